"""The latent prior ``p_z = N(0, I)`` (spec §4): a latent ``z`` is all the randomness of one generated sample (a GAN's
latent, a diffusion model's initial noise under a deterministic sampler).

The samplers take any density ``q`` with ``sample(n, generator)`` and ``log_prior_ratio(z) = log p_z(z) - log q(z)``
for the entry pool and the independent jumps (`s2m_diffusers.chains`); the prior itself is the default, and the only
one the library ships: latent refitting (earlier versions' ``LowRankGaussianMixture`` and ``TiltedNormal``) was
measured not to pay once chains move locally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["StandardNormal"]


def _standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over all but the first dimension."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))


class StandardNormal:
    """The latent prior ``p_z = N(0, I)`` over latents of shape ``latent_shape``.

    Args:
        latent_shape (`Sequence[int]`): the shape of one latent, e.g. ``(128,)`` or ``(4, 64, 64)``.
    """

    def __init__(self, latent_shape: Sequence[int]):
        self.latent_shape = tuple(int(s) for s in latent_shape)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw ``n`` latents, shape ``(n, *latent_shape)``, on the generator's device unless ``device`` is given."""
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        return torch.randn((n, *self.latent_shape), generator=generator, device=device, dtype=dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return _standard_normal_log_prob(z)

    def log_prior_ratio(self, z: torch.Tensor) -> torch.Tensor:
        """``log p_z(z) - log q(z)``: zero for the prior itself."""
        return torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)

    def __repr__(self) -> str:
        return f"StandardNormal(latent_shape={self.latent_shape})"
