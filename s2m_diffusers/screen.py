"""Screening diffusion proposals part-way through their denoising (delayed acceptance; Christen and Fox 2005).

A diffusion proposal's image costs ``K`` UNet calls. After ``s`` of them the predicted clean image
(``pred_original_sample``) already tells the heads much: its weight ``w_s`` (the surrogate) screens the proposal, and
only a proposal that passes runs the rest. A screened Metropolis-Hastings step, for a local move or an independent
draw (`s2m_diffusers.kernels`), accepts in two stages with ``r_s = w_s p_z / q`` and ``r = w p_z / q``
(``p_z / q`` cancels for a pCN move):

    stage 1:  min(1, r_s(z') / r_s(z))                            after s of the K steps
    stage 2:  min(1, [w(z') / w_s(z')] / [w(z) / w_s(z)])         only for proposals that passed stage 1

which leaves ``pi ∝ p_z w`` invariant as long as ``w_s > 0`` wherever ``w > 0``: ``log w_s`` is floored at a low
quantile of its values on the pool's on-target draws, so the surrogate's hard zeros (its margins) do not matter.

The entry pool is screened too (Poisson sampling): each draw runs ``s`` steps and is finished with probability
``p = min(1, max(min_finish, r_s / mean r_s))``, a finished draw weighing ``1 / p`` (Horvitz-Thompson), so the pool's
importance-weighted picture of the target stays unbiased whatever the surrogate.

The evaluate function offers ``num_steps`` (``K``), ``start(z, s) -> (handle, log w_s)`` and
``finish(handle, keep) -> (x, log w[, readings])``; a proposal that cannot resume after the step (a wrapped diffusers
pipeline, ``screen_restarts``) reruns a proposal that passes whole, ``s + K`` calls, counted so, and is screened only
when a step is given. ``screen="auto"`` screens after ``max(1, round(K / 10))`` steps where the proposal allows it
and can resume, and keeps screening after the burn-in only where the burn-in's screened steps cost less than 0.9 of
unscreened ones.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from . import kernels

__all__ = ["Screen", "prepare_screen", "screened_pool_batch", "finish_log_probs", "unpack", "num_steps", "count"]

# "auto" screens after this share of the K denoising steps (at least one step).
AUTO_SHARE = 0.1
# The surrogate's floor: this quantile of its log values on the pool's finished on-target draws.
FLOOR_QUANTILE = 0.1
# "auto" stops screening after the burn-in where screened steps cost more than this share of unscreened ones.
MAX_COST_SHARE = 0.9
# Why "auto" does not screen a proposal that reruns whole what passes (a wrapped pipeline). Measured on the Digits
# DDPM's UNet taken as a wrapped pipeline (`benchmarks/RESULTS.md`, "Wrapped pipelines"): screened after 1 of 10
# steps, 141 UNet calls per image against 114 unscreened at 16 images, 90.8 against 84.6 at 64.
AUTO_RESTARTS_REASON = (
    "'auto' does not screen a proposal that reruns a latent that passes the screen from its start (a wrapped "
    "pipeline): with local moves most proposals pass, and the reruns cost more than the screen saves; pass screen=S "
    "to screen anyway."
)


def unpack(out) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
    """``evaluate``'s output as ``(x, log_w, readings)``, ``log_w`` float64 on the CPU (readings `None` if absent)."""
    x, log_w = out[0], out[1].detach().double().cpu()
    readings = out[2].detach().double().cpu() if len(out) > 2 and out[2] is not None else None
    return x, log_w, readings


def num_steps(evaluate) -> int:
    """The denoising steps (UNet calls) of one proposal: ``evaluate.num_steps``, 0 without."""
    return int(getattr(evaluate, "num_steps", None) or 0)


def count(stats, n: int, evaluate) -> None:
    """Count ``n`` proposals run whole."""
    stats.proposals += n
    stats.unet_calls += n * num_steps(evaluate)
    stats.cost += n


def _cannot_screen(evaluate) -> str | None:
    why = getattr(evaluate, "screen_unavailable", None)
    if why:
        return why
    if not all(callable(getattr(evaluate, name, None)) for name in ("start", "finish")):
        return "this proposal cannot be stopped after a denoising step (a GAN, or an evaluate without start/finish)."
    if int(getattr(evaluate, "num_steps", None) or 0) < 2:
        return "the proposal has fewer than 2 denoising steps to screen between."
    return None


