"""Batched independent Metropolis-Hastings in latent space (spec §4-6), as plain functions.

The sampler never sees a model. It is given

- ``evaluate(z) -> (x, log_w)``: runs the generator on latents ``z`` (B, ...) and returns the samples ``x``
  (a tensor with batch dimension first) and their log weights ``log w(x) = log p_T(x) / p_G(x)`` up to a
  constant (B,), ``-inf`` off target;
- a latent density ``q`` (``densities.StandardNormal``, i.e. ``p_z`` itself, or a refitted
  ``densities.LowRankGaussianMixture`` or ``densities.TiltedNormal``) with ``sample(n, generator)`` and
  ``log_prior_ratio(z) = log p_z(z) - log q(z)``.

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
  literal of the target each stage; [`fit_stage`]), then [`sample_imh`] with the last fit.

For a diffusion proposal, [`sample_imh`] can screen each proposal on its predicted clean image part-way through the
denoising (``screen``; delayed acceptance, Christen and Fox 2005): a proposal rejected there stops denoising, and a
second stage corrects with the true weight, so the chain's target is unchanged ([`calibrate_screen`] picks the step).
A UNet + scheduler proposal resumes a proposal that passes after the screen step; a wrapped diffusers pipeline is
stopped through its step callback and reruns it whole (``screen_restarts``).

Its settings are one dataclass, [`S2MSamplingConfig`]; the acceptance itself is `s2m_diffusers.maths.imh_accept`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .densities import LowRankGaussianMixture, StandardNormal, TiltedNormal
from .maths import da_imh_steps, fit_exponent, imh_accept, imh_distance, imh_steps, importance_resample

__all__ = [
    "REFIT_MODES",
    "S2MSamplingConfig",
    "ChainState",
    "SamplerStats",
    "SampleResult",
    "BudgetExhaustedError",
    "budget_error",
    "sample_official",
    "sample_imh",
    "calibrate_screen",
    "fit_stage",
    "LatentFit",
    "fit_latent",
    "sample_s2m",
    "save_fits",
    "load_fits",
]

Evaluate = Callable[[torch.Tensor], tuple[Any, torch.Tensor]]
Callback = Callable[[int, dict], None]

REFIT_MODES = ("off", "once", "sequential")
# The density families a refitting stage fits (`fit_stage`); the pilots choose among them.
FIT_FAMILIES = ("gaussian", "tilted")
# What a call's refitting may spend (`S2MSamplingConfig.fit_spend`): what a fit could save on its samples, or all.
FIT_SPENDS = ("call", "full")
# Settings for which `None` is a value of its own, not "keep the default" (see `S2MSamplingConfig.resolve`).
_NONE_IS_A_VALUE = ("class_label", "mixing_tolerance", "screen")
# Screening (delayed acceptance, `sample_imh`): the candidate screen steps "auto" calibrates, as shares of the K steps,
# and the floors it tries for the surrogate's log ratio, as quantiles of its values on the pilot's on-target draws.
_SCREEN_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# A proposal that restarts (a wrapped pipeline) pays s + P(pass) K UNet calls per screened proposal: "auto" tries steps
# up to this share of K (past it a screen costs over half an unscreened proposal before anything passes, and each
# candidate step costs the calibration pilot a VAE decode per draw).
_RESTART_MAX_SHARE = 0.5
_SCREEN_FLOOR_QUANTILES = (0.02, 0.1, 0.25, 0.5)
# "auto" screens only where the calibration predicts at most this share of the unscreened UNet calls per sample.
_SCREEN_MAX_COST = 0.9
# The on-target atoms the screened chain's exact distance is computed on (the latest): it costs their square times T.
_MAX_ATOMS = 2048
# Two samples of one chain are this many steps apart that the chain has moved in between with probability
# 1 - _STUCK_SHARE at the observed acceptance rate (see `_MixingBound.thinning`).
_STUCK_SHARE = 0.05
# Refitting resamples its fit data with tempered importance ratios that keep this share of the on-target latents as
# effective sample size (`fit_exponent`): untempered, real heads' heavy-tailed ratios collapsed fits onto 2-3 latents.
FIT_MIN_ESS = 0.25


# ----------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class S2MSamplingConfig:
    """Every setting of an S2M sampling call, each default in one place (spec §3-6).

    Pass one to `S2MPipeline.__call__` (``sampling=``) or to [`sample_s2m`] (``config=``), or name single fields as
    keyword arguments there (``pipe("a & ~b", refit="off")``); `replace` gives a changed copy.

    How the target is read from the heads (spec §3):

    - ``negation_margin`` (`float`, *optional*): ``lambda >= 1``; a forbidden attribute must stay below ``1/lambda``
      of the image's strongest. `None`: the heads' own (``S2MHeads.config.negation_margin``, chosen from data by
      training: `s2m_diffusers.calibration.choose_margins`). 1 is the paper's formula.
    - ``presence_margin`` (`float`, *optional*): ``kappa`` in [0, 1]; a required attribute counts only where it
      comes within ``kappa`` of the strongest. `None`: the heads' own (chosen from data by training), else 0.
      Exact heads are unchanged by it; 0 is the paper's formula.
    - ``dr_temperature`` (`float`, `"auto"` or `None`): read ``D_r`` as ``softmax(log D_r / T)``
      (`s2m_diffusers.maths.temper_dr`; exact heads are unchanged). `None` = 1; ``"auto"`` sharpens pure
      conjunctions of two or more attributes (`s2m_diffusers.maths.auto_dr_temperature`). Every refitting stage
      uses the full target's value.
    - ``priors`` (`tuple[float, ...]`, *optional*): the attribute priors ``pi_c``; `None`: the heads' (or
      ``p_data``).
    - ``class_label`` (`int`, `str` or `None`, defaults to `"auto"`): for a class-conditional proposal, the class
      every sample is generated with (with the ``D_f`` correction). ``"auto"``: the first attribute the target
      requires at its top level when the heads have ``D_f``, else the class is drawn from ``p_G(c)`` by one extra
      latent coordinate (no ``D_f`` needed); `None` always draws it.
    - ``dv_strength`` (`float`, `"auto"` or `None`): ``beta`` in [0, 1], the weight of ``logit D_v``: the sampler
      targets ``p_G^(1 - beta) p_data^beta`` restricted to the combination (`s2m_diffusers.maths.dv_strength`); 1 is
      the paper's target. `None`: the heads' own (chosen by training: the largest ``beta`` whose weights keep an
      effective sample size of 10% over held-out generated images), else 1. ``"auto"``: measured for this target,
      the largest ``beta`` whose weights keep an effective sample size of 10% of the on-target samples among up to
      2,048 generated ones (once per target and settings, its proposals counted in the call).

    The sampler (spec §5-6):

    - ``refit`` (`str`, defaults to `"sequential"`): latent refitting; ``"sequential"`` fits ``q`` one literal of
      the target at a time (``a``, then ``a & b``, ...), ``"once"`` on the full target, ``"off"`` proposes from
      ``p_z``. A fit is kept only where its pilot predicts fewer proposals per sample than the prior's
      ([`fit_latent`]).
    - ``fit_spend`` (`str`, defaults to `"call"`): what a call's refitting may spend. ``"call"``: at most what a fit
      could save on the call's samples, ``num_samples * (c_prior - 1)`` proposals with ``c_prior`` the prior's
      predicted proposals per sample (under a screen, its predicted cost as the budget counts it; [`fit_latent`]),
      so that a call pays at most about twice what the prior alone would; ``"full"``: every stage runs, for a fit
      that later calls reuse (`S2MPipeline.fit` always fits in full).
    - ``mixing_tolerance`` (`float`, defaults to 0.01): every returned sample is at least ``T`` MH steps past its
      chain's entry into the target, with ``T`` the fewest steps after which its distance to the target (total
      variation) falls below this: the independence sampler's exact distance from an entry drawn from ``q`` on the
      target (`s2m_diffusers.maths.imh_distance`, Smith and Tierney 1996) for the importance ratios seen in the run
      (under a screen, the uniform bound ``(1 - 1/W)^T``, spec §5). `None`: exactly ``steps_after_entry`` steps, with
      no stated bound.
    - ``steps_after_entry`` (`int`, defaults to 1): the least ``T``.
    - ``max_steps_after_entry`` (`int`, defaults to 200): the most ``T`` (the official recipe's 200); ``stats``
      report the bound actually reached.
    - ``samples_per_chain`` (`int`, defaults to 8): samples each chain returns, a few steps apart (the thinning,
      chosen so that a chain has moved between two of them with probability 0.95): the entry and the ``T`` steps
      are paid once per chain, not once per sample.
    - ``num_chains`` (`int`, *optional*): chains side by side; by default ``ceil(images / samples_per_chain)``, at
      most 256 in the pipeline.
    - ``fit_size`` (`int`, defaults to 256): on-target latents per refitting stage.
    - ``fit_batch`` (`int`, *optional*): proposals per round while collecting them (defaults to ``fit_size``).
    - ``pilot_size`` (`int`, defaults to 256): draws of each candidate density on the full target, to choose the
      density and estimate ``W``; no sample is returned before this many proposals entered the estimate.
    - ``fit_seed`` (`int`, defaults to 0): the pipeline fits with its own generator seeded by this, so that a fit is a
      function of the target and the settings alone and a call returns the same images whether it fitted or reused
      a fit.
    - ``screen`` (`int`, `"auto"` or `None`, defaults to `"auto"`): delayed-acceptance screening of diffusion proposals
      (Christen and Fox, 2005; [`sample_imh`]). After ``screen`` of the K denoising steps the heads (or the pipeline's
      screen heads, `s2m_diffusers.screen_heads`) judge the predicted clean image (``pred_original_sample``); a
      proposal rejected there stops denoising, and the acceptance is corrected at the end by the ratio of the true
      weight to the surrogate's, so the chain's target is unchanged. ``"auto"`` chooses the step, and the floor that
      keeps the surrogate positive, from the fit's pilot (the one whose UNet calls per sample it predicts lowest), and
      screens only where that saves at least 10% without pushing ``T`` to its cap; `None` (or ``"off"``) never screens.
      A no-op for proposals without denoising steps (GANs) and for wrapped pipelines whose step callback does not allow
      it (`proposals.PipelineProposal.check_screen`). A wrapped pipeline cannot be resumed after the step, so a
      proposal that passes its screen is rerun whole (``s + K`` UNet calls, counted so, and the calibration predicts
      with it; ``"auto"`` tries steps up to K / 2 there). Unless `None`, the fit's draws (its stages and pilots) are
      screened too, after the first candidate step (``screen`` itself when a step is given): each draw is finished with
      a probability that grows with its surrogate ratio, at least ``screen_min_finish``, and weighted by its inverse
      (Horvitz-Thompson), so that the finished draws, weighted, stand for all of them (`_finish_log_probs`); the chosen
      density's pilot, which seeds the sampler's bound, is then finished whole (the bound's risk lies in the on-target
      draws the surrogate rates low, which a screened pilot sees only at rate ``screen_min_finish``).
    - ``screen_min_finish`` (`float`, defaults to 0.2): the least probability with which a screened fit draw is
      finished whatever its surrogate: the weights stay below ``1 / screen_min_finish``, so a pilot keeps at least
      that share of its precision where the surrogate tells nothing. 1 does not screen the fit's draws. A screened
      fit weighs its candidates by their screened cost ([`fit_latent`]); the pipeline caches fits per ``screen`` and
      ``screen_min_finish``.
    - ``rank`` (`int`, defaults to 32), ``n_components`` (defaults to ``(1, 2, 4, 8)``), ``defensive`` (defaults to
      0.1), ``covariance_scale`` (defaults to 2.0): the refitted density, see
      `s2m_diffusers.densities.LowRankGaussianMixture.fit`. ``covariance_scale=2.0`` (a proposal wider than the fit)
      was chosen on the analytic problem: with 1.0 the fit sometimes missed part of the target.
    - ``fit_families`` (`tuple[str, ...]`, defaults to ``("gaussian", "tilted")``): the densities each refitting
      stage fits, each measured by its own pilot: ``"gaussian"`` (above) and ``"tilted"``, the prior reweighted by a
      classifier of the stage's latents (`s2m_diffusers.densities.TiltedNormal`), which keeps the prior's shape where
      the target's region is not Gaussian-shaped.
    """

    negation_margin: float | None = None
    presence_margin: float | None = None
    dr_temperature: float | str | None = None
    priors: tuple[float, ...] | None = None
    class_label: int | str | None = "auto"
    dv_strength: float | str | None = None
    refit: str = "sequential"
    fit_spend: str = "call"
    mixing_tolerance: float | None = 0.01
    steps_after_entry: int = 1
    max_steps_after_entry: int = 200
    samples_per_chain: int = 8
    num_chains: int | None = None
    fit_size: int = 256
    pilot_size: int = 256
    fit_seed: int = 0
    fit_batch: int | None = None
    rank: int = 32
    n_components: int | tuple[int, ...] = (1, 2, 4, 8)
    defensive: float = 0.1
    covariance_scale: float = 2.0
    fit_families: tuple[str, ...] = ("gaussian", "tilted")
    screen: int | str | None = "auto"
    screen_min_finish: float = 0.2

    def __post_init__(self) -> None:
        if self.refit not in REFIT_MODES:
            raise ValueError(
                f"refit must be one of {list(REFIT_MODES)}, got {self.refit!r}: 'sequential' refits one literal of "
                "the target at a time (the default), 'once' on the full target, 'off' samples from the prior."
            )
        if self.fit_spend not in FIT_SPENDS:
            raise ValueError(
                f"fit_spend must be one of {list(FIT_SPENDS)}, got {self.fit_spend!r}: 'call' spends on refitting at "
                "most what a fit could save on the call's samples (the default), 'full' runs every stage."
            )
        if not isinstance(self.steps_after_entry, int) or self.steps_after_entry < 0:
            raise ValueError(f"steps_after_entry must be a non-negative integer, got {self.steps_after_entry!r}.")
        if self.mixing_tolerance is not None and not 0 < self.mixing_tolerance < 1:
            raise ValueError(f"mixing_tolerance must be in (0, 1) or None, got {self.mixing_tolerance!r}.")
        for name in (
            "fit_size",
            "max_steps_after_entry",
            "num_chains",
            "fit_batch",
            "samples_per_chain",
            "pilot_size",
        ):
            _check_positive(name, getattr(self, name), allow_none=name in ("num_chains", "fit_batch"))
        if self.negation_margin is not None and not self.negation_margin >= 1.0:
            raise ValueError(f"negation_margin must be >= 1 (1 is the paper's formula), got {self.negation_margin}.")
        if self.presence_margin is not None and not 0.0 <= self.presence_margin <= 1.0:
            raise ValueError(
                f"presence_margin must lie in [0, 1] (0 is the paper's formula), got {self.presence_margin}."
            )
        b = self.dv_strength
        if not (
            b is None or b == "auto" or (isinstance(b, int | float) and not isinstance(b, bool) and 0.0 <= b <= 1.0)
        ):
            raise ValueError(f"dv_strength must be 'auto' or a number in [0, 1] (1 is the paper's target), got {b!r}.")
        t = self.dr_temperature
        if not (t is None or t == "auto" or (isinstance(t, int | float) and not isinstance(t, bool) and t > 0)):
            raise ValueError(
                f"dr_temperature must be None, 'auto' or a positive number, got {t!r}; 1.0 (or None) reads the "
                "calibrated heads as they are."
            )
        if self.priors is not None:
            object.__setattr__(self, "priors", tuple(float(p) for p in self.priors))
        families = (self.fit_families,) if isinstance(self.fit_families, str) else tuple(self.fit_families)
        unknown = [f for f in families if f not in FIT_FAMILIES]
        if unknown or not families:
            raise ValueError(
                f"fit_families must name one or more of {list(FIT_FAMILIES)}, got {self.fit_families!r}: 'gaussian' "
                "fits a Gaussian mixture to the on-target latents, 'tilted' tilts the prior by a classifier of them."
            )
        object.__setattr__(self, "fit_families", families)
        if self.screen == "off":
            object.__setattr__(self, "screen", None)
        sc = self.screen
        if not (sc is None or sc == "auto" or (isinstance(sc, int) and not isinstance(sc, bool) and sc >= 1)):
            raise ValueError(
                f"screen must be None (or 'off'), 'auto' or a positive number of denoising steps after which the "
                f"heads screen a proposal on its predicted clean image, got {sc!r}."
            )
        m = self.screen_min_finish
        if not (isinstance(m, int | float) and not isinstance(m, bool) and 0 < m <= 1):
            raise ValueError(
                f"screen_min_finish must be a probability in (0, 1] (1 finishes every fit draw: no screening of the "
                f"fit), got {m!r}."
            )

    def replace(self, **overrides: Any) -> S2MSamplingConfig:
        """A copy with some fields changed; an unknown name is an error that lists the fields."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"Unknown sampling setting(s) {unknown}; S2MSamplingConfig has {sorted(names)}.")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items()})

    @classmethod
    def resolve(cls, config: S2MSamplingConfig | dict | None = None, **overrides: Any) -> S2MSamplingConfig:
        """``config`` (an instance, a dict of fields, or `None` for the defaults) with ``overrides`` applied.

        An override of `None` keeps the config's value (so that callers can pass optional settings through), except
        for the settings where `None` is a value of its own: ``class_label`` (draw the class) and
        ``mixing_tolerance`` (no bound: exactly ``steps_after_entry`` steps)."""
        if isinstance(config, dict):
            config = cls().replace(**config)
        elif config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(f"sampling must be an S2MSamplingConfig or a dict of its fields, got {type(config)}.")
        return config.replace(**{k: v for k, v in overrides.items() if v is not None or k in _NONE_IS_A_VALUE})

    def fit_for(self, num_samples: int | None) -> int | None:
        """The samples a call's fit is made for under ``fit_spend`` ([`fit_latent`]'s ``num_samples``): the call's
        for ``"call"``, `None` (every stage) for ``"full"``."""
        return num_samples if self.fit_spend == "call" else None

    def num_fit_stages(self, num_target_stages: int) -> int:
        """Refitting stages before the final sampling, for a target of ``num_target_stages`` stages."""
        return {"off": 0, "once": 1, "sequential": num_target_stages}[self.refit]


# ----------------------------------------------------------------------------------------------------------
# Results and statistics


@dataclass
class SamplerStats:
    """Diagnostics of one sampler call (spec §5). ``proposals`` counts generator calls (one per latent), ``unet_calls``
    the denoising steps they ran (latents times steps; 0 for a generator without steps), ``cost`` what the budget
    ``max_proposals`` counts: whole proposals, one screened out after ``s`` of its ``K`` denoising steps counting
    ``s / K`` (so ``unet_calls / K`` for a diffusion proposal), ``screen`` the delayed acceptance of the final sampling
    (see [`sample_imh`]; empty when it did not screen)."""

    proposals: int = 0
    unet_calls: int = 0
    cost: float = 0.0
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
    mixing: dict = field(default_factory=dict)  # the final sampling's bound: see `sample_imh`
    fit: str = ""  # the latent density the final sampling used: "prior" or "stage k" (see `fit_latent`)
    screen: dict = field(default_factory=dict)  # the final sampling's screen: see `sample_imh`

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposals if self.proposals else 0.0

    @property
    def proposals_per_sample(self) -> float:
        return self.proposals / self.num_returned if self.num_returned else math.inf

    @classmethod
    def merge(cls, parts: Sequence[SamplerStats], label: str | None = None) -> SamplerStats:
        """The statistics of several runs (refitting stages and final sampling, one run per generator, one per
        process) as one: counts and seconds summed, stages concatenated (tagged ``{label: i}`` when given and
        there is more than one part), ``budget_exhausted`` if any part ran out."""
        out = cls()
        for name in (f.name for f in dataclasses.fields(cls)):
            if name == "stages":
                tag = label is not None and len(parts) > 1
                out.stages = [{**s, label: i} if tag else dict(s) for i, p in enumerate(parts) for s in p.stages]
            elif name == "budget_exhausted":
                out.budget_exhausted = any(p.budget_exhausted for p in parts)
            elif name == "mixing":  # the worst bound of the parts that sampled
                sampled = [p.mixing for p in parts if p.mixing]
                out.mixing = max(sampled, key=lambda m: m.get("bound") or 0.0) if sampled else {}
            elif name == "screen":  # the screens of the parts that screened, their counts summed
                out.screen = _merge_screens([p.screen for p in parts if p.screen])
            elif name == "fit":
                out.fit = next((p.fit for p in reversed(parts) if p.fit), "")
            else:
                setattr(out, name, sum(getattr(p, name) for p in parts))
        return out


@dataclass
class ChainState:
    """A batch of chain states. ``log_ratio = log w + log p_z - log q`` under the density ``q`` in use."""

    z: torch.Tensor  # (B, *latent_shape)
    x: Any  # (B, ...) samples
    log_w: torch.Tensor  # (B,)
    log_ratio: torch.Tensor  # (B,)
    log_ratio_s: torch.Tensor | None = None  # (B, S): the surrogate's log ratios at S screen steps (pilots only)
    log_weight: torch.Tensor | None = None  # (B,): a screened fit draw's -log P(finished) (`_finish_log_probs`)
    pending: Callable | None = None  # a screened pilot's: finish the draws screened out too (`_propose_screened`)


@dataclass
class SampleResult:
    """What a sampler returns: latents, samples, log weights, per-sample on-target flags and statistics."""

    z: torch.Tensor
    x: Any
    log_w: torch.Tensor
    on_target: torch.Tensor  # (N,) bool
    stats: SamplerStats
    q: Any = None  # the latent density of the final stage
    chain: torch.Tensor | None = None  # (N,) long: the chain each sample came from (samples of one chain correlate)

    @classmethod
    def empty(cls, stats: SamplerStats | None = None) -> SampleResult:
        """No sample (a budget spent before any chain finished); ``x`` is `None`."""
        stats = stats if stats is not None else SamplerStats()
        return cls(torch.zeros(0), None, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), stats)

    @property
    def num_samples(self) -> int:
        return 0 if self.x is None else int(self.z.shape[0])

    @classmethod
    def concat(cls, results: Sequence[SampleResult], label: str | None = "run") -> SampleResult:
        """Several runs' samples in order, on the CPU, with merged statistics ([`SamplerStats.merge`])."""
        stats = SamplerStats.merge([r.stats for r in results], label)
        found = [r for r in results if r.num_samples]
        if not found:
            return cls.empty(stats)
        chains, offset = [], 0
        for r in found:
            ids = r.chain if r.chain is not None else torch.arange(r.num_samples)
            chains.append(ids.cpu() + offset)
            offset += int(ids.max()) + 1 if ids.numel() else 0
        return cls(
            *(torch.cat([getattr(r, name).cpu() for r in found]) for name in ("z", "x", "log_w", "on_target")),
            stats,
            found[-1].q,
            torch.cat(chains),
        )


