"""The mathematics of S2M sampling (spec §3-6) as pure functions over tensors, with the spec's names.

Everything a sampler decides comes from here:

- the target's log ratio to ``p_data``, ``log r_T`` ([`log_r`], from ``log g_c`` = [`log_g`]; spec §3);
- the log importance weight ``log w = log p_T / p_G`` ([`log_w`]; spec §4) and [`log_weight`], **the one weight
  function** that the pipeline, the benchmarks and the tests all call: heads' outputs in, ``log w`` out;
- ``log p_data(c)`` and ``log pi_c`` from counts and priors ([`log_p_data`], [`log_priors`]);
- reading ``D_r`` tempered ([`temper_dr`], [`auto_dr_temperature`]);
- the independent Metropolis-Hastings acceptance ([`imh_accept`]; spec §5);
- resampling and tempering the fit data of latent refitting ([`importance_resample`], [`fit_exponent`]; spec §6).

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
    "da_imh_distances",
    "da_imh_steps",
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
    "imh_distance",
    "imh_steps",
    "importance_resample",
    "fit_exponent",
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
        target ([`Target`]): the target (or a refitting stage of it).
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
# Independent Metropolis-Hastings (spec §5) and the fit data of refitting (spec §6)


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


def imh_distance(log_ratios: torch.Tensor, steps: Sequence[int], weights: torch.Tensor | None = None) -> list[float]:
    """Total variation distance to the target of an independent-MH chain after each of ``steps`` steps, started from
    the proposal ``q`` restricted to the target, when the importance ratios ``r = pi / q`` are distributed as the
    given draws' (spec §5): exact for that empirical distribution.

    It uses Smith and Tierney's exact ``n``-step transition of the independence sampler (1996): with ``r`` normalised
    to mean 1 over ``q``, ``lambda(v) = 1 - E_q min(1, r / v)`` the rejection probability at a state of ratio ``v`` and
    ``T_n(v) = int_v^inf n lambda(u)^(n-1) / u^2 du``,

        P^n(x, dy) = T_n(max(r(x), r(y))) pi(dy) + lambda(r(x))^n delta_x(dy).

    A chain enters the target with a draw of ``q`` restricted to it (``mu_0 = q 1[r > 0] / s``, ``s`` the on-target
    share), so ``mu_0 P^n`` has the density ``f_n(y) = E_{mu_0}[T_n(max(r(x), r(y)))] + lambda(r(y))^n / (s r(y))``
    against ``pi``, a function of ``r(y)`` alone, and the distance is ``E_pi |f_n - 1| / 2``. ``lambda`` is piecewise
    ``1 - a - b / v`` between consecutive sorted ratios, so ``T_n`` has a closed form on each piece. It is far below
    the uniform bound ``(1 - 1/W)^n`` (``W = sup r``), which holds from the worst state: a chain that enters with a
    typical state leaves it at the typical acceptance rate.

    Args:
        log_ratios (`torch.Tensor` of shape `(N,)`): ``log r`` of ``N`` draws of ``q`` (``-inf`` off the target), up
            to a constant.
        steps (`Sequence[int]`): the numbers of steps ``n >= 0``.
        weights (`torch.Tensor` of shape `(N,)`, *optional*): the draws' weights (``1 / P(finished)`` of a screened
            pilot's draws: a Horvitz-Thompson picture of ``q``); default equal. Integer weights give the distance of
            the draws repeated that often.

    Returns:
        `list[float]`: the distance after each number of steps (1.0 each when no draw is on the target).
    """
    pieces = _imh_pieces(log_ratios, weights)
    return [_imh_distance_at(pieces, n) for n in steps]


def _imh_pieces(
    log_ratios: torch.Tensor, weights: torch.Tensor | None = None
) -> dict[str, torch.Tensor | float] | None:
    """What [`imh_distance`] computes once for every number of steps: the sorted, normalised ratios, their weights and
    the pieces of ``lambda`` between them (`None` when no draw is on the target)."""
    lr = log_ratios.double().flatten().cpu()
    w_all = torch.ones_like(lr) if weights is None else weights.double().flatten().cpu()
    total = float(w_all.sum())
    on = torch.isfinite(lr)
    if not on.any():
        return None
    # Ratios below 1e-300 of the largest (an underflow to 0) count as ties at that level: a chain leaves them at once.
    r, order = torch.sort(torch.exp(lr[on] - lr[on].max()).clamp_min(1e-300))
    w = w_all[on][order]
    r = r / (float((w * r).sum()) / total)  # mean 1 over q
    m = r.numel()
    cum = torch.cat([r.new_zeros(1), torch.cumsum(w * r, 0)])
    cum_w = torch.cat([r.new_zeros(1), torch.cumsum(w, 0)])
    a = (cum_w[m] - cum_w[:m]) / total  # P_q(r >= r_j)
    b = cum[:m] / total  # E_q[r 1(r < r_j)]
    # The piece of T_n over (r_j, r_(j+1)]: lambda = 1 - a - b u with u = 1/v, a and b of index j + 1.
    a_up, b_up, du = a[1:], b[1:], 1 / r[:-1] - 1 / r[1:]
    lam_lo = (1 - a_up - b_up / r[:-1]).clamp(0, 1)  # at v = r_j
    return {
        "r": r,
        "lam": (1 - a - b / r).clamp(0, 1),  # lambda(r_j)
        "b_up": b_up,
        "lam_hi": (1 - a_up - b_up / r[1:]).clamp(0, 1),  # at v = r_(j+1)
        "lam_lo": lam_lo,
        # int_{u_lo}^{u_hi} n lambda^(n-1) du = (lam_hi^n - lam_lo^n) / b = lam_lo^n expm1(n log1p(b du / lam_lo)) / b
        "log_step": torch.where(lam_lo > 0, torch.log1p(b_up * du / lam_lo.clamp_min(1e-300)), lam_lo.new_zeros(1)),
        "pi_share": w * r / (w * r).sum(),  # pi's mass on each draw
        "mu_share": w / cum_w[m],  # the entry's mass on each draw: q restricted to the target
        "below": cum_w[1:] / cum_w[m],  # the entry's mass at or below each draw
    }


def _imh_distance_at(pieces: dict | None, n: int) -> float:
    """[`imh_distance`] after ``n`` steps, from [`_imh_pieces`]."""
    if pieces is None:
        return 1.0
    r, lam, pi_share, mu_share = pieces["r"], pieces["lam"], pieces["pi_share"], pieces["mu_share"]
    # pi_j f_j = pi_j E_mu0[T_n(max(r_x, r_j))] + mu0_j lambda_j^n, with mu0 the entry's law.
    if n == 0:
        pif = mu_share
    else:
        lam_lo, lam_hi, b_up = pieces["lam_lo"], pieces["lam_hi"], pieces["b_up"]
        inner = lam_lo.pow(n) * torch.expm1(n * pieces["log_step"])
        piece = torch.where(lam_lo > 0, inner, lam_hi.pow(n)) / b_up
        top = -torch.expm1(n * torch.log1p(-1 / r[-1])) if r[-1] > 1 else r.new_tensor(1.0)  # v >= max r
        t_n = top + torch.cat([torch.flip(torch.cumsum(torch.flip(piece, [0]), 0), [0]), r.new_zeros(1)])
        mu_t = mu_share * t_n
        above = torch.cat([torch.flip(torch.cumsum(torch.flip(mu_t, [0]), 0), [0])[1:], r.new_zeros(1)])
        pif = pi_share * (pieces["below"] * t_n + above) + mu_share * lam.pow(n)
    return min(1.0, 0.5 * float((pif - pi_share).abs().sum()))


def imh_steps(
    log_ratios: torch.Tensor,
    tolerance: float,
    min_steps: int = 0,
    max_steps: int = 200,
    hint: int | None = None,
    weights: torch.Tensor | None = None,
) -> int:
    """The fewest steps ``n`` in ``[min_steps, max_steps]`` after which [`imh_distance`] is at most ``tolerance``
    (``max_steps`` when none is); the distance never grows with ``n``, so a bisection finds it. ``hint`` (a previous
    answer, e.g. before more ratios were seen) is tried first: the answer is the same, found in 2-3 evaluations when
    it has not moved. ``weights``: see [`imh_distance`]."""
    pieces = _imh_pieces(log_ratios, weights)

    def within(n: int) -> bool:
        return _imh_distance_at(pieces, n) <= tolerance

    lo, hi = min_steps, max_steps
    if within(lo):
        return lo
    # Invariant: the distance after lo steps is above the tolerance; hi is the answer or max_steps.
    if hint is not None and lo < hint <= hi:
        if not within(hint):
            lo = hint
        elif hint - 1 == lo or not within(hint - 1):
            return hint
        else:
            hi = hint - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if within(mid) else (mid, hi)
    return hi


def da_imh_distances(
    log_ratios: torch.Tensor,
    log_ratios_s: torch.Tensor,
    max_steps: int,
    weights: torch.Tensor | None = None,
    log_bar: float | None = None,
) -> torch.Tensor:
    """Total variation distance to the target of a delayed-acceptance independent-MH chain (Christen and Fox 2005)
    after ``0 .. max_steps`` steps from its entry, exact for the empirical distribution of the given draws of ``q``.

    The chain proposes ``z' ~ q`` and accepts in two stages, ``min(1, s(z') / s(z))`` with the surrogate ratio ``s``
    and ``min(1, rho(z') / rho(z))`` with ``rho = r / s``, ``r = pi / q``. On the empirical distribution (atom ``j``
    drawn with probability ``weights_j / sum(weights)``), its kernel on the on-target atoms is a matrix ``P`` with
    ``P_ij = p_j a(i, j)`` off the diagonal, and the target is ``pi_j ∝ p_j r_j``; a chain enters with the first
    on-target proposal that passes the first stage against the bar ``b`` (``mu_0 ∝ p_j min(1, s_j / b)``, as
    `sampling.sample_imh` enters chains). The distance after ``n`` steps is ``|mu_0 P^n - pi|_TV``, computed by ``n``
    vector-matrix products. It is the screened chain's counterpart of [`imh_distance`] (to which it reduces for a
    constant surrogate, or for ``s = r`` and ``b = 0``), and far below the uniform bound ``(1 - 1/W_bound)^n``.

    Args:
        log_ratios (`torch.Tensor` of shape `(N,)`): ``log r`` of the draws (``-inf`` off the target), up to a
            constant.
        log_ratios_s (`torch.Tensor` of shape `(N,)`): the surrogate's ``log s`` of the same draws (finite wherever
            ``log r`` is: floored).
        max_steps (`int`): the last number of steps.
        weights (`torch.Tensor` of shape `(N,)`, *optional*): the draws' weights (e.g. ``1 / P(pass)`` of draws that
            passed a screen: a Horvitz-Thompson picture of ``q``); default equal.
        log_bar (`float`, *optional*): ``log b``; default the log of the weighted mean of ``s``. ``-inf``: the entry
            is ``q`` restricted to the target.

    Returns:
        `torch.Tensor` of shape `(max_steps + 1,)`: the distance after each number of steps (1.0 each when no draw is
        on the target).
    """
    lr, ls = log_ratios.double().flatten().cpu(), log_ratios_s.double().flatten().cpu()
    w = torch.ones_like(lr) if weights is None else weights.double().flatten().cpu()
    p_all = w / w.sum()
    if log_bar is None:
        log_bar = float(torch.logsumexp(ls + p_all.log(), 0))
    on = torch.isfinite(lr)
    if not on.any():
        return torch.ones(max_steps + 1, dtype=torch.float64)
    lr, ls, p = lr[on], ls[on], p_all[on]
    if not torch.isfinite(ls).all():
        raise ValueError("The surrogate must be positive wherever the weight is (floor it): got a -inf on the target.")
    rho = lr - ls
    log_accept = torch.clamp(ls[None, :] - ls[:, None], max=0.0) + torch.clamp(rho[None, :] - rho[:, None], max=0.0)
    accept = log_accept.exp()
    kernel = accept * p[None, :]
    kernel.fill_diagonal_(0.0)
    kernel += torch.diag(1.0 - kernel.sum(1))
    pi = torch.softmax(lr + p.log(), 0)
    mu = p * torch.clamp(ls - log_bar, max=0.0).exp()
    mu = mu / mu.sum()
    out = torch.empty(max_steps + 1, dtype=torch.float64)
    for n in range(max_steps + 1):
        out[n] = 0.5 * float((mu - pi).abs().sum())
        mu = mu @ kernel
    return out


def da_imh_steps(
    log_ratios: torch.Tensor,
    log_ratios_s: torch.Tensor,
    tolerance: float,
    min_steps: int = 0,
    max_steps: int = 200,
    weights: torch.Tensor | None = None,
    log_bar: float | None = None,
) -> tuple[int, float]:
    """The fewest steps ``n`` in ``[min_steps, max_steps]`` after which [`da_imh_distances`] is at most ``tolerance``
    (``max_steps`` when none is), and the distance after them."""
    d = da_imh_distances(log_ratios, log_ratios_s, max_steps, weights, log_bar)
    within = (d[min_steps:] <= tolerance).nonzero()
    n = min_steps + int(within[0]) if within.numel() else max_steps
    return n, float(d[n])


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
