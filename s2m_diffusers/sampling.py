"""Batched independent Metropolis-Hastings in latent space (spec §4-6), as plain functions.

The sampler never sees a model. It is given

- ``evaluate(z) -> (x, log_w)``: runs the generator on latents ``z`` (B, ...) and returns the samples ``x``
  (a tensor with batch dimension first) and their log weights ``log w(x) = log p_T(x) / p_G(x)`` up to a
  constant (B,), ``-inf`` off target;
- a latent density ``q`` (``refit.StandardNormal`` or ``refit.LowRankGaussianMixture``) with ``sample(n,
  generator)`` and ``log_prior_ratio(z) = log p_z(z) - log q(z)``.

The chain state is ``(z, x, log_w)``. The chain targets ``pi(z) ∝ p_z(z) w(G(z))``, whose push-forward
through the generator is exactly ``p_T`` (spec §4), and accepts a proposal ``z'`` drawn from ``q`` against
the current ``z`` with

    log alpha = [log w(z') + log p_z(z') - log q(z')] - [log w(z) + log p_z(z) - log q(z)]

one uniform per chain. A chain whose state has weight 0 accepts any proposal of finite weight.

Three entry points:

- [`sample_official`]: the official recipe (a fixed number of chains and steps from the prior; final states
  returned whether on target or not): 201 generator calls per returned sample with the defaults.
- [`sample_imh`]: ours. Every chain starts empty, *enters* the target with its first proposal of finite
  weight (that state is a draw of ``q`` restricted to the target), then takes ``steps_after_entry`` more MH
  steps and is returned. By the strong Markov property the returned state has the law of ``steps_after_entry``
  IMH steps started from ``q`` restricted to the target, whatever the entry time, so chains can finish at
  different rounds without bias. A pool of at most ``num_chains`` chains runs side by side.
- [`sample_s2m`]: ours with latent refitting: fit ``q`` to on-target latents, stage by stage (one more
  literal of the target each stage), then [`sample_imh`] with the last fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .refit import LowRankGaussianMixture, StandardNormal

__all__ = [
    "ChainState",
    "SamplerStats",
    "SampleResult",
    "BudgetExhaustedError",
    "imh_accept",
    "importance_resample",
    "sample_official",
    "sample_imh",
    "sample_s2m",
]

Evaluate = Callable[[torch.Tensor], tuple[Any, torch.Tensor]]
Callback = Callable[[int, dict], None]


@dataclass
class SamplerStats:
    """Diagnostics of one sampler call (spec §5). ``proposals`` counts generator calls (one per latent)."""

    proposals: int = 0
    accepted: int = 0
    rounds: int = 0
    num_returned: int = 0
    on_target_returned: int = 0
    unique_returned: int = 0
    chains_started: int = 0
    chains_entered: int = 0
    seconds_evaluate: float = 0.0
    seconds_total: float = 0.0
    budget_exhausted: bool = False
    stages: list[dict] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposals if self.proposals else 0.0

    @property
    def proposals_per_sample(self) -> float:
        return self.proposals / self.num_returned if self.num_returned else math.inf

    @property
    def entered_share(self) -> float:
        """Share of started chains that ever reached the target."""
        return self.chains_entered / self.chains_started if self.chains_started else 0.0

    @property
    def seconds_bookkeeping(self) -> float:
        return max(0.0, self.seconds_total - self.seconds_evaluate)

    def add(self, other: SamplerStats) -> None:
        """Accumulate another call's counts and times (for multi-stage runs)."""
        for name in ("proposals", "accepted", "rounds", "seconds_evaluate", "seconds_total"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out.update(
            acceptance_rate=self.acceptance_rate,
            proposals_per_sample=self.proposals_per_sample,
            entered_share=self.entered_share,
            seconds_bookkeeping=self.seconds_bookkeeping,
        )
        return out


@dataclass
class ChainState:
    """A batch of chain states. ``log_ratio = log w + log p_z - log q`` under the proposal in use."""

    z: torch.Tensor  # (B, *latent_shape)
    x: Any  # (B, ...) samples
    log_w: torch.Tensor  # (B,)
    log_ratio: torch.Tensor  # (B,)


@dataclass
class SampleResult:
    """What a sampler returns: latents, samples, log weights, per-sample on-target flags and statistics."""

    z: torch.Tensor
    x: Any
    log_w: torch.Tensor
    on_target: torch.Tensor  # (N,) bool
    stats: SamplerStats
    proposal: Any = None  # the latent density used in the final stage


class BudgetExhaustedError(RuntimeError):
    """Raised when the proposal budget ran out before enough chains reached the target.

    ``.result`` holds what was obtained (possibly empty), with its statistics.
    """

    def __init__(self, message: str, result: SampleResult):
        super().__init__(message)
        self.result = result


# ----------------------------------------------------------------------------------------------------------
# Pure pieces


def imh_accept(
    log_ratio_current: torch.Tensor, log_ratio_proposed: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-chain independent-MH acceptance: one uniform per chain, in log space.

    ``log alpha = log_ratio_proposed - log_ratio_current``. A chain at weight 0 (``-inf``) accepts any proposal
    of finite weight; a proposal of weight 0 is never accepted.

    Returns:
        `torch.Tensor` of shape `(B,)`, bool.
    """
    device = generator.device if generator is not None else log_ratio_current.device
    u = torch.rand(log_ratio_current.shape, generator=generator, device=device).to(log_ratio_current.device)
    finite_new = torch.isfinite(log_ratio_proposed)
    empty = ~torch.isfinite(log_ratio_current)
    log_alpha = torch.where(empty, torch.zeros_like(log_ratio_proposed), log_ratio_proposed - log_ratio_current)
    log_alpha = torch.where(finite_new, log_alpha, torch.full_like(log_alpha, -math.inf))
    return torch.log(u) < log_alpha


def _select(mask: torch.Tensor, new: Any, old: Any) -> Any:
    """``where(mask, new, old)`` along the batch dimension, for a tensor of any rank."""
    m = mask.reshape(-1, *([1] * (new.ndim - 1))).to(new.device)
    return torch.where(m, new, old)


def importance_resample(
    log_weights: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """Multinomial resampling proportional to ``exp(log_weights)``.

    Returns:
        indices `(n,)` and the effective sample size ``(sum w)^2 / sum w^2`` of the weights.
    """
    finite = torch.isfinite(log_weights)
    if not finite.any():
        raise ValueError("No finite weight to resample from: no proposal reached the target.")
    lw = torch.where(finite, log_weights, torch.full_like(log_weights, -math.inf)).double()
    p = torch.softmax(lw, 0)
    ess = float(1.0 / p.pow(2).sum())
    gen_device = generator.device if generator is not None else "cpu"
    idx = torch.multinomial(p.to(gen_device), n, replacement=True, generator=generator)
    return idx.to(log_weights.device), ess


def fit_exponent(log_weights: torch.Tensor, min_ess: float, iterations: int = 40) -> float:
    """The largest ``beta`` in [0, 1] whose tempered weights ``w^beta`` keep an effective sample size of ``min_ess``.

    Refitting resamples the on-target latents in proportion to their importance ratios. When those ratios are
    heavy-tailed (real ``D_v`` heads), a handful of latents take all the mass and the fit collapses onto them
    (an effective sample size of 2-3 out of 128 was seen on Digits-7to3, and the refitted proposal then left the
    target). Tempering the ratios, as adaptive sequential Monte Carlo does, keeps the fit broad; the fit only shapes
    the proposal, and the final independent Metropolis-Hastings stage corrects for it exactly whatever ``beta`` is.

    Args:
        log_weights (`torch.Tensor` of shape `(n,)`): log importance ratios, ``-inf`` off target.
        min_ess (`float`): the effective sample size to keep (at most the number of finite weights).
        iterations (`int`, defaults to 40): bisection steps.

    Returns:
        `float`: ``beta``; 1.0 when the untempered weights already keep ``min_ess``.
    """
    lw = log_weights[torch.isfinite(log_weights)].double()
    if len(lw) == 0:
        raise ValueError("No finite weight: no proposal reached the target.")
    min_ess = min(float(min_ess), float(len(lw)))

    def ess(beta: float) -> float:
        return float(1.0 / torch.softmax(beta * lw, 0).pow(2).sum())

    if ess(1.0) >= min_ess:
        return 1.0
    lo, hi = 0.0, 1.0  # ess(lo) >= min_ess > ess(hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ess(mid) >= min_ess else (lo, mid)
    return lo


def _propose(evaluate: Evaluate, proposal, n: int, generator, stats: SamplerStats) -> ChainState:
    z = proposal.sample(n, generator=generator)
    t0 = time.perf_counter()
    x, log_w = evaluate(z)
    stats.seconds_evaluate += time.perf_counter() - t0
    stats.proposals += n
    log_w = log_w.to(torch.float64)
    log_ratio = log_w + proposal.log_prior_ratio(z).to(log_w.device, torch.float64)
    return ChainState(z, x, log_w, log_ratio)


def _unique_count(z: torch.Tensor) -> int:
    if z.shape[0] == 0:
        return 0
    return int(torch.unique(z.reshape(z.shape[0], -1), dim=0).shape[0])


def _finish(result: SampleResult, start: float) -> SampleResult:
    s = result.stats
    s.seconds_total += time.perf_counter() - start
    s.num_returned = int(result.z.shape[0])
    s.on_target_returned = int(result.on_target.sum())
    s.unique_returned = _unique_count(result.z)
    return result


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


# ----------------------------------------------------------------------------------------------------------
# Samplers


def sample_official(
    evaluate: Evaluate,
    prior: StandardNormal,
    num_chains: int = 64,
    num_steps: int = 200,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """The official S2M recipe: ``num_chains`` IMH chains from the prior, ``num_steps`` steps each.

    Each chain starts at a prior draw and its final state is returned, on target or not; nothing checks that
    it got there. Cost: ``num_steps + 1`` generator calls per returned sample (201 with the defaults).

    Args:
        evaluate (`Callable`): ``z -> (x, log_w)``.
        prior ([`StandardNormal`]): the latent prior, also the proposal.
        num_chains (`int`, defaults to 64), num_steps (`int`, defaults to 200): as in the official code.
        generator (`torch.Generator`, *optional*): the source of all randomness.
        callback (`Callable`, *optional*): ``callback(round, info)`` after every step.
    """
    _check_positive("num_chains", num_chains)
    _check_positive("num_steps", num_steps)
    start = time.perf_counter()
    stats = SamplerStats(chains_started=num_chains)
    state = _propose(evaluate, prior, num_chains, generator, stats)
    ever = torch.isfinite(state.log_w)
    for step in range(num_steps):
        new = _propose(evaluate, prior, num_chains, generator, stats)
        accept = imh_accept(state.log_ratio, new.log_ratio, generator)
        state = ChainState(*(_select(accept, a, b) for a, b in zip(vars(new).values(), vars(state).values())))
        ever |= torch.isfinite(state.log_w)
        stats.accepted += int(accept.sum())
        stats.rounds += 1
        if callback is not None:
            callback(step, {"accepted": int(accept.sum()), "on_target": int(torch.isfinite(state.log_w).sum())})
    stats.chains_entered = int(ever.sum())
    result = SampleResult(state.z, state.x, state.log_w, torch.isfinite(state.log_w), stats, prior)
    return _finish(result, start)


def sample_imh(
    evaluate: Evaluate,
    proposal,
    num_samples: int,
    steps_after_entry: int = 5,
    mixing_tolerance: float | None = None,
    max_steps_after_entry: int = 200,
    num_chains: int | None = None,
    max_proposals: int | None = None,
    generator: torch.Generator | None = None,
    allow_partial: bool = False,
    callback: Callback | None = None,
) -> SampleResult:
    """Ours: a pool of independent-MH chains that each return one on-target sample.

    A chain starts empty (weight 0), so its first proposal of finite weight is accepted: the chain has
    *entered* the target with a draw of ``q`` restricted to it. It then takes ``steps_after_entry`` MH steps
    towards ``pi ∝ p_z w`` and its state is returned. At most ``num_chains`` chains run at once; a finished
    chain's slot is given to a new chain until ``num_samples`` chains have been started.

    Args:
        evaluate (`Callable`): ``z -> (x, log_w)`` with ``log_w`` of shape `(B,)`, ``-inf`` off target.
        proposal: a latent density (``StandardNormal`` or a refitted ``LowRankGaussianMixture``).
        num_samples (`int`): samples to return.
        steps_after_entry (`int`, defaults to 5): MH steps each chain takes after entering the target. The law of
            the returned state approaches the target geometrically in it, at rate ``1 - 1/W`` where ``W`` bounds
            ``pi / q`` (spec §5): with a good refitted ``q``, a few steps suffice.
        mixing_tolerance (`float`, *optional*): also take enough steps that the independent
            sampler's convergence bound ``(1 - 1/W)^T`` (spec §5) falls below this, with ``W`` estimated as the
            largest importance ratio ``pi / q`` among all proposals drawn so far in this call (one global figure,
            so no chain's own path decides its length). With real heads every image has some weight, chains
            enter at once, and a fixed few steps return chains that never left their first, unselected state
            (seen on Digits-7to3: `A & B & C` got 0.23 accuracy with 5 steps). `None`: exactly
            ``steps_after_entry``.
        max_steps_after_entry (`int`, defaults to 200): cap on those steps (the official recipe's 200).
        num_chains (`int`, *optional*): chains side by side (the batch size of ``evaluate``). Defaults to
            ``num_samples``.
        max_proposals (`int`, *optional*): the proposal budget. When it runs out first, a
            [`BudgetExhaustedError`] carrying the partial result is raised, or, with ``allow_partial=True``, the
            finished samples are returned with ``stats.budget_exhausted = True``.
        generator (`torch.Generator`, *optional*): the source of all randomness; same seed, same samples.
        allow_partial (`bool`, defaults to `False`): see ``max_proposals``.
        callback (`Callable`, *optional*): ``callback(round, info)`` after every round.

    Returns:
        [`SampleResult`] with the samples in the order their chains finished.
    """
    _check_positive("num_samples", num_samples)
    _check_positive("num_chains", num_chains, allow_none=True)
    _check_positive("max_proposals", max_proposals, allow_none=True)
    if not isinstance(steps_after_entry, int) or steps_after_entry < 0:
        raise ValueError(f"steps_after_entry must be a non-negative integer, got {steps_after_entry!r}.")
    if mixing_tolerance is not None and not 0 < mixing_tolerance < 1:
        raise ValueError(f"mixing_tolerance must be in (0, 1) or None, got {mixing_tolerance!r}.")
    log_sum, log_max, seen = -math.inf, -math.inf, 0  # running log-sum-exp and max of pi / q over proposals
    target_steps = steps_after_entry
    start = time.perf_counter()
    pool = min(num_chains or num_samples, num_samples)
    stats = SamplerStats()

    state: ChainState | None = None  # the pool's chain states; empty slots have log_w = -inf
    steps = torch.zeros(pool, dtype=torch.long)  # MH steps since entry; -1 = not entered
    alive = torch.zeros(pool, dtype=torch.bool)  # slot holds a running chain
    done: list[ChainState] = []
    n_done = 0
    round_ = 0
    while n_done < num_samples:
        # Fill free slots with new (empty) chains while chains are still needed.
        free = (~alive).nonzero().flatten()
        room = num_samples - n_done - int(alive.sum())
        for i in free[: max(0, room)].tolist():
            alive[i] = True
            steps[i] = -1
            stats.chains_started += 1
        active = alive.nonzero().flatten()
        if max_proposals is not None:
            active = active[: max(0, max_proposals - stats.proposals)]
        if active.numel() == 0:
            stats.budget_exhausted = True
            break
        new = _propose(evaluate, proposal, active.numel(), generator, stats)
        if state is None:  # lay out the pool's storage from the first proposal
            state = ChainState(
                torch.zeros((pool, *new.z.shape[1:]), dtype=new.z.dtype, device=new.z.device),
                torch.zeros((pool, *new.x.shape[1:]), dtype=new.x.dtype, device=new.x.device),
                torch.full((pool,), -math.inf, dtype=torch.float64, device=new.log_w.device),
                torch.full((pool,), -math.inf, dtype=torch.float64, device=new.log_w.device),
            )
        cur_ratio = torch.where(steps[active] >= 0, state.log_ratio[active].cpu(), -math.inf).to(new.log_ratio)
        accept = imh_accept(cur_ratio, new.log_ratio, generator).cpu()
        entered_now = accept & (steps[active] < 0)
        stats.chains_entered += int(entered_now.sum())
        stats.accepted += int(accept.sum())
        idx = active[accept]
        state.z[idx.to(state.z.device)] = new.z[accept.to(new.z.device)]
        state.x[idx.to(state.x.device)] = new.x[accept.to(new.x.device)]
        state.log_w[idx.to(state.log_w.device)] = new.log_w[accept.to(new.log_w.device)]
        state.log_ratio[idx.to(state.log_ratio.device)] = new.log_ratio[accept.to(new.log_ratio.device)]
        # A chain that entered this round has taken 0 steps after entry; others advance by one.
        was_in = steps[active] >= 0
        steps[active] = torch.where(was_in, steps[active] + 1, torch.where(entered_now, 0, -1))
        if mixing_tolerance is not None:
            finite = new.log_ratio[torch.isfinite(new.log_ratio)]
            seen += new.log_ratio.numel()
            if finite.numel():
                log_sum = float(torch.logsumexp(torch.cat([finite, finite.new_tensor([log_sum])]), 0))
                log_max = max(log_max, float(finite.max()))
                w_bound = math.exp(log_max - (log_sum - math.log(seen)))  # W = sup (pi / q), estimated
                wanted = math.ceil(math.log(mixing_tolerance) / math.log1p(-1 / w_bound)) if w_bound > 1 else 1
                target_steps = max(steps_after_entry, min(wanted, max_steps_after_entry))
        finished = active[(steps[active] >= target_steps) & (steps[active] >= 0)]
        finished = finished[: num_samples - n_done]
        if finished.numel():
            f = finished.to(state.z.device)
            done.append(ChainState(state.z[f].clone(), state.x[f].clone(), state.log_w[f].clone(), state.log_ratio[f]))
            n_done += finished.numel()
            alive[finished] = False
            state.log_w[f] = -math.inf
            state.log_ratio[f] = -math.inf
        stats.rounds += 1
        round_ += 1
        if callback is not None:
            callback(round_, {"done": n_done, "active": int(alive.sum()), "accepted": int(accept.sum())})

    if done:
        z = torch.cat([d.z for d in done])
        x = torch.cat([d.x for d in done])
        lw = torch.cat([d.log_w for d in done])
    else:
        ref = state if state is not None else None
        z = ref.z[:0] if ref is not None else torch.zeros(0)
        x = ref.x[:0] if ref is not None else torch.zeros(0)
        lw = torch.zeros(0, dtype=torch.float64)
    result = _finish(SampleResult(z, x, lw, torch.isfinite(lw), stats, proposal), start)
    if stats.budget_exhausted and not allow_partial:
        raise BudgetExhaustedError(
            f"The proposal budget of {max_proposals} ran out with {n_done} of {num_samples} samples on target "
            f"({stats.chains_entered} of {stats.chains_started} chains reached the target; acceptance rate "
            f"{stats.acceptance_rate:.3g}). Try refitting the proposal (refit='sequential'), a larger "
            f"max_proposals, or a class-conditional proposal; or pass allow_partial=True to keep what was found.",
            result,
        )
    return result


def sample_s2m(
    stage_evaluates: Sequence[Evaluate],
    prior: StandardNormal,
    num_samples: int,
    refit: str = "sequential",
    steps_after_entry: int = 5,
    mixing_tolerance: float | None = None,
    max_steps_after_entry: int = 200,
    fit_size: int = 256,
    fit_batch: int | None = None,
    rank: int = 32,
    n_components: int | Sequence[int] = (1, 2, 4, 8),
    defensive: float = 0.1,
    covariance_scale: float = 2.0,
    fit_weighting: str = "resample",
    fit_min_ess: float | None = 0.25,
    num_chains: int | None = None,
    max_proposals: int | None = None,
    generator: torch.Generator | None = None,
    allow_partial: bool = False,
    callback: Callback | None = None,
) -> SampleResult:
    """Ours, with latent refitting (spec §6).

    With ``refit="sequential"``, stage ``s`` draws proposals from the current density until ``fit_size`` of them
    satisfy the stage's target (``stage_evaluates[s]``: the first ``s + 1`` literals), resamples them in
    proportion to their importance ratio ``w_s p_z / q`` and fits a [`LowRankGaussianMixture`] to the result;
    the next stage proposes from that fit. ``refit="once"`` fits in one stage on the full target;
    ``refit="off"`` samples from the prior. The final stage is [`sample_imh`] on the full target
    (``stage_evaluates[-1]``) with the last fit: exact in the latent view whatever the fit (spec §4), since the
    correction ``log p_z - log q`` enters every acceptance.

    Args:
        stage_evaluates (`Sequence[Callable]`): ``z -> (x, log_w)`` per stage; the last one is the full target.
        prior ([`StandardNormal`]): the latent prior.
        num_samples (`int`): samples to return.
        refit (`str`, defaults to `"sequential"`): `"off"`, `"once"` or `"sequential"`.
        steps_after_entry (`int`, defaults to 5), mixing_tolerance (`float`, *optional*), max_steps_after_entry
            (`int`, defaults to 200): see [`sample_imh`].
        fit_size (`int`, defaults to 256): on-target latents per fit.
        fit_batch (`int`, *optional*): proposals per round while collecting fit data (defaults to
            ``fit_size``).
        rank, n_components, defensive, covariance_scale: see [`LowRankGaussianMixture.fit`]. The default
            ``covariance_scale=2.0`` (a proposal wider than the fit) was chosen on the analytic problem: with 1.0
            the fit sometimes misses part of the target and the chains need many more steps to fill it in.
        fit_weighting (`str`, defaults to `"resample"`): `"resample"` fits to on-target proposals resampled in
            proportion to ``w_s p_z / q``; `"none"` fits to them unweighted (measured far worse: the fit inherits
            the previous proposal's shape).
        fit_min_ess (`float`, *optional*, defaults to 0.25): with `"resample"`, the share of the on-target latents
            that the resampling weights must keep as effective sample size; heavier-tailed ratios are tempered,
            ``(w_s p_z / q)^beta`` with the largest ``beta <= 1`` that keeps it ([`fit_exponent`]). `None`: never
            temper (with real heads the fit then collapsed onto 2-3 latents).
        num_chains, max_proposals, generator, allow_partial, callback: see [`sample_imh`]; the budget covers
            the fitting stages too.

    Returns:
        [`SampleResult`]; ``stats.stages`` lists each fitting stage's proposals, on-target share and ESS.
    """
    if fit_weighting not in ("resample", "none"):
        raise ValueError(f"fit_weighting must be 'resample' or 'none', got {fit_weighting!r}.")
    if refit not in ("off", "once", "sequential"):
        raise ValueError(f"refit must be 'off', 'once' or 'sequential', got {refit!r}.")
    if not stage_evaluates:
        raise ValueError("stage_evaluates is empty: pass at least the full target's evaluate function.")
    start = time.perf_counter()
    stages = {"off": [], "once": [stage_evaluates[-1]], "sequential": list(stage_evaluates)}[refit]
    fit_batch = fit_batch or fit_size
    total = SamplerStats()
    density = prior
    for s, evaluate in enumerate(stages):
        stage = SamplerStats()
        t_stage = time.perf_counter()
        zs, ratios = [], []
        n_on = 0
        while n_on < fit_size:
            n = fit_batch
            if max_proposals is not None:
                n = min(n, max_proposals - total.proposals - stage.proposals)
            if n <= 0:
                break
            new = _propose(evaluate, density, n, generator, stage)
            zs.append(new.z)
            ratios.append(new.log_ratio)
            n_on += int(torch.isfinite(new.log_ratio).sum())
        stage.seconds_total = time.perf_counter() - t_stage
        total.add(stage)
        if n_on < 2:
            total.budget_exhausted = True
            result = SampleResult(prior.sample(0), None, torch.zeros(0), torch.zeros(0, dtype=torch.bool), total)
            total.stages.append({"stage": s, "proposals": stage.proposals, "on_target": n_on})
            if allow_partial:
                return _finish(result, start)
            raise BudgetExhaustedError(
                f"Refitting stage {s + 1} of {len(stages)} found {n_on} on-target proposals in "
                f"{stage.proposals} (budget {max_proposals}). Try a larger max_proposals, or check that the "
                f"generator can produce this combination at all.",
                result,
            )
        z = torch.cat(zs)
        log_ratio = torch.cat(ratios)
        beta = 1.0
        if fit_weighting == "resample":
            if fit_min_ess is not None:
                beta = fit_exponent(log_ratio, fit_min_ess * n_on)
            idx, ess = importance_resample(beta * log_ratio, min(fit_size, n_on), generator)
        else:
            idx, ess = torch.isfinite(log_ratio).nonzero().flatten(), float("nan")
        density = LowRankGaussianMixture.fit(
            z[idx.to(z.device)].cpu(),
            rank=rank,
            n_components=n_components,
            defensive=defensive,
            covariance_scale=covariance_scale,
            seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=_gen_device(generator))),
        )
        total.stages.append(
            {
                "stage": s,
                "proposals": stage.proposals,
                "on_target": n_on,
                "on_target_share": n_on / stage.proposals,
                "ess": ess,
                "fit_exponent": beta,
                "n_components": density.n_components,
                "rank": density.rank,
            }
        )
        if callback is not None:
            callback(-1, {"stage": s, "on_target_share": n_on / stage.proposals})

    remaining = None if max_proposals is None else max_proposals - total.proposals
    if remaining is not None and remaining <= 0:  # the fits spent the whole budget: nothing left to sample with
        total.budget_exhausted = True
        result = SampleResult(prior.sample(0), None, torch.zeros(0), torch.zeros(0, dtype=torch.bool), total)
        if allow_partial:
            return _finish(result, start)
        raise BudgetExhaustedError(
            f"The refitting stages spent the whole budget of {max_proposals} proposals before sampling began "
            f"(on-target shares per stage: {[round(st['on_target_share'], 4) for st in total.stages]}). Try a "
            "larger max_proposals, or check that the generator can produce this combination at all.",
            result,
        )
    try:
        result = sample_imh(
            stage_evaluates[-1],
            density,
            num_samples,
            steps_after_entry=steps_after_entry,
            mixing_tolerance=mixing_tolerance,
            max_steps_after_entry=max_steps_after_entry,
            num_chains=num_chains,
            max_proposals=remaining,
            generator=generator,
            allow_partial=allow_partial,
            callback=callback,
        )
    except BudgetExhaustedError as err:
        _merge(err.result.stats, total)
        raise
    _merge(result.stats, total)
    result.stats.seconds_total = time.perf_counter() - start
    return result


def _merge(stats: SamplerStats, fit: SamplerStats) -> None:
    stats.proposals += fit.proposals
    stats.accepted += fit.accepted
    stats.seconds_evaluate += fit.seconds_evaluate
    stats.rounds += fit.rounds
    stats.stages = fit.stages
    stats.budget_exhausted |= fit.budget_exhausted


def _gen_device(generator: torch.Generator | None) -> torch.device | str:
    return generator.device if generator is not None else "cpu"
