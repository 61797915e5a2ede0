"""The mathematics of S2M sampling (spec §3-6) as pure functions over tensors, with the spec's names.

Everything a sampler decides comes from here:

- the target's log ratio to ``p_data``, ``log r_T`` ([`log_r`], from ``log g_c`` = [`log_g`]; spec §3);
- the log importance weight ``log w = log p_T / p_G`` ([`log_w`]; spec §4) and [`log_weight`], **the one weight
  function** that the pipeline, the benchmarks and the tests all call: heads' outputs in, ``log w`` out;
- ``log p_data(c)`` and ``log pi_c`` from counts and priors ([`log_p_data`], [`log_priors`]);
- reading ``D_r`` tempered ([`temper_dr`], [`auto_dr_temperature`]);
- the independent Metropolis-Hastings acceptance of the official recipe ([`imh_accept`]; spec §5; the chains' kernels
  are in `s2m_diffusers.kernels`);
- the strength of ``logit D_v`` in the weights ([`dv_strength`], [`ess_share`]).

Names: ``p_z`` is the latent prior, ``q`` a latent proposal density, ``pi_c`` the attribute priors, ``p_data(c)`` the
share of single-positive labels, ``g_c = pi_c / p_data(c) * D_r(c|x)``. Everything is in log space, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .targets import Attr, Node, Not, Or, Target

__all__ = [
    "DEFAULT_NEGATION_MARGIN",
    "LABELLINGS",
    "log_p_data",
    "log_priors",
    "log_g",
    "log_r",
    "log_w",
    "log_weight",
    "dv_strength",
    "ess_share",
    "temper_dr",
    "auto_dr_temperature",
    "imh_accept",
]

# lambda of the negation margin when neither the call nor the heads set one (spec §3: a margin well above 1 is the
# safe default with imperfect heads; 1 is the paper's formula). The heads, training and the pipeline all use this.
DEFAULT_NEGATION_MARGIN = 10.0
# How single-positive data were labelled (spec §1): "independent" (the paper's model: each attribute's folder samples
# the images that hold it) or "one_label_per_image" (each image in one folder, labelled with one of its attributes).
LABELLINGS = ("independent", "one_label_per_image")
# `dv_strength`: the share of generated samples that the weights exp(beta logit D_v) keep as effective sample size.
DV_MIN_ESS_SHARE = 0.1


# ----------------------------------------------------------------------------------------------------------
# p_data(c) and pi_c


def log_p_data(label_counts: Sequence[int] | None, num_attributes: int) -> torch.Tensor:
    """``log p_data(c)``: the log share of single-positive labels per attribute (spec §1), uniform when unknown.

    Args:
        label_counts (`Sequence[int]`, *optional*): single-positive labels per attribute.
        num_attributes (`int`): ``n``, used when ``label_counts`` is `None`.

    Returns:
        `torch.Tensor` of shape `(n,)`, float64.
    """
    counts = torch.tensor(list(label_counts) if label_counts else [1] * num_attributes, dtype=torch.float64)
    if counts.numel() != num_attributes:
        raise ValueError(f"label_counts has {counts.numel()} entries, expected one per attribute ({num_attributes}).")
    return (counts / counts.sum()).log()


def log_priors(priors: Sequence[float] | None, num_attributes: int) -> torch.Tensor | None:
    """``log pi_c`` (any scale), or `None` when no priors are given (then ``pi = p_data``, exact for conjunctions).

    Args:
        priors (`Sequence[float]`, *optional*): the attribute priors ``pi_c``.
        num_attributes (`int`): ``n``; ``priors`` must have that many entries.

    Returns:
        `torch.Tensor` of shape `(n,)`, float64, or `None`.
    """
    if priors is None:
        return None
    if len(priors) != num_attributes:
        raise ValueError(f"priors has {len(priors)} entries, but the heads know {num_attributes} attributes.")
    return torch.tensor(list(priors), dtype=torch.float64).log()


# ----------------------------------------------------------------------------------------------------------
# log r_T and log w

# Relative differences below this count as zero: ``g_a - g_b`` for two attributes an image holds both of is
# exactly 0 in theory and a rounding error in floating point, which must not put the image on target.
_RELATIVE_TOLERANCE = 1e-6


def _log_sub(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``log((a - b)^+)`` from ``log a`` and ``log b``: ``-inf`` where ``b >= a (1 - 1e-6)``, stable, warning-free."""
    diff = log_b - log_a  # <= 0 where a > b
    positive = diff < math.log1p(-_RELATIVE_TOLERANCE)
    safe = torch.where(positive, diff, torch.full_like(diff, -1.0))
    # log(1 - e^d): log(-expm1(d)) near 0, log1p(-exp(d)) far below (Maechler's log1mexp).
    log1mexp = torch.where(safe > -math.log(2), torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe)))
    out = log_a + log1mexp
    neg_inf = torch.full_like(out, -math.inf)
    return torch.where(positive & torch.isfinite(log_a), out, neg_inf)


