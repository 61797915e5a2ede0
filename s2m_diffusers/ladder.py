"""The entry of a rare target one refinement at a time (spec §5b): a sequential Monte Carlo sampler over the target's
stages.

A target that few prior draws reach makes the entry pool of `s2m_diffusers.chains` expensive: it draws until its
importance ratios have the effective sample size the chains need, about ``ess / share`` draws. The target's stages
(`targets.Target.stages`: ``a``, ``a & b``, ``a & b & ~c``, one literal more at a time) are each reached from the
one before far more often than the whole target from the prior, so particles can climb them (an SMC sampler, Del
Moral, Doucet and Jasra 2006; what subset simulation, Au and Beck 2001, does for rare events): at each stage ``j``
the particles are

1. **reweighted** by ``w_j / w_{j-1}`` (the draws of ``q`` by ``w_1 p_z / q``),
2. **resampled** (systematic resampling) to ``particles`` equally weighted ones,
3. **moved** by ``LADDER_MOVES`` pCN steps that leave ``pi_j(z) ∝ N(z; 0, I) w_j(G(z))`` invariant, so that the
   copies of one particle part; until the particles of the stage's rounds together reach the next stage with the
   effective sample size the pool would need, they move again (at most ``MAX_ROUNDS`` rounds; each round's particles
   are a sample of the stage, so their union is reweighted; a stage none reaches ends the climb, and the pool is
   drawn on).

After the last stage the particles are an equally weighted sample of the full target (consistent as they grow, not
exact), from which the chains start; the chains themselves stay exact Metropolis-Hastings chains whatever their
starts, so the ladder changes where a call begins, never what it samples. Its cost is ``particles x moves x stages``
calls at the least (more where a stage needs more rounds) against the pool's ``ess / share``: with
`S2MSamplingConfig.entry` ``"auto"`` the pool climbs once it has drawn twice the ladder's least cost
([`climb_pays`]).

The functions see an ``evaluate`` with ``refinements(z) -> (x, stage log w (B, L), readings)`` (the stages' ``log w``
in one pass of the generator and the heads; the last column is the target's) and ``q``, never a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import kernels
from .screen import count

__all__ = [
    "LADDER_MOVES",
    "Particles",
    "stages_of",
    "systematic_resample",
    "ess",
    "ladder_cost",
    "climb_pays",
    "climb",
]

# pCN moves of every particle in a round at a stage: on Shapes at k = 6 (6 seeds, 200 images), 3 moves gave a mean
# accuracy of 0.85 for 89 calls per image, 6 moves 0.95 for 98 (climbing after the same 7,200 draws).
LADDER_MOVES = 6
# "auto" climbs once the pool has drawn this many times the fewest calls of a climb: the particles are less
# independent than the pool's draws (on Digits-7to3's GAN `A & B & C`, a target of 5% of the prior, climbing from
# the first 32 draws gave 12 calls of 64 images a mean accuracy of 0.76 against the pool's 0.83).
CLIMB_SAVING = 2
# The acceptance rate the particles' common step size is adapted towards, and the least step.
LADDER_ACCEPTANCE = 0.3
MIN_STEP = 1e-3
# Rounds of moves at a stage while its particles reach the next one with too small an ESS, at most.
MAX_ROUNDS = 25


@dataclass
class Particles:
    """Draws with every stage's ``log w`` `(P, L)` (float64, CPU), their images (`None` for the pool's draws, whose
    images are not kept), readings and ``log p_z - log q``."""

    z: torch.Tensor
    x: torch.Tensor | None
    stage_log_w: torch.Tensor
    readings: torch.Tensor | None
    log_prior_ratio: torch.Tensor
    record: dict = field(default_factory=dict)

    def take(self, rows: torch.Tensor) -> Particles:
        return _map(lambda a: a[rows.to(a.device)], self)


_TENSORS = ("z", "x", "stage_log_w", "readings", "log_prior_ratio")


def _map(fn, *parts: Particles) -> Particles:
    """The particles whose every tensor is ``fn`` of that tensor of each of ``parts`` (`None` where one is `None`)."""
    values = {}
    for name in _TENSORS:
        got = [getattr(part, name) for part in parts]
        values[name] = None if any(g is None for g in got) else fn(*got)
    return Particles(**values)


def stages_of(target) -> list:
    """The stages a climb goes through: `Target.stages`, the last replaced by the target itself (so that the last
    column of ``refinements`` is exactly the target's ``log w``)."""
    return target.stages()[:-1] + [target]


def systematic_resample(log_weights: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` indices drawn in proportion to ``exp(log_weights)`` by systematic resampling (one uniform): each index
    appears ``floor(n p_i)`` or ``ceil(n p_i)`` times, fewer repeats than multinomial draws."""
    p = torch.softmax(log_weights.double(), 0)
    device = generator.device if generator is not None else "cpu"
    u = (torch.rand(1, generator=generator, device=device, dtype=torch.float64).cpu() + torch.arange(n)) / n
    return torch.searchsorted(torch.cumsum(p, 0), u.clamp(max=1 - 1e-12)).clamp(max=p.numel() - 1)


def ess(log_weights: torch.Tensor) -> float:
    """The effective sample size of importance weights (0 when none is positive)."""
    if not bool(torch.isfinite(log_weights).any()):
        return 0.0
    return float(1.0 / torch.softmax(log_weights.double(), 0).pow(2).sum())


def ladder_cost(particles: int, stages: int, moves: int = LADDER_MOVES) -> int:
    """The fewest calls a climb makes: one round of every particle's moves at every stage."""
    return particles * stages * moves


def climb_pays(drawn: int, particles: int, stages: int) -> bool:
    """Whether a pool that has drawn ``drawn`` and is not done should climb instead: where it has already spent
    ``CLIMB_SAVING`` times the fewest calls a climb of ``stages`` stages with ``particles`` particles makes (as in
    ski rental: whatever the target's share, the entry then costs at most a few times the cheaper of the two)."""
    return stages > 1 and drawn >= CLIMB_SAVING * ladder_cost(particles, stages)


def _evaluate(evaluate, z: torch.Tensor, stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x, stage_log_w, readings = evaluate.refinements(z)
    count(stats, z.shape[0], evaluate)
    readings = None if readings is None else readings.detach().double().cpu()
    return x, stage_log_w.detach().double().cpu(), readings


def climb(
    evaluate,
    q,
    drawn: Particles,
    particles: int,
    generator: torch.Generator | None,
    stats,
    initial_step: float = 0.5,
    frozen: torch.Tensor | None = None,
    affordable=None,
    ess_goal: float = 1.0,
) -> Particles | None:
    """Climb the stages from the pool's draws ``drawn`` (module docstring) with ``particles`` particles, moving at
    each stage until the particles of its rounds reach the next with an ESS of ``ess_goal`` (the pool's).

    Returns:
        The particles on the full target, equally weighted, with ``record`` (each stage's ESS after reweighting and
        acceptance rate), or `None` where a stage keeps no particle or ``affordable(n)`` refuses a round of moves
        (the caller then goes on drawing the plain pool).
    """
    levels = drawn.stage_log_w.shape[1]
    state = {"log_step": math.log(initial_step), "moves": 0, "accepted": 0.0}

    def move(current: Particles, j: int) -> Particles | None:
        """``LADDER_MOVES`` pCN steps of every particle, invariant for stage ``j``, the step size adapted."""
        for _ in range(LADDER_MOVES):
            if affordable is not None and not affordable(particles):
                return None
            b = torch.full((particles,), math.exp(state["log_step"]), dtype=torch.float64)
            z_new = kernels.pcn_propose(current.z, b, generator, frozen)
            x_new, slw_new, r_new = _evaluate(evaluate, z_new, stats)
            log_alpha = kernels.log_alpha_pcn(current.stage_log_w[:, j], slw_new[:, j])
            accept = kernels.mh_accept(log_alpha, generator).cpu()
            alpha = float(torch.clamp(log_alpha, max=0.0).exp().mean())
            state["moves"] += 1
            state["accepted"] += float(accept.double().mean())
            state["log_step"] = min(0.0, max(math.log(MIN_STEP), state["log_step"] + alpha - LADDER_ACCEPTANCE))
            new = Particles(z_new, x_new, slw_new, r_new, q.log_prior_ratio(z_new).detach().double().cpu())
            current = _where(accept, new, current)
        return current

    current = drawn
    log_weights = drawn.stage_log_w[:, 0] + drawn.log_prior_ratio
    record = {"particles": particles, "stages": []}
    for j in range(levels):
        stage_ess = ess(log_weights)
        if stage_ess == 0:
            return None
        current = _resample(evaluate, current, log_weights, particles, generator, stats, affordable)
        if current is None:
            return None
        state["moves"], state["accepted"], rounds, seen = 0, 0.0, 0, None
        while True:  # move until the rounds' particles reach the next stage with ``ess_goal`` (or MAX_ROUNDS)
            current = move(current, j)
            if current is None:
                return None
            rounds += 1
            if j + 1 == levels:
                break
            seen = current if seen is None else _concat(seen, current)
            log_weights = seen.stage_log_w[:, j + 1] - seen.stage_log_w[:, j]
            if ess(log_weights) >= ess_goal or rounds == MAX_ROUNDS:
                current = seen
                break
        record["stages"].append(
            {
                "ess": stage_ess,
                "rounds": rounds,
                "acceptance": state["accepted"] / max(1, state["moves"]),
                "step": math.exp(state["log_step"]),
            }
        )
    current.record = record
    return current


def _resample(evaluate, current: Particles, log_weights, particles: int, generator, stats, affordable) -> Particles:
    """``particles`` of ``current`` resampled by ``log_weights``; the pool's draws, whose images were not kept, are
    generated again (the distinct ones drawn: one call each; `None` where ``affordable`` refuses them)."""
    rows = systematic_resample(log_weights, particles, generator)
    if current.x is not None:
        return current.take(rows)
    distinct, inverse = torch.unique(rows, return_inverse=True)
    if affordable is not None and not affordable(distinct.numel()):
        return None
    x, stage_log_w, readings = _evaluate(evaluate, current.z[distinct.to(current.z.device)], stats)
    again = Particles(
        current.z[distinct.to(current.z.device)], x, stage_log_w, readings, current.log_prior_ratio[distinct]
    )
    return again.take(inverse)


def _concat(a: Particles, b: Particles) -> Particles:
    """The particles of two rounds at one stage, together (each an equally weighted sample of that stage)."""
    return _map(lambda u, v: torch.cat([u, v]), a, b)


def _where(accept: torch.Tensor, new: Particles, old: Particles) -> Particles:
    """``new`` where ``accept``, else ``old``."""

    def pick(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = accept.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
        return torch.where(mask, u.to(v.device, v.dtype), v)

    return _map(pick, new, old)