class BudgetExhaustedError(RuntimeError):
    """Raised when the proposal budget ran out before enough chains reached the target.

    ``.result`` holds what was obtained (possibly empty), with its statistics.
    """

    def __init__(self, message: str, result: SampleResult, budget: int | None = None):
        super().__init__(message)
        self.result = result
        self.budget = budget


def budget_error(
    result: SampleResult,
    num_requested: int,
    budget: int | None,
    target: str | None = None,
    tries: Sequence[str] | None = None,
    unit: str = "samples",
) -> BudgetExhaustedError:
    """The one budget-exhausted error: how far the sampler got (proposals, samples found, acceptance, chains that
    reached the target, each refitting stage's on-target proposals) and what to try.

    Args:
        result ([`SampleResult`]): what was found, with its statistics.
        num_requested (`int`): samples asked for.
        budget (`int`, *optional*): the proposal budget.
        target (`str`, *optional*): the target, named in the message.
        tries (`Sequence[str]`, *optional*): what to try, in the words of the interface the user called; by default
            the sampler's own arguments.
    """
    s = result.stats
    n_found = result.num_samples
    if tries is None:
        tries = ["refitting the latent density (refit='sequential')", "a larger max_proposals"]
        if n_found:
            tries.append(f"allow_partial=True to keep the {n_found} {unit} found")
    fits = [st for st in s.stages if "on_target" in st]
    progress = [f"acceptance rate {s.acceptance_rate:.3g}"]
    if s.chains_started:
        entered = f"{s.chains_entered} of {s.chains_started} chains reached the target"
        if s.chains_entered and s.chains_entered * (s.mixing.get("samples_per_chain") or 1) > n_found:
            entered += ", some of them still taking the steps they take after entering it when the budget ran out"
        progress.append(entered)
    if fits:
        shares = ", ".join(f"{st['on_target']} of {st['proposals']}" for st in fits)
        progress.append(f"on-target proposals per refitting stage: {shares}")
    if not s.chains_started and fits:
        progress.append("the refitting stages spent the whole budget before sampling began")
    never = not s.chains_entered and not any(st.get("on_target") for st in fits)
    for_target = f" for target {target!r}" if target else ""
    message = (
        f"The proposal budget of {budget} ran out after {s.proposals} proposals{_screened_cost(s)} with {n_found} of "
        f"{num_requested} "
        f"on-target {unit}{for_target} ({'; '.join(progress)}). Try " + "; ".join(tries) + "."
    )
    if never:
        message += (
            " No proposal reached the target: check that the generator can produce this combination and that the "
            "heads recognise it."
        )
    return BudgetExhaustedError(message, result, budget)


def _screened_cost(stats: SamplerStats) -> str:
    """`` (costing N: some were screened out part-way)`` where the budget's count differs from the proposals'."""
    return (
        f" (costing {stats.cost:.1f}: some were screened out part-way)" if stats.cost < stats.proposals - 0.05 else ""
    )


