"""S2M sampling over callables (spec §4-5b): the settings, the entry points, what a run returns.

The samplers never see a model. They are given ``evaluate(z) -> (x, log_w[, readings])``, which runs the generator on
latents ``z`` `(B, ...)` and returns the images ``x``, their log weights ``log w = log p_T(x) / p_G(x)`` up to a
constant `(B,)` (``-inf`` off the target) and, optionally, readings of the heads `(B, m)` for the diagnostics; and
the latent prior ``p_z`` (a `densities.StandardNormal`), or any density ``q`` with ``sample(n, generator)`` and
``log_prior_ratio(z) = log p_z(z) - log q(z)``.

- [`sample_s2m`]: ours. Chains that move locally in the noise space (pCN by default, MALA for differentiable
  generators), with independent jumps from ``q``, started by importance-resampling a pool drawn from ``q``
  (`s2m_diffusers.chains`); diffusion proposals are screened part-way through their denoising
  (`s2m_diffusers.screen`). It returns images with diagnostics: R-hat and ESS across chains, and a reading check
  (`s2m_diffusers.diagnostics`).
- [`sample_imh`]: the same chains with independent moves only (the paper's kernel, from the pool).
- [`sample_official`]: the official recipe (a fixed number of chains and steps from the prior; final states returned
  whether on target or not): 201 generator calls per returned sample with the defaults.

Every setting is a field of one dataclass, [`S2MSamplingConfig`].
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .chains import chain_diagnostics, sample_chains
from .densities import StandardNormal
from .maths import imh_accept
from .results import BudgetExhaustedError, SampleResult, SamplerStats, budget_error

__all__ = [
    "KERNELS",
    "S2MSamplingConfig",
    "SamplerStats",
    "SampleResult",
    "BudgetExhaustedError",
    "budget_error",
    "sample_s2m",
    "sample_imh",
    "sample_official",
]

Evaluate = Callable[[torch.Tensor], tuple]
Callback = Callable[[int, dict], Any]

KERNELS = ("pcn", "mala", "independent")
ENTRIES = ("auto", "pool", "ladder")
# Settings for which `None` is a value of its own, not "keep the default" (see `S2MSamplingConfig.resolve`).
_NONE_IS_A_VALUE = ("class_label", "screen", "thinning")
# Settings of earlier versions, and what took their place.
_REMOVED = {
    **dict.fromkeys(
        ("refit", "fit_spend", "fit_size", "fit_batch", "fit_seed", "pilot_size", "rank", "n_components"),
        "latent refitting was removed: chains now move locally in the noise space and enter the target from a pool "
        "drawn from the prior (pool_size, pool_ess), which measured cheaper than every fit",
    ),
    **dict.fromkeys(
        ("defensive", "covariance_scale", "fit_families"),
        "the refitted densities were removed with latent refitting (chains move locally instead)",
    ),
    **dict.fromkeys(
        ("mixing_tolerance", "steps_after_entry", "max_steps_after_entry"),
        "the worst-case bound was replaced by diagnostics (stats['diagnostics']: R-hat, ESS, the reading check); "
        "burn_in sets the steps before the first image",
    ),
}


@dataclass(frozen=True)
class S2MSamplingConfig:
    """Every setting of an S2M sampling call, each default in one place (spec §3-5b).

    Pass one to `S2MPipeline.__call__` (``sampling=``) or to [`sample_s2m`] (``config=``), or name single fields as
    keyword arguments there (``pipe("a & ~b", kernel="independent")``); `replace` gives a changed copy.

    How the target is read from the heads (spec §3):

    - ``negation_margin`` (`float`, *optional*): ``lambda >= 1``; a forbidden attribute must stay below ``1/lambda``
      of the image's strongest. `None`: the heads' own (chosen from data by training). 1 is the paper's formula.
    - ``presence_margin`` (`float`, *optional*): ``kappa`` in [0, 1]; a required attribute counts only where it
      comes within ``kappa`` of the strongest. `None`: the heads' own, else 0 (the paper's formula).
    - ``dr_temperature`` (`float`, `"auto"` or `None`): read ``D_r`` as ``softmax(log D_r / T)``
      (`s2m_diffusers.maths.temper_dr`; exact heads are unchanged). `None` = 1; ``"auto"`` sharpens pure
      conjunctions of two or more attributes.
    - ``priors`` (`tuple[float, ...]`, *optional*): the attribute priors ``pi_c``; `None`: the heads' (or
      ``p_data``).
    - ``class_label`` (`int`, `str` or `None`, defaults to `"auto"`): for a class-conditional proposal, the class
      every sample is generated with (with the ``D_f`` correction). ``"auto"``: the first attribute the target
      requires at its top level when the heads have ``D_f``, else the class is drawn from ``p_G(c)`` by one extra
      latent coordinate (kept by local moves, redrawn by jumps); `None` always draws it.
    - ``dv_strength`` (`float`, `"auto"` or `None`): ``beta`` in [0, 1], the weight of ``logit D_v``: the sampler
      targets ``p_G^(1 - beta) p_data^beta`` restricted to the combination; 1 is the paper's target. `None`: the
      heads' own (chosen by training), else 1. ``"auto"``: measured for this target on up to 2,048 generated images.

    The chains (spec §5b, `s2m_diffusers.chains`):

    - ``kernel`` (`str`, defaults to `"pcn"`): the local move: ``"pcn"`` (preconditioned Crank-Nicolson, any
      generator whose randomness is standard normal), ``"mala"`` (Langevin with the gradient of ``log w``; a GAN and
      heads that are differentiable) or ``"independent"`` (every move an independent draw from ``q``: the paper's).
    - ``jump_rate`` (`float`, defaults to 0.1): the share of moves that are independent draws from ``q`` instead of
      local ones, so that chains can jump between modes.
    - ``samples_per_chain`` (`int`, defaults to 4): images each chain returns, ``thinning`` steps apart.
    - ``num_chains`` (`int`, *optional*): chains side by side; by default ``ceil(images / samples_per_chain)``, at
      least 2 (rounded up to an even number from 4 on: chains start in pairs), at most 256 in the pipeline.
    - ``burn_in`` (`int`, defaults to 10): steps before the first image, during which the chains adapt their common
      step size (and chains started annealed reach the target, `s2m_diffusers.anneal`); afterwards every chain is a
      fixed Metropolis-Hastings kernel.
    - ``target_acceptance`` (`float`, defaults to 0.5): the acceptance rate the step sizes are adapted towards.
    - ``initial_step`` (`float`, defaults to 0.5): the step size the adaptation starts from (pCN's ``b``; MALA's
      noise scale ``sqrt(h)``).
    - ``thinning`` (`int`, *optional*): steps between two images of a chain; `None`: the fewest after which a chain
      at the burn-in's acceptance rate has moved with probability 0.95 (at most 20).
    - ``pool_size`` (`int`, defaults to 32): the least number of draws of ``q`` in the entry pool, which the chains'
      starting points are importance-resampled from (and which the reading check compares the images with).
    - ``pool_ess`` (`int`, defaults to 2): the pool grows, ``pool_batch`` draws at a time, until it holds an
      on-target draw per starting point of the chains (at most 16) and the importance ratios of its draws have this
      effective sample size (or the budget is spent); once it holds those on-target draws, it also stops when it has
      drawn what the chains are expected to cost (their steps at the thinning of ``target_acceptance``): a small
      call's entry costs no more than its chains. Where the ratios rest on few of the on-target draws (the heads'
      weight uneven on them), the chains start annealed from them (`s2m_diffusers.anneal`).
    - ``pool_batch`` (`int`, *optional*): draws per batch of the pool (defaults to ``pool_size``).
    - ``entry`` (`str`, defaults to `"auto"`): how the chains reach a rare target (`s2m_diffusers.ladder`).
      ``"pool"`` draws the pool until its ESS is reached; ``"ladder"`` climbs the target's stages (``a``, ``a & b``,
      ...) from the first batch with particles moved by pCN at each stage (an SMC sampler); ``"auto"`` climbs once
      the pool, not yet done, has drawn twice the fewest calls of a climb (four particles per starting point, six
      moves each per stage). A screened call, or a target of one stage, always draws the pool.

    Diffusion proposals (spec §5b, `s2m_diffusers.screen`):

    - ``screen`` (`int`, `"auto"` or `None`, defaults to `"auto"`): delayed-acceptance screening. After ``screen`` of
      the K denoising steps the heads (or the pipeline's screen heads) judge the predicted clean image; a proposal
      rejected there stops denoising, and a second stage corrects with the true weight, so the chains' target is
      unchanged. ``"auto"`` screens after ``max(1, round(K / 10))`` steps where the proposal allows it and can resume
      after the screen (not a wrapped pipeline, which would rerun what passes), and keeps screening after the burn-in
      only where it saved at least 10% there; `None` (or ``"off"``) never screens.
    - ``screen_min_finish`` (`float`, defaults to 0.5): the least probability with which a screened pool draw is
      finished whatever its surrogate (the finished ones are weighted by the inverse: Horvitz-Thompson). Lower saves
      more of the pool's denoising steps but makes the chains' starts noisier: with 0.2 the toy's screened exactness
      test of `B & ~A & ~C` (a surrogate that misses much of the target) failed at the default burn-in (p 1e-6).
    """

    negation_margin: float | None = None
    presence_margin: float | None = None
    dr_temperature: float | str | None = None
    priors: tuple[float, ...] | None = None
    class_label: int | str | None = "auto"
    dv_strength: float | str | None = None
    kernel: str = "pcn"
    jump_rate: float = 0.1
    samples_per_chain: int = 4
    num_chains: int | None = None
    burn_in: int = 10
    target_acceptance: float = 0.5
    initial_step: float = 0.5
    thinning: int | None = None
    pool_size: int = 32
    pool_ess: int = 2
    pool_batch: int | None = None
    entry: str = "auto"
    screen: int | str | None = "auto"
    screen_min_finish: float = 0.5

    def __new__(cls, *args: Any, **kwargs: Any) -> S2MSamplingConfig:
        _refuse_removed(kwargs)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(
                f"kernel must be one of {list(KERNELS)}, got {self.kernel!r}: 'pcn' moves locally (the default), "
                "'mala' follows the gradient of the weights (differentiable generators), 'independent' redraws."
            )
        if self.entry not in ENTRIES:
            raise ValueError(
                f"entry must be one of {list(ENTRIES)}, got {self.entry!r}: 'auto' climbs a rare target's stages "
                "where that is cheaper than drawing the pool on, 'pool' always draws, 'ladder' always climbs."
            )
        for name in ("samples_per_chain", "pool_size", "pool_ess", "num_chains", "pool_batch", "thinning"):
            _check_positive(name, getattr(self, name), allow_none=name in ("num_chains", "pool_batch", "thinning"))
        if not isinstance(self.burn_in, int) or isinstance(self.burn_in, bool) or self.burn_in < 0:
            raise ValueError(f"burn_in must be a non-negative integer, got {self.burn_in!r}.")
        for name, low, high in (("jump_rate", 0.0, 1.0), ("target_acceptance", 0.01, 0.99), ("initial_step", 1e-3, 1)):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high):
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}.")
        if self.negation_margin is not None and not self.negation_margin >= 1.0:
            raise ValueError(f"negation_margin must be >= 1 (1 is the paper's formula), got {self.negation_margin}.")
        if self.presence_margin is not None and not 0.0 <= self.presence_margin <= 1.0:
            raise ValueError(
                f"presence_margin must lie in [0, 1] (0 is the paper's formula), got {self.presence_margin}."
            )
        b = self.dv_strength
        if not (b is None or b == "auto" or (_is_number(b) and 0.0 <= b <= 1.0)):
            raise ValueError(f"dv_strength must be 'auto' or a number in [0, 1] (1 is the paper's target), got {b!r}.")
        t = self.dr_temperature
        if not (t is None or t == "auto" or (_is_number(t) and t > 0)):
            raise ValueError(
                f"dr_temperature must be None, 'auto' or a positive number, got {t!r}; 1.0 (or None) reads the "
                "calibrated heads as they are."
            )
        if self.priors is not None:
            object.__setattr__(self, "priors", tuple(float(p) for p in self.priors))
        if self.screen == "off":
            object.__setattr__(self, "screen", None)
        sc = self.screen
        if not (sc is None or sc == "auto" or (isinstance(sc, int) and not isinstance(sc, bool) and sc >= 1)):
            raise ValueError(
                f"screen must be None (or 'off'), 'auto' or a positive number of denoising steps after which the "
                f"heads screen a proposal on its predicted clean image, got {sc!r}."
            )
        m = self.screen_min_finish
        if not (_is_number(m) and 0 < m <= 1):
            raise ValueError(f"screen_min_finish must be a probability in (0, 1], got {m!r}.")

    def replace(self, **overrides: Any) -> S2MSamplingConfig:
        """A copy with some fields changed; an unknown name is an error that lists the fields (and says what took the
        place of a setting of an earlier version)."""
        names = {f.name for f in dataclasses.fields(self)}
        _refuse_removed(overrides)
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"Unknown sampling setting(s) {unknown}; S2MSamplingConfig has {sorted(names)}.")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def resolve(cls, config: S2MSamplingConfig | dict | None = None, **overrides: Any) -> S2MSamplingConfig:
        """``config`` (an instance, a dict of fields, or `None` for the defaults) with ``overrides`` applied.

        An override of `None` keeps the config's value (so that callers can pass optional settings through), except
        for the settings where `None` is a value of its own: ``class_label`` (draw the class), ``screen`` (never)
        and ``thinning`` (from the acceptance rate)."""
        if isinstance(config, dict):
            config = cls().replace(**config)
        elif config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(f"sampling must be an S2MSamplingConfig or a dict of its fields, got {type(config)}.")
        return config.replace(**{k: v for k, v in overrides.items() if v is not None or k in _NONE_IS_A_VALUE})


def _refuse_removed(settings: dict) -> None:
    """A setting of an earlier version is refused with what took its place."""
    removed = sorted(set(settings) & set(_REMOVED))
    if removed:
        raise TypeError(f"The sampling setting {removed[0]!r} no longer exists: {_REMOVED[removed[0]]}.")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


# ----------------------------------------------------------------------------------------------------------
# Samplers


def sample_s2m(
    evaluate: Evaluate | Sequence[Evaluate],
    q=None,
    num_samples: int = 1,
    config: S2MSamplingConfig | dict | None = None,
    *,
    max_proposals: float | None = None,
    generator: torch.Generator | None = None,
    allow_partial: bool = False,
    callback: Callback | None = None,
    reading_names: Sequence[str] | None = None,
    **overrides: Any,
) -> SampleResult:
    """Ours: chains in the noise space that enter the target from a pool and move locally (spec §5b;
    `s2m_diffusers.chains`).

    Args:
        evaluate (`Callable`): ``z -> (x, log_w)`` or ``z -> (x, log_w, readings)``, ``log_w`` of shape `(B,)`,
            ``-inf`` off target. It may offer ``num_steps`` (the UNet calls of one proposal), ``frozen`` (a mask of
            the coordinates local moves keep), ``value_and_grad`` (for ``kernel="mala"``) and the screen's
            ``start`` / ``finish`` (`s2m_diffusers.screen`). A sequence of them (an earlier version's stages) uses the
            last, the full target.
        q: the density of the entry pool and of the independent jumps (``StandardNormal``, the prior, by default;
            inferred from the first latent only when given).
        num_samples (`int`): samples to return.
        config ([`S2MSamplingConfig`] or `dict`, *optional*), overrides: the settings.
        max_proposals (`float`, *optional*): the proposal budget. When it runs out first, a [`BudgetExhaustedError`]
            carrying the partial result is raised, or, with ``allow_partial=True``, the samples found are returned with
            ``stats.budget_exhausted = True``.
        generator (`torch.Generator`, *optional*): the source of all randomness; same seed, same samples.
        allow_partial (`bool`, defaults to `False`): see ``max_proposals``.
        callback (`Callable`, *optional*): ``callback(round, info)`` after the pool and every step (``info["phase"]``:
            ``"pool"``, ``"burn_in"`` or ``"sampling"``; ``info["done"]``: samples finished); a true return value stops
            the run there, with the samples returned so far.
        reading_names (`Sequence[str]`, *optional*): names of the readings' columns, for the diagnostics.

    Returns:
        [`SampleResult`]; ``stats.chains`` records the run and ``stats.diagnostics`` holds R-hat, ESS and the reading
        check (a `UserWarning` names any value beyond its threshold).
    """
    config = S2MSamplingConfig.resolve(config, **overrides)
    if not callable(evaluate):
        if not evaluate:
            raise ValueError("evaluate is empty: pass the target's evaluate function.")
        evaluate = list(evaluate)[-1]
    if q is None:
        raise ValueError("Pass the latent prior q (e.g. StandardNormal(latent_shape)).")
    _check_positive("num_samples", num_samples)
    if max_proposals is not None and not (_is_number(max_proposals) and max_proposals > 0):
        raise ValueError(f"max_proposals must be a positive number, got {max_proposals!r}.")
    start = time.perf_counter()
    out, pool, traces, record, stats = sample_chains(
        evaluate, q, num_samples, config, max_proposals=max_proposals, generator=generator, callback=callback
    )
    stats.chains = record
    if out is None or out.get("z") is None:
        result = SampleResult.empty(stats)
    else:
        result = SampleResult(
            out["z"], out["x"], out["log_w"], torch.isfinite(out["log_w"]), stats, out["chain"], out.get("readings")
        )
        names = list(reading_names) if reading_names is not None else _default_names(out.get("readings"))
        stats.diagnostics = chain_diagnostics(traces, out.get("readings"), out["log_w"], out["chain"], pool, names)
        for message in stats.diagnostics["warnings"]:
            warnings.warn(f"S2M sampling: {message}; see stats['diagnostics'].", UserWarning, stacklevel=2)
    result.pool_readings = pool.readings if pool is not None else None
    _finish(result, start)
    if result.num_samples < num_samples and stats.budget_exhausted and not allow_partial:
        raise budget_error(result, num_samples, max_proposals)
    return result


def _default_names(readings: torch.Tensor | None) -> list[str]:
    return [] if readings is None else [str(j) for j in range(readings.shape[1])]


def _finish(result: SampleResult, start: float) -> SampleResult:
    s = result.stats
    s.seconds_total += time.perf_counter() - start
    s.num_returned = result.num_samples
    s.on_target_returned = int(result.on_target.sum())
    z = result.z
    s.unique_returned = int(torch.unique(z.reshape(z.shape[0], -1), dim=0).shape[0]) if s.num_returned else 0
    return result


def sample_imh(evaluate: Evaluate, q, num_samples: int, config: S2MSamplingConfig | dict | None = None, **kwargs):
    """Ours with independent moves only (``kernel="independent"``): chains that enter from the pool and move by
    independent draws from ``q`` (the paper's kernel, spec §4-5). Arguments as [`sample_s2m`]."""
    config = S2MSamplingConfig.resolve(config, kernel="independent")
    return sample_s2m(evaluate, q, num_samples, config, **kwargs)


def sample_official(
    evaluate: Evaluate,
    p_z: StandardNormal,
    num_chains: int = 64,
    num_steps: int = 200,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """The official S2M recipe: ``num_chains`` independent-MH chains from the prior, ``num_steps`` steps each.

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
    stats = SamplerStats()

    def draw():
        z = p_z.sample(num_chains, generator=generator)
        out = evaluate(z)
        stats.proposals += num_chains
        stats.cost += num_chains
        return z, out[0], out[1].double()

    z, x, log_w = draw()
    ever = torch.isfinite(log_w)
    for step in range(num_steps):
        z_new, x_new, log_w_new = draw()
        accept = imh_accept(log_w, log_w_new, generator)
        z = torch.where(accept.reshape(-1, *([1] * (z.ndim - 1))).to(z.device), z_new, z)
        x = torch.where(accept.reshape(-1, *([1] * (x.ndim - 1))).to(x.device), x_new, x)
        log_w = torch.where(accept.to(log_w.device), log_w_new, log_w)
        ever |= torch.isfinite(log_w)
        stats.accepted += int(accept.sum())
        stats.rounds += 1
        if callback is not None:
            callback(step, {"accepted": int(accept.sum()), "on_target": int(torch.isfinite(log_w).sum())})
    stats.chains = {"num_chains": num_chains, "entered": int(ever.sum())}
    result = SampleResult(z, x, log_w, torch.isfinite(log_w), stats)
    return _finish(result, start)
