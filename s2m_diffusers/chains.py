"""The chains of S2M sampling (spec §5b): enter by importance resampling a pool, adapt during burn-in, then sample.

[`sample_chains`] is the one driver. It sees ``evaluate(z) -> (x, log_w[, readings])`` and a latent density ``q``
(``sample(n, generator)``, ``log_prior_ratio(z) = log p_z(z) - log q(z)``), never a model:

1. **Entry.** A pool of draws of ``q`` (at least ``pool_size``, in batches until it holds an on-target draw per
   starting point and the importance ratios of its draws have an effective sample size of ``pool_ess``, or it has
   drawn what the chains will cost) is importance-resampled (systematic resampling by ``r = w p_z / q``) to the
   chains' starting points, at a tempered weight ``w^g`` where ``r`` rests on few of the on-target draws
   (`s2m_diffusers.anneal`). Chains are started in pairs from one point (superchains, for
   [`diagnostics.nested_rhat`]).
2. **Burn-in.** ``burn_in`` steps of the kernel, the chains adapting their common step size towards
   ``target_acceptance`` (Robbins-Monro on the log step, with the mean acceptance probability itself, not the coin;
   one step for all chains, so that no chain's kernel depends on its own state; the step kept is the average over
   the burn-in's second half); the thinning is then set from the acceptance rate (its posterior median) so that a
   chain has moved between two of its images with probability 0.95. Chains started at ``g < 1`` are reweighted and
   resampled every `anneal.ANNEAL_EVERY` steps until ``g = 1``.
3. **Sampling.** The step sizes and the thinning are frozen: each chain is an exact Metropolis-Hastings chain for
   ``pi(z) ∝ p_z(z) w(G(z))`` and returns its state every ``thinning`` steps, ``samples_per_chain`` times, the first
   at the end of the burn-in.

Each step is a mixture kernel (`s2m_diffusers.kernels`): a local move (pCN, or MALA) and, with probability
``jump_rate`` per chain, an independent draw from ``q`` (so that chains can jump between modes; ``kernel=
"independent"`` makes every move one). A diffusion proposal can be screened (delayed acceptance,
`s2m_diffusers.screen`). The chains' ``log w`` and readings at every step after the burn-in feed the diagnostics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import anneal, diagnostics, kernels, ladder
from .results import SamplerStats
from .screen import Screen, count, prepare_screen, screened_pool_batch, unpack

__all__ = [
    "ChainState",
    "Pool",
    "chains_per_start",
    "pool_on_target",
    "draw_pool",
    "start_chains",
    "thinning_for",
    "sample_chains",
]

# Two images of one chain are this many steps apart that the chain has moved in between with probability 0.95.
STUCK_SHARE = 0.05
MAX_THINNING = 20
# Step sizes stay in [MIN_STEP, 1] (pCN's b = 1 is an independent draw from the prior).
MIN_STEP = 1e-3
# The pool also stops, once it holds at least as many on-target draws as the chains have starting points, when it has
# drawn this many times what the chains are expected to cost (`None`: only its ESS stops it), so that a small call's
# entry costs no more than its chains. A rare target that has not that many on-target draws by then draws on (or
# climbs its stages, `ladder`): one on-target draw is not enough (on Shapes k = 6 a stop at the first one started 50
# chains from it, evaluator accuracy 0 on 3 of 3 calls).
POOL_BALANCE = 1.0
# The pool holds an on-target draw per starting point of the chains, up to this many: the chains start annealed from
# them (`anneal`), and a large call's pool would otherwise grow with its chains (1,000 samples of the analytic toy's
# `A & B & C`, 1% of the prior, 125 pairs of chains: 20.2 calls per sample against 8.8 before the rule; 64 images
# start 8 pairs, 16 images 2).
MAX_ON_TARGET = 16
# The Robbins-Monro gain of the step-size adaptation at burn-in step t: ADAPT_GAIN / sqrt(t + 1).
ADAPT_GAIN = 1.5


@dataclass
class ChainState:
    """A batch of chain states (or of proposals): latents `(C, ...)`, images `(C, ...)`, ``log w`` and the importance
    ratio ``log r = log w + log p_z - log q`` `(C,)` (float64, CPU), the heads' readings `(C, m)`, and where a kernel
    needs them, the gradient of ``log w`` (MALA) and the screen's floored surrogate ``log w_s``."""

    z: torch.Tensor
    x: Any
    log_w: torch.Tensor
    log_ratio: torch.Tensor
    readings: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    log_w_s: torch.Tensor | None = None

    def replace_where(self, accept: torch.Tensor, new: ChainState) -> None:
        """Move the chains where ``accept`` to ``new``'s states, in place."""
        for name in _FIELDS:
            mine, other = getattr(self, name), getattr(new, name)
            if mine is not None and other is not None:
                mask = accept.to(mine.device).reshape(-1, *([1] * (mine.ndim - 1)))
                setattr(self, name, torch.where(mask, other.to(mine.device, mine.dtype), mine))

    def take(self, rows: torch.Tensor) -> None:
        """Make chain ``i`` a copy of chain ``rows[i]``, in place (a resampling of the chains)."""
        for name in _FIELDS:
            mine = getattr(self, name)
            if mine is not None:
                setattr(self, name, mine[rows.to(mine.device)].clone())

    def put(self, rows: torch.Tensor, new: ChainState) -> None:
        """Write ``new``'s states into the chains ``rows``, in place."""
        for name in _FIELDS:
            mine, other = getattr(self, name), getattr(new, name)
            if mine is not None and other is not None:
                mine[rows.to(mine.device)] = other.to(mine.device, mine.dtype)


