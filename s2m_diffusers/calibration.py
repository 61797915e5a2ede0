"""How the sampler reads trained heads, chosen from data when they are trained (spec §3, §7), as pure functions.

Three settings decide how a trained ``D_v`` and ``D_r`` become weights, and none of them is learned by the heads'
losses:

- the **negation margin** ``lambda`` (a forbidden attribute must stay below ``1/lambda`` of the image's strongest);
- the **presence margin** ``kappa`` (a required attribute must reach ``kappa`` of the strongest);
- the **strength** ``beta`` of ``logit D_v`` (the weights target ``p_G^(1 - beta) p_data^beta`` on the combination).

With exact heads the margins change nothing and ``beta = 1`` is the paper's target. With real heads they matter a lot
(on Digits-7to3, ``A & B & C`` is 57% accurate at ``kappa = 0`` and 91% at ``kappa = 0.5``), and hand-setting them per
dataset is what the official code does and what this module replaces:

- [`choose_margins`]: the ratios ``rho_c = g_c / max_c' g_c'`` that ``D_r`` gives the non-strongest attributes of
  held-out **generated** images (what the sampler meets) fall in two groups, attributes the image holds (``rho`` near
  1) and attributes it lacks (``rho`` near 0). A two-component Gaussian mixture over ``log rho`` (scikit-learn's
  `GaussianMixture`) gives the boundary ``t`` where an attribute is as likely held as lacking. ``kappa`` is the level
  that 95% of the attributes **real** held-out images are labelled with reach (their single positive label is an
  attribute they hold), kept in ``[t, 0.5]``. ``lambda`` starts at ``1 / t`` and is then made as strict as the data
  allow: the largest value (up to 8 times that, at most 100) at which every combination of attributes that at least
  1% of the generated images support at ``1 / t`` keeps at least half of that support ([`support_shares`]). A stricter
  negation keeps out more images that hold a forbidden attribute faintly; the support rule keeps every combination
  the generator makes reachable.
- [`choose_dv_strength`]: ``beta`` is the largest value in [0, 1] whose weights ``exp(beta logit D_v)`` keep an
  effective sample size of 10% over held-out generated images ([`s2m_diffusers.maths.dv_strength`]); with it,
  [`dv_report`] says whether ``D_v`` separates real from generated images instead of estimating their ratio.
- [`support_shares`]: the share of generated images on which each combination of attributes keeps a positive weight
  under the chosen margins (label-free: the heads' own reading), so that a combination the margins leave without
  support shows in the report.

Training also calibrates each head's logits by a temperature (Guo, Pleiss, Sun and Weinberger 2017):
[`fit_temperature`] minimises the held-out [`nll`], and [`head_metrics`] reports accuracy, NLL and
[`expected_calibration_error`] before and after.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

from .maths import DV_MIN_ESS_SHARE, dv_strength, ess_share, log_g, log_r
from .targets import parse_target

__all__ = [
    "PRESENCE_RECALL",
    "log_attribute_ratios",
    "choose_margins",
    "choose_dv_strength",
    "dv_report",
    "ess_share",
    "support_shares",
    "nll",
    "expected_calibration_error",
    "fit_temperature",
    "head_metrics",
]

# kappa: the share of real held-out images whose labelled attribute must keep reaching the presence margin.
PRESENCE_RECALL = 0.95
# Bounds of the chosen margins: lambda in [2, 100] (a forbidden attribute below half of the strongest at least),
# kappa at most 0.5 (a required attribute may hold half of the strongest's mass and still count).
NEGATION_MARGIN_RANGE = (2.0, 100.0)
MAX_PRESENCE_MARGIN = 0.5
# lambda is made stricter from the mixture boundary by these factors while every combination keeps this share of its
# support (`choose_margins`).
STRICTER_FACTORS = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
MIN_SUPPORT_KEPT = 0.5
# log rho below this is treated as this (D_r's smallest probabilities are rounding noise).
_LOG_RHO_FLOOR = math.log(1e-6)
# Combinations are enumerated for the support report up to this many attributes (2^n - 1 of them).
_MAX_SUPPORT_ATTRIBUTES = 8


def log_attribute_ratios(
    dr_log_probs: torch.Tensor,
    log_p_data: torch.Tensor,
    log_priors: torch.Tensor | None = None,
    labelling: str = "independent",
) -> torch.Tensor:
    """``log rho_c(x) = log g_c(x) - max_c' log g_c'(x)``, `(B, n)`, float64: each attribute's ratio to the image's
    strongest, the quantity both margins threshold (``s2m_diffusers.maths.log_r``)."""
    priors = None if log_priors is None else log_priors.double()
    lg = log_g(dr_log_probs.double(), log_p_data.double(), priors, labelling)
    return lg - lg.amax(1, keepdim=True)


def _mixture_boundary(values: np.ndarray, seed: int = 0) -> tuple[float | None, dict]:
    """The point between the two components of a 2-component Gaussian mixture over `values` where each is equally
    probable, or `None` when the values are not two separated groups (then `report["reason"]` says why)."""
    from sklearn.mixture import GaussianMixture

    report: dict = {"num_values": int(values.size)}
    if values.size < 20:
        report["reason"] = f"only {values.size} non-strongest attribute ratios"
        return None, report
    mixture = GaussianMixture(2, random_state=seed).fit(values.reshape(-1, 1))
    means, sds = mixture.means_.ravel(), np.sqrt(mixture.covariances_.ravel())
    order = np.argsort(means)
    report.update(
        means=[float(means[i]) for i in order],
        sds=[float(sds[i]) for i in order],
        weights=[float(mixture.weights_[i]) for i in order],
    )
    low, high = order
    if min(mixture.weights_) < 0.02 or means[high] - means[low] < sds[low] + sds[high]:
        report["reason"] = "the ratios do not fall in two separated groups"
        return None, report
    grid = np.linspace(means[low], means[high], 2001)
    posterior_high = mixture.predict_proba(grid.reshape(-1, 1))[:, high]
    boundary = float(grid[int(np.argmax(posterior_high >= 0.5))])
    report["boundary_log_rho"] = boundary
    return boundary, report


def choose_margins(
    generated_log_ratios: torch.Tensor,
    real_log_ratios: torch.Tensor,
    real_labels: torch.Tensor,
    presence_recall: float = PRESENCE_RECALL,
    default_negation_margin: float = 10.0,
    seed: int = 0,
    attribute_names: list[str] | None = None,
    min_support_kept: float = MIN_SUPPORT_KEPT,
) -> tuple[float, float, dict]:
    """The negation margin ``lambda`` and presence margin ``kappa`` from held-out data (module docstring).

    Args:
        generated_log_ratios (`torch.Tensor` of shape `(M, n)`): [`log_attribute_ratios`] of held-out generated images.
        real_log_ratios (`torch.Tensor` of shape `(N, n)`): the same of held-out real images.
        real_labels (`torch.Tensor` of shape `(N,)`): their single-positive labels.
        presence_recall (`float`, defaults to 0.95): share of the real images' labelled attributes that must reach
            ``kappa``.
        default_negation_margin (`float`, defaults to 10.0): ``lambda`` when the generated ratios do not fall in two
            groups (too few images, or heads that never split their mass).
        seed (`int`, defaults to 0): seed of the mixture fit.
        attribute_names (`list[str]`, *optional*): names for the support report (default ``a0, a1, ...``).
        min_support_kept (`float`, defaults to 0.5): how much of its support at the boundary each combination must
            keep as ``lambda`` is made stricter.

    Returns:
        `tuple[float, float, dict]`: ``lambda``, ``kappa`` and a report (`boundary_rho`, the mixture, how ``kappa``
        came about, `generated_present_share`: the share of generated images' attributes at or above the boundary).
    """
    gen = generated_log_ratios.double().clamp(min=_LOG_RHO_FLOOR)
    top = gen.argmax(1)
    others = torch.ones_like(gen, dtype=torch.bool)
    others[torch.arange(len(gen)), top] = False
    boundary, report = _mixture_boundary(gen[others].cpu().numpy(), seed)
    if boundary is None:
        negation_margin = float(default_negation_margin)
        report["negation_margin_from"] = f"default ({report['reason']})"
    else:
        negation_margin = float(np.clip(math.exp(-boundary), *NEGATION_MARGIN_RANGE))
        report["negation_margin_from"] = "mixture boundary of generated images' attribute ratios"
    threshold = 1.0 / negation_margin
    report["boundary_rho"] = threshold
    report["generated_present_share"] = float((gen[others] >= math.log(threshold)).double().mean())

    real = real_log_ratios.double()
    labelled = real[torch.arange(len(real)), real_labels.long().cpu()].exp()
    if labelled.numel():
        level = float(torch.quantile(labelled, 1.0 - presence_recall))
    else:
        level = 0.0
    presence_margin = float(min(MAX_PRESENCE_MARGIN, max(threshold, level)))
    names = attribute_names or [f"a{i}" for i in range(gen.shape[1])]
    report["stricter"] = None
    if boundary is not None:  # the default margin stays as it is: there is no boundary to tighten from
        negation_margin, report["stricter"] = _strictest_negation(
            gen, names, negation_margin, presence_margin, min_support_kept
        )
    report.update(
        presence_level_real=level,
        presence_recall_real=float((labelled >= presence_margin).double().mean()) if labelled.numel() else None,
        num_real=int(labelled.numel()),
        num_generated=int(len(gen)),
    )
    return negation_margin, presence_margin, report


def _strictest_negation(
    log_ratios: torch.Tensor, names: list[str], start: float, presence_margin: float, min_support_kept: float
) -> tuple[float, dict]:
    """The largest ``lambda`` in ``start * STRICTER_FACTORS`` (at most the range's top) at which every combination
    supported by at least 1% of the images at ``start`` keeps `min_support_kept` of that support."""
    base = support_shares(log_ratios, names, start, presence_margin)
    supported = {k: v for k, v in base.items() if v >= 0.01}
    chosen, kept = start, 1.0
    for factor in STRICTER_FACTORS:
        candidate = min(start * factor, NEGATION_MARGIN_RANGE[1])
        shares = support_shares(log_ratios, names, candidate, presence_margin)
        worst = min((shares[k] / v for k, v in supported.items()), default=1.0)
        if worst < min_support_kept:
            break
        chosen, kept = candidate, worst
    return float(chosen), {"from": start, "factor": chosen / start, "least_support_kept": kept}


def choose_dv_strength(dv_logits_generated: torch.Tensor, min_ess_share: float = DV_MIN_ESS_SHARE) -> float:
    """``beta``: the largest strength in [0, 1] whose weights ``exp(beta logit D_v)`` keep an effective sample size
    of `min_ess_share` over held-out generated images ([`s2m_diffusers.maths.dv_strength`])."""
    return dv_strength(dv_logits_generated, None, min_ess_share)


def dv_report(
    dv_logits_generated: torch.Tensor, fitted_temperature: float, accuracy: float, beta: float
) -> tuple[bool, str]:
    """Whether ``D_v`` is degenerate, and a sentence saying what its weights are and what was done about them, for
    `metrics.json` and the model card.

    ``D_v`` is degenerate when it separates real from generated held-out images (accuracy at least 0.98) or when
    calibration asked to sharpen it strongly (a fitted temperature below 0.5, kept at 1): its logit is then no density
    ratio, its size arbitrary. Either way the strength ``beta`` is what keeps the weights usable."""
    ess_full = ess_share(dv_logits_generated)
    ess_beta = ess_share(beta * dv_logits_generated.double())
    reasons = []
    if accuracy >= 0.98:
        reasons.append(f"held-out accuracy {accuracy:.3f}")
    if fitted_temperature < 0.5:
        reasons.append(f"calibration asked to sharpen it, temperature {fitted_temperature:.3g}, kept at 1")
    strength = (
        f"strength {beta:.3g} (the sampler targets p_G^{1 - beta:.3g} p_data^{beta:.3g} on the combination), whose "
        f"weights keep an effective sample size of {ess_beta:.1%} of generated images"
    )
    if reasons:
        return True, (
            f"D_v separates real from generated images instead of estimating their ratio ({'; '.join(reasons)}): "
            f"used at {strength}. More real data, a pretrained backbone or a better generator would allow more."
        )
    if beta < 1.0:
        return False, (
            f"D_v's weights are heavy-tailed (effective sample size {ess_full:.1%} of generated images at strength "
            f"1): used at {strength}."
        )
    return False, f"D_v is used at full strength 1 (the paper's target); its weights keep {ess_full:.1%} as ESS."


def support_shares(
    log_ratios: torch.Tensor, attribute_names: list[str], negation_margin: float, presence_margin: float
) -> dict[str, float]:
    """Share of images on which each combination of attributes (all of S present, every other absent) keeps a
    positive weight under the margins: ``min_S rho >= kappa`` and ``min_S rho > lambda max_(not S) rho``.

    Args:
        log_ratios (`torch.Tensor` of shape `(B, n)`): [`log_attribute_ratios`].
        attribute_names (`list[str]`): the `n` names.
        negation_margin (`float`), presence_margin (`float`): ``lambda`` and ``kappa``.

    Returns:
        `dict[str, float]`: share per combination, keyed like ``"A & B & ~C"``; empty above 8 attributes.
    """
    n = len(attribute_names)
    if n > _MAX_SUPPORT_ATTRIBUTES:
        return {}
    # The ratios are log g_c up to a common shift: read them as the sampler reads D_r (no priors), with log_r itself.
    lr, no_shift = log_ratios.double(), torch.zeros(n, dtype=torch.float64)
    out = {}
    for size in range(1, n + 1):
        for chosen in itertools.combinations(range(n), size):
            literals = [attribute_names[i] for i in chosen]
            literals += [f"~{attribute_names[j]}" for j in range(n) if j not in chosen]
            name = " & ".join(literals)
            target = parse_target(name, list(attribute_names))
            keep = torch.isfinite(log_r(target, lr, no_shift, None, negation_margin, presence_margin))
            out[name] = float(keep.double().mean())
    return out


# ----- temperature scaling of the heads' logits, and the metrics training reports ----------------------------
def nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood: binary (logits `(N,)`, labels in {0, 1}) or softmax (logits `(N, K)`)."""
    if logits.ndim == 1:
        losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    else:
        losses = F.cross_entropy(logits, labels, reduction="none")
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum()


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """(N,) binary logits or (N, K) logits -> (N, K) probabilities."""
    if logits.ndim == 1:
        p = torch.sigmoid(logits)
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, num_bins: int = 15
) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    Args:
        logits (`torch.Tensor`): `(N,)` binary logits (labels in {0, 1}) or `(N, K)` class logits.
        labels (`torch.Tensor`): `(N,)` integer labels.
        weights (`torch.Tensor`, *optional*): `(N,)` sample weights (e.g. to balance real and generated).
        num_bins (`int`, defaults to 15): number of bins over [0, 1].

    Returns:
        `float`: ``sum_b w_b |accuracy_b - confidence_b|`` with ``w_b`` the weight share of bin b.
    """
    confidence, predicted = _probs(logits.double()).max(dim=1)
    correct = (predicted == labels).double()
    weights = torch.ones_like(confidence) if weights is None else weights.double()
    bins = (confidence * num_bins).long().clamp(max=num_bins - 1)
    total = weights.sum()
    ece = torch.zeros((), dtype=torch.float64)
    for k in range(num_bins):
        mask = bins == k
        mass = weights[mask].sum()
        if mass > 0:
            gap = ((correct[mask] - confidence[mask]) * weights[mask]).sum() / mass
            ece += mass / total * gap.abs()
    return float(ece)


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, min_temperature: float = 0.0
) -> float:
    """The temperature T minimising the held-out NLL of `logits / T` (golden-section search over log T).

    The NLL of `beta * logits` is convex in `beta = 1 / T`, so the search over `log T` in `[-4, 4]` finds the
    minimum.

    Args:
        logits (`torch.Tensor`): `(N,)` binary or `(N, K)` class logits.
        labels (`torch.Tensor`): `(N,)` labels.
        weights (`torch.Tensor`, *optional*): `(N,)` sample weights.
        min_temperature (`float`, defaults to 0.0): the smallest temperature returned. ``D_v`` uses 1: a temperature
            below 1 would sharpen its logit, and on real and generated images that it can tell apart calibration
            asks for exactly that (the held-out NLL falls as the logit grows without bound), which makes the weights
            ``exp(logit D_v)`` degenerate. A fitted temperature below 1 is reported instead.

    Returns:
        `float`: the temperature.
    """
    logits, labels = logits.detach().double(), labels.detach()
    weights = None if weights is None else weights.double()

    def loss(log_t: float) -> float:
        return float(nll(logits / math.exp(log_t), labels, weights))

    low, high = -4.0, 4.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return max(min_temperature, math.exp((low + high) / 2))


def head_metrics(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, weights: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracy, NLL and ECE of one head before (T = 1) and after calibration (T = `temperature`)."""
    predicted = logits > 0 if logits.ndim == 1 else logits.argmax(dim=1)
    correct = (predicted.long() == labels).double()
    w = torch.ones_like(correct) if weights is None else weights.double()
    return {
        "accuracy": float((correct * w).sum() / w.sum()),
        "nll_before": float(nll(logits.double(), labels, weights)),
        "nll_after": float(nll(logits.double() / temperature, labels, weights)),
        "ece_before": expected_calibration_error(logits, labels, weights),
        "ece_after": expected_calibration_error(logits / temperature, labels, weights),
        "temperature": temperature,
    }