# ----------------------------------------------------------------------------------------------------------
# Pieces


def _select(mask: torch.Tensor, new: Any, old: Any) -> Any:
    """``where(mask, new, old)`` along the batch dimension, for a tensor of any rank."""
    m = mask.reshape(-1, *([1] * (new.ndim - 1))).to(new.device)
    return torch.where(m, new, old)


def _propose(
    evaluate: Evaluate,
    q,
    n: int,
    generator,
    stats: SamplerStats,
    views: Sequence[int] | None = None,
    screen: tuple[int, float] | None = None,
) -> ChainState:
    """Draw ``n`` latents from ``q``, run ``evaluate`` on them, and give their chain states; with ``views`` (screen
    steps), also the surrogate's log ratios at those steps (``evaluate.views``, see [`sample_imh`]).

    With ``screen = (s, min_finish)`` (a fit's draws, [`_fit_screen_step`]) each draw runs ``s`` steps, is
    finished with the probability [`_finish_log_probs`] gives its surrogate (``views`` must then lie at or after
    ``s``), and only the finished draws are returned, with ``log_weight = -log P(finished)``; the others cost
    ``s / K`` (`_propose_screened`)."""
    if screen is not None:
        return _propose_screened(evaluate, q, n, generator, stats, views or (), *screen)
    z = q.sample(n, generator=generator)
    t0 = time.perf_counter()
    if views:
        x, log_w, log_w_s = evaluate.views(z, list(views))
    else:
        x, log_w = evaluate(z)
    stats.seconds_evaluate += time.perf_counter() - t0
    stats.proposals += n
    stats.unet_calls += n * _num_steps(evaluate)
    stats.cost += n
    log_w = log_w.to(torch.float64)
    correction = q.log_prior_ratio(z).to(log_w.device, torch.float64)
    state = ChainState(z, x, log_w, log_w + correction)
    if views:
        state.log_ratio_s = log_w_s.to(torch.float64).cpu() + correction.cpu()[:, None]
    return state


def _propose_screened(evaluate, q, n, generator, stats, views, step, min_finish) -> ChainState:
    """[`_propose`] with a screen after ``step`` steps: the finished draws, weighted, and in ``pending`` a function
    ``pending(stats) -> ChainState`` that finishes the others too (counted in ``stats``) and gives all ``n`` draws in
    their order, unweighted: what a pilot that seeds the sampler's bound must be (see [`fit_latent`])."""
    z = q.sample(n, generator=generator)
    t0 = time.perf_counter()
    handle, log_w_s = evaluate.start(z, step)
    correction = q.log_prior_ratio(z).double().cpu()
    ls = log_w_s.double().cpu() + correction
    log_p = _finish_log_probs(ls, min_finish)
    keep = imh_accept(torch.zeros_like(log_p), log_p, generator).cpu().nonzero().flatten()
    later = [v for v in views if v > step]
    k = _num_steps(evaluate)

    def finished(idx: torch.Tensor, counted: SamplerStats) -> ChainState:
        """The draws ``idx`` run to the end, with the surrogate at ``views``."""
        t1 = time.perf_counter()
        if idx.numel():
            x, log_w, log_w_later = evaluate.finish(handle, idx, later)
            log_w = log_w.double().cpu()
        else:
            x, log_w, log_w_later = None, torch.zeros(0, dtype=torch.float64), torch.zeros(0, len(later))
        counted.seconds_evaluate += time.perf_counter() - t1
        state = ChainState(z[idx.to(z.device)], x, log_w, log_w + correction[idx])
        if views:
            columns = {step: ls[idx]}
            columns.update({v: log_w_later[:, i].double().cpu() + correction[idx] for i, v in enumerate(later)})
            state.log_ratio_s = torch.stack([columns[v] for v in views], 1)
        return state

    def pending(counted: SamplerStats) -> ChainState:
        rest = torch.ones(n, dtype=torch.bool)
        rest[keep] = False
        rest = rest.nonzero().flatten()
        done = finished(rest, counted)
        _count_screened(counted, 0, rest.numel(), step, k, _restarts(evaluate))  # their first steps are counted
        order = torch.cat([keep, rest]).argsort()
        parts = [s_ for s_ in (state, done) if s_.z.shape[0]]

        def joined(name: str):
            values = [getattr(s_, name) for s_ in parts]
            if any(v is None for v in values):
                return None
            return torch.cat([v.cpu() for v in values])[order]

        return ChainState(joined("z"), joined("x"), joined("log_w"), joined("log_ratio"), joined("log_ratio_s"))

    stats.seconds_evaluate += time.perf_counter() - t0
    state = finished(keep, stats)
    _count_screened(stats, n, keep.numel(), step, k, _restarts(evaluate))
    state.log_weight, state.pending = -log_p[keep], pending
    return state


def _count_screened(
    stats: SamplerStats, n: int, finished: int, step: int, num_steps: int, restarts: bool = False
) -> None:
    """Count ``n`` proposals screened after ``step`` of ``num_steps`` denoising steps, ``finished`` of them run to the
    end: their UNet calls, and their cost (a proposal screened out counts ``step / num_steps``; one finished by a
    proposal that ``restarts`` counts ``(step + num_steps) / num_steps``)."""
    calls = n * step + finished * _finish_calls(step, num_steps, restarts)
    stats.proposals += n
    stats.unet_calls += calls
    stats.cost += calls / num_steps


def _finish_calls(step: int, num_steps: int, restarts: bool) -> int:
    """The UNet calls that finish a proposal screened after ``step`` steps: the rest (``K - s``), or all ``K`` for a
    proposal that ``restarts`` (a wrapped pipeline, rerun from its latent: `proposals.PipelineProposal`)."""
    return num_steps if restarts else num_steps - step


def _within(budget_left: int | None, evaluate: Evaluate, step: int | None) -> int | None:
    """The proposals that ``budget_left`` whole proposals pay for at most, screened after ``step`` steps (`None`:
    unscreened, one each): a proposal that restarts costs up to ``(s + K) / K`` (screened, then rerun whole)."""
    if budget_left is None or step is None or not _restarts(evaluate):
        return budget_left
    k = _num_steps(evaluate)
    return math.floor(budget_left * k / (step + k))


def _restarts(evaluate: Evaluate) -> bool:
    """Whether ``evaluate`` finishes a screened proposal by rerunning it whole (``screen_restarts``)."""
    return bool(getattr(evaluate, "screen_restarts", False))


def _left(budget: float | None, spent: float) -> int | None:
    """The whole proposals a budget still holds after ``spent`` (`None`: no budget)."""
    return None if budget is None else max(0, math.floor(budget - spent + 1e-9))


def _finish_log_probs(log_ratio_s: torch.Tensor, min_finish: float) -> torch.Tensor:
    """The log probabilities with which screened fit draws are finished, from their surrogate log ratios:
    ``p = min(1, max(min_finish, s / mean s))`` (a draw the surrogate rates above average is always finished; a
    surrogate of 0 gets ``min_finish``). A finished draw weighs ``1 / p`` (Poisson sampling, Horvitz-Thompson): any
    mean over ``q`` estimated from the finished draws so weighted is unbiased, whatever the surrogate, and the
    weights stay below ``1 / min_finish``."""
    ls = log_ratio_s.double().cpu()
    finite = torch.isfinite(ls)
    if not finite.any():
        return torch.full_like(ls, math.log(min_finish))
    log_mean = float(torch.logsumexp(ls[finite], 0)) - math.log(ls.numel())
    return torch.clamp(ls - log_mean, min=math.log(min_finish), max=0.0)


def _fit_screen_step(evaluate: Evaluate, config: S2MSamplingConfig) -> int | None:
    """The step after which a fit's draws are screened (the first candidate step of ``config.screen``; [`_propose`]),
    `None` when they are not (no screen, a proposal that cannot screen, or ``screen_min_finish`` 1)."""
    if config.screen_min_finish >= 1:
        return None
    steps = _screen_steps(evaluate, config)
    return steps[0] if steps else None


def _num_steps(evaluate: Evaluate) -> int:
    """The denoising steps (UNet calls) of one proposal of ``evaluate``: its ``num_steps``, 0 when it has none."""
    return int(getattr(evaluate, "num_steps", None) or 0)


def _screen_steps(evaluate: Evaluate, config: S2MSamplingConfig) -> list[int]:
    """The screen steps to calibrate for ``evaluate`` under ``config.screen`` (none when it does not screen).

    Raises:
        ValueError: an int ``screen`` that the proposal cannot screen at (no steps, a pipeline that cannot be stopped
            and resumed, or a step at or past its last).
    """
    if config.screen is None:
        return []
    k = _num_steps(evaluate)
    why = _cannot_screen(evaluate)
    if why is not None:
        if config.screen == "auto":
            return []
        raise ValueError(f"screen={config.screen!r} was asked for, but {why} Use screen=None (or 'auto').")
    if config.screen == "auto":
        shares = [s for s in _SCREEN_SHARES if s <= _RESTART_MAX_SHARE or not _restarts(evaluate)]
        return sorted({min(k - 1, max(1, round(share * k))) for share in shares})
    if not config.screen < k:
        raise ValueError(
            f"screen={config.screen} must be below the proposal's {k} denoising steps (the heads screen the "
            "predicted clean image after that many steps, and the rest are skipped for proposals screened out): "
            f"pick 1..{k - 1}."
        )
    return [int(config.screen)]


def _cannot_screen(evaluate: Evaluate) -> str | None:
    """Why ``evaluate`` cannot screen its proposals, or `None` when it can (``start``/``finish``/``views``, and no
    ``screen_unavailable`` reason)."""
    why = getattr(evaluate, "screen_unavailable", None)
    if why:
        return why
    if all(callable(getattr(evaluate, name, None)) for name in ("start", "finish", "views")):
        return (
            None if _num_steps(evaluate) >= 2 else "the proposal has fewer than 2 denoising steps to screen between."
        )
    return (
        "this proposal cannot be stopped after a denoising step and resumed (a GAN, or an evaluate function without "
        "start/finish/views)."
    )


def _finish(result: SampleResult, start: float) -> SampleResult:
    s = result.stats
    s.seconds_total += time.perf_counter() - start
    s.num_returned = result.num_samples
    s.on_target_returned = int(result.on_target.sum())
    z = result.z
    s.unique_returned = int(torch.unique(z.reshape(z.shape[0], -1), dim=0).shape[0]) if s.num_returned else 0
    return result


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _gen_device(generator: torch.Generator | None) -> torch.device | str:
    return generator.device if generator is not None else "cpu"


# ----------------------------------------------------------------------------------------------------------
# Samplers


