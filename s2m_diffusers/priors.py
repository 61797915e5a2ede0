"""Attribute priors ``pi_c`` from ``D_r`` alone (spec §3), as pure functions.

With ``gamma_c = pi_c / p_data(c)`` and exact heads, on any x holding both attributes a and b,
``D_r(a|x) / D_r(b|x) = gamma_b / gamma_a``. Each real image on which ``D_r`` splits its mass between a and b (both
probabilities at least `min_prob`) gives one measurement ``log D_r(a|x) - log D_r(b|x) = log gamma_b - log gamma_a``;
least squares over all such pairs gives ``log gamma`` up to a constant (only ratios of priors matter for a target).
Attributes never seen sharing an image with another are not identified: they keep ``gamma = 1`` (``pi = p_data``).

The priors returned are ``pi_c = p_data(c) * gamma_c`` with the geometric mean of ``gamma`` over identified
attributes equal to 1, so that "no evidence" means ``pi = p_data``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def estimate_log_gamma(dr_log_probs: torch.Tensor, min_prob: float = 0.15) -> tuple[torch.Tensor, dict]:
    """Least-squares estimate of ``log gamma_c`` from pairs of attributes that share the mass of ``D_r``.

    Args:
        dr_log_probs (`torch.Tensor` of shape `(N, n)`): calibrated ``log D_r(c|x)`` on real images.
        min_prob (`float`, defaults to 0.15): both attributes of a pair need at least this probability.

    Returns:
        `tuple[torch.Tensor, dict]`: ``log gamma`` `(n,)` (mean 0 over each connected group of attributes) and a
        report: `pair_counts` (n x n list), `identified` (per attribute), `residual_rms`, `num_pairs`.
    """
    log_p = dr_log_probs.detach().double().cpu()
    n = log_p.shape[1]
    strong = log_p.exp() >= min_prob  # (N, n)
    rows, targets = [], []
    pair_counts = torch.zeros(n, n, dtype=torch.long)
    for a in range(n):
        for b in range(a + 1, n):
            both = strong[:, a] & strong[:, b]
            count = int(both.sum())
            pair_counts[a, b] = pair_counts[b, a] = count
            if count:
                row = torch.zeros(n, dtype=torch.float64)
                row[b], row[a] = 1.0, -1.0
                rows.append(row.expand(count, n))
                targets.append(log_p[both, a] - log_p[both, b])  # = log gamma_b - log gamma_a
    roots = _connected_roots(pair_counts)  # each connected group's level is free: fixed below by a zero mean
    identified = [bool((pair_counts[i] > 0).any()) for i in range(n)]
    log_gamma = torch.zeros(n, dtype=torch.float64)
    residual_rms = float("nan")
    if rows:
        design = torch.cat(rows)  # (P, n)
        target = torch.cat(targets)  # (P,)
        constraints = torch.stack([torch.tensor([float(roots[i] == r) for i in range(n)]) for r in sorted(set(roots))])
        design = torch.cat([design, constraints])
        target = torch.cat([target, torch.zeros(len(constraints), dtype=torch.float64)])
        log_gamma = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
        residual_rms = float(
            (design[: -len(constraints)] @ log_gamma - target[: -len(constraints)]).pow(2).mean().sqrt()
        )
        log_gamma = torch.where(torch.tensor(identified), log_gamma, torch.zeros_like(log_gamma))
    report = {
        "pair_counts": pair_counts.tolist(),
        "identified": identified,
        "residual_rms": residual_rms,
        "num_pairs": int(sum(t.numel() for t in targets)),
        "min_prob": min_prob,
    }
    return log_gamma.float(), report


def _connected_roots(pair_counts: torch.Tensor) -> list[int]:
    """For each attribute, a representative of its connected group (attributes linked by shared images)."""
    n = len(pair_counts)
    group = list(range(n))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for a in range(n):
        for b in range(a + 1, n):
            if pair_counts[a, b] > 0:
                group[root(a)] = root(b)
    return [root(i) for i in range(n)]


def priors_from_log_gamma(log_gamma: torch.Tensor, label_counts: Sequence[int]) -> list[float]:
    """``pi_c = p_data(c) * gamma_c``, with ``p_data`` from the single-positive label counts.

    Args:
        log_gamma (`torch.Tensor` of shape `(n,)`): ``log pi_c / p_data(c)``, any common offset.
        label_counts (`Sequence[int]`): single-positive labels per attribute.

    Returns:
        `list[float]`: the priors (only their ratios matter).
    """
    counts = torch.tensor(list(label_counts), dtype=torch.float64)
    p_data = counts / counts.sum()
    return (p_data * log_gamma.double().exp()).tolist()


def estimate_priors(
    dr_log_probs: torch.Tensor, label_counts: Sequence[int], min_prob: float = 0.15
) -> tuple[list[float], dict]:
    """Attribute priors ``pi_c`` estimated from ``D_r`` on real images (spec §3).

    Args:
        dr_log_probs (`torch.Tensor` of shape `(N, n)`): calibrated ``log D_r(c|x)`` on real images.
        label_counts (`Sequence[int]`): single-positive labels per attribute (gives ``p_data``).
        min_prob (`float`, defaults to 0.15): see [`estimate_log_gamma`].

    Returns:
        `tuple[list[float], dict]`: the priors and the report of [`estimate_log_gamma`] with `log_gamma` added.
    """
    log_gamma, report = estimate_log_gamma(dr_log_probs, min_prob)
    report["log_gamma"] = log_gamma.tolist()
    return priors_from_log_gamma(log_gamma, label_counts), report
