"""Chains in a diffusion model's noise at Stable Diffusion's latent shape, 4 x 64 x 64 (16,384 dimensions).

The proposal is a real `DDIMProposal` around a stand-in UNet whose prediction is linear in its input, so that DDIM maps
the noise to a scaled copy of it, ``x = c z``, and the exact target is known: two attributes read the image's low
frequencies (A: channel 0's top-left quarter is bright; B: channel 1 is bright), each held by 15% of the prior's
images, so ``A & B`` by 2.25%. Under the target, the two block means are independent truncated normals, and every
direction of the noise orthogonal to them stays standard normal. ``RUNS`` independent calls of the sampler at its
default kernel (pCN) return ``N`` images each; the images are tested against the exact target on a 3 x 3 grid of its
quantiles, with the calls as clusters (images of one call are correlated, calls are not;
`toy.clustered_chi_square`), at p < 1e-3.
"""

import math

import pytest
import torch
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from s2m_diffusers.densities import StandardNormal
from s2m_diffusers.proposals import DDIMProposal
from s2m_diffusers.sampling import sample_s2m
from s2m_diffusers.testing.toy import clustered_chi_square

SHAPE = (4, 64, 64)
RUNS, N = 40, 8
ALPHA = 1e-3
PRIOR_SHARE = 0.15**2  # of A & B
PRIOR = StandardNormal(SHAPE)
# The pool grows 64 draws at a time until two are on the target; the chains start from those exact target draws
# (the pool is drawn from the prior, so its draws on the target are the target's), so a short burn-in does.
SETTINGS = {"pool_size": 32, "pool_batch": 64, "burn_in": 4}
pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # 8 images a call: the diagnostics may warn
Z85 = 1.0364333894937898  # the standard normal's 85% quantile


class LinearUNet(ModelMixin, ConfigMixin):
    """A `UNet2DModel` stand-in: predicts ``factor * sample`` (the clean sample, for ``prediction_type="sample"``)."""

    @register_to_config
    def __init__(self, sample_size: int = 64, in_channels: int = 4, out_channels: int = 4, factor: float = 0.01):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(factor)))

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        out = self.weight * sample
        return UNet2DOutput(sample=out) if return_dict else (out,)


def block_means(x: torch.Tensor) -> torch.Tensor:
    """(B, 2): channel 0's top-left 32 x 32 mean (attribute A), channel 1's mean (attribute B)."""
    return torch.stack([x[:, 0, :32, :32].mean((1, 2)), x[:, 1].mean((1, 2))], 1).double()


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """(B,): a pixel difference inside A's block, orthogonal to every block mean: standard normal (times c sqrt 2)."""
    return (x[:, 0, 5, 7] - x[:, 0, 5, 8]).double()


def linear_ddim_world():
    """The proposal, ``c`` (``x = c z``), the thresholds of A and B, and ``stage(k)``: the evaluate function of the
    first ``k`` attributes' conjunction (exact: ``log w`` is 0 on it, ``-inf`` off it)."""
    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type="sample")
    proposal = DDIMProposal(LinearUNet(), scheduler, num_inference_steps=2, micro_batch_size=256)
    z = torch.randn((8, *SHAPE), generator=torch.Generator().manual_seed(0))
    x = proposal.generate(z)
    c = float((x * z).sum() / (z * z).sum())
    assert 0 < c < 0.1 and torch.allclose(x, c * z, atol=1e-6)  # x = c z: no pixel reaches the clamp at +-1
    # The 85% quantiles of the two block means under the prior: each attribute holds 15% of the images.
    thresholds = torch.tensor([c * Z85 / 32, c * Z85 / 64], dtype=torch.float64)

    def stage(k: int):
        def evaluate(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            images = proposal.generate(latents)
            on = (block_means(images)[:, :k] > thresholds[:k]).all(1)
            return images, torch.where(on, 0.0, -math.inf).double()

        return evaluate

    return c, thresholds, stage


def sample(evaluate, seed: int):
    return sample_s2m(evaluate, PRIOR, N, generator=torch.Generator().manual_seed(seed), **SETTINGS)


@torch.no_grad()
def test_chains_run_in_4x64x64_diffusion_noise_and_move_far_more_often_than_the_prior_hits():
    _, thresholds, stage = linear_ddim_world()
    # a list of evaluates (an earlier version's stages) samples the last one, the whole target
    result = sample([stage(1), stage(2)], seed=0)
    assert result.x.shape == (N, *SHAPE) and bool((block_means(result.x) > thresholds).all())
    chains = result.stats.chains
    assert chains["kernel"] == "pcn" and chains["num_chains"] == 2 and result.stats.unique_returned == N
    steps = SETTINGS["burn_in"] + (chains["samples_per_chain"] - 1) * chains["thinning"]
    assert result.stats.proposals == chains["pool"]["proposals"] + 2 * steps
    # the chains' local moves stay on the target far more often than a draw from the prior lands on it
    assert result.stats.acceptance_rate > 10 * PRIOR_SHARE


@pytest.mark.slow  # a statistical test: 40 calls in 16,384 dimensions (about a minute on 2 cores)
@torch.no_grad()
def test_chains_in_4x64x64_diffusion_noise_are_exact():
    c, thresholds, stage = linear_ddim_world()
    images = torch.cat([sample(stage(2), seed=r).x for r in range(RUNS)])
    means, diff = block_means(images), high_frequency(images)
    assert bool((means > thresholds).all())
    calls = torch.arange(RUNS).repeat_interleave(N)

    # The exact target: the block means are independent normals truncated above their thresholds, the pixel
    # difference an independent normal.
    g = torch.Generator().manual_seed(1234)
    u = torch.randn(4_000_000, 2, generator=g, dtype=torch.float64) * torch.tensor([c / 32, c / 64]).double()
    exact_means = u[(u > thresholds).all(1)][:60_000]
    exact_diff = torch.randn(exact_means.shape[0], generator=g, dtype=torch.float64) * c * math.sqrt(2)
    assert clustered_chi_square(means, calls, exact_means, bins=3)[2] > ALPHA
    pairs, exact_pairs = torch.stack([means[:, 0], diff], 1), torch.stack([exact_means[:, 0], exact_diff], 1)
    assert clustered_chi_square(pairs, calls, exact_pairs, bins=3)[2] > ALPHA