def sample_official(
    evaluate: Evaluate,
    p_z: StandardNormal,
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
        p_z ([`StandardNormal`]): the latent prior, also the proposal density.
        num_chains (`int`, defaults to 64), num_steps (`int`, defaults to 200): as in the official code.
        generator (`torch.Generator`, *optional*): the source of all randomness.
        callback (`Callable`, *optional*): ``callback(round, info)`` after every step.
    """
    _check_positive("num_chains", num_chains)
    _check_positive("num_steps", num_steps)
    start = time.perf_counter()
    stats = SamplerStats(chains_started=num_chains)
    state = _propose(evaluate, p_z, num_chains, generator, stats)
    ever = torch.isfinite(state.log_w)
    for step in range(num_steps):
        new = _propose(evaluate, p_z, num_chains, generator, stats)
        accept = imh_accept(state.log_ratio, new.log_ratio, generator)
        names = ("z", "x", "log_w", "log_ratio")
        state = ChainState(*(_select(accept, getattr(new, k), getattr(state, k)) for k in names))
        ever |= torch.isfinite(state.log_w)
        stats.accepted += int(accept.sum())
        stats.rounds += 1
        if callback is not None:
            callback(step, {"accepted": int(accept.sum()), "on_target": int(torch.isfinite(state.log_w).sum())})
    stats.chains_entered = int(ever.sum())
    result = SampleResult(state.z, state.x, state.log_w, torch.isfinite(state.log_w), stats, p_z)
    return _finish(result, start)


class _MixingBound:
    """How many MH steps after entry bring a chain within a tolerance of the target (spec §5), and how many steps apart
    a chain's returned samples are.

    The distance is `s2m_diffusers.maths.imh_distance`: the independence sampler's exact total variation distance after
    ``T`` steps from an entry drawn from ``q`` on the target (Smith and Tierney's transition), for the empirical
    distribution of the importance ratios ``w p_z / q`` of all proposals seen (the fit's pilot draws, then every
    proposal of the run): one global figure, so that no chain's own path decides its length. Under a screen (delayed
    acceptance, whose kernel is not an independence sampler's) it is `s2m_diffusers.maths.da_imh_distances`: the
    delayed-acceptance chain's exact distance for the empirical distribution of the pilot's draws (fully evaluated
    whatever their surrogate; the proposals that passed the screen are a biased sample of ``q``, and weighting them
    by ``1 / P(pass)`` leaves the off-target proposals the screen stops unseen, which makes the chain look far faster
    than it is), with the bar of the proposals seen. ``T`` stays in
    ``[steps_after_entry, max_steps_after_entry]``. Nothing is returned before
    ``min_seen`` proposals have entered the estimate. The thinning ``k`` between two samples of one chain is the
    fewest steps after which the chain has moved with probability 0.95 at the observed acceptance rate (at most
    ``max_steps_after_entry``), so that consecutive samples of a chain are rarely the same image; it decides
    correlation, not bias, since every returned state is at least ``T`` steps past its chain's entry.
    """

    def __init__(self, tolerance: float | None, min_steps: int, max_steps: int, min_seen: int = 0):
        self.tolerance, self.min_steps, self.max_steps, self.min_seen = tolerance, min_steps, max_steps, min_seen
        self.steps = min_steps
        self.log_sum, self.log_max, self.seen = -math.inf, -math.inf, 0  # running log-sum-exp and max of pi / q
        self.moves, self.tries = 0, 0  # MH steps of entered chains that moved, and all such steps
        # Delayed acceptance (a screen): running log-sum-exp and max of the surrogate's ratio over the proposals, and
        # the max of the true ratio over the surrogate's among the fully evaluated ones.
        self.screened, self.seen_s = False, 0
        self.log_sum_s, self.log_max_s, self.log_max_rho = -math.inf, -math.inf, -math.inf
        self.log_ratios: list[torch.Tensor] = []  # every proposal's log ratio (unscreened): the exact bound's input
        # under a screen, the pilot's draws: (log r, log s), the exact bound's input
        self.atoms: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.atoms_used, self.distance = 0, None  # atoms when T was last computed, and its distance then

    def update(
        self,
        log_ratio: torch.Tensor,
        log_ratio_s: torch.Tensor | None = None,
        log_pass: torch.Tensor | None = None,
        log_ratio_s_all: torch.Tensor | None = None,
    ) -> int:
        """Add proposals' log ratios to the estimate of ``W``; returns ``T``.

        Under a screen, ``log_ratio`` holds the fully evaluated proposals only, ``log_ratio_s`` their (floored)
        surrogate log ratios, ``log_pass`` the log probability that each passed the screen (its mean ``pi / q`` is
        then a Horvitz-Thompson estimate over all proposals), and ``log_ratio_s_all`` the surrogate's log ratios of
        every proposal of the round, screened out or not."""
        log_ratio = log_ratio.double().cpu()
        weighted = log_ratio if log_pass is None else log_ratio - log_pass.double().cpu()
        keep = torch.isfinite(weighted)
        self.seen += log_ratio.numel() if log_ratio_s_all is None else log_ratio_s_all.numel()
        if keep.any():
            finite = weighted[keep]
            self.log_sum = float(torch.logsumexp(torch.cat([finite, finite.new_tensor([self.log_sum])]), 0))
            self.log_max = max(self.log_max, float(log_ratio[keep].max()))
        if log_ratio_s_all is not None:
            self.screened = True
            all_s = log_ratio_s_all.double().cpu()
            self.seen_s += all_s.numel()
            if all_s.numel():
                self.log_sum_s = _log_add(self.log_sum_s, float(torch.logsumexp(all_s, 0)))
                self.log_max_s = max(self.log_max_s, float(all_s.max()))
            rho = log_ratio - log_ratio_s.double().cpu()
            if torch.isfinite(rho).any():
                self.log_max_rho = max(self.log_max_rho, float(rho[torch.isfinite(rho)].max()))
            if log_pass is None:  # draws of q fully evaluated whatever their surrogate: the exact bound's input
                self.atoms.append((log_ratio, log_ratio_s.double().cpu()))
        else:
            self.log_ratios.append(log_ratio)
        if self.tolerance is not None and self.log_max > -math.inf:
            if self.screened:
                self._screened_steps()
            else:
                self.log_ratios = [torch.cat(self.log_ratios)]
                self.steps = imh_steps(
                    self.log_ratios[0], self.tolerance, self.min_steps, self.max_steps, hint=self.steps
                )
        return self.steps

    def _screened_steps(self) -> None:
        """``T`` under a screen from the delayed-acceptance chain's exact distance on the pilot's draws, computed once
        per pilot (on at most the latest ``_MAX_ATOMS`` on-target ones: the cost is their square times ``T``)."""
        count = sum(a[0].numel() for a in self.atoms)
        if self.distance is not None and count == self.atoms_used:
            return
        lr, ls = (torch.cat([a[i] for a in self.atoms]) for i in range(2))
        on = torch.isfinite(lr).nonzero().flatten()
        if on.numel() > _MAX_ATOMS:  # the off-target atoms only carry weight: keep them all, and the latest on-target
            keep = torch.ones_like(lr, dtype=torch.bool)
            keep[on[:-_MAX_ATOMS]] = False
            lr, ls = lr[keep], ls[keep]
        bar = self.log_mean_s if self.seen_s else None
        self.steps, self.distance = da_imh_steps(lr, ls, self.tolerance, self.min_steps, self.max_steps, None, bar)
        self.atoms_used = count

    @property
    def w_estimate(self) -> float:
        """``W = sup pi / q`` over its mean."""
        if self.log_max == -math.inf:
            return math.inf
        return math.exp(self.log_max - (self.log_sum - math.log(self.seen)))

    @property
    def w_bound(self) -> float:
        """The ``W`` of the bound: ``W`` itself, or under a screen ``sup(pi_s / q) * sup(pi / pi_s)`` over the mean of
        ``pi / q``: the delayed-acceptance kernel moves to ``z'`` with at least ``q(z') min(1, r_s) min(1, rho)``,
        which is at least ``pi(z') / W_bound`` (Christen and Fox's kernel is uniformly ergodic at that rate)."""
        if not self.screened:
            return self.w_estimate
        if self.log_max == -math.inf or self.log_max_rho == -math.inf:
            return math.inf
        return math.exp(self.log_max_s + self.log_max_rho - (self.log_sum - math.log(self.seen)))

    @property
    def log_mean_s(self) -> float:
        """``log`` of the mean surrogate ratio of the proposals seen: the screen's bar for a chain not yet entered."""
        return self.log_sum_s - math.log(self.seen_s) if self.seen_s else -math.inf

    @property
    def ready(self) -> bool:
        return self.seen >= self.min_seen

    @property
    def thinning(self) -> int:
        return _thinning_for(self.moves / self.tries if self.tries else 0.0, self.max_steps)

    def report(self) -> dict:
        w = self.w_bound
        uniform = (1 - 1 / w) ** self.steps if math.isfinite(w) and w >= 1 else None
        exact = not self.screened and self.log_ratios
        bound, bound_from = uniform, "(1 - 1/W)^T"
        if exact:
            bound = imh_distance(torch.cat(self.log_ratios), [self.steps])[0]
            bound_from = (
                f"the independence sampler's exact distance after T steps from an entry drawn from q on the target "
                f"(Smith and Tierney 1996), for the importance ratios of the {self.seen} proposals seen"
            )
        elif self.screened and self.distance is not None:  # the distance T was chosen with (and the bar then)
            bound = self.distance
            bound_from = (
                f"the delayed-acceptance chain's exact distance after T steps from its entry (Christen and Fox 2005), "
                f"for the importance and surrogate ratios of the pilot's {self.atoms_used} draws"
            )
        out = {
            "tolerance": self.tolerance,
            "steps_after_entry": self.steps,
            "bound": bound,
            "bound_from": bound_from,
            "uniform_bound": uniform,
            "w_estimate": w if math.isfinite(w) else None,
            "w_estimated_from": f"max / mean of the importance ratios of {self.seen} proposals",
            "thinning": self.thinning,
            "acceptance_after_entry": self.moves / self.tries if self.tries else None,
        }
        if self.screened:
            full = self.w_estimate
            out["w_estimated_from"] = (
                f"delayed acceptance: max of the surrogate's ratio times max of the true-to-surrogate ratio, over the "
                f"mean importance ratio (Horvitz-Thompson over the screen) of {self.seen} proposals"
            )
            out["w_unscreened_estimate"] = full if math.isfinite(full) else None
        return out


def _log_add(a: float, b: float) -> float:
    """``log(exp(a) + exp(b))``."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


class _ChainPool:
    """At most ``size`` chains of [`sample_imh`] side by side. Per slot: the state, the MH steps since entry (-1: not
    entered), how many samples the chain still owes, and the step of its last returned sample. Empty slots and
    unentered chains have ``log_w = -inf``."""

    def __init__(self, size: int):
        self.size = size
        self.state: ChainState | None = None
        self.steps = torch.zeros(size, dtype=torch.long)
        self.alive = torch.zeros(size, dtype=torch.bool)
        self.owed = torch.zeros(size, dtype=torch.long)
        self.last = torch.zeros(size, dtype=torch.long)  # step of the last returned sample, -1: none yet
        self.ids = torch.zeros(size, dtype=torch.long)  # the chain in each slot, numbered in the order started
        self.log_ratio_s = torch.full((size,), -math.inf, dtype=torch.float64)  # the surrogate's, under a screen
        self.started = 0

    def start_chains(self, outstanding: int, per_chain: int) -> int:
        """Start new (empty) chains in free slots until the running chains owe ``outstanding`` samples."""
        started = 0
        for i in (~self.alive).nonzero().flatten().tolist():
            missing = outstanding - int(self.owed[self.alive].sum())
            if missing <= 0:
                break
            self.alive[i], self.steps[i], self.last[i], self.ids[i] = True, -1, -1, self.started
            self.owed[i] = min(per_chain, missing)
            started += 1
            self.started += 1
        return started

    def lay_out(self, new: ChainState) -> None:
        """Allocate the pool's storage from the first proposals' shapes."""
        if self.state is None:
            self.state = ChainState(
                torch.zeros((self.size, *new.z.shape[1:]), dtype=new.z.dtype, device=new.z.device),
                torch.zeros((self.size, *new.x.shape[1:]), dtype=new.x.dtype, device=new.x.device),
                torch.full((self.size,), -math.inf, dtype=torch.float64, device=new.log_w.device),
                torch.full((self.size,), -math.inf, dtype=torch.float64, device=new.log_w.device),
            )

    def step(self, active: torch.Tensor, new: ChainState, generator) -> tuple[int, int, int, int]:
        """One MH step of the ``active`` chains against ``new``.

        Returns:
            (accepted, entered now, entered chains that stepped, of those the ones that moved).
        """
        state, steps = self.state, self.steps
        cur_ratio = torch.where(steps[active] >= 0, state.log_ratio[active].cpu(), -math.inf).to(new.log_ratio)
        accept = imh_accept(cur_ratio, new.log_ratio, generator).cpu()
        rows = ChainState(
            *(getattr(new, k)[accept.to(getattr(new, k).device)] for k in ("z", "x", "log_w", "log_ratio"))
        )
        return self.move(active, accept, rows)

    def move(
        self, active: torch.Tensor, accept: torch.Tensor, rows: ChainState, log_ratio_s: torch.Tensor | None = None
    ) -> tuple[int, int, int, int]:
        """Every ``active`` chain has taken one MH step; those where ``accept`` moved to ``rows`` (the accepted
        proposals, in order), with the surrogate's log ratios ``log_ratio_s`` under a screen.

        Returns:
            (accepted, entered now, entered chains that stepped, of those the ones that moved).
        """
        state, steps = self.state, self.steps
        was_in = steps[active] >= 0
        entered_now = accept & ~was_in
        idx = active[accept]
        if idx.numel():
            for name in ("z", "x", "log_w", "log_ratio"):
                mine = getattr(state, name)
                mine[idx.to(mine.device)] = getattr(rows, name).to(mine.device)
            if log_ratio_s is not None:
                self.log_ratio_s[idx] = log_ratio_s.cpu()
        # A chain that entered this round has taken 0 steps after entry; others advance by one.
        steps[active] = torch.where(was_in, steps[active] + 1, torch.where(entered_now, 0, -1))
        return int(accept.sum()), int(entered_now.sum()), int(was_in.sum()), int((accept & was_in).sum())

    def take_due(
        self, active: torch.Tensor, first: int, thinning: int, limit: int
    ) -> tuple[ChainState, torch.Tensor] | None:
        """Copies of the states of (at most ``limit``) chains due to return a sample: ``first`` steps past entry, and
        ``thinning`` steps past their previous sample. A chain that owes nothing more frees its slot."""
        steps, last = self.steps[active], self.last[active]
        due = (steps >= first) & ((last < 0) | (steps - last >= thinning))
        chosen = active[due][:limit]
        if not chosen.numel():
            return None
        s, f = self.state, chosen.to(self.state.z.device)
        out = ChainState(s.z[f].clone(), s.x[f].clone(), s.log_w[f].clone(), s.log_ratio[f].clone())
        ids = self.ids[chosen].clone()
        self.last[chosen] = self.steps[chosen]
        self.owed[chosen] -= 1
        done = chosen[self.owed[chosen] == 0]
        self.alive[done] = False
        s.log_w[done.to(s.log_w.device)] = -math.inf
        s.log_ratio[done.to(s.log_ratio.device)] = -math.inf
        return out, ids


def _steps_screened(
    log_ratio: torch.Tensor, log_ratio_s: torch.Tensor, config: S2MSamplingConfig, weights: torch.Tensor | None = None
) -> int:
    """``T`` of [`_MixingBound`] under a screen, for draws of ``q`` with these log ratios and (floored) surrogate log
    ratios (and ``weights``): the delayed-acceptance chain's exact distance on them."""
    if config.mixing_tolerance is None:
        return config.steps_after_entry
    if not torch.isfinite(log_ratio).any():
        return config.max_steps_after_entry
    tol, low, high = config.mixing_tolerance, config.steps_after_entry, config.max_steps_after_entry
    return da_imh_steps(log_ratio, log_ratio_s, tol, low, high, weights=weights)[0]


def _steps_unscreened(log_ratio: torch.Tensor, config: S2MSamplingConfig, weights: torch.Tensor | None = None) -> int:
    """``T`` of [`_MixingBound`] without a screen, for draws of ``q`` with these log importance ratios (and
    ``weights``)."""
    if config.mixing_tolerance is None:
        return config.steps_after_entry
    if not torch.isfinite(log_ratio).any():
        return config.max_steps_after_entry
    tol, low, high = config.mixing_tolerance, config.steps_after_entry, config.max_steps_after_entry
    return imh_steps(log_ratio, tol, low, high, weights=weights)


def _thinning_for(rate: float, max_steps: int) -> int:
    """The thinning of [`_MixingBound`] at an acceptance rate: capped by ``max_steps_after_entry``, not by ``T`` (a
    short ``T`` must not return a stuck chain twice)."""
    if rate >= 1.0:
        return 1
    k = math.ceil(math.log(_STUCK_SHARE) / math.log1p(-rate)) if rate > 0 else max_steps
    return max(1, min(k, max_steps))


def _pair_means(
    p: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor | None = None, q: torch.Tensor | None = None
) -> float:
    """``sum_i p_i sum_j q_j min(1, exp(a_j - a_i)) [min(1, exp(b_j - b_i))]``: an acceptance probability with the
    current state ``i`` drawn from ``p`` and the proposal ``j`` from ``q`` over the same draws (default uniform)."""
    i = p > 0
    acc = torch.clamp(log_a[None, :] - log_a[i][:, None], max=0.0).nan_to_num(nan=-math.inf).exp()  # (I, n)
    if log_b is not None:
        acc = acc * torch.clamp(log_b[None, :] - log_b[i][:, None], max=0.0).nan_to_num(nan=-math.inf).exp()
    return float((p[i] * (acc.mean(1) if q is None else acc @ q.double())).sum())


def _chain_cost(
    log_ratio: torch.Tensor,
    log_ratio_s: torch.Tensor | None,
    step: int,
    num_steps: int,
    config: S2MSamplingConfig,
    log_weight: torch.Tensor | None = None,
    restarts: bool = False,
) -> tuple[float, int]:
    """The UNet calls one chain of [`sample_imh`] is predicted to pay with draws of ``q`` like a pilot's (log ratios
    ``log_ratio``, log weights ``log_weight`` for a screened pilot), and its ``T``: unscreened (``log_ratio_s``
    `None`: ``K`` calls per proposal), or screened after ``step`` of the ``K = num_steps`` steps with the floored
    surrogate log ratios ``log_ratio_s`` (see [`calibrate_screen`]; ``restarts``: a proposal that passes the screen
    costs ``K`` more, not ``K - s``). Weighted draws count as repeated draws."""
    lr = log_ratio.double().cpu()
    lw = torch.zeros_like(lr) if log_weight is None else log_weight.double().cpu()
    weights = None if log_weight is None else lw.exp()
    k, on = num_steps, torch.isfinite(lr)
    p = torch.softmax(torch.where(on, lr + lw, -math.inf), 0)  # current states: the pilot reweighted to the target
    q = torch.softmax(lw, 0)  # proposals: the pilot's draws as q makes them
    if log_ratio_s is None:
        t, rate, per_step = _steps_unscreened(lr, config, weights), _pair_means(p, lr, q=q), k
        entry = k / float(q[on].sum())
    else:
        ls = log_ratio_s.double().cpu()
        t = _steps_screened(lr, ls, config, weights)
        rate = _pair_means(p, ls, lr - ls, q=q)  # both stages of delayed acceptance
        rest = _finish_calls(step, k, restarts)
        per_step = step + _pair_means(p, ls, q=q) * rest
        entry_pass = torch.clamp(ls - float(torch.logsumexp(ls + q.log(), 0)), max=0.0).exp()
        enter = float((entry_pass * on * q).sum())
        entry = (step + float((entry_pass * q).sum()) * rest) / enter if enter > 0 else math.inf
    thinning = _thinning_for(rate, config.max_steps_after_entry)
    return entry + (t + (config.samples_per_chain - 1) * thinning) * per_step, t


def calibrate_screen(
    log_ratio: torch.Tensor,
    log_ratio_s: torch.Tensor,
    steps: Sequence[int],
    num_steps: int,
    config: S2MSamplingConfig,
    log_weight: torch.Tensor | None = None,
    restarts: bool = False,
) -> dict:
    """Choose the screen step and the surrogate's floor from a pilot of ``n`` fully evaluated draws of ``q``.

    For each candidate step ``s`` and floor ``f`` (a quantile of the surrogate's finite log ratios at ``s``) it
    predicts the UNet calls per chain, against the unscreened sampler's, from the pilot alone: a chain pays its entry,
    then ``T + (samples_per_chain - 1) * thinning`` MH steps, each of ``s + P(pass) (K - s)`` UNet calls (``K``
    unscreened), with ``T`` from the bound of [`_MixingBound`] (under the screen the delayed-acceptance chain's exact
    distance on the pilot, `maths.da_imh_distances`: a screen that would push ``T`` to ``max_steps_after_entry``
    where the unscreened chain stays below it is not considered), the thinning from the acceptance rate, and the
    pass and acceptance
    probabilities averaged over current states drawn from the pilot reweighted to the target and proposals drawn
    from the pilot.

    Args:
        log_ratio (`torch.Tensor` of shape `(n,)`): ``log w + log p_z - log q`` of the pilot (``-inf`` off target).
        log_ratio_s (`torch.Tensor` of shape `(n, S)`): the surrogate's log ratios at the ``S`` candidate ``steps``
            (``-inf`` where it is 0).
        steps (`Sequence[int]`): the candidate steps.
        num_steps (`int`): ``K``.
        config ([`S2MSamplingConfig`]): the tolerance, the steps and the samples per chain.
        log_weight (`torch.Tensor` of shape `(n,)`, *optional*): the draws' log weights, for a screened pilot (the
            finished draws of [`_propose`] with a screen, weighted by their inverse finishing probability): every
            mean over ``q`` is then taken with these weights (equal to repeating the draws).
        restarts (`bool`, defaults to `False`): the proposal finishes a screened proposal by rerunning it whole
            (``s + P(pass) K`` UNet calls per MH step: a wrapped pipeline, `proposals.PipelineProposal`).

    Returns:
        `dict`: ``step`` and ``log_floor`` of the cheapest candidate, ``predicted_cost`` (its UNet calls over the
        unscreened sampler's), ``agreement`` (Spearman correlation of surrogate and true log ratio over the pilot's
        on-target draws at that step), ``on_target_seen`` (share of those the unfloored surrogate put on the target),
        and ``candidates`` (the best predicted cost of each step).
    """
    lr = log_ratio.double().cpu()
    ls_all = log_ratio_s.double().cpu()
    on = torch.isfinite(lr)
    if not on.any():
        return {"step": None, "reason": "no pilot draw on the target"}
    base, base_steps = _chain_cost(lr, None, 0, num_steps, config, log_weight)
    best, candidates = None, []
    for col, step in enumerate(steps):
        raw = ls_all[:, col]
        finite = torch.isfinite(raw)
        if not finite.any():
            continue
        step_best = None
        seen = torch.isfinite(raw) & on  # floors among the on-target draws' surrogates, which decide sup(r / r_s)
        for quantile in _SCREEN_FLOOR_QUANTILES:
            floor = float(torch.quantile(raw[seen if seen.any() else finite], quantile))
            floored = torch.clamp(raw, min=floor)
            cost, steps_s = _chain_cost(lr, floored, step, num_steps, config, log_weight, restarts)
            if steps_s == config.max_steps_after_entry > base_steps and config.screen == "auto":
                continue  # it would lengthen the chains past the cap that the unscreened bound stays under
            if step_best is None or cost / base < step_best[0]:
                step_best = (cost / base, floor)
        if step_best is None:
            continue
        candidates.append({"step": step, "predicted_cost": step_best[0]})
        if best is None or step_best[0] < best[0]:
            best = (step_best[0], step_best[1], step, col)
    if best is None:
        return {"step": None, "reason": "the surrogate is 0 on every pilot draw", "candidates": candidates}
    cost, floor, step, col = best
    raw = ls_all[:, col]
    return {
        "step": step,
        "log_floor": floor,
        "predicted_cost": cost,
        "agreement": _spearman(torch.clamp(raw[on], min=floor), lr[on]),
        "on_target_seen": float(torch.isfinite(raw[on]).double().mean()),
        "candidates": candidates,
    }


def _saves_too_little(record: dict, config: S2MSamplingConfig) -> bool:
    """Whether ``"auto"`` declines the screen a [`calibrate_screen`] record chose: it predicts more than
    ``_SCREEN_MAX_COST`` of the unscreened UNet calls (a given step is always used)."""
    return config.screen == "auto" and record["predicted_cost"] > _SCREEN_MAX_COST


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation (ties broken by order), `None` for fewer than 3 values or a constant one."""
    if a.numel() < 3:
        return None
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else None


class _Screen:
    """Delayed-acceptance Metropolis-Hastings (Christen and Fox, 2005) for [`sample_imh`]: each round's proposals run
    ``step`` denoising steps (``evaluate.start``), a first stage accepts with the surrogate's ratio, and only the
    proposals it passes run the rest (``evaluate.finish``, compacted into full micro-batches) and face the second
    stage, the ratio of the true weight to the surrogate's. The surrogate's log ratio is floored at ``log_floor``, so
    it is positive wherever the true weight is: the chain's target is unchanged whatever the surrogate."""

    def __init__(self, step: int, log_floor: float, num_steps: int, record: dict, restarts: bool = False):
        self.step, self.log_floor, self.num_steps, self.record = step, log_floor, num_steps, record
        self.restarts = restarts  # a proposal that passes is rerun whole (a wrapped pipeline)
        self.proposed = self.finished = self.finished_on_target = 0
        self.entered_passed = self.entered_accepted = 0

    def floored(self, log_ratio_s: torch.Tensor) -> torch.Tensor:
        return torch.clamp(log_ratio_s.double().cpu(), min=self.log_floor)

    def round(self, evaluate, q, pool: _ChainPool, active: torch.Tensor, bound: _MixingBound, generator, stats):
        """One delayed-acceptance step of the ``active`` chains; returns what [`_ChainPool.move`] returns."""
        n, k = active.numel(), self.num_steps
        z = q.sample(n, generator=generator)
        t0 = time.perf_counter()
        handle, log_w_s = evaluate.start(z, self.step)
        correction = q.log_prior_ratio(z).double().cpu()
        ratio_s = self.floored(log_w_s.double().cpu() + correction)  # (n,)
        entered = pool.steps[active] >= 0
        # A chain not yet entered compares with the mean surrogate ratio: its entry state need not be q on the target,
        # since the bound holds from any state; it enters with the first proposal that passes and is on target.
        bar = bound.log_mean_s if bound.seen_s else float(torch.logsumexp(ratio_s, 0) - math.log(n))
        cur_s = torch.where(entered, pool.log_ratio_s[active], bar)
        log_pass = torch.clamp(ratio_s - cur_s, max=0.0)
        keep = imh_accept(cur_s, ratio_s, generator).cpu().nonzero().flatten()
        accept = torch.zeros(n, dtype=torch.bool)
        rows, new_ratio = None, torch.zeros(0, dtype=torch.float64)
        if keep.numel():
            x, log_w = evaluate.finish(handle, keep)
            log_w = log_w.double()
            new_ratio = log_w.cpu() + correction[keep]
            if pool.state is None:
                pool.lay_out(ChainState(z[keep], x, log_w, new_ratio.to(log_w.device)))
            in_pool = pool.state.log_ratio[active[keep].to(pool.state.log_ratio.device)].cpu()
            cur_rho = torch.where(entered[keep], in_pool - pool.log_ratio_s[active[keep]], -math.inf)
            ok = imh_accept(cur_rho, new_ratio - ratio_s[keep], generator).cpu()
            accept[keep[ok]] = True
            rows = ChainState(z[keep][ok.to(z.device)], x[ok.to(x.device)], log_w[ok.to(log_w.device)], new_ratio[ok])
            self.finished += keep.numel()
            self.finished_on_target += int(torch.isfinite(log_w).sum())
            self.entered_passed += int(entered[keep].sum())
            self.entered_accepted += int((ok & entered[keep]).sum())
        stats.seconds_evaluate += time.perf_counter() - t0
        _count_screened(stats, n, keep.numel(), self.step, k, self.restarts)
        self.proposed += n
        moved = pool.move(active, accept, rows, ratio_s[accept])
        first = bound.update(new_ratio, ratio_s[keep], log_pass[keep], ratio_s)
        return (*moved, first)

    def report(self) -> dict:
        return {
            **{k: v for k, v in self.record.items() if k != "step"},
            "step": self.step,
            "num_steps": self.num_steps,
            "restarts": self.restarts,
            "log_floor": self.log_floor,
            "proposals": self.proposed,
            "finished": self.finished,
            "screened_out_share": 1 - self.finished / self.proposed if self.proposed else None,
            "finished_on_target_share": self.finished_on_target / self.finished if self.finished else None,
            "second_stage_acceptance": self.entered_accepted / self.entered_passed if self.entered_passed else None,
        }


def _merge_screens(screens: list[dict]) -> dict:
    """The screen records of several runs as one: the first's settings, counts summed, shares recomputed."""
    if not screens:
        return {}
    if len(screens) == 1:
        return dict(screens[0])
    out = dict(screens[0])
    for key in ("proposals", "finished"):
        out[key] = sum(s.get(key) or 0 for s in screens)
    out["screened_out_share"] = 1 - out["finished"] / out["proposals"] if out.get("proposals") else None
    return out


def _prepare_screen(
    evaluate, q, config, pilot_log_ratios, pilot_log_surrogates, pilot_steps, generator, stats
) -> tuple[_Screen | None, dict, list]:
    """The screen of a [`sample_imh`] run (`None` when it does not screen), its record for ``stats.screen``, and the
    pilots the bound starts from, as ``(log ratios, the surrogate's floored log ratios or None)``. Without a pilot
    that carries the surrogate at the candidate steps, a calibration pilot of ``pilot_size`` draws is run (counted)."""
    given = pilot_log_ratios is not None and pilot_log_ratios.numel() > 0
    seeds = [(pilot_log_ratios, None)] if given else []
    steps = _screen_steps(evaluate, config)
    if not steps:
        why = _cannot_screen(evaluate) if config.screen is not None else None
        return None, ({"step": None, "reason": why} if why and _num_steps(evaluate) else {}), seeds
    if given and pilot_log_surrogates is not None and all(s in list(pilot_steps or ()) for s in steps):
        log_ratio, log_ratio_s = pilot_log_ratios, pilot_log_surrogates[:, [list(pilot_steps).index(s) for s in steps]]
        seeds = []
    elif config.screen == "auto" and config.mixing_tolerance is None:  # a pilot only to calibrate: not by default
        reason = "no pilot to calibrate on (without a tolerance and a fit none is drawn); pass a step (screen=S)"
        return None, {"step": None, "reason": reason}, seeds
    else:
        pilot = _propose(evaluate, q, config.pilot_size, generator, stats, views=steps)
        log_ratio, log_ratio_s = pilot.log_ratio.cpu(), pilot.log_ratio_s
    record = calibrate_screen(log_ratio, log_ratio_s, steps, _num_steps(evaluate), config, None, _restarts(evaluate))
    record["chosen"] = "auto" if config.screen == "auto" else "given"
    if record["step"] is not None and _saves_too_little(record, config):
        record["reason"] = f"the calibration predicts {record['predicted_cost']:.2f} of the unscreened UNet calls"
        record["step"] = None
    if record["step"] is None:
        if config.screen != "auto":
            raise ValueError(f"screen={config.screen} cannot be used: {record.get('reason')}.")
        return None, record, [*seeds, (log_ratio, None)]
    namer = getattr(evaluate, "surrogate_name", None)  # what reads the views: the heads, or screen heads
    if callable(namer):
        record["surrogate"] = namer(record["step"])
    screen = _Screen(record["step"], record["log_floor"], _num_steps(evaluate), record, _restarts(evaluate))
    return screen, record, [*seeds, (log_ratio, screen.floored(log_ratio_s[:, steps.index(record["step"])]))]


def sample_imh(
    evaluate: Evaluate,
    q,
    num_samples: int,
    config: S2MSamplingConfig | dict | None = None,
    *,
    max_proposals: int | None = None,
    generator: torch.Generator | None = None,
    allow_partial: bool = False,
    callback: Callback | None = None,
    pilot_log_ratios: torch.Tensor | None = None,
    pilot_log_surrogates: torch.Tensor | None = None,
    pilot_screen_steps: Sequence[int] | None = None,
    **overrides: Any,
) -> SampleResult:
    """Ours: a pool of independent-MH chains in latent space, each returning on-target samples (spec §5).

    A chain starts empty (weight 0), so its first proposal of finite weight is accepted: the chain has *entered* the
    target with a draw of ``q`` restricted to it. It returns its state once it is ``T`` MH steps past its entry, with
    ``T`` the fewest steps whose distance to the target (exact for the importance ratios seen: `maths.imh_distance`)
    falls below ``mixing_tolerance`` (`_MixingBound`), then again every ``thinning`` steps, ``samples_per_chain``
    times in all.
    Every returned state is at least ``T`` steps past its chain's entry, so its law is within the bound of the target
    ``pi ∝ p_z w`` whatever the entry time; a chain that never entered returns nothing. At most ``num_chains`` chains
    run at once; a finished chain's slot goes to a new chain while samples are owed.

    Args:
        evaluate (`Callable`): ``z -> (x, log_w)`` with ``log_w`` of shape `(B,)`, ``-inf`` off target.
        q: the latent proposal density (``StandardNormal``, a refitted ``LowRankGaussianMixture`` or ``TiltedNormal``).
        num_samples (`int`): samples to return.
        config ([`S2MSamplingConfig`] or `dict`, *optional*), overrides: ``steps_after_entry`` (the least ``T``),
            ``mixing_tolerance`` (`None`: exactly ``steps_after_entry`` steps), ``max_steps_after_entry``,
            ``num_chains`` (default ``ceil(num_samples / samples_per_chain)``), ``samples_per_chain``.
        max_proposals (`int`, *optional*): the proposal budget. When it runs out first, a [`BudgetExhaustedError`]
            carrying the partial result is raised, or, with ``allow_partial=True``, the finished samples are
            returned with ``stats.budget_exhausted = True``.
        generator (`torch.Generator`, *optional*): the source of all randomness; same seed, same samples.
        allow_partial (`bool`, defaults to `False`): see ``max_proposals``.
        callback (`Callable`, *optional*): ``callback(round, info)`` after every round; a true return value stops
            the run there, with the samples returned so far.
        pilot_log_ratios (`torch.Tensor`, *optional*): log importance ratios of earlier draws of ``q`` on this
            target (a fit's pilot, [`fit_latent`]): ``W`` is estimated from them before the first round, and no sample
            is returned before ``pilot_size`` proposals have entered the estimate.
        pilot_log_surrogates (`torch.Tensor` of shape `(n, S)`, *optional*), pilot_screen_steps (`Sequence[int]`,
            *optional*): the surrogate's log ratios of the same draws at ``S`` screen steps, from which a screen is
            calibrated (without them a screened run draws its own calibration pilot of ``pilot_size``).

    **Screening** (``config.screen``; delayed acceptance, Christen and Fox 2005). ``evaluate`` may offer, beside
    ``evaluate(z)``, ``num_steps`` (``K``, the denoising steps of one proposal: ``stats.unet_calls`` counts them),
    ``start(z, s) -> (handle, log_w_s)`` (the first ``s`` steps, and the surrogate weight: the heads on the predicted
    clean image), ``finish(handle, keep) -> (x, log_w)`` (the remaining steps of the latents ``keep`` of that handle)
    and ``views(z, steps) -> (x, log_w, log_w_s)`` (full runs, with the surrogate at each of ``steps``). A screened
    MH step accepts ``z'`` against the current ``z`` in two stages, with ``r = w p_z / q`` and ``r_s`` the surrogate's:

        stage 1:  min(1, r_s(z') / r_s(z))                              (after s of the K steps)
        stage 2:  min(1, [r(z') / r_s(z')] / [r(z) / r_s(z)])           (only for proposals that passed stage 1)

    which leaves ``pi ∝ p_z w`` invariant (Christen and Fox's detailed balance) as long as ``r_s > 0`` wherever
    ``w > 0``: ``log r_s`` is floored at the calibrated ``log_floor`` (so the surrogate's hard zeros, its margins, do
    not matter). A proposal rejected at stage 1 costs ``s`` UNet calls instead of ``K``; the proposals that pass are
    finished together, in full micro-batches. A chain not yet entered passes stage 1 against the mean surrogate ratio
    and enters with the first on-target proposal that passes (the bound holds from any entry state). The bound uses
    ``W_bound = sup r_s * sup (r / r_s) / E_q r`` (the delayed-acceptance kernel's rate), which is at least ``W``.
    ``stats.screen`` reports the step, the floor, the calibration, the share screened out and the second stage's
    acceptance.

    Returns:
        [`SampleResult`] with the samples in the order they were returned; ``stats.mixing`` reports ``T``, the bound
        reached, ``W`` and how it was estimated, and the thinning.
    """
    config = S2MSamplingConfig.resolve(config, **overrides)
    _check_positive("num_samples", num_samples)
    _check_positive("max_proposals", max_proposals, allow_none=True)
    start = time.perf_counter()
    per_chain = min(config.samples_per_chain, num_samples)
    pool = _ChainPool(min(config.num_chains or math.ceil(num_samples / per_chain), num_samples))
    bound = _MixingBound(
        config.mixing_tolerance,
        config.steps_after_entry,
        config.max_steps_after_entry,
        min_seen=config.pilot_size if config.mixing_tolerance is not None else 0,
    )
    stats, done, n_done = SamplerStats(), [], 0
    screen, screen_record, seeds = _prepare_screen(
        evaluate, q, config, pilot_log_ratios, pilot_log_surrogates, pilot_screen_steps, generator, stats
    )
    for log_ratio, log_ratio_s in seeds:
        bound.update(log_ratio) if log_ratio_s is None else bound.update(log_ratio, log_ratio_s, None, log_ratio_s)
    while n_done < num_samples:
        stats.chains_started += pool.start_chains(num_samples - n_done, per_chain)
        active = pool.alive.nonzero().flatten()
        if max_proposals is not None:
            # each costs at most one proposal (one that restarts: (s + K) / K)
            active = active[: _within(_left(max_proposals, stats.cost), evaluate, screen and screen.step)]
        if active.numel() == 0:
            stats.budget_exhausted = True
            break
        if screen is None:
            new = _propose(evaluate, q, active.numel(), generator, stats)
            pool.lay_out(new)
            accepted, entered, tries, moves = pool.step(active, new, generator)
            first = bound.update(new.log_ratio)
        else:
            accepted, entered, tries, moves, first = screen.round(evaluate, q, pool, active, bound, generator, stats)
        stats.accepted += accepted
        stats.chains_entered += entered
        bound.tries, bound.moves = bound.tries + tries, bound.moves + moves
        if bound.ready:
            returned = pool.take_due(active, first, bound.thinning, num_samples - n_done)
            if returned is not None:
                done.append(returned)
                n_done += returned[0].z.shape[0]
        stats.rounds += 1
        info = {"done": n_done, "active": int(pool.alive.sum()), "accepted": accepted}
        if callback is not None and callback(stats.rounds, info):  # the caller stops the run (`pipe.interrupt`)
            break
    stats.mixing = {**bound.report(), "samples_per_chain": per_chain}
    stats.screen = screen.report() if screen is not None else screen_record
    if done:
        result = SampleResult(
            *(torch.cat([getattr(d, k) for d, _ in done]) for k in ("z", "x", "log_w")), None, stats, q
        )
        result.on_target = torch.isfinite(result.log_w)
        result.chain = torch.cat([ids for _, ids in done])
    else:  # nothing returned: empty tensors shaped like the pool's (when a proposal was ever drawn)
        result = SampleResult.empty(stats)
        if pool.state is not None:
            result.z, result.x = pool.state.z[:0], pool.state.x[:0]
        result.q = q
    result = _finish(result, start)
    if stats.budget_exhausted and not allow_partial:
        raise budget_error(result, num_samples, max_proposals)
    return result


# ----------------------------------------------------------------------------------------------------------
# Refitting


def fit_stage(
    evaluate: Evaluate,
    q,
    config: S2MSamplingConfig,
    max_proposals: int | None,
    generator: torch.Generator | None,
    negatives: torch.Tensor | None = None,
    screen: tuple[int, float] | None = None,
) -> tuple[dict[str, Any], SamplerStats, torch.Tensor | None]:
    """One refitting stage (spec §6): draw from ``q`` until ``fit_size`` proposals satisfy the stage's target, then fit
    each density family of ``config.fit_families`` to them:

    - ``"gaussian"``: resample the on-target draws in proportion to their (tempered, [`fit_exponent`]) importance
      ratios ``w p_z / q`` and fit a [`LowRankGaussianMixture`];
    - ``"tilted"``: train the classifier of a [`TiltedNormal`] on all the stage's draws, on or off its target, and on
      ``negatives`` (latents an earlier stage found off its own target, so off this one too: the stages add
      literals).

    With ``screen = (s, min_finish)`` the draws are screened after ``s`` denoising steps ([`_propose`]): the stage
    runs until ``fit_size`` finished draws are on its target, the Gaussian's resampling weighs each by ``1 /
    P(finished)`` too, and the classifier learns from the finished draws (it is measured by its pilot like any fit:
    a fit only has to propose well, the sampler stays exact whatever it is).

    Returns:
        The fitted densities by family (none when fewer than 2 proposals reached the stage's target within
        ``max_proposals``), the stage's statistics, whose ``stages`` holds one record (proposals, on-target share,
        ESS, ...), and the stage's off-target latents.
    """
    stats, start = SamplerStats(), time.perf_counter()
    fit_batch = config.fit_batch or config.fit_size
    zs, ratios, weights, n_on, share = [], [], [], 0, 0.0
    while n_on < config.fit_size:
        left = _within(_left(max_proposals, stats.cost), evaluate, screen and screen[0])
        n = fit_batch if left is None else min(fit_batch, left)
        if n <= 0:
            break
        new = _propose(evaluate, q, n, generator, stats, screen=screen)
        lr = new.log_ratio.double().cpu()
        lw = torch.zeros_like(lr) if new.log_weight is None else new.log_weight
        zs.append(new.z.cpu())
        ratios.append(lr)
        weights.append(lw)
        n_on += int(torch.isfinite(lr).sum())
        share += float(lw[torch.isfinite(lr)].exp().sum())
    stats.seconds_total = time.perf_counter() - start
    record = {"proposals": stats.proposals, "on_target": n_on, "unet_calls": stats.unet_calls}
    if screen is not None:
        record.update(screen_step=screen[0], finished=sum(r.numel() for r in ratios), cost=stats.cost)
    stats.stages.append(record)
    if n_on < 2:
        stats.budget_exhausted = True
        return {}, stats, None
    z, log_ratio, log_weight = torch.cat(zs), torch.cat(ratios), torch.cat(weights)
    on = torch.isfinite(log_ratio)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=_gen_device(generator)))
    densities: dict[str, Any] = {}
    record["on_target_share"] = share / stats.proposals
    if "gaussian" in config.fit_families:
        beta = fit_exponent(log_ratio, FIT_MIN_ESS * n_on)
        idx, ess = importance_resample(beta * log_ratio + log_weight, min(config.fit_size, n_on), generator)
        densities["gaussian"] = LowRankGaussianMixture.fit(
            z[idx.cpu()],
            rank=config.rank,
            n_components=config.n_components,
            defensive=config.defensive,
            covariance_scale=config.covariance_scale,
            seed=seed,
        )
        record.update(ess=ess, fit_exponent=beta, n_components=densities["gaussian"].n_components)
        record["rank"] = densities["gaussian"].rank
    off = z[~on]
    if "tilted" in config.fit_families:
        train_z, train_on = z, on
        if negatives is not None and negatives.numel():
            train_z = torch.cat([z, negatives.to(z.dtype)])
            train_on = torch.cat([on, torch.zeros(negatives.shape[0], dtype=torch.bool)])
        if int(train_on.sum()) <= train_on.numel() - 2:  # the classifier needs both labels
            densities["tilted"] = TiltedNormal.fit(train_z, train_on, rank=config.rank, seed=seed)
            record["tilted_training_latents"] = int(train_on.numel())
    return densities, stats, off


