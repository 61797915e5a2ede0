"""The chains' diagnostics (`s2m_diffusers.diagnostics`) on draws whose answer is known: independent draws, an AR(1)
chain with a known autocorrelation time, chains stuck at different points, and a reading check of a consistent and
of a shifted sample."""

import math

import numpy as np
import pytest
import torch

from s2m_diffusers import diagnostics


def ar1(chains: int, n: int, rho: float, seed: int = 0, shift=None) -> np.ndarray:
    """``chains`` stationary AR(1) chains of ``n`` draws with unit variance (``shift``: a mean per chain)."""
    rng = np.random.default_rng(seed)
    x = np.empty((chains, n))
    x[:, 0] = rng.standard_normal(chains)
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + math.sqrt(1 - rho**2) * rng.standard_normal(chains)
    return x + (0.0 if shift is None else np.asarray(shift)[:, None])


def test_split_rhat_is_one_for_independent_chains_and_large_for_chains_apart():
    assert diagnostics.split_rhat(ar1(4, 1000, 0.0)) < 1.01
    assert diagnostics.split_rhat(ar1(4, 1000, 0.5, shift=[0, 0, 0, 2.0])) > 1.1
    # a chain that drifts within itself: its two halves disagree
    drift = ar1(4, 1000, 0.0) + np.linspace(0, 3, 1000)[None, :] * np.array([[0], [0], [0], [1]])
    assert diagnostics.split_rhat(drift) > 1.05
    assert math.isnan(diagnostics.split_rhat(np.ones((4, 10))))  # no variance: no verdict


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_bulk_ess_matches_the_ar1_autocorrelation_time(rho):
    """The ESS of an AR(1) chain is ``n (1 - rho) / (1 + rho)``."""
    draws = ar1(8, 2000, rho, seed=1)
    expected = draws.size * (1 - rho) / (1 + rho)
    assert diagnostics.ess_bulk(draws) == pytest.approx(expected, rel=0.15)


def test_nested_rhat_sees_superchains_that_have_not_forgotten_their_starts():
    """Pairs of chains (superchains) at stationarity: nested R-hat near 1, under the threshold; pairs that stay near
    their own starting points: far above it. One chain per superchain needs no pairs; one superchain gives no
    verdict."""
    pairs = np.repeat(np.arange(8), 2)
    mixed = ar1(16, 40, 0.3, seed=2)
    threshold = diagnostics.nested_rhat_threshold(2)
    assert threshold == pytest.approx(math.sqrt(1.51))
    assert diagnostics.nested_rhat(mixed, pairs) < threshold
    stuck = ar1(16, 40, 0.3, seed=2, shift=np.repeat(np.random.default_rng(3).normal(0, 2, 8), 2))
    assert diagnostics.nested_rhat(stuck, pairs) > 1.5 * threshold
    assert math.isnan(diagnostics.nested_rhat(mixed, np.zeros(16)))
    assert math.isnan(diagnostics.nested_rhat(mixed, np.r_[np.zeros(15), 1]))  # superchains of unequal size


def test_reading_check_is_a_standard_normal_score_when_both_estimates_agree():
    """Returned values and a pool of draws with importance weights for the same law: the score is |N(0, 1)|-like;
    a returned sample shifted by 3 standard errors scores about 3."""
    gen = torch.Generator().manual_seed(0)
    scores = []
    for _ in range(200):
        returned = torch.randn(64, generator=gen, dtype=torch.float64) + 1.0
        pool = torch.randn(400, generator=gen, dtype=torch.float64)  # N(0, 1) draws, weighted to N(1, 1)
        log_w = pool - 0.5
        scores.append(diagnostics.reading_check(returned, 64.0, pool, log_w)["z"])
    scores = np.array(scores)
    assert 0.55 < float(np.median(scores)) < 0.85  # the median of |N(0, 1)| is 0.674
    assert float(np.mean(scores > 3)) < 0.02
    returned = torch.randn(64, generator=gen, dtype=torch.float64) + 1.0
    pool = torch.randn(400, generator=gen, dtype=torch.float64)
    check = diagnostics.reading_check(returned, 64.0, pool, pool - 0.5)
    shifted = diagnostics.reading_check(returned + 4 * check["se"], 64.0, pool, pool - 0.5)
    assert shifted["z"] > 3
    off = torch.full((400,), -math.inf, dtype=torch.float64)
    assert math.isnan(diagnostics.reading_check(returned, 64.0, pool, off)["z"])  # no pool draw on the target


