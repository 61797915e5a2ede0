import math

import pytest
import torch

from s2m_diffusers.densities import LowRankGaussianMixture, StandardNormal


def _clustered(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.zeros(d)
    centre[0], centre[1] = 2.0, -1.0
    z = torch.randn((n, d), generator=g) * 0.3 + centre
    return z


def test_standard_normal():
    prior = StandardNormal((3, 4))
    z = prior.sample(5, torch.Generator().manual_seed(0))
    assert z.shape == (5, 3, 4)
    expected = torch.distributions.Normal(0, 1).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(prior.log_prob(z), expected)
    assert torch.equal(prior.log_prior_ratio(z), torch.zeros(5))


@pytest.mark.parametrize("d, rank", [(2, 32), (64, 4)])
def test_mixture_is_normalised_and_bounded(d, rank):
    """E_q[p_z / q] = 1 (q is a density) and p_z / q <= 1 / eps everywhere (the defensive share)."""
    q = LowRankGaussianMixture.fit(_clustered(2000, d), rank=rank, defensive=0.1)
    assert q.rank == min(rank, d)
    z = q.sample(40000, torch.Generator().manual_seed(1))
    ratio = q.log_prior_ratio(z).double().exp()
    mean, se = float(ratio.mean()), float(ratio.std() / math.sqrt(ratio.numel()))
    assert abs(mean - 1.0) < 4 * se + 1e-3, (mean, se)
    assert float(ratio.max()) <= 1 / 0.1 + 1e-6
    # Far from the fit, q is the defensive prior share: p_z / q -> 1 / eps.
    far = torch.full((1, d), -6.0)
    assert abs(float(q.log_prior_ratio(far).exp()) - 10.0) < 1e-3


def test_low_rank_log_ratio_matches_full_formula():
    """log p_z - log q computed on k coordinates equals the d-dimensional definition of q."""
    d = 16
    q = LowRankGaussianMixture.fit(_clustered(1000, d), rank=3, n_components=2, defensive=0.2)
    z = torch.randn((50, d), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    P = q.basis  # (k, d)
    u = z @ P.T
    perp = z - u @ P  # (50, d): component in the orthogonal complement
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    log_perp = -0.5 * perp.pow(2).sum(1) - 0.5 * (d - 3) * math.log(2 * math.pi)
    log_q = torch.logaddexp(math.log(0.8) + q.mixture.log_prob(u) + log_perp, math.log(0.2) + log_pz)
    torch.testing.assert_close(q.log_prior_ratio(z), log_pz - log_q)
    torch.testing.assert_close(q.log_prob(z), log_q)


def test_fit_recovers_the_data_and_sampling_is_seeded():
    z = _clustered(3000, 8)
    q = LowRankGaussianMixture.fit(z, rank=2, defensive=0.05)
    s1 = q.sample(4000, torch.Generator().manual_seed(7))
    s2 = q.sample(4000, torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2)
    # 95 % of draws come from the fit: their mean sits near the data's mean in the fitted directions.
    torch.testing.assert_close(s1.mean(0)[:2], z.mean(0)[:2], atol=0.15, rtol=0)


def test_fit_errors():
    with pytest.raises(ValueError, match="at least 2 accepted latents"):
        LowRankGaussianMixture.fit(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="defensive must be in"):
        LowRankGaussianMixture.fit(_clustered(100, 2), defensive=0.0)
