"""What a call can say about its chains (spec §5b): convergence diagnostics across chains and a reading check.

- [`split_rhat`] and [`ess_bulk`]: rank-normalised split-R-hat (the larger of the bulk and the folded one) and bulk
  effective sample size (Vehtari, Gelman, Simpson, Carpenter and Bürkner 2021). Their authors rely on R-hat below
  1.01 only once every split chain has an ESS of 50 or more, which short chains never have.
- [`nested_rhat`]: nested R-hat for many short chains (Margossian, Hoffman, Sountsov, Riou-Durand, Vehtari and Gelman
  2024): chains are grouped into superchains that start from one point, and ``nR^2 = 1 + B/W`` compares the
  variance between superchain means with the variance inside superchains. At stationarity ``B/W`` is about ``1/M``
  for ``M`` chains per superchain (less when each chain has more than one effective draw); the chains are taken to
  have forgotten their starting points when ``nR^2 < 1 + 1/M + delta``, ``delta = 0.01`` (the condition of the
  authors' simulation code; the paper's threshold is of the same form). That condition is stated for many
  superchains and one effective draw per chain; with few superchains such draws cross it by chance, so a call warns
  only above the larger of it and the 99th percentile of nested R-hat for stationary chains of the call's length
  ([`nested_rhat_chance`]), whose effective draws per chain come from how fast each chain forgets around its own
  mean ([`draws_per_effective_draw`]): with 2 pairs of chains only far apart superchains warn, with 8 pairs (64
  images) the authors' threshold itself.
- [`cluster_ess`]: the effective number of the returned images, from how much more alike the images of one
  superchain are than images of different ones (one-way analysis of variance, Kish's design effect): chains that
  start from a few points return images worth about as many.
- [`reading_check`]: the returned images' mean of a reading of the heads (``log w``, each attribute's ratio)
  against its importance-weighted estimate from the entry pool, in standard errors: the same target seen by a chain
  and without one. It warns only where the pool's effective sample size is 10 or more (on fewer draws the pool's
  estimate and its standard error mean little).

All functions take draws as a `(chains, draws)` array (float64 numpy) and return plain floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "RHAT_THRESHOLD",
    "MIN_ESS_PER_SPLIT_CHAIN",
    "NESTED_RHAT_DELTA",
    "READING_CHECK_SE",
    "split_rhat",
    "ess_bulk",
    "nested_rhat",
    "nested_rhat_threshold",
    "nested_rhat_chance",
    "draws_per_effective_draw",
    "cluster_ess",
    "reading_check",
]

# Vehtari et al. (2021): use the draws only when R-hat < 1.01, and rely on R-hat only once each split chain has an
# average bulk-ESS of at least 50.
RHAT_THRESHOLD = 1.01
MIN_ESS_PER_SPLIT_CHAIN = 50
# Margossian et al. (2024): nR^2 < 1 + 1/M + delta.
NESTED_RHAT_DELTA = 0.01
# Nested R-hat warns where it exceeds what independent draws exceed with probability 1 - CHANCE_LEVEL.
CHANCE_LEVEL = 0.99
# The reading check warns beyond this many standard errors, where the pool's effective sample size is at least this
# (below it, the pool's importance-weighted estimate stands on a few draws and its standard error means little).
READING_CHECK_SE = 3.0
READING_CHECK_MIN_POOL_ESS = 10.0


def _as_array(draws) -> np.ndarray:
    a = draws.detach().double().cpu().numpy() if isinstance(draws, torch.Tensor) else np.asarray(draws, dtype=float)
    if a.ndim != 2:
        raise ValueError(f"draws must be a (chains, draws) array, got shape {a.shape}.")
    return a


def _split(a: np.ndarray) -> np.ndarray:
    """Each chain cut in two halves (the middle draw of an odd length dropped): `(2 C, N // 2)`."""
    half = a.shape[1] // 2
    return np.concatenate([a[:, :half], a[:, a.shape[1] - half :]], axis=0)


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) of all the draws, ties shared."""
    flat = a.ravel()
    order = np.argsort(flat, kind="mergesort")
    ranks = np.empty(flat.size)
    sorted_values = flat[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1, flat.size]
    for lo, hi in zip(starts[:-1], starts[1:]):
        ranks[order[lo:hi]] = 0.5 * (lo + hi - 1) + 1
    return ranks.reshape(a.shape)


def _rank_normalise(a: np.ndarray) -> np.ndarray:
    """``Phi^-1((rank - 3/8) / (S + 1/4))`` over all ``S`` draws (Vehtari et al., eq. 14)."""
    u = (_ranks(a) - 0.375) / (a.size + 0.25)
    return torch.special.ndtri(torch.from_numpy(u)).numpy()


def _rhat(a: np.ndarray) -> float:
    """The basic R-hat of chains `(M, N)`: ``sqrt(((N - 1) / N W + B / N) / W)``."""
    m, n = a.shape
    if m < 2 or n < 2:
        return math.nan
    w = a.var(axis=1, ddof=1).mean()
    b = n * a.mean(axis=1).var(ddof=1)
    if w <= 0:
        return math.nan if b <= 0 else math.inf
    return math.sqrt(((n - 1) / n * w + b / n) / w)