def prepare_screen(evaluate, config) -> tuple[Screen | None, dict]:
    """The screen of a run under ``config.screen`` (`None` when it does not screen) and, when it does not, why.

    Raises:
        ValueError: a step number (``screen=S``) the proposal cannot screen at.
    """
    if config.screen is None:
        return None, {}
    if config.screen == "auto" and getattr(evaluate, "screen_restarts", False):
        return None, {"step": None, "reason": AUTO_RESTARTS_REASON}
    why = _cannot_screen(evaluate)
    k = int(getattr(evaluate, "num_steps", None) or 0)
    if why is not None:
        if config.screen == "auto":
            return None, ({"step": None, "reason": why} if k else {})
        raise ValueError(f"screen={config.screen!r} was asked for, but {why} Use screen=None (or 'auto').")
    if config.screen == "auto":
        step = min(k - 1, max(1, round(AUTO_SHARE * k)))
    elif not 1 <= config.screen < k:
        raise ValueError(
            f"screen={config.screen} must be below the proposal's {k} denoising steps (the heads screen the "
            f"predicted clean image after that many steps): pick 1..{k - 1}."
        )
    else:
        step = int(config.screen)
    namer = getattr(evaluate, "surrogate_name", None)
    surrogate = namer(step) if callable(namer) else "heads"
    screen = Screen(step, k, bool(getattr(evaluate, "screen_restarts", False)), config, surrogate)
    return screen, {}


def finish_log_probs(log_w_s: torch.Tensor, min_finish: float) -> torch.Tensor:
    """``log p`` with ``p = min(1, max(min_finish, r_s / mean r_s))``: a draw the surrogate rates above average is
    always finished, one it rates 0 with probability ``min_finish``; the finished ones weigh ``1 / p``."""
    ls = log_w_s.double().cpu()
    finite = torch.isfinite(ls)
    if not finite.any():
        return torch.full_like(ls, math.log(min_finish))
    log_mean = float(torch.logsumexp(ls[finite], 0)) - math.log(ls.numel())
    return torch.clamp(ls - log_mean, min=math.log(min_finish), max=0.0)


def _count(stats, n: int, finished: int, screen: Screen) -> None:
    """``n`` proposals screened after ``s`` of ``K`` steps, ``finished`` of them run to the end."""
    rest = screen.num_steps if screen.restarts else screen.num_steps - screen.step
    calls = n * screen.step + finished * rest
    stats.proposals += n
    stats.unet_calls += calls
    stats.cost += calls / screen.num_steps


def screened_pool_batch(evaluate, z: torch.Tensor, screen: Screen, generator, stats):
    """One batch of the entry pool, screened by Poisson sampling. Returns the indices of the finished draws, their
    images, ``log w``, readings, surrogate ``log w_s`` and ``log p`` (finishing probability)."""
    t0 = time.perf_counter()
    handle, log_w_s = evaluate.start(z, screen.step)
    ls = log_w_s.detach().double().cpu()
    log_p = finish_log_probs(ls, screen.min_finish)
    keep = kernels.mh_accept(log_p, generator).cpu().nonzero().flatten()
    x, log_w, readings = unpack(evaluate.finish(handle, keep))
    stats.seconds_evaluate += time.perf_counter() - t0
    _count(stats, z.shape[0], keep.numel(), screen)
    screen.pool_drawn += z.shape[0]
    screen.pool_finished += keep.numel()
    return keep, x, log_w, readings, ls[keep], log_p[keep]