def log_g(
    dr_log_probs: torch.Tensor,
    log_p_data: torch.Tensor,
    log_priors: torch.Tensor | None = None,
    labelling: str = "independent",
) -> torch.Tensor:
    """``log g_c(x)``, the attribute's ratio to ``p_data`` up to a factor common to all ``c`` (spec §1, §3).

    - ``labelling="independent"`` (each attribute's images a sample of the images that hold it):
      ``log g_c(x) = log pi_c - log p_data(c) + log D_r(c|x)``, so that ``g_c = h(x) 1[c in S(x)]`` for exact heads.
    - ``labelling="one_label_per_image"`` (each image in one folder, its label drawn uniformly from its attributes):
      ``p_data = p`` and ``D_r(c|x) = 1[c in S(x)] / |S(x)|``, so ``log g_c(x) = log D_r(c|x) - max_c' log D_r(c'|x)``
      is the indicator itself (``h = 1``); priors play no role.

    Args:
        dr_log_probs (`torch.Tensor` of shape `(B, n)`): ``log D_r(c|x)``.
        log_p_data (`torch.Tensor` of shape `(n,)`): log share of single-positive labels per attribute.
        log_priors (`torch.Tensor` of shape `(n,)`, *optional*): ``log pi_c``. ``None`` uses ``log p_data``
            (all ``gamma_c = 1``), which is exact for conjunction targets (spec §3).
        labelling (`str`, defaults to `"independent"`): how the single-positive data were labelled (spec §1).
    """
    if labelling == "one_label_per_image":
        return dr_log_probs - dr_log_probs.amax(1, keepdim=True)
    if labelling != "independent":
        raise ValueError(f"labelling must be one of {list(LABELLINGS)}, got {labelling!r}.")
    if log_priors is None:
        return dr_log_probs
    return dr_log_probs + (log_priors - log_p_data).to(dr_log_probs)


def _eval(
    node: Node, lg: torch.Tensor, log_h: torch.Tensor, log_margin: float, log_presence: float, positive: bool = True
) -> torch.Tensor:
    if isinstance(node, Attr):
        value = lg[:, node.index]
        if positive and log_presence > -math.inf:  # a required attribute must come within kappa of the strongest
            value = torch.where(value >= log_h + log_presence, value, torch.full_like(value, -math.inf))
        return value
    if isinstance(node, Or):
        return torch.stack([_eval(c, lg, log_h, log_margin, log_presence, positive) for c in node.children]).amax(0)
    if isinstance(node, Not):
        return _log_sub(log_h, _eval(node.child, lg, log_h, log_margin, log_presence, not positive) + log_margin)
    positive_children = [c for c in node.children if not isinstance(c, Not)]
    negative = [c.child for c in node.children if isinstance(c, Not)]
    if positive_children:
        log_min = torch.stack([_eval(c, lg, log_h, log_margin, log_presence, positive) for c in positive_children])
        log_min = log_min.amin(0)
    else:
        log_min = log_h
    if not negative:
        return log_min
    log_max = torch.stack([_eval(c, lg, log_h, log_margin, log_presence, not positive) for c in negative]).amax(0)
    return _log_sub(log_min, log_max + log_margin)


