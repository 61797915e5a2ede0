import math
import os

import pytest
import torch

from s2m_diffusers.densities import LowRankGaussianMixture, StandardNormal, TiltedNormal


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


def _labelled(n, shape, seed=0):
    """Prior latents labelled on target where their first coordinate exceeds 1 (prior share 0.159)."""
    z = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    return z, z.reshape(n, -1)[:, 0] > 1.0


def test_tilted_samples_follow_its_density_exactly():
    """In one dimension, the rejection sampler's draws match q = N(z) (c^gamma + tau) / Z, integrated on a grid, by a
    chi-square test on 20 equal-probability cells (20,000 draws, fixed seed)."""
    from scipy.stats import chi2

    z, on = _labelled(3000, (1,))
    q = TiltedNormal.fit(z, on, seed=0)
    grid = torch.linspace(-7, 7, 140001, dtype=torch.float64)
    dens = torch.exp(-0.5 * grid**2) * q.tilt(grid[:, None])
    cdf = torch.cumsum(dens, 0)
    cdf = cdf / cdf[-1]
    edges = grid[torch.searchsorted(cdf, torch.linspace(0, 1, 21, dtype=torch.float64)[1:-1])]
    draws = q.sample(20000, torch.Generator().manual_seed(1)).flatten().double()
    counts = torch.bincount(torch.bucketize(draws, edges), minlength=20).double()
    stat = float(((counts - 1000.0) ** 2 / 1000.0).sum())
    assert chi2.sf(stat, 19) > 1e-3, stat
    # The tilt puts most draws on the target (the prior puts 15.9% there) and its Z is the grid's.
    assert float((draws > 1).double().mean()) > 0.5
    z_grid = float(dens.sum() * (grid[1] - grid[0])) / math.sqrt(2 * math.pi)
    assert abs(q.log_norm - math.log(z_grid)) < 0.03


@pytest.mark.parametrize("shape", [(4,), (2, 8, 8)])
def test_tilted_is_normalised_bounded_and_round_trips(shape):
    """E_q[p_z / q] = 1 up to the Monte Carlo Z, p_z / q <= Z / tau; a spatial latent is read through its pooled view;
    the state dict rebuilds the same density and the same draws."""
    z, on = _labelled(4000, shape)
    q = TiltedNormal.fit(z, on, rank=8, seed=0)
    assert q.rank == (4 if len(shape) == 1 else 8) and (q.basis is None) == (len(shape) == 1)
    draws = q.sample(20000, torch.Generator().manual_seed(2))
    assert draws.shape == (20000, *shape)
    ratio = q.log_prior_ratio(draws).double().exp()
    mean, se = float(ratio.mean()), float(ratio.std() / math.sqrt(ratio.numel()))
    assert abs(mean - 1.0) < 4 * se + 0.03, (mean, se)
    assert float(ratio.max()) <= math.exp(q.log_norm) / q.tau * (1 + 1e-6)  # float32 latents
    again = TiltedNormal.from_state_dict(q.state_dict())
    torch.testing.assert_close(again.log_prior_ratio(draws), q.log_prior_ratio(draws))
    seeded = [d.sample(50, torch.Generator().manual_seed(3)) for d in (q, again)]
    assert torch.equal(*seeded)
    torch.testing.assert_close(q.log_prob(draws), StandardNormal(shape).log_prob(draws) - q.log_prior_ratio(draws))


def test_tilted_errors():
    z, _ = _labelled(100, (3,))
    with pytest.raises(ValueError, match="at least 2 latents on the target and 2 off it"):
        TiltedNormal.fit(z, torch.zeros(100, dtype=torch.bool))
    with pytest.raises(ValueError, match="100 latents but 99 labels"):
        TiltedNormal.fit(z, torch.zeros(99, dtype=torch.bool))
    with pytest.raises(ValueError, match="lacks the tensors"):
        TiltedNormal.from_state_dict({})


def test_a_tilted_fit_is_saved_and_loaded_as_safetensors(tmp_path):
    """`save_fits` writes a tilted fit's tensors (no pickle) and `load_fits` rebuilds the same density."""
    from s2m_diffusers.sampling import LatentFit, SamplerStats, load_fits, save_fits

    z, on = _labelled(2000, (2, 8, 8))
    q = TiltedNormal.fit(z, on, rank=8, seed=1)
    save_fits({"key": LatentFit(q, torch.zeros(4, dtype=torch.float64), SamplerStats(), "stage 0 tilted")}, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["fit_000.safetensors", "index.json"]
    back = load_fits(tmp_path)["key"]
    assert isinstance(back.q, TiltedNormal) and back.chosen == "stage 0 tilted"
    torch.testing.assert_close(back.q.log_prior_ratio(z), q.log_prior_ratio(z))