@pytest.mark.parametrize("icc", [0.0, 0.2, 1.0])
def test_cluster_ess_is_kishs_design_effect_for_a_known_intra_cluster_correlation(icc):
    """Images in 500 clusters of 8 whose values share a cluster effect with the given share of the variance: the
    effective number is ``n / (1 + 7 icc)`` (within 10%; at 0 within the estimate's noise); clusters of identical
    images count one each."""
    g = np.random.default_rng(0)
    k, m = 500, 8
    clusters = np.repeat(np.arange(k), m)
    values = math.sqrt(icc) * g.normal(size=k)[clusters] + math.sqrt(1 - icc) * g.normal(size=k * m)
    expected = k * m / (1 + (m - 1) * icc)
    assert abs(diagnostics.cluster_ess(values, clusters) - expected) < 0.1 * expected
    assert diagnostics.cluster_ess(np.arange(k)[clusters].astype(float), clusters) == k
    assert diagnostics.cluster_ess(values[:5], np.zeros(5)) == 5  # one cluster: nothing to compare


def test_with_few_pairs_of_chains_the_warning_waits_for_more_than_chance():
    """Independent draws cross the authors' threshold by chance when pairs of chains are few; the level a call warns
    above (`nested_rhat_chance`) is crossed 1% of the time, and tends to the authors' threshold with many pairs."""
    rng = np.random.default_rng(0)
    for pairs in (2, 4, 8):
        ids = np.repeat(np.arange(pairs), 2)
        values = [diagnostics.nested_rhat(rng.standard_normal((2 * pairs, 1)), ids) for _ in range(3000)]
        values = np.array(values)
        chance = diagnostics.nested_rhat_chance(pairs, 2)
        assert float(np.mean(values > chance)) < 0.02
        assert float(np.mean(values > diagnostics.nested_rhat_threshold(2))) > 0.05
    assert diagnostics.nested_rhat_chance(10_000, 2) == pytest.approx(diagnostics.nested_rhat_threshold(2), abs=0.02)
    assert diagnostics.nested_rhat_chance(1, 2) == math.inf


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.8])
def test_a_chain_forgets_as_fast_as_its_autocorrelation_says(rho):
    """`draws_per_effective_draw` of AR(1) chains is their autocorrelation time ``(1 + rho) / (1 - rho)``, within
    ``[1, draws per chain]``; chains stuck apart do not raise it (their means are left out)."""
    draws = ar1(16, 400, rho, seed=4)
    assert diagnostics.draws_per_effective_draw(draws) == pytest.approx((1 + rho) / (1 - rho), rel=0.25)
    apart = draws + np.random.default_rng(5).normal(0, 3, 16)[:, None]
    # (the ranks are taken over all draws, so that chains apart change them a little)
    assert diagnostics.draws_per_effective_draw(apart) == pytest.approx(
        diagnostics.draws_per_effective_draw(draws), rel=0.1
    )
    assert diagnostics.draws_per_effective_draw(np.ones((4, 10))) == 10  # no variance: one draw per chain
    assert 1 <= diagnostics.draws_per_effective_draw(ar1(16, 6, 0.99, seed=6)) <= 6


def test_the_warning_level_for_short_chains_is_crossed_by_chance_1_percent_of_the_time():
    """The level a call warns above, for chains of the call's length: stationary AR(1) chains (autocorrelation time
    9, 16 draws: under 2 effective draws a chain) in 8 pairs cross it in about 1% of 400 runs (under 3%: 2.5 binomial
    sd above 1%); pairs started at different points (superchain means 1 sd apart) in most runs. With one effective
    draw per chain the level is the one-draw chance level."""
    pairs = np.repeat(np.arange(8), 2)

    def warns(x):
        effective = x.shape[1] / diagnostics.draws_per_effective_draw(x)
        level = max(
            diagnostics.nested_rhat_threshold(2), diagnostics.nested_rhat_chance(8, 2, draws_per_chain=effective)
        )
        return diagnostics.nested_rhat(x, pairs) > level

    stationary = [warns(ar1(16, 16, 0.8, seed=seed)) for seed in range(400)]
    assert float(np.mean(stationary)) < 0.03
    rng = np.random.default_rng(7)
    apart = [warns(ar1(16, 16, 0.8, seed=1000 + s, shift=np.repeat(rng.normal(0, 1, 8), 2))) for s in range(100)]
    assert float(np.mean(apart)) > 0.7
    assert diagnostics.nested_rhat_chance(8, 2, draws_per_chain=1) == diagnostics.nested_rhat_chance(8, 2)
    assert diagnostics.nested_rhat_chance(8, 2, draws_per_chain=4) < diagnostics.nested_rhat_chance(8, 2)