def log_r(
    target: Target,
    dr_log_probs: torch.Tensor,
    log_p_data: torch.Tensor,
    log_priors: torch.Tensor | None = None,
    negation_margin: float = 1.0,
    presence_margin: float = 0.0,
    labelling: str = "independent",
) -> torch.Tensor:
    """``log r_T(x)``: the log ratio of the target density to ``p_data``, up to the constant ``pi_T`` (spec §3).

    Args:
        target ([`Target`]): from [`parse_target`].
        dr_log_probs (`torch.Tensor` of shape `(B, n)`): ``log D_r(c|x)`` over the target's attributes.
        log_p_data (`torch.Tensor` of shape `(n,)`): log share of single-positive labels per attribute.
        log_priors (`torch.Tensor` of shape `(n,)`, *optional*): log attribute priors ``pi_c`` (any scale).
        negation_margin (`float`, defaults to 1.0): ``lambda >= 1``; how much a forbidden attribute's ratio
            is scaled before it is subtracted. 1 is the paper's formula.
        presence_margin (`float`, defaults to 0.0): ``kappa`` in [0, 1]; a required attribute counts only where
            ``g_c >= kappa * h`` (``h = max_c g_c``), elsewhere it is 0. With exact heads ``g_c`` is ``h`` or 0, so
            any ``kappa <= 1`` leaves the target unchanged (0 is the paper's formula); with soft heads it keeps out
            images that hold a required attribute only faintly, the counterpart of the negation margin for present
            attributes. On Digits-7to3 (shipped GAN and heads), ``a & b & c`` held 55% of the heads' target mass on
            images missing an attribute at ``kappa = 0`` and 12% at ``kappa = 0.5``.
        labelling (`str`, defaults to `"independent"`): the labelling model of the heads' data ([`log_g`]).

    Returns:
        `torch.Tensor` of shape `(B,)`: ``log r_T``, ``-inf`` where ``r_T = 0``.
    """
    if dr_log_probs.ndim != 2 or dr_log_probs.shape[1] != len(target.attribute_names):
        raise ValueError(
            f"dr_log_probs must have shape (batch, {len(target.attribute_names)}) for attributes "
            f"{list(target.attribute_names)}, got {tuple(dr_log_probs.shape)}."
        )
    if not negation_margin >= 1.0:
        raise ValueError(f"negation_margin must be >= 1 (1 is the paper's formula), got {negation_margin}.")
    if not 0.0 <= presence_margin <= 1.0:
        raise ValueError(f"presence_margin must lie in [0, 1] (0 is the paper's formula), got {presence_margin}.")
    log_pi = None if log_priors is None else log_priors.to(dr_log_probs)
    lg = log_g(dr_log_probs, log_p_data.to(dr_log_probs), log_pi, labelling)
    log_h = lg.amax(1)
    log_presence = math.log(presence_margin) if presence_margin > 0 else -math.inf
    return _eval(target.expression, lg, log_h, math.log(negation_margin), log_presence)


def log_w(
    log_r_t: torch.Tensor,
    dv_logit: torch.Tensor,
    df_log_prob: torch.Tensor | None = None,
    log_pg_class: torch.Tensor | float | None = None,
    dv_strength: float = 1.0,
) -> torch.Tensor:
    """The log importance weight ``log w = log p_T / p_G`` up to a constant (spec §4).

    ``log w = log r_T + logit D_v`` for an unconditional proposal; for a proposal conditioned on class ``c``,
    ``- log D_f(c|x) + log p_G(c)`` is added (the proposal's density is ``p_G(x|c)``, not ``p_G(x)``).

    Args:
        log_r_t (`torch.Tensor` of shape `(B,)`): from [`log_r`].
        dv_logit (`torch.Tensor` of shape `(B,)`): ``logit D_v(x) = log p_data(x) / p_G(x)``.
        df_log_prob (`torch.Tensor` of shape `(B,)`, *optional*): ``log D_f(c|x)`` for each sample's class.
        log_pg_class (`torch.Tensor` or `float`, *optional*): ``log p_G(c)`` for each sample's class.
        dv_strength (`float`, defaults to 1.0): ``beta`` in [0, 1], the weight of ``logit D_v``: the weights then
            target ``p_G^(1 - beta) p_data^beta`` restricted to the target ([`dv_strength`]); 1 is the paper's target.
    """
    out = log_r_t + dv_strength * dv_logit
    if df_log_prob is not None:
        if log_pg_class is None:
            raise ValueError("A class-conditional proposal needs log_pg_class (log p_G(c)) beside df_log_prob.")
        out = out - df_log_prob + log_pg_class
    return out