@dataclass
class LatentFit:
    """A target's latent proposal density and what was measured of it (spec §6): the result of [`fit_latent`].

    Args:
        q: the chosen density (the prior ``p_z`` itself when no fit beat it).
        pilot_log_ratios (`torch.Tensor` of shape `(pilot_size,)`): log importance ratios ``w p_z / q`` of
            ``pilot_size`` draws of ``q`` on the full target, from which the sampler estimates ``W``.
        stats ([`SamplerStats`]): the fitting's proposals and its ``stages``: per stage the fit's record, and per
            candidate density its pilot's on-target share, efficiency and predicted proposals per sample.
        chosen (`str`): ``"prior"``, ``"stage k"`` (its Gaussian mixture) or ``"stage k tilted"``.
        pilot_log_surrogates (`torch.Tensor` of shape `(pilot_size, S)`, *optional*): the surrogate's log ratios of
            the same draws at ``pilot_screen_steps`` (recorded when ``screen`` is set), to calibrate the screen.
        limited_to (`int`, *optional*): the ``num_samples`` whose spend limit stopped the refitting before its last
            stage ([`fit_latent`]); `None` when every stage ran.
    """

    q: Any
    pilot_log_ratios: torch.Tensor
    stats: SamplerStats
    chosen: str = "prior"
    pilot_log_surrogates: torch.Tensor | None = None
    pilot_screen_steps: tuple[int, ...] = ()
    limited_to: int | None = None

    def serves(self, num_samples: int | None) -> bool:
        """Whether this fit is as complete as [`fit_latent`] would make it for ``num_samples`` samples: a fit whose
        refitting was stopped by its spend limit (``limited_to``: the samples it was made for) serves calls for at
        most as many samples; a complete fit serves any call."""
        return self.limited_to is None or (num_samples is not None and num_samples <= self.limited_to)


