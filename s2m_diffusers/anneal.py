"""The chains' start, annealed (spec §5b): from the entry pool at a tempered weight to the target during the burn-in.

Inside a combination the heads' weight ``w`` is uneven (mostly ``D_v``'s realism tilt), so the entry pool's
importance ratios rest on few of its on-target draws: on Digits-7to3's GAN ``A & B & C`` (4% of the prior) 679
on-target draws of 16,384 prior draws have an ESS of 154, and the pools of 64-image calls, 3-26 on-target draws, an
ESS of 2-4. Chains
importance-resampled from such a pool start from 3 distinct points, and local moves do not carry them between the
combination's separate regions in the noise: a call's images then keep the mix of regions those few points happened
to take. An SMC sampler over the tempered targets ``pi_g(z) ∝ p_z(z) w(G(z))^g`` (Neal 2001; Del Moral, Doucet and
Jasra 2006), whose particles are the chains themselves, starts them from many draws and lets the moves and the
reweighting set the mix:

1. the chains' starting points are resampled from the pool's ratios at ``g_0``, the largest ``g`` at which those
   ratios keep an ESS of half the pool's on-target draws (or the starting points' number, where that is fewer;
   ``g_0 = 1`` where the untempered ratios already do);
2. every ``ANNEAL_EVERY`` steps of the burn-in the chains, which have moved under ``pi_g``, are reweighted by
   ``w^(g' - g)`` with the largest ``g' <= 1`` that keeps an ESS of half the chains ([`next_temperature`]) and
   resampled in pairs (each pair a superchain again, for `diagnostics.nested_rhat`); the last such step, at least
   ``ANNEAL_EVERY`` steps before the burn-in's end, goes to ``g' = 1`` whatever the ESS.

From then on the chains move under the target itself, and after the burn-in they are the usual exact
Metropolis-Hastings chains: annealing changes where they start sampling, never what they sample. It costs no call:
the tempered weight ``w^g`` is the weight already computed, raised to ``g`` ([`Tempered`] wraps ``evaluate``).
"""

from __future__ import annotations

import torch

from .ladder import ess, systematic_resample

__all__ = [
    "ANNEAL_EVERY",
    "checkpoints",
    "tempered",
    "largest_temperature",
    "start_temperature",
    "next_temperature",
    "Tempered",
    "retemper",
    "resample_pairs",
]

# Burn-in steps between two reweightings of the chains.
ANNEAL_EVERY = 3
# Each reweighting keeps an ESS of this share of the particles (the usual adaptive SMC rule).
ANNEAL_ESS = 0.5
# The least temperature (the tempered weights are divided by it to go back).
MIN_TEMPERATURE = 1e-3


def checkpoints(burn_in: int) -> list[int]:
    """The burn-in steps after which the chains are reweighted: every `ANNEAL_EVERY`-th, the last at least
    `ANNEAL_EVERY` steps before the burn-in's end (none in a burn-in shorter than twice that: no annealing)."""
    return list(range(ANNEAL_EVERY, burn_in - ANNEAL_EVERY + 1, ANNEAL_EVERY))


def tempered(log_w: torch.Tensor, g: float) -> torch.Tensor:
    """``g log w``, keeping ``-inf`` (a draw off the combination stays off it at every temperature)."""
    return torch.where(torch.isfinite(log_w), g * log_w, log_w)


def largest_temperature(log_w: torch.Tensor, rest: torch.Tensor, need: float) -> float:
    """The largest ``g`` in [0, 1] at which the log weights ``g log w + rest`` have an ESS of ``need``
    (bisection; the ESS falls as ``g`` grows while ``w`` spreads), at least `MIN_TEMPERATURE`."""
    rest = torch.where(torch.isfinite(log_w), rest, torch.zeros_like(rest))

    def ess_at(g: float) -> float:
        return ess(tempered(log_w, g) + rest)

    if ess_at(1.0) >= need:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ess_at(mid) >= need else (lo, mid)
    return max(lo, MIN_TEMPERATURE)


def next_temperature(log_w: torch.Tensor, g: float) -> float:
    """The chains' next temperature from ``g``: the largest whose reweighting ``w^(g' - g)`` of the chains' weights
    ``log_w`` (untempered) keeps an ESS of `ANNEAL_ESS` of them."""
    return min(1.0, g + largest_temperature(log_w, torch.zeros_like(log_w), ANNEAL_ESS * log_w.numel()))


class Tempered:
    """``evaluate`` at temperature ``g``: every ``log w`` it returns (and ``log w_s``, and MALA's gradient) times
    ``g``; everything else passes through."""

    def __init__(self, evaluate, g: float):
        self.evaluate, self.g = evaluate, g

    def __call__(self, z):
        out = self.evaluate(z)
        return (out[0], tempered(out[1], self.g), *out[2:])

    def __getattr__(self, name):
        inner = getattr(self.evaluate, name)
        if name == "value_and_grad":
            return lambda z: self._scaled(inner(z), grad=True)
        if name == "start":
            return lambda z, s: self._start(inner(z, s))
        if name == "finish":
            return lambda handle, keep: self._scaled(inner(handle, keep))
        return inner

    def _scaled(self, out, grad: bool = False):
        out = list(out)
        out[1] = tempered(out[1], self.g)
        if grad:
            out[3] = out[3] * self.g
        return tuple(out)

    def _start(self, out):
        handle, log_w_s = out
        return handle, tempered(log_w_s, self.g)


def retemper(state, g: float, g_new: float, log_floor: float | None = None) -> None:
    """Move a `chains.ChainState` held at temperature ``g`` to ``g_new``, in place: its ``log w``, ``log r``,
    ``log w_s`` and gradient (the screen's floor applied again at ``g_new = 1``)."""
    factor = g_new / g
    log_w = state.log_w
    state.log_ratio = state.log_ratio + tempered(log_w, factor - 1.0)
    state.log_w = tempered(log_w, factor)
    if state.log_w_s is not None:
        state.log_w_s = tempered(state.log_w_s, factor)
        if g_new >= 1.0 and log_floor is not None:
            state.log_w_s = state.log_w_s.clamp(min=log_floor)
    if state.grad is not None:
        state.grad = state.grad * factor


def resample_pairs(log_weights: torch.Tensor, num_chains: int, per_start: int, generator) -> torch.Tensor:
    """The rows of ``num_chains`` chains resampled from draws of ``log_weights``: ``num_chains / per_start`` drawn
    (systematic resampling), each taken by ``per_start`` chains side by side (superchains)."""
    return systematic_resample(log_weights, num_chains // per_start, generator).repeat_interleave(per_start)


def start_temperature(log_w: torch.Tensor, rest: torch.Tensor, on_target: float, starts: int) -> float:
    """``g_0``: the largest temperature at which the pool's ratios ``g log w + rest`` keep an ESS of half its
    on-target draws, or of ``starts`` where that is fewer (module docstring)."""
    need = min(float(starts), ANNEAL_ESS * on_target)
    return 1.0 if need <= 1.0 else largest_temperature(log_w, rest, need)