def temper_dr(dr_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(log D_r / T)``: ``D_r`` sharpened (``T < 1``) or flattened (``T > 1``).

    With exact heads and labels drawn uniformly among an image's attributes, ``D_r(.|x)`` is uniform on the image's
    attribute set ``S(x)`` and zero elsewhere, and tempering leaves it unchanged: the target ``p_T`` is the same
    for every ``T``. With soft heads it is not: ``T < 1`` pushes the small probabilities of absent attributes
    towards zero (a conjunction ``a & b & c`` is then held only by images whose ``D_r`` is close to uniform over
    all three), while ``T > 1`` lifts them (a negation ``~c`` is then stricter). The official S2M scripts temper
    by the number of present attributes (1.2 for one, 1.0 for two, 0.2 for three); see `auto_dr_temperature`.

    Args:
        dr_log_probs (`torch.Tensor` of shape `(B, n)`): ``log D_r(c|x)``.
        temperature (`float`): ``T > 0``; 1 returns the input.

    Returns:
        `torch.Tensor` of shape `(B, n)`: the tempered log probabilities.
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"The D_r temperature must be a positive number, got {temperature}; 1.0 leaves D_r as is.")
    if temperature == 1.0:
        return dr_log_probs
    return torch.log_softmax(dr_log_probs / temperature, dim=-1)


def auto_dr_temperature(target: Target, sharp: float = 0.2) -> float:
    """The ``D_r`` temperature of ``dr_temperature="auto"``: ``sharp`` for a conjunction of two or more attributes
    with no negation (``a & b & c``), 1.0 otherwise.

    Tempering is exact for exact heads (`temper_dr`), so this only changes how soft heads are read: a pure
    conjunction asks that ``D_r`` spread its mass evenly over the required attributes, and soft heads leave too much
    on images that hold only some of them (on Digits-7to3, ``a & b & c`` drew 45% images missing an attribute at
    ``T = 1`` and 12% at ``T = 0.2``, the official scripts' value for three attributes). A target with a negation
    keeps ``T = 1``: sharpening hides the minor attribute that the negation must see.

    Args:
        target ([`Target`]): a parsed target.
        sharp (`float`, defaults to 0.2): the temperature of pure conjunctions.

    Returns:
        `float`: the temperature.
    """
    if target.is_conjunction and not target.absent and len(target.present) >= 2:
        return float(sharp)
    return 1.0


def log_weight(
    target: Target,
    dr_log_probs: torch.Tensor,
    dv_logit: torch.Tensor,
    log_p_data: torch.Tensor,
    log_priors: torch.Tensor | None = None,
    negation_margin: float = 1.0,
    presence_margin: float = 0.0,
    dr_temperature: float = 1.0,
    df_log_prob: torch.Tensor | None = None,
    log_pg_class: torch.Tensor | float | None = None,
    labelling: str = "independent",
    dv_strength: float = 1.0,
) -> torch.Tensor:
    """The one weight function: heads' outputs in, ``log w = log p_T / p_G`` (up to a constant) out (spec §3-4).

    ``D_r`` is read tempered ([`temper_dr`]), the target's ratio [`log_r`] is taken with the margins, and [`log_w`]
    adds ``logit D_v`` (and, for a proposal conditioned on class ``c``, ``- log D_f(c|x) + log p_G(c)``). All in
    float64.

    Args:
        target ([`Target`]): the target (or one of its `stages`).
        dr_log_probs (`torch.Tensor` of shape `(B, n)`): ``log D_r(c|x)``.
        dv_logit (`torch.Tensor` of shape `(B,)`): ``logit D_v(x)``.
        log_p_data (`torch.Tensor` of shape `(n,)`): from [`log_p_data`].
        log_priors (`torch.Tensor` of shape `(n,)`, *optional*): from [`log_priors`].
        negation_margin (`float`, defaults to 1.0), presence_margin (`float`, defaults to 0.0): see [`log_r`].
        dr_temperature (`float`, defaults to 1.0): see [`temper_dr`].
        df_log_prob (`torch.Tensor` of shape `(B,)`, *optional*), log_pg_class (*optional*): see [`log_w`].
        labelling (`str`, defaults to `"independent"`): the labelling model of the heads' data ([`log_g`]).
        dv_strength (`float`, defaults to 1.0): ``beta``, see [`log_w`] and [`dv_strength`].

    Returns:
        `torch.Tensor` of shape `(B,)`, float64: ``log w``, ``-inf`` off target.
    """
    dr = temper_dr(dr_log_probs.double(), dr_temperature)
    lr = log_r(target, dr, log_p_data, log_priors, negation_margin, presence_margin, labelling)
    df = None if df_log_prob is None else df_log_prob.double()
    return log_w(lr, dv_logit.double(), df, log_pg_class, dv_strength)