class Screen:
    """Delayed acceptance of one run (module docstring): the step, the surrogate's floor, and what it did."""

    def __init__(self, step: int, num_steps: int, restarts: bool, config, surrogate: str = "heads"):
        self.step, self.num_steps, self.restarts, self.surrogate = step, num_steps, restarts, surrogate
        self.min_finish = config.screen_min_finish
        self.auto = config.screen == "auto"
        self.log_floor = -math.inf
        self.active = True
        self.reason = None
        self.pool_drawn = self.pool_finished = 0
        self.proposed = self.passed = self.accepted = 0
        self.unet_calls = 0

    @property
    def worst_cost(self) -> float:
        """The most one screened proposal can cost, in whole proposals (a restart: ``(s + K) / K``)."""
        return (self.step + self.num_steps) / self.num_steps if self.restarts else 1.0

    def calibrate(self, pool) -> None:
        """The floor from the pool's finished on-target draws; the pool's surrogate ratios floored with it."""
        on = torch.isfinite(pool.log_ratio)
        ls = pool.log_w_s
        seen = ls[on & torch.isfinite(ls)] if ls is not None else torch.zeros(0)
        if seen.numel() >= 2:
            self.log_floor = float(torch.quantile(seen, FLOOR_QUANTILE))
        elif ls is not None and torch.isfinite(ls).any():
            self.log_floor = float(ls[torch.isfinite(ls)].min())
        else:
            self.active, self.reason = False, "the surrogate is 0 on every pool draw on the target"
        if ls is not None:
            pool.log_w_s = ls.clamp(min=self.log_floor)

    def floored(self, log_w_s: torch.Tensor) -> torch.Tensor:
        return torch.clamp(log_w_s.detach().double().cpu(), min=self.log_floor)

    def end_burn_in(self) -> None:
        """``"auto"``: stop screening where the burn-in's screened steps cost more than 0.9 of unscreened ones."""
        if self.auto and self.proposed:
            share = self.unet_calls / (self.proposed * self.num_steps)
            if share > MAX_COST_SHARE:
                self.active = False
                self.reason = f"the burn-in's screened steps cost {share:.2f} of unscreened ones"
        self.burn_in = {"proposed": self.proposed, "passed": self.passed, "unet_calls": self.unet_calls}

    def move(self, evaluate, q, state, z_new, jump, generator, stats):
        """One delayed-acceptance step of every chain, in place; returns (accepted, acceptance probabilities)."""
        c = z_new.shape[0]
        t0 = time.perf_counter()
        handle, log_w_s = evaluate.start(z_new, self.step)
        ls_new = self.floored(log_w_s)
        corr_new = q.log_prior_ratio(z_new).detach().double().cpu()
        corr_cur = state.log_ratio - state.log_w  # log p_z - log q of the current states
        # stage 1: the surrogate's ratio, with p_z / q for the independent draws
        la1 = ls_new - state.log_w_s + torch.where(jump, corr_new - corr_cur, torch.zeros_like(corr_new))
        passed = kernels.mh_accept(la1, generator).cpu()
        keep = passed.nonzero().flatten()
        accept = torch.zeros(c, dtype=torch.bool)
        la2 = torch.zeros(c, dtype=torch.float64)
        if keep.numel():
            x, log_w, readings = unpack(evaluate.finish(handle, keep))
            rho_new = log_w - ls_new[keep]
            rho_cur = state.log_w[keep] - state.log_w_s[keep]
            la2[keep] = kernels.log_alpha_pcn(rho_cur, rho_new)  # the ratio of w / w_s, -inf where w' = 0
            ok = kernels.mh_accept(la2[keep], generator).cpu()
            accept[keep[ok]] = True
            rows = keep[ok]
            if rows.numel():
                new = type(state)(
                    z_new[rows.to(z_new.device)], x[ok.to(x.device)], log_w[ok], log_w[ok] + corr_new[rows],
                    None if readings is None else readings[ok], None, ls_new[rows],
                )  # fmt: skip
                state.put(rows, new)
        stats.seconds_evaluate += time.perf_counter() - t0
        before = stats.unet_calls
        _count(stats, c, keep.numel(), self)
        self.unet_calls += stats.unet_calls - before
        self.proposed, self.passed, self.accepted = (
            self.proposed + c,
            self.passed + keep.numel(),
            self.accepted + int(accept.sum()),
        )
        a1 = torch.clamp(la1, max=0.0).exp()
        a2 = torch.clamp(la2, max=0.0).exp()
        mean_a2 = float(a2[keep].mean()) if keep.numel() else 0.5
        return accept, a1 * torch.where(passed, a2, torch.full_like(a2, mean_a2))

    def report(self) -> dict:
        out = {
            "step": self.step,
            "num_steps": self.num_steps,
            "restarts": self.restarts,
            "surrogate": self.surrogate,
            "log_floor": self.log_floor,
            "pool_drawn": self.pool_drawn,
            "pool_finished": self.pool_finished,
            "proposals": self.proposed,
            "passed": self.passed,
            "screened_out_share": 1 - self.passed / self.proposed if self.proposed else None,
            "second_stage_acceptance": self.accepted / self.passed if self.passed else None,
            "active_after_burn_in": self.active,
            "chosen": "auto" if self.auto else "given",
        }
        if self.reason:
            out["reason"] = self.reason
        return out