_FIELDS = ("z", "x", "log_w", "log_ratio", "readings", "grad", "log_w_s")


@dataclass
class Pool:
    """The entry pool: every draw's latent, log importance ratio (``log r``, plus ``-log P(finished)`` for a screened
    draw: its weight as a start) and readings, the surrogate ``log w_s`` and ``log P(finished)`` of a screened pool;
    the images of the on-target draws only (the only ones a chain can start from)."""

    z: torch.Tensor
    log_ratio: torch.Tensor
    readings: torch.Tensor | None
    on_target: dict[int, Any]  # index -> image
    log_w: torch.Tensor
    log_w_s: torch.Tensor | None = None
    proposals: int = 0
    log_finish: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    climbed: dict | None = None  # the ladder's record where the pool climbed the target's stages (`ladder`)

    @property
    def num_on_target(self) -> int:
        return int(torch.isfinite(self.log_ratio).sum())

    @property
    def ess(self) -> float:
        """The effective sample size of the pool's importance ratios (0 when no draw is on the target); for a pool
        that climbed, the least ESS of its stages' reweighting (its particles are equally weighted but not
        independent)."""
        if self.climbed is not None:
            return min(stage["ess"] for stage in self.climbed["stages"])
        return ladder.ess(self.log_ratio)

    @property
    def log_ratio_without_w(self) -> torch.Tensor:
        """Each draw's ratio without the heads' weight: ``log p_z - log q`` (and a screened draw's
        ``-log P(finished)``) on the target, ``-inf`` off it."""
        return torch.where(torch.isfinite(self.log_ratio), self.log_ratio - self.log_w, self.log_ratio)

    @property
    def on_target_ess(self) -> float:
        """The effective number of the pool's on-target draws: the ESS of [`log_ratio_without_w`]: their number for
        a pool drawn from the prior."""
        return ladder.ess(self.log_ratio_without_w)

    @classmethod
    def from_particles(cls, particles: ladder.Particles, proposals: int) -> Pool:
        """The pool of a climb: equally weighted as starts (``log_ratio`` 0), each chain keeping its own ratio
        ``log w + log p_z - log q`` (held in ``log_finish``, which `start_chains` adds)."""
        log_w = particles.stage_log_w[:, -1]
        n = log_w.shape[0]
        return cls(
            particles.z,
            torch.zeros(n, dtype=torch.float64),
            particles.readings,
            {i: particles.x[i] for i in range(n)},
            log_w,
            proposals=proposals,
            log_finish=log_w + particles.log_prior_ratio,
            climbed=particles.record,
        )


def _cat(a, b):
    return b if a is None else torch.cat([a, b])


def can_climb(evaluate, config, screen: Screen | None) -> bool:
    """Whether the entry may climb the target's stages (`s2m_diffusers.ladder`): ``entry`` is not ``"pool"``, the
    call is not screened and ``evaluate`` offers ``refinements`` of more than one stage."""
    return (
        config.entry != "pool"
        and screen is None
        and callable(getattr(evaluate, "refinements", None))
        and int(getattr(evaluate, "num_stages", 1)) > 1
    )


def ladder_particles(config, starts: int) -> int:
    """The ladder's particles: four per starting point, at least ``pool_size``."""
    return max(config.pool_size, 4 * starts)


