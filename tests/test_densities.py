"""The latent prior, the one density the library ships (latent refitting and its densities were removed)."""

import pytest
import torch

import s2m_diffusers.densities as densities
from s2m_diffusers.densities import StandardNormal


def test_standard_normal():
    prior = StandardNormal((3, 4))
    z = prior.sample(5, torch.Generator().manual_seed(0))
    assert z.shape == (5, 3, 4)
    expected = torch.distributions.Normal(0, 1).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(prior.log_prob(z), expected)
    assert torch.equal(prior.log_prior_ratio(z), torch.zeros(5))


def test_standard_normal_is_seeded_and_takes_a_device_and_dtype():
    prior = StandardNormal([2])
    assert prior.latent_shape == (2,) and repr(prior) == "StandardNormal(latent_shape=(2,))"
    a, b = (prior.sample(4, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.device.type == "cpu"
    z = prior.sample(4, torch.Generator().manual_seed(3), device="cpu", dtype=torch.float64)
    assert z.dtype == torch.float64 and torch.allclose(z.float(), a)
    assert prior.log_prior_ratio(z).dtype == torch.float64


@pytest.mark.parametrize("removed", ["LowRankGaussianMixture", "TiltedNormal"])
def test_the_refitted_densities_are_gone(removed):
    assert densities.__all__ == ["StandardNormal"] and not hasattr(densities, removed)