def split_rhat(draws) -> float:
    """Rank-normalised split-R-hat, the larger of the bulk and the folded one (Vehtari et al. 2021); `nan` for fewer
    than 2 chains or 4 draws per chain, or draws that are all equal."""
    a = _as_array(draws)
    if a.shape[0] < 2 or a.shape[1] < 4 or np.ptp(a) == 0:
        return math.nan
    split = _split(a)
    bulk = _rhat(_rank_normalise(split))
    folded = _rhat(_rank_normalise(np.abs(split - np.median(split))))
    return max(bulk, folded)


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Autocovariance of one chain at every lag, by FFT."""
    n = x.size
    f = np.fft.rfft(x - x.mean(), n=2 * n)
    return np.fft.irfft(f * np.conj(f))[:n] / n


def _geyer_tau(rho: np.ndarray) -> float:
    """The integrated autocorrelation time ``-1 + 2 sum`` of Geyer's initial monotone sequence over the
    autocorrelations ``rho`` (lag 0 first): sums of adjacent pairs, kept while positive, made monotone."""
    n = rho.size
    pairs = rho[: 2 * ((n - 1) // 2) : 2] + rho[1 : 2 * ((n - 1) // 2) + 1 : 2]
    positive = np.flatnonzero(pairs <= 0)
    pairs = pairs[: positive[0]] if positive.size else pairs
    pairs = np.minimum.accumulate(pairs) if pairs.size else pairs
    return -1.0 + 2.0 * pairs.sum() if pairs.size else 1.0


def ess_bulk(draws) -> float:
    """Bulk effective sample size: the ESS of the rank-normalised split chains, with Geyer's initial monotone
    sequence over the combined autocorrelation (Vehtari et al. 2021, §3.2); `nan` when it cannot be estimated."""
    a = _as_array(draws)
    if a.shape[1] < 4 or np.ptp(a) == 0:
        return math.nan
    z = _rank_normalise(_split(a))
    m, n = z.shape
    acov = np.stack([_autocovariance(chain) for chain in z])  # (m, n)
    mean_var = acov[:, 0].mean() * n / (n - 1)
    var_plus = mean_var * (n - 1) / n + (z.mean(axis=1).var(ddof=1) if m > 1 else 0.0)
    if var_plus <= 0:
        return math.nan
    rho = 1.0 - (mean_var - acov.mean(axis=0)) / var_plus  # (n,)
    rho[0] = 1.0
    tau = _geyer_tau(rho)
    tau = max(tau, 1.0 / math.log10(m * n)) if m * n > 10 else max(tau, 1e-3)
    return float(m * n / tau)


def draws_per_effective_draw(draws) -> float:
    """How many of a chain's draws make one effective draw, from the autocorrelation of each chain around its own
    mean (rank-normalised over all draws, averaged over chains, Geyer's initial monotone sequence): in
    ``[1, draws per chain]``; the draws per chain (one effective draw per chain) where it cannot be estimated.

    Unlike [`ess_bulk`] it leaves out the variance between chains: it says how fast a chain forgets within the region
    it stays in, which is what stationary chains of this length would show, whether or not the chains have forgotten
    their starting points (which [`nested_rhat`] judges against it)."""
    a = _as_array(draws)
    n = a.shape[1]
    if n < 4 or np.ptp(a) == 0:
        return float(n)
    z = _rank_normalise(a)
    acov = np.stack([_autocovariance(chain) for chain in z]).mean(axis=0)  # (n,)
    if acov[0] <= 0:
        return float(n)
    return float(min(max(_geyer_tau(acov / acov[0]), 1.0), n))


def nested_rhat(draws, superchains, rank_normalise: bool = True) -> float:
    """Nested R-hat (Margossian et al. 2024) of chains `(C, N)` grouped into superchains of equal size (chains of one
    superchain started from one point): ``sqrt(1 + B / W)`` with ``B`` the variance of the superchain means and ``W``
    the mean over superchains of the variance between their chains' means plus the chains' own variance (each 0
    where a superchain has one chain, or a chain one draw), on the rank-normalised draws (as Vehtari et al. do for
    R-hat: robust to heavy tails, such as ``log w``'s). `nan` for fewer than 2 superchains or no variance."""
    a = _as_array(draws)
    if rank_normalise and np.ptp(a) > 0:
        a = _rank_normalise(a)
    ids = np.asarray(superchains)
    groups = [a[ids == k] for k in np.unique(ids)]
    sizes = {g.shape[0] for g in groups}
    if len(groups) < 2 or len(sizes) != 1:
        return math.nan
    means = np.array([g.mean() for g in groups])
    b = means.var(ddof=1)
    within = []
    for g in groups:
        between_chains = g.mean(axis=1).var(ddof=1) if g.shape[0] > 1 else 0.0
        in_chains = g.var(axis=1, ddof=1).mean() if g.shape[1] > 1 else 0.0
        within.append(between_chains + in_chains)
    w = float(np.mean(within))
    if w <= 0:
        return math.nan if b <= 0 else math.inf
    return math.sqrt(1.0 + b / w)


def nested_rhat_threshold(chains_per_superchain: int, delta: float = NESTED_RHAT_DELTA) -> float:
    """``sqrt(1 + 1/M + delta)``: nested R-hat above it says the chains have not forgotten their starting points
    (the authors' reliability condition, stated for many superchains)."""
    return math.sqrt(1.0 + 1.0 / chains_per_superchain + delta)


def nested_rhat_chance(
    superchains: int, chains_per_superchain: int, level: float = CHANCE_LEVEL, draws_per_chain: float = 1.0
) -> float:
    """The ``level`` quantile of nested R-hat for stationary chains in ``superchains`` superchains of
    ``chains_per_superchain`` chains with ``draws_per_chain`` effective draws each (a chain's length over
    [`draws_per_effective_draw`]): ``B / W`` is then about ``F(K - 1, K (M - 1)) / (M n)``. With few superchains
    and one effective draw per chain the authors' threshold is crossed by chance (with 2 pairs of chains in about a
    third of such runs); with several it is not. A call warns above the larger of the two."""
    from scipy.stats import f

    k, m = superchains, chains_per_superchain
    if k < 2 or m < 2:
        return math.inf
    return math.sqrt(1.0 + float(f.ppf(level, k - 1, k * (m - 1))) / (m * max(draws_per_chain, 1.0)))


def cluster_ess(values, clusters) -> float:
    """The effective sample size of ``values`` `(n,)` drawn in ``clusters`` `(n,)` (the superchains the returned
    images come from): ``n / (1 + (m - 1) rho)`` for the mean cluster size ``m`` and the intra-cluster correlation
    ``rho`` of a one-way analysis of variance (clipped to [0, 1]): ``n`` where images of one cluster are no more
    alike than of two, the number of clusters where each cluster's images are one.

    Args:
        values (`torch.Tensor` or array of shape `(n,)`): a reading of each image.
        clusters (`torch.Tensor` or array of shape `(n,)`): each image's cluster.
    """
    v = np.asarray(torch.as_tensor(values).detach().double().cpu(), dtype=np.float64)
    ids = np.unique(np.asarray(torch.as_tensor(clusters).cpu()), return_inverse=True)[1]
    n, k = v.size, int(ids.max()) + 1 if v.size else 0
    if k < 2 or n <= k or not np.all(np.isfinite(v)):
        return float(n)
    sizes = np.bincount(ids, minlength=k).astype(np.float64)
    means = np.bincount(ids, weights=v, minlength=k) / sizes
    between = float((sizes * (means - v.mean()) ** 2).sum()) / (k - 1)
    within = float(((v - means[ids]) ** 2).sum()) / (n - k)
    m0 = (n - float((sizes**2).sum()) / n) / (k - 1)
    denominator = between + (m0 - 1.0) * within
    rho = 0.0 if denominator <= 0 else min(1.0, max(0.0, (between - within) / denominator))
    return float(n / (1.0 + (n / k - 1.0) * rho))


def reading_check(returned, ess: float, pool_values, pool_log_weights) -> dict:
    """The returned images' mean of one reading against its importance-weighted estimate from the entry pool.

    Args:
        returned (`torch.Tensor` of shape `(n,)`): the reading on the returned images.
        ess (`float`): their effective sample size (correlated images of one chain, or of one pair of chains started
            together, count less: [`cluster_ess`]).
        pool_values (`torch.Tensor` of shape `(P,)`): the reading on the pool's draws (any value off the target).
        pool_log_weights (`torch.Tensor` of shape `(P,)`): the draws' log importance ratios (``-inf`` off target).

    Returns:
        `dict`: ``mean`` (returned), ``estimate`` (from the pool, self-normalised), ``se`` (both standard errors
        combined: the chains' ``sd / sqrt(ESS)`` and the pool's delta-method one), ``z`` (the difference in standard
        errors) and ``pool_ess``.
    """
    r = returned.detach().double().cpu()
    lw = pool_log_weights.detach().double().cpu()
    keep = torch.isfinite(lw) & torch.isfinite(pool_values.detach().double().cpu())
    if r.numel() < 2 or int(keep.sum()) < 2 or not math.isfinite(ess) or ess <= 0:
        return {
            "mean": float(r.mean()) if r.numel() else math.nan,
            "estimate": math.nan,
            "se": math.nan,
            "z": math.nan,
        }
    p = torch.softmax(lw[keep], 0)
    v = pool_values.detach().double().cpu()[keep]
    estimate = float((p * v).sum())
    se_pool2 = float((p.pow(2) * (v - estimate).pow(2)).sum())
    se_chain2 = float(r.var()) / ess
    se = math.sqrt(se_pool2 + se_chain2)
    mean = float(r.mean())
    z = abs(mean - estimate) / se if se > 0 else (0.0 if mean == estimate else math.inf)
    return {"mean": mean, "estimate": estimate, "se": se, "z": z, "pool_ess": float(1.0 / p.pow(2).sum())}