def draw_pool(
    evaluate,
    q,
    config,
    generator,
    stats,
    budget: float | None,
    screen: Screen | None = None,
    starts: int = 1,
    enough: float | None = None,
) -> Pool:
    """Draws of ``q`` in batches of ``pool_batch`` until at least ``pool_size`` are drawn, they hold an on-target
    draw per starting point (``starts``, at most `MAX_ON_TARGET`; [`Pool.on_target_ess`]: their effective number),
    and their importance ratios have an effective sample size of ``pool_ess`` or ``enough`` are drawn (what the
    chains will cost); or until ``budget`` proposals are spent. With a ``screen`` each batch is screened
    ([`screen.screened_pool_batch`]). Where the entry may climb ([`can_climb`]), each batch is read on every stage of
    the target, and the pool climbs them instead of drawing on (`s2m_diffusers.ladder`) with ``entry="ladder"``, or
    with ``"auto"`` where [`ladder.climb_pays`]; a climb moves on from a stage once its particles reach the next with
    an ESS of ``pool_ess``, or of the square root of the number of ``starts`` where that is more."""
    size, ess = config.pool_size, config.pool_ess
    climb_ess = max(config.pool_ess, math.sqrt(starts))  # what each stage of a climb reaches the next with
    batch = config.pool_batch or size
    pool = Pool(torch.zeros(0), torch.zeros(0, dtype=torch.float64), None, {}, torch.zeros(0, dtype=torch.float64))
    zs, stage_log_w, corrections = [], [], []
    climbing = can_climb(evaluate, config, screen)
    particles = ladder_particles(config, starts)
    while True:  # until the pool is done (its size and ESS), the budget is spent, or it climbs
        n = batch if budget is None else min(batch, math.floor(budget - stats.cost + 1e-9))
        if n <= 0:
            break
        z = q.sample(n, generator=generator)
        correction = q.log_prior_ratio(z).detach().double().cpu()
        if screen is not None:
            keep, x, log_w, readings, log_w_s, log_p = screened_pool_batch(evaluate, z, screen, generator, stats)
        else:
            t0 = time.perf_counter()
            if climbing:
                x, stages, readings = evaluate.refinements(z)
                stages = stages.detach().double().cpu()
                readings = None if readings is None else readings.detach().double().cpu()
                log_w = stages[:, -1]
                stage_log_w.append(stages)
                corrections.append(correction)
            else:
                x, log_w, readings = unpack(evaluate(z))
            stats.seconds_evaluate += time.perf_counter() - t0
            count(stats, n, evaluate)
            keep, log_w_s, log_p = torch.arange(n), None, torch.zeros(n, dtype=torch.float64)
        offset = sum(v.shape[0] for v in zs)
        log_ratio = log_w + correction[keep] - log_p
        for i in torch.isfinite(log_ratio).nonzero().flatten().tolist():
            pool.on_target[offset + i] = x[i]
        zs.append(z[keep.to(z.device)])
        pool.log_ratio = torch.cat([pool.log_ratio, log_ratio])
        pool.log_w = torch.cat([pool.log_w, log_w])
        pool.log_finish = torch.cat([pool.log_finish, log_p])
        pool.readings = readings if pool.readings is None else torch.cat([pool.readings, readings])
        if log_w_s is not None:
            pool.log_w_s = _cat(pool.log_w_s, log_w_s)
        pool.proposals += n
        more = (  # the ESS once per batch: it reads every draw
            pool.proposals < size
            or pool.on_target_ess < min(starts, MAX_ON_TARGET)
            or (pool.ess < ess and not (enough is not None and pool.proposals >= enough))
        )
        if climbing and (config.entry == "ladder" or more):
            levels = int(evaluate.num_stages)
            if config.entry == "ladder" or ladder.climb_pays(pool.proposals, particles, levels):
                drawn = ladder.Particles(
                    torch.cat(zs), None, torch.cat(stage_log_w), pool.readings, torch.cat(corrections)
                )
                spent = stats.proposals
                climbed = _climb(
                    evaluate, q, config, generator, stats, budget, particles, drawn, pool.proposals, climb_ess
                )
                if climbed is not None:
                    return climbed
                pool.proposals += stats.proposals - spent
                climbing = False  # a stage kept no particle, or the budget ran out: draw on
        if not more:
            break
    pool.z = torch.cat(zs) if zs else torch.zeros(0)
    return pool


def _climb(evaluate, q, config, generator, stats, budget, particles, drawn, proposals, ess) -> Pool | None:
    """The pool's ``drawn`` draws climb the target's stages (`ladder.climb`); the pool of the particles on the
    target, or `None`."""

    def affordable(n: int) -> bool:
        return budget is None or stats.cost + n <= budget + 1e-9

    before = stats.proposals
    frozen = getattr(evaluate, "frozen", None)
    out = ladder.climb(evaluate, q, drawn, particles, generator, stats, config.initial_step, frozen, affordable, ess)
    if out is None:
        return None
    out.record["drawn"] = proposals
    return Pool.from_particles(out, proposals + stats.proposals - before)