# A pilot with fewer on-target draws than this predicts the chains' length no better than the cap.
_MIN_PILOT_ON_TARGET = 16


def _predicted_cost(
    log_ratio: torch.Tensor, config: S2MSamplingConfig, log_weight: torch.Tensor | None = None
) -> tuple[float, int]:
    """Proposals per sample that [`sample_imh`] would pay with draws of ``q`` like the pilot's ``log_ratio``: a chain
    pays its entry (one over the on-target share), ``T`` steps (the exact bound of [`_MixingBound`];
    ``max_steps_after_entry`` when fewer than 16 pilot draws are on the target, too few to see the ratios' spread;
    ``steps_after_entry`` without a tolerance, whatever the pilot) and
    a thinning between its ``samples_per_chain`` samples at the acceptance rate the pilot predicts. ``log_weight``:
    the draws' log weights, for a screened pilot ([`_finish_log_probs`]). Returns (cost, ``T``)."""
    lr = log_ratio.double().cpu()
    on = torch.isfinite(lr)
    if not on.any():
        return math.inf, config.max_steps_after_entry
    if int(on.sum()) < _MIN_PILOT_ON_TARGET and config.mixing_tolerance is not None:  # too few to see the spread
        config = config.replace(steps_after_entry=config.max_steps_after_entry)  # T at its cap
    chain, steps = _chain_cost(lr, None, 0, 1, config, log_weight)  # one "UNet call" per proposal: proposals
    return chain / config.samples_per_chain, steps


