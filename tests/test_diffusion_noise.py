"""Refitting in a diffusion model's noise at Stable Diffusion's latent shape, 4 x 64 x 64 (16,384 dimensions).

The proposal is a real `DDIMProposal` around a stand-in UNet whose prediction is linear in its input, so that DDIM maps
the noise to a scaled copy of it, ``x = c z``, and the exact target is known: two attributes read the image's low
frequencies (A: channel 0's top-left quarter is bright; B: channel 1 is bright), each held by 15% of the prior's
images, so ``A & B`` by 2.25%. Under the target, the two block means are independent truncated normals, and every
direction of the noise orthogonal to them stays standard normal. The sampler refits at its defaults (one literal per
stage, both families, the pilots choose) and its 2,000 samples are tested by Pearson's chi-square on a 4 x 4 grid of
the exact target's quantiles, at p < 1e-3.
"""

import math

import torch
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from s2m_diffusers.densities import StandardNormal
from s2m_diffusers.proposals import DDIMProposal
from s2m_diffusers.sampling import sample_s2m
from s2m_diffusers.testing.toy import chi_square_cells

SHAPE = (4, 64, 64)
N = 2000
ALPHA = 1e-3
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


@torch.no_grad()
def test_refitting_in_4x64x64_diffusion_noise_is_exact_and_raises_the_on_target_share():
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

    result = sample_s2m([stage(1), stage(2)], StandardNormal(SHAPE), N, generator=torch.Generator().manual_seed(1))
    assert result.x.shape == (N, *SHAPE)
    means, diff = block_means(result.x), high_frequency(result.x)
    assert bool((means > thresholds).all())

    # The fit is not the prior, and its pilot put more draws on the target than the prior's.
    pilots = {s["pilot"]: s for s in result.stats.stages if "pilot" in s}
    assert result.stats.fit != "prior"
    assert pilots[result.stats.fit]["on_target_share"] > 2 * pilots["prior"]["on_target_share"]

    # The exact target: the block means are independent normals truncated above their thresholds, the pixel
    # difference an independent normal.
    g = torch.Generator().manual_seed(1234)
    u = torch.randn(4_000_000, 2, generator=g, dtype=torch.float64) * torch.tensor([c / 32, c / 64]).double()
    exact_means = u[(u > thresholds).all(1)][:60_000]
    exact_diff = torch.randn(exact_means.shape[0], generator=g, dtype=torch.float64) * c * math.sqrt(2)
    assert chi_square_cells(means, exact_means)[2] > ALPHA
    assert (
        chi_square_cells(torch.stack([means[:, 0], diff], 1), torch.stack([exact_means[:, 0], exact_diff], 1))[2]
        > ALPHA
    )