def start_chains(
    pool: Pool, num_chains: int, per_start: int, generator, temperature: float = 1.0
) -> tuple[ChainState, torch.Tensor]:
    """The chains' starting states: ``num_chains / per_start`` points resampled from the pool by their importance
    ratios, the heads' weight in them raised to ``temperature`` (`s2m_diffusers.anneal`), each shared by
    ``per_start`` chains (a superchain); the states hold the tempered weights. Returns the states and each chain's
    superchain."""
    tempering = anneal.tempered(pool.log_w, temperature - 1.0)
    rows = anneal.resample_pairs(pool.log_ratio + tempering, num_chains, per_start, generator)
    z = pool.z[rows.to(pool.z.device)].clone()
    x = torch.stack([pool.on_target[int(i)] for i in rows])
    readings = None if pool.readings is None else pool.readings[rows]
    log_w_s = None if pool.log_w_s is None else pool.log_w_s[rows]
    # A state's own log r, without the screened pool's -log P(finished): that weighs a draw as a start, and would
    # otherwise stay in the acceptance of the chain's first independent move (a jump away from a start the surrogate
    # underrates would be accepted P(finished) times as often as it should).
    log_ratio = pool.log_ratio[rows] + pool.log_finish[rows] + tempering[rows]
    log_w = anneal.tempered(pool.log_w[rows], temperature)
    log_w_s = None if log_w_s is None else anneal.tempered(log_w_s, temperature)
    state = ChainState(z, x, log_w, log_ratio, readings, None, log_w_s)
    return state, torch.arange(num_chains // per_start).repeat_interleave(per_start)


def acceptance_estimate(alpha: torch.Tensor, level: float = 0.5) -> float:
    """The acceptance rate the thinning is set from, from the burn-in's acceptance probabilities ``alpha``: the
    ``level`` quantile of ``Beta(1 + sum alpha, 1 + n - sum alpha)`` (the posterior median by default, under a uniform
    prior, which keeps a few values from an extreme: 2 chains give 10). Measured on Digits-7to3's GAN (7 targets x 2
    seeds): distinct images 0.96 / 0.95 / 0.90 at 64 / 16 / 8 images for 9.7 / 13.9 / 21.4 calls per image; the 25%
    quantile gave 0.97 / 0.96 / 0.96 for 10.2 / 15.1 / 23.3."""
    from scipy.stats import beta

    total, n = float(alpha.double().sum()), alpha.numel()
    return float(beta.ppf(level, 1.0 + total, 1.0 + n - total))


def thinning_for(acceptance: float, stuck_share: float = STUCK_SHARE, most: int = MAX_THINNING) -> int:
    """The fewest steps after which a chain accepting at this rate has moved with probability ``1 - stuck_share``."""
    if acceptance >= 1.0:
        return 1
    if acceptance <= 0.0:
        return most
    return max(1, min(most, math.ceil(math.log(stuck_share) / math.log1p(-acceptance) - 1e-9)))


def _propose(evaluate, q, state: ChainState, step, jump, kernel, generator, frozen) -> torch.Tensor:
    """One round's proposed latents: a local move for each chain, an independent draw of ``q`` where ``jump``."""
    if kernel == "mala":
        local = kernels.mala_propose(state.z, state.grad, step, generator, frozen)
    else:
        local = kernels.pcn_propose(state.z, step, generator, frozen)
    if not bool(jump.any()):
        return local
    drawn = q.sample(state.z.shape[0], generator=generator).to(local.device, local.dtype)
    return torch.where(jump.to(local.device).reshape(-1, *([1] * (local.ndim - 1))), drawn, local)


def _weigh(evaluate, q, z, kernel, stats) -> ChainState:
    """Proposals through ``evaluate`` (with the gradient for MALA), counted."""
    t0 = time.perf_counter()
    grad = None
    if kernel == "mala":
        x, log_w, readings, grad = evaluate.value_and_grad(z)
        log_w = log_w.detach().double().cpu()
        readings = None if readings is None else readings.detach().double().cpu()
    else:
        x, log_w, readings = unpack(evaluate(z))
    stats.seconds_evaluate += time.perf_counter() - t0
    count(stats, z.shape[0], evaluate)
    log_ratio = log_w + q.log_prior_ratio(z).detach().double().cpu()
    return ChainState(z, x, log_w, log_ratio, readings, grad)


def _log_alpha(state: ChainState, new: ChainState, jump, kernel, step, frozen) -> torch.Tensor:
    """The log acceptance ratio of each chain's proposal: the independent kernel's where ``jump``, else the local
    one."""
    independent = kernels.log_alpha_independent(state.log_ratio, new.log_ratio)
    if kernel == "mala":
        local = kernels.log_alpha_mala(state.z, state.log_w, state.grad, new.z, new.log_w, new.grad, step, frozen)
    else:
        local = kernels.log_alpha_pcn(state.log_w, new.log_w)
    return torch.where(jump, independent, local.cpu())


def step_chains(evaluate, q, state: ChainState, step, config, generator, stats, screen: Screen | None, frozen):
    """One Metropolis-Hastings step of every chain, in place; returns (accepted `(C,)`, acceptance probabilities
    `(C,)`, jumped `(C,)`)."""
    c = state.z.shape[0]
    kernel = config.kernel
    if kernel == "independent":
        jump = torch.ones(c, dtype=torch.bool)
    else:
        device = generator.device if generator is not None else "cpu"
        jump = (torch.rand(c, generator=generator, device=device, dtype=torch.float64) < config.jump_rate).cpu()
    z_new = _propose(evaluate, q, state, step, jump, kernel, generator, frozen)
    if screen is not None:
        accept, alpha = screen.move(evaluate, q, state, z_new, jump, generator, stats)
        return accept, alpha, jump
    new = _weigh(evaluate, q, z_new, kernel, stats)
    log_alpha = _log_alpha(state, new, jump, kernel, step, frozen)
    accept = kernels.mh_accept(log_alpha, generator).cpu()
    state.replace_where(accept, new)
    return accept, torch.clamp(log_alpha, max=0.0).exp(), jump


def adapt(log_step: torch.Tensor, alpha: torch.Tensor, local: torch.Tensor, t: int, target: float) -> torch.Tensor:
    """One Robbins-Monro update of the chains' common log step size towards the target acceptance, from the mean
    acceptance probability of the chains that made a local move this step: ``log b += gain_t (mean alpha - target)``.

    One step size for all chains, not one per chain: a chain's own acceptances depend on where it is, so a step
    adapted to them makes its kernel depend on its state, and a chain started from the target does not stay on it
    (on the analytic toy's `A & C & ~B`, 150 calls of 100 one-image chains after a 10-step burn-in: p 4e-6 and 6e-6
    against the exact target with per-chain steps, 0.56 and 0.81 with the common step)."""
    gain = ADAPT_GAIN / math.sqrt(t + 1)
    if not bool(local.any()):
        return log_step
    mean = float(alpha.double()[local].mean())
    return (log_step + gain * (mean - target)).clamp(math.log(MIN_STEP), 0.0)


def frozen_steps(late: list[torch.Tensor], last: torch.Tensor) -> torch.Tensor:
    """The log step size the chains keep after the burn-in: the mean over the second half of the burn-in (Polyak
    averaging: the last iterate of a few Robbins-Monro steps is noisy)."""
    return torch.stack(late).mean(0) if late else last


@dataclass
class _Run:
    """One run's context, shared by its phases: what it evaluates, its settings and randomness, what it counts, and
    its record (``stats.chains``)."""

    evaluate: Any
    q: Any
    config: Any
    generator: torch.Generator | None
    budget: float | None
    callback: Callable | None
    stats: SamplerStats = field(default_factory=SamplerStats)
    screen: Screen | None = None
    record: dict = field(default_factory=dict)
    rounds: int = 0
    temperature: float = 1.0  # the power of the heads' weight the chains move under (`anneal`)

    @property
    def moving(self):
        """``evaluate`` at the chains' temperature."""
        return self.evaluate if self.temperature >= 1.0 else anneal.Tempered(self.evaluate, self.temperature)

    def step(self, state: ChainState, step: torch.Tensor):
        """One step of every chain (`step_chains`), counted as a round."""
        self.rounds += 1
        frozen = getattr(self.evaluate, "frozen", None)
        return step_chains(
            self.moving, self.q, state, step, self.config, self.generator, self.stats, self.screen, frozen
        )

    def affordable(self, num_chains: int) -> bool:
        """Whether the budget holds one more round of ``num_chains`` proposals at the most they can cost."""
        worst = num_chains * (self.screen.worst_cost if self.screen is not None else 1.0)
        if self.budget is None or self.stats.cost + worst <= self.budget + 1e-9:
            return True
        self.stats.budget_exhausted = True
        return False

    def stop(self, phase: str, done: int = 0) -> bool:
        """Tell the callback where the run is; `True` when it asks to stop."""
        return self.callback is not None and bool(self.callback(self.rounds, {"phase": phase, "done": done}))

    def phase(self, name: str) -> None:
        """Tell ``evaluate`` the phase (``set_phase``, where it has one: the pipeline's `callback_on_step_end`)."""
        set_phase = getattr(self.evaluate, "set_phase", None)
        if callable(set_phase):
            set_phase(name)


def chains_per_start(num_chains: int) -> int:
    """The chains started from one point: pairs (superchains, for `diagnostics.nested_rhat`) from 4 chains on."""
    return 2 if num_chains >= 4 else 1


def pool_on_target(num_chains: int) -> int:
    """The on-target draws the entry pool holds before it stops: one per starting point of ``num_chains`` chains, at
    most `MAX_ON_TARGET` (their images are kept until the chains start: `s2m_diffusers.memory` counts them)."""
    return min(num_chains // chains_per_start(num_chains), MAX_ON_TARGET)


def _layout(num_samples: int, config) -> tuple[int, int, int]:
    """The chains, the chains per start (pairs from 4 chains on: superchains) and the images per chain."""
    per_chain = min(config.samples_per_chain, num_samples)
    num_chains = config.num_chains or max(min(2, num_samples), math.ceil(num_samples / per_chain))
    per_start = chains_per_start(num_chains)
    num_chains = per_start * math.ceil(num_chains / per_start)
    return num_chains, per_start, math.ceil(num_samples / num_chains)


def chains_cost(config, num_chains: int, per_chain: int) -> float:
    """What the chains are expected to cost before the burn-in has set the thinning: their burn-in and sampling
    steps at the thinning of a chain accepting at ``target_acceptance``."""
    thinning = config.thinning or thinning_for(config.target_acceptance)
    return num_chains * (config.burn_in + (per_chain - 1) * thinning)


def _enter(run: _Run, num_chains: int, per_start: int, per_chain: int):
    """The entry: the pool, and the chains' starting states and superchains (`None` when no draw is on the target or
    the callback stops the run)."""
    run.phase("pool")
    starts = num_chains // per_start
    enough = None if POOL_BALANCE is None else POOL_BALANCE * chains_cost(run.config, num_chains, per_chain)
    pool = draw_pool(run.evaluate, run.q, run.config, run.generator, run.stats, run.budget, run.screen, starts, enough)
    run.record["pool"] = {"proposals": pool.proposals, "on_target": pool.num_on_target, "ess": pool.ess}
    if pool.climbed is not None:
        run.record["pool"]["climbed"] = pool.climbed
    if run.stop("pool") or not pool.num_on_target:
        run.stats.budget_exhausted = not pool.num_on_target
        return pool, None, None
    if run.screen is not None:
        run.screen.calibrate(pool)  # the surrogate's floor, from the pool's on-target draws
        if not run.screen.active:
            run.record["screen"], run.screen = run.screen.report(), None
    if pool.climbed is None and anneal.checkpoints(run.config.burn_in):  # a climb's particles start as they are
        run.temperature = anneal.start_temperature(
            pool.log_w, pool.log_ratio_without_w, pool.on_target_ess, num_chains // per_start
        )
    run.record["temperatures"] = [run.temperature]
    state, superchains = start_chains(pool, num_chains, per_start, run.generator, run.temperature)
    # how many distinct points the chains start from: a call's images are about as varied as these and their moves
    run.record["distinct_starts"] = int(torch.unique(state.z.reshape(num_chains, -1), dim=0).shape[0])
    if run.config.kernel == "mala":  # the starting states' gradients: one more evaluation of the starts
        state = _weigh(run.moving, run.q, state.z, "mala", run.stats)
    return pool, state, superchains


def _reweigh(run: _Run, state: ChainState, per_start: int, last: bool) -> None:
    """One reweighting of the annealed chains (`s2m_diffusers.anneal`): to the next temperature (to 1 where
    ``last``), the chains resampled in superchains, in place."""
    g = run.temperature
    log_w = anneal.tempered(state.log_w, 1.0 / g)  # the heads' weight itself
    g_new = 1.0 if last else anneal.next_temperature(log_w, g)
    rows = anneal.resample_pairs(anneal.tempered(log_w, g_new - g), log_w.numel(), per_start, run.generator)
    state.take(rows)
    anneal.retemper(state, g, g_new, run.screen.log_floor if run.screen is not None else None)
    run.temperature = g_new
    run.record["temperatures"].append(g_new)
    if g_new >= 1.0:  # the points the chains set out from at the target itself
        run.record["distinct_starts"] = int(torch.unique(rows).numel())


def _burn_in(run: _Run, state: ChainState, per_start: int) -> tuple[torch.Tensor, int] | None:
    """``burn_in`` steps adapting the chains' common step size, and raising their temperature to 1 where they started
    below it (`s2m_diffusers.anneal`); the step sizes and the thinning the chains keep (`None` when the budget or
    the callback stops the run)."""
    config, c = run.config, state.z.shape[0]
    run.phase("burn_in")
    log_step = torch.full((c,), math.log(config.initial_step), dtype=torch.float64)
    late_alpha, late_steps = [], []
    marks = anneal.checkpoints(config.burn_in)
    for t in range(config.burn_in):
        if not run.affordable(c):
            return None
        _, alpha, jump = run.step(state, log_step.exp())
        log_step = adapt(log_step, alpha, ~jump, t, config.target_acceptance)
        if t >= config.burn_in // 2:
            late_alpha.append(alpha)
            late_steps.append(log_step)
        if run.temperature < 1.0 and t + 1 in marks:  # the step size is common: resampling leaves it
            _reweigh(run, state, per_start, last=t + 1 == marks[-1])
        if run.stop("burn_in"):
            return None
    if run.screen is not None:  # "auto" keeps the screen only where the burn-in's steps saved with it
        run.screen.end_burn_in()
        run.record["screen"] = run.screen.report()
        run.screen = run.screen if run.screen.active else None
    rate = float(torch.cat(late_alpha).mean()) if late_alpha else config.target_acceptance
    estimate = acceptance_estimate(torch.cat(late_alpha)) if late_alpha else config.target_acceptance
    thinning = config.thinning or thinning_for(estimate)
    step = frozen_steps(late_steps, log_step).exp()
    run.record.update(thinning=thinning, burn_in_acceptance=rate, step_size=_summary(step))
    return step, thinning


def _sample(run: _Run, state: ChainState, step: torch.Tensor, thinning: int, per_chain: int, num_samples: int):
    """The exact Metropolis-Hastings chains: every chain's state every ``thinning`` steps, ``per_chain`` times (the
    first at the end of the burn-in), and every step's ``log w`` and readings for the diagnostics."""
    run.phase("sampling")
    c = state.z.shape[0]
    # copies: a screened move writes the chains' states in place (`ChainState.put`)
    taken, trace_w, trace_r = [_snapshot(state)], [state.log_w.clone()], [_copy(state.readings)]
    accepted = moves = jumps = 0
    for t in range(1, (per_chain - 1) * thinning + 1):
        if not run.affordable(c):
            break
        accept, _, jump = run.step(state, step)
        accepted, moves, jumps = accepted + int(accept.sum()), moves + c, jumps + int(jump.sum())
        trace_w.append(state.log_w.clone())
        trace_r.append(_copy(state.readings))
        if t % thinning == 0:
            taken.append(_snapshot(state))
        if run.stop("sampling", min(num_samples, len(taken) * c)):
            break
    run.stats.accepted = accepted
    run.record.update(moves=moves, acceptance=accepted / moves if moves else None)
    run.record["jump_share"] = jumps / moves if moves else None
    traces = {"log_w": torch.stack(trace_w, 1)}
    if all(r is not None for r in trace_r):
        traces["readings"] = torch.stack(trace_r, 1)  # (C, T, m)
    out = {
        name: torch.cat([getattr(s, name) for s in taken])[:num_samples]
        for name in ("z", "x", "log_w", "readings")
        if all(getattr(s, name) is not None for s in taken)
    }
    out["chain"] = torch.arange(c).repeat(len(taken))[:num_samples]
    return out, traces


def sample_chains(
    evaluate,
    q,
    num_samples: int,
    config,
    *,
    max_proposals: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
):
    """Run the chains and return their images (module docstring): the entry, the burn-in, the sampling. See
    `s2m_diffusers.sampling.sample_s2m`.

    Returns:
        (`dict` of the returned states ``z``, ``x``, ``log_w``, ``readings``, ``chain``, or `None` when no image was
        made; the pool; the traces with the chains' superchains; the run's record; its `SamplerStats`), which
        `sampling.sample_s2m` assembles into a `SampleResult`.
    """
    if config.kernel == "mala" and not callable(getattr(evaluate, "value_and_grad", None)):
        raise ValueError(
            "kernel='mala' needs an evaluate function with value_and_grad (the gradient of log w: a GAN and heads "
            "that are differentiable); use kernel='pcn', which needs no gradient."
        )
    num_chains, per_start, per_chain = _layout(num_samples, config)
    run = _Run(evaluate, q, config, generator, max_proposals, callback)
    run.screen, screen_record = prepare_screen(evaluate, config)
    run.record.update(num_chains=num_chains, samples_per_chain=per_chain, kernel=config.kernel, screen=screen_record)
    pool, state, superchains = _enter(run, num_chains, per_start, per_chain)
    frozen = None if state is None else _burn_in(run, state, per_start)
    out = traces = None
    if frozen is not None:
        out, traces = _sample(run, state, *frozen, per_chain, num_samples)
        traces.update(superchains=superchains, per_start=per_start)
        if run.screen is not None:
            run.record["screen"] = run.screen.report()
    run.stats.rounds = run.rounds
    return out, pool, traces, run.record, run.stats


def _copy(values: torch.Tensor | None) -> torch.Tensor | None:
    return None if values is None else values.clone()


def _snapshot(state: ChainState) -> ChainState:
    return ChainState(
        state.z.clone(), state.x.clone(), state.log_w.clone(), state.log_ratio.clone(), _copy(state.readings)
    )


def _summary(values: torch.Tensor) -> dict:
    v = values.double()
    return {"min": float(v.min()), "median": float(v.median()), "max": float(v.max())}


def chain_diagnostics(traces: dict, returned_readings, returned_log_w, chain_ids, pool: Pool, names) -> dict:
    """R-hat, ESS and the reading check of a run (`s2m_diffusers.diagnostics`), with the warnings they call for."""
    log_w = traces["log_w"]  # (C, T)
    columns = {"log_w": log_w}
    if "readings" in traces:
        for j, name in enumerate(names):
            columns[f"ratio[{name}]"] = traces["readings"][:, :, j]
    per_start = traces["per_start"]
    out: dict[str, Any] = {"draws_per_chain": int(log_w.shape[1]), "chains": int(log_w.shape[0])}
    superchains = int(len(set(traces["superchains"].tolist())))
    threshold = diagnostics.nested_rhat_threshold(per_start)
    rhat, ess, nested, chance = {}, {}, {}, {}
    for key, draws in columns.items():
        rhat[key] = diagnostics.split_rhat(draws)
        ess[key] = diagnostics.ess_bulk(draws)
        nested[key] = diagnostics.nested_rhat(draws, traces["superchains"]) if per_start > 1 else math.nan
        # what stationary chains of this length exceed 1% of the time: their effective draws from how fast each
        # chain forgets around its own mean
        effective = draws.shape[1] / diagnostics.draws_per_effective_draw(draws)
        chance[key] = diagnostics.nested_rhat_chance(superchains, per_start, draws_per_chain=effective)
    out.update(split_rhat=rhat, ess_bulk=ess, nested_rhat=nested)
    out.update(nested_rhat_threshold=threshold, nested_rhat_chance=chance, superchains=superchains)
    warnings = []
    finite_ess = [v for v in ess.values() if math.isfinite(v)]
    long_enough = finite_ess and min(finite_ess) / (2 * log_w.shape[0]) >= diagnostics.MIN_ESS_PER_SPLIT_CHAIN
    out["rhat_used"] = "split_rhat" if long_enough else "nested_rhat"
    stuck = []
    for key in columns:
        if long_enough and rhat[key] > diagnostics.RHAT_THRESHOLD:
            warnings.append(f"split-R-hat of {key} is {rhat[key]:.3f} (> {diagnostics.RHAT_THRESHOLD})")
        elif not long_enough and nested[key] > max(threshold, chance[key]):
            stuck.append(f"{key} {nested[key]:.3f} (> {max(threshold, chance[key]):.3f})")
    if stuck:
        warnings.append(
            f"nested R-hat of {', '.join(stuck)} is above the authors' threshold and above what chains of this "
            f"length that have forgotten their starting points reach 1% of the time with {superchains} pairs: the "
            "chains have not forgotten their starting points, so this call's images are about as varied as those "
            "points (stats['chains']['distinct_starts']). More images per call start more chains; a larger entry "
            "pool (pool_ess) starts them from more points"
        )
    checks = {}
    if returned_log_w is not None and returned_log_w.numel() >= 2:
        values = {"log_w": (returned_log_w, pool.log_w)}
        if returned_readings is not None and pool.readings is not None:
            for j, name in enumerate(names):
                values[f"ratio[{name}]"] = (returned_readings[:, j], pool.readings[:, j])
        superchain_ids = traces["superchains"].cpu()[chain_ids.cpu()]
        judged = pool.ess >= diagnostics.READING_CHECK_MIN_POOL_ESS
        n_effs = {}
        for key, (mine, theirs) in values.items():
            # images of one pair of chains (started from one point) count as one where they are as alike as that
            n_effs[key] = min(_returned_ess(mine, chain_ids), diagnostics.cluster_ess(mine, superchain_ids))
            checks[key] = diagnostics.reading_check(mine, n_effs[key], theirs, pool.log_ratio)
            z = checks[key]["z"]
            if judged and math.isfinite(z) and z > diagnostics.READING_CHECK_SE:
                warnings.append(
                    f"the returned images' mean {key} {checks[key]['mean']:.3g} is {z:.1f} standard errors from the "
                    f"pool's importance-weighted estimate {checks[key]['estimate']:.3g}"
                )
        out["returned_ess"] = min(n_effs.values())
        out["returned_ess_by_reading"] = n_effs
        out["reading_check_judged"] = judged
    out["reading_check"] = checks
    out["warnings"] = warnings
    return out


def _returned_ess(values: torch.Tensor, chain_ids: torch.Tensor) -> float:
    """The effective number of the returned images as draws of their chains: their bulk-ESS across chains where every
    chain returned as many (at least 4), else their number (correlation unseen). `chain_diagnostics` also counts
    the images of one superchain as alike as they are (`diagnostics.cluster_ess`) and keeps the smaller."""
    ids = chain_ids.cpu()
    counts = torch.bincount(ids)
    counts = counts[counts > 0]
    n = values.numel()
    if counts.numel() < 2 or int(counts.min()) != int(counts.max()) or int(counts[0]) < 4:
        return float(n)
    per = int(counts[0])
    draws = values.double().cpu()[torch.argsort(ids, stable=True)].reshape(-1, per)  # (chains, images), in order
    ess = diagnostics.ess_bulk(draws)
    return float(min(n, ess)) if math.isfinite(ess) else float(n)