def _pilot(
    evaluate: Evaluate,
    q,
    n: int,
    generator,
    stats: SamplerStats,
    views: Sequence[int] | None = None,
    screen: tuple[int, float] | None = None,
) -> tuple[ChainState, float, float]:
    """``n`` draws of ``q`` on the full target (screened with ``screen``: see [`_propose`]): their states (log
    ratios, the surrogate's log ratios at the screen steps ``views``, the log weights of a screened pilot), on-target
    share and efficiency ``ESS / n``."""
    drawn = _propose(evaluate, q, n, generator, stats, views=views, screen=screen)
    log_ratio = drawn.log_ratio.double().cpu()
    lw = torch.zeros_like(log_ratio) if drawn.log_weight is None else drawn.log_weight
    finite = torch.isfinite(log_ratio)
    if not finite.any():
        return drawn, 0.0, 0.0
    p = torch.softmax(torch.where(finite, log_ratio + lw, -math.inf), 0)
    share = float(lw[finite].exp().sum()) / n
    return drawn, share, float(1.0 / p.pow(2).sum()) / n


def fit_latent(
    stage_evaluates: Sequence[Evaluate],
    p_z: StandardNormal,
    config: S2MSamplingConfig | dict | None = None,
    *,
    num_samples: int | None = None,
    max_proposals: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    **overrides: Any,
) -> LatentFit:
    """Refitting that never hurts (spec §6): fit ``q`` stage by stage ([`fit_stage`]), and keep the candidate, the
    prior included, with which the sampler is predicted to pay the fewest proposals per sample.

    Every candidate (``p_z``, then each stage's fit) is measured by a pilot of ``pilot_size`` draws on the full target
    (``stage_evaluates[-1]``): from their importance ratios ``w p_z / q``, the proposals per sample of [`sample_imh`]
    (the entry, the steps its exact bound asks for, the thinning; `_predicted_cost`), so that a fit that puts more
    draws on the target with weights too uneven to use (a narrow fit in a 32-dimensional latent: Digits-7to3's GAN)
    loses to a wider one or to the prior. A fit that does not beat the density it was drawn from is not built on: the
    next stage fits from that density again. A stage that cannot find 2 on-target latents within the budget ends the
    refitting with the best candidate so far.
    With ``refit="off"`` only the prior's pilot is drawn (it estimates ``W`` for the sampler).

    A fit made for a call is worth at most what it saves on that call's samples: every sample costs at least one
    proposal, so no density saves more than ``c_prior - 1`` per sample, ``c_prior`` the prior's predicted proposals
    per sample. With ``num_samples`` given, the stages and their pilots spend at most ``num_samples * (c_prior - 1)``
    proposals beyond the prior's pilot (the rule of renting before buying: a call then pays at most about twice what
    sampling from the prior alone would, and the fit only where it is predicted to pay), and, within
    ``max_proposals``, leave what sampling ``num_samples`` with the best candidate so far is predicted to cost where
    the budget holds it (so that a fit never spends what the call needs to finish without it; where it cannot finish
    without a better density, the fit may spend up to the limit). A stage that would not fit in what is left is
    not started (a stage stopped by the limit fits on what it found), and the fit records ``limited_to =
    num_samples``, so that a later call for more samples fits again (`LatentFit.serves`). Where the prior's pilot
    finds no sample on the target, ``c_prior`` is infinite and every stage runs.

    Where the sampler screens (``config.screen``, a diffusion proposal), every cost above is counted as the budget
    counts it (a proposal screened out after ``s`` of ``K`` steps as ``s / K``): a candidate's predicted cost per
    sample is its proposals per sample times the share of them the screen would leave, calibrated on its screened
    pilot ([`calibrate_screen`] with the pilot's weights; the record's ``predicted_cost_per_sample``), and the
    sampling's need includes finishing the chosen pilot. A screen that makes the prior cheap leaves a fit less to
    save, so the fit spends less, and a fit never spends what the screened sampler needs to finish (counted in
    unscreened proposals, a call whose prior predicted more than the budget let the fit spend all of it and return
    no sample).

    Args:
        stage_evaluates (`Sequence[Callable]`): ``z -> (x, log_w)`` per refitting stage; the last is the full target.
        p_z ([`StandardNormal`]): the latent prior.
        config ([`S2MSamplingConfig`] or `dict`, *optional*): the settings; ``overrides`` names single fields.
        num_samples (`int`, *optional*): the samples the fit is for (a sampling call's); `None`: no spend limit,
            every stage runs (`S2MPipeline.fit`).
        max_proposals (`int`, *optional*): the proposal budget of the whole fitting.
        generator (`torch.Generator`, *optional*): the randomness.
        callback (`Callable`, *optional*): ``callback(-1, {"stage": s, ...})`` after each stage.

    Returns:
        [`LatentFit`]; ``stats.stages`` records each fitting stage and each pilot (and a stage not started for the
        spend limit, as ``{"stage": s, "skipped": ...}``).
    """
    config = S2MSamplingConfig.resolve(config, **overrides)
    full = stage_evaluates[-1]
    fits = list(stage_evaluates)[len(stage_evaluates) - config.num_fit_stages(len(stage_evaluates)) :]
    parts = [SamplerStats()]

    def left() -> int | None:
        return _left(max_proposals, sum(p.cost for p in parts))

    views = _screen_steps(full, config)  # the screen's candidate steps: each pilot records the surrogate there
    step = _fit_screen_step(full, config)
    screen = None if step is None else (step, config.screen_min_finish)  # the fit's draws are screened there
    drawn_by = {}

    def measure(q, name: str) -> tuple[torch.Tensor | None, float]:
        """A pilot of ``q`` on the full target: its log ratios and the proposals per sample it predicts."""
        n = config.pilot_size if max_proposals is None else min(config.pilot_size, _within(left(), full, step))
        if n <= 0:
            return None, math.inf
        before, calls_before = parts[-1].cost, parts[-1].unet_calls
        drawn, share, efficiency = _pilot(full, q, n, generator, parts[-1], views, screen)
        drawn_by[name] = drawn
        log_ratio = drawn.log_ratio.double().cpu()
        proposals, steps = _predicted_cost(log_ratio, config, drawn.log_weight)
        record = {
            "pilot": name,
            "proposals": n,
            "on_target_share": share,
            "efficiency": efficiency,
            "steps_after_entry": steps,
            "predicted_proposals_per_sample": proposals,
            "unet_calls": parts[-1].unet_calls - calls_before,
        }
        cost = proposals
        if screen is not None:
            record.update(screen_step=step, finished=int(log_ratio.numel()), cost=parts[-1].cost - before)
            kept = _screened_share(log_ratio, drawn, views, full, config)
            cost = proposals * kept
            record.update(screen_predicted_share=kept, predicted_cost_per_sample=cost)
        parts[-1].stages.append(record)
        return log_ratio, cost

    if not fits and config.mixing_tolerance is None:  # nothing to choose or estimate: no pilot (nor a screen's)
        return LatentFit(p_z, torch.zeros(0, dtype=torch.float64), SamplerStats(), "prior")
    best = (p_z, *measure(p_z, "prior"), "prior")  # (q, pilot log ratios, predicted cost, name)
    base, base_score = p_z, best[2]  # the density the next stage fits from
    negatives = []  # latents off an earlier stage's target: off every later one's
    limit = _fit_spend_limit(num_samples, best[2])
    spent_before, limited = sum(p.cost for p in parts), False
    # finishing the chosen screened pilot's screened-out draws (in proposals)
    completion = 0.0
    if screen is not None and parts[0].stages and "finished" in parts[0].stages[0]:
        first = parts[0].stages[0]
        rest = _finish_calls(step, _num_steps(full), _restarts(full)) / _num_steps(full)
        completion = (first["proposals"] - first["finished"]) * rest
    for s, evaluate in enumerate(fits):
        cap = left()
        if limit is not None:
            spent = sum(p.cost for p in parts) - spent_before
            need = num_samples * best[2] + completion
            allowed = _stage_allowance(limit, spent, cap, need, config.pilot_size * len(config.fit_families))
            if allowed < config.fit_size:  # not even fit_size draws: the stage could not find its fit_size latents
                parts[-1].stages.append({"stage": s, "skipped": f"spend limit {limit:.0f} for {num_samples} samples"})
                limited = True
                break
            cap = allowed if cap is None else min(cap, allowed)
        # the latest negatives, at most 16 * fit_size: they bound the classifier's training set and the memory kept
        known = torch.cat(negatives)[-16 * config.fit_size :] if negatives else None
        densities, stage, off = fit_stage(evaluate, base, config, cap, generator, known, screen)
        stage.stages[0] = {"stage": s, **stage.stages[0]}
        parts.append(stage)
        if limit is not None and stage.stages[0]["on_target"] < config.fit_size and (left() is None or left() > 0):
            stage.stages[0]["stopped"] = f"spend limit {limit:.0f} for {num_samples} samples"
            limited = True
        if not densities:
            stage.budget_exhausted = False  # the refitting ends here; the sampler goes on with the best candidate
            stage.stages[0]["kept"] = best[3]
            break
        negatives.append(off)
        stage_best = (None, math.inf)
        for family, density in densities.items():
            name = f"stage {s}" if family == "gaussian" else f"stage {s} {family}"
            log_ratio, score = measure(density, name)
            if log_ratio is not None and score < best[2]:
                best = (density, log_ratio, score, name)
            if score < stage_best[1]:
                stage_best = (density, score)
        if stage_best[1] < base_score:
            base, base_score = stage_best
        for name in [k for k in drawn_by if k != best[3]]:  # only the best pilot may be finished later: free the rest
            del drawn_by[name]
        stage.stages[0]["kept"] = best[3]
        if callback is not None:
            callback(-1, {"stage": s, "num_stages": len(fits), "on_target_share": stage.stages[0]["on_target_share"]})
        if limited:
            break
    stats = SamplerStats.merge(parts)
    if best[1] is None:  # not even the prior's pilot fitted in the budget
        stats.budget_exhausted = True
        return LatentFit(p_z, torch.zeros(0, dtype=torch.float64), stats, "prior")
    drawn = drawn_by[best[3]]
    if drawn.pending is not None:  # the chosen density's pilot seeds the sampler's bound: it must be whole
        completion = SamplerStats()
        drawn = drawn.pending(completion)
        stats = SamplerStats.merge([stats, completion])
        pilot = next(st for st in stats.stages if st.get("pilot") == best[3])
        pilot.update(finished=pilot["proposals"], completed_cost=completion.cost)
        pilot["unet_calls"] += completion.unet_calls
    return LatentFit(
        best[0],
        drawn.log_ratio.double().cpu(),
        stats,
        best[3],
        drawn.log_ratio_s,
        tuple(views),
        num_samples if limited else None,
    )