# ----------------------------------------------------------------------------------------------------------
# The official recipe's independent Metropolis-Hastings acceptance (spec §5), and the D_v strength


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


def ess_share(log_weights: torch.Tensor) -> float:
    """Effective sample size of normalised ``exp(log_weights)`` as a share of all the weights (``-inf`` are zeros)."""
    lw = log_weights.double().flatten()
    if lw.numel() == 0 or not torch.isfinite(lw).any():
        return 0.0
    return float(1.0 / torch.softmax(lw, 0).pow(2).sum()) / lw.numel()


def dv_strength(
    dv_logits: torch.Tensor, log_rest: torch.Tensor | None = None, min_ess_share: float = DV_MIN_ESS_SHARE
) -> float:
    """The strength ``beta`` of ``logit D_v`` in the weights: the largest ``beta`` in [0, 1] whose weights
    ``exp(log_rest + beta logit D_v)`` over the given samples keep an effective sample size of ``min_ess_share`` of
    them (samples with ``log_rest = -inf``, off the target, are left out).

    Where real and generated images can be told apart, a classifier's logit is no density ratio: its size is
    arbitrary, and ``exp(logit D_v)`` puts the whole target on a handful of generated images (with the shipped
    Digits-7to3 GAN heads and `A & B & ~C`: an effective sample size of about 1% of the on-target samples), which an
    exact sampler must then return again and again, at a cost of about ``sup w / E w`` proposals per sample.
    ``beta < 1`` targets ``p_G^(1 - beta) p_data^beta`` restricted to the combination instead: between the generator's
    images and the data's, by geometric interpolation of the densities. ``beta = 1`` is the paper's target, kept
    wherever the weights allow it (the analytic toy's exact heads: ``beta = 1`` for every target).

    Args:
        dv_logits (`torch.Tensor` of shape `(n,)`): ``logit D_v`` of ``n`` proposal samples.
        log_rest (`torch.Tensor` of shape `(n,)`, *optional*): the rest of their log weights (``log r_T``, and the
            ``D_f`` term of a class-conditional proposal); `None`: zero.
        min_ess_share (`float`, defaults to 0.1): the share of the samples to keep as effective sample size.

    Returns:
        `float`: ``beta`` (1.0 when fewer than 2 samples are on the target).
    """
    dv = dv_logits.double().flatten()
    rest = torch.zeros_like(dv) if log_rest is None else log_rest.double().flatten()
    keep = torch.isfinite(rest) & torch.isfinite(dv)
    dv, rest = dv[keep], rest[keep]
    if dv.numel() < 2:
        return 1.0

    def share(beta: float) -> float:
        return ess_share(rest + beta * dv)

    if share(1.0) >= min_ess_share:
        return 1.0
    lo, hi = 0.0, 1.0
    if share(0.0) < min_ess_share:  # the rest alone is already heavier: use as little of D_v as possible
        return 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if share(mid) >= min_ess_share else (lo, mid)
    return lo