def _stage_allowance(limit: float, spent: float, cap: int | None, need: float, pilots: float) -> int:
    """The draws the next refitting stage may make: what the spend ``limit`` leaves after ``spent``, less the
    sampling's predicted ``need`` where the budget left (``cap``) holds it (where it cannot finish anyway, only a fit
    can help), less the stage's ``pilots`` (one per family, reserved whole: a screened pilot costs less)."""
    spare = int(limit - spent)
    if cap is not None and need <= cap:
        spare = min(spare, cap - math.ceil(need))
    return spare - math.ceil(pilots)


def _screened_share(log_ratio: torch.Tensor, drawn: ChainState, views: Sequence[int], evaluate, config) -> float:
    """The share of a candidate's predicted sampling cost that the sampler's screen would leave, from its screened
    pilot (``drawn``: finished draws, weighted, with the surrogate at the candidate ``views``): the calibration's
    predicted cost ([`calibrate_screen`]) where ``config.screen`` would screen with it, else 1."""
    if drawn.log_ratio_s is None or not views:
        return 1.0
    k, restarts = _num_steps(evaluate), _restarts(evaluate)
    record = calibrate_screen(log_ratio, drawn.log_ratio_s, views, k, config, drawn.log_weight, restarts)
    if record["step"] is None or _saves_too_little(record, config):
        return 1.0
    return float(record["predicted_cost"])


def _fit_spend_limit(num_samples: int | None, prior_cost: float) -> float | None:
    """The most proposals [`fit_latent`]'s stages may spend for ``num_samples`` samples: what the best possible
    density (one proposal per sample) would save on them against the prior's predicted ``prior_cost`` per sample.
    `None` (no limit) without ``num_samples`` or where the prior's cost is unknown (infinite: no pilot draw on the
    target)."""
    if num_samples is None or not math.isfinite(prior_cost):
        return None
    return num_samples * max(0.0, prior_cost - 1.0)


def sample_s2m(
    stage_evaluates: Sequence[Evaluate],
    p_z: StandardNormal,
    num_samples: int,
    config: S2MSamplingConfig | dict | None = None,
    *,
    max_proposals: int | None = None,
    generator: torch.Generator | None = None,
    allow_partial: bool = False,
    callback: Callback | None = None,
    fit: LatentFit | None = None,
    fit_generator: torch.Generator | None = None,
    **overrides: Any,
) -> SampleResult:
    """Ours, with latent refitting (spec §6): [`fit_latent`] (unless a ``fit`` is given), then [`sample_imh`] on the
    full target (``stage_evaluates[-1]``) with the chosen density, exact in the latent view whatever the fit (spec §4)
    since the correction ``log p_z - log q`` enters every acceptance.

    Args:
        stage_evaluates (`Sequence[Callable]`): ``z -> (x, log_w)`` per refitting stage (``Target.stages()``); the
            last one is the full target.
        p_z ([`StandardNormal`]): the latent prior.
        num_samples (`int`): samples to return.
        config ([`S2MSamplingConfig`] or `dict`, *optional*): the settings; ``overrides`` names single fields.
        max_proposals (`int`, *optional*): the proposal budget, fitting included; see [`sample_imh`].
        generator, allow_partial, callback: see [`sample_imh`]; ``callback(-1, {"stage": s, ...})`` after each
            refitting stage.
        fit ([`LatentFit`], *optional*): a fit made before (for this target and settings): no fitting is done.
            Without it, [`fit_latent`] fits for ``num_samples`` (its spend limit).
        fit_generator (`torch.Generator`, *optional*): the randomness of the fitting (defaults to ``generator``).

    Returns:
        [`SampleResult`]; ``stats.stages`` lists each fitting stage and pilot of this call (none with ``fit``).
    """
    config = S2MSamplingConfig.resolve(config, **overrides)
    if not stage_evaluates:
        raise ValueError("stage_evaluates is empty: pass at least the full target's evaluate function.")
    start = time.perf_counter()
    parts = []
    if fit is None:
        fit = fit_latent(
            stage_evaluates,
            p_z,
            config,
            num_samples=config.fit_for(num_samples),
            max_proposals=max_proposals,
            generator=fit_generator if fit_generator is not None else generator,
            callback=callback,
        )
        parts.append(fit.stats)
    remaining = _left(max_proposals, sum(p.cost for p in parts))
    if fit.stats.budget_exhausted or (remaining is not None and remaining <= 0):
        result = _finish(SampleResult.empty(SamplerStats.merge(parts)), start)
        result.stats.budget_exhausted = True
        if allow_partial:
            return result
        raise budget_error(result, num_samples, max_proposals)
    try:
        result = sample_imh(
            stage_evaluates[-1],
            fit.q,
            num_samples,
            config,
            max_proposals=remaining,
            generator=generator,
            allow_partial=allow_partial,
            callback=callback,
            pilot_log_ratios=fit.pilot_log_ratios,
            pilot_log_surrogates=fit.pilot_log_surrogates,
            pilot_screen_steps=fit.pilot_screen_steps,
        )
    except BudgetExhaustedError as err:
        err.result.stats = SamplerStats.merge([*parts, err.result.stats])
        raise budget_error(err.result, num_samples, max_proposals) from None
    result.stats = SamplerStats.merge([*parts, result.stats])
    result.stats.seconds_total = time.perf_counter() - start
    result.stats.fit = fit.chosen
    return result


def save_fits(fits: dict[str, LatentFit], folder: str | os.PathLike) -> None:
    """Write fits (keyed by a string that names their target and settings) into ``folder``: one safetensors file
    each (the density's tensors, the pilot's log ratios) and ``index.json`` (key, file, chosen density, stages)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    index = []
    for i, (key, fit) in enumerate(fits.items()):
        tensors = {"pilot_log_ratios": fit.pilot_log_ratios.double().cpu().contiguous()}
        if fit.pilot_log_surrogates is not None:
            tensors["pilot_log_surrogates"] = fit.pilot_log_surrogates.double().cpu().contiguous()
            tensors["pilot_screen_steps"] = torch.tensor(fit.pilot_screen_steps, dtype=torch.long)
        if isinstance(fit.q, LowRankGaussianMixture):
            tensors.update({f"q.{k}": v.cpu().contiguous() for k, v in fit.q.state_dict().items()})
        elif isinstance(fit.q, TiltedNormal):
            tensors.update({f"tilted.{k}": v.cpu().contiguous() for k, v in fit.q.state_dict().items()})
        else:
            tensors["p_z.latent_shape"] = torch.tensor(fit.q.latent_shape, dtype=torch.long)
        name = f"fit_{i:03d}.safetensors"
        save_file(tensors, os.path.join(folder, name))
        entry = {"key": key, "file": name, "chosen": fit.chosen, "stages": fit.stats.stages}
        if fit.limited_to is not None:
            entry["limited_to"] = fit.limited_to
        index.append(entry)
    with open(os.path.join(folder, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, default=float)


def load_fits(folder: str | os.PathLike) -> dict[str, LatentFit]:
    """The fits [`save_fits`] wrote into ``folder`` (none when it holds no ``index.json``)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    fits = {}
    for entry in index:
        tensors = load_file(os.path.join(folder, entry["file"]))
        if "p_z.latent_shape" in tensors:
            q = StandardNormal(tensors["p_z.latent_shape"].tolist())
        elif any(k.startswith("tilted.") for k in tensors):
            q = TiltedNormal.from_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("tilted.")})
        else:
            q = LowRankGaussianMixture.from_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("q.")})
        stats = SamplerStats(stages=list(entry.get("stages", [])))
        steps = (
            tuple(int(s) for s in tensors["pilot_screen_steps"].tolist()) if "pilot_screen_steps" in tensors else ()
        )
        fits[entry["key"]] = LatentFit(
            q,
            tensors["pilot_log_ratios"],
            stats,
            entry.get("chosen", "prior"),
            tensors.get("pilot_log_surrogates"),
            steps,
            entry.get("limited_to"),
        )
    return fits
