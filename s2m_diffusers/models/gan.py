"""A reference DCGAN (Radford et al. 2016) as diffusers components, for the demo, the benchmarks and the tests.

`DCGANGenerator` maps a standard-normal latent `z` (B, latent_dim) to an image in [-1, 1]; with `num_classes` set it
is class-conditional: the latent is multiplied elementwise by a learned class embedding before the first layer.
(Concatenating or adding the embedding instead made the generator ignore `z` on Digits-7to3: one image per class.)
`DCGANDiscriminator` is the training counterpart (spectral normalisation; a projection term for classes, Miyato &
Koyama 2018). Both round-trip through `save_pretrained` / `from_pretrained` in safetensors.

Sample in `eval()` mode: the generator's batch normalisation then uses its stored statistics, so that every image is
a function of its own latent only (S2M's chains rely on `x = G(z)`, independent of the rest of the batch).

Examples:

```py
>>> import torch
>>> from s2m_diffusers.models.gan import DCGANGenerator
>>> generator = DCGANGenerator(latent_dim=32, sample_size=16).eval()
>>> z = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
>>> generator(z).shape
torch.Size([4, 1, 16, 16])
```
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def _num_doublings(sample_size: int) -> int:
    """Number of x2 resolution steps between 4x4 and `sample_size`; `sample_size` must be 4 * 2^k, k >= 1."""
    k = math.log2(sample_size / 4) if sample_size >= 8 else -1
    if k < 1 or k != int(k):
        raise ValueError(f"`sample_size` must be 4 * 2^k with k >= 1 (8, 16, 32, 64, ...), got {sample_size}.")
    return int(k)


def _check_class_labels(class_labels: torch.Tensor | None, num_classes: int | None, batch_size: int) -> None:
    if num_classes is None and class_labels is not None:
        raise ValueError("This model is unconditional (`num_classes=None`); call it without `class_labels`.")
    if num_classes is not None:
        if class_labels is None:
            raise ValueError(
                f"This model is class-conditional ({num_classes} classes); pass `class_labels`, a long tensor of "
                f"shape ({batch_size},) with values in 0..{num_classes - 1}."
            )
        if class_labels.shape != (batch_size,):
            raise ValueError(f"`class_labels` must have shape ({batch_size},), got {tuple(class_labels.shape)}.")
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= num_classes):
            raise ValueError(f"`class_labels` must lie in 0..{num_classes - 1}, got {class_labels.tolist()}.")


class DCGANGenerator(ModelMixin, ConfigMixin):
    r"""
    DCGAN generator: latent `(B, latent_dim)` -> 4x4 feature map -> transposed convolutions -> `tanh` image.

    Args:
        latent_dim (`int`, defaults to 32): dimension of the standard-normal latent.
        sample_size (`int`, defaults to 16): side of the generated images (4 * 2^k: 8, 16, 32, ...).
        out_channels (`int`, defaults to 1): image channels.
        base_channels (`int`, defaults to 32): channels at full resolution; doubled at every halving.
        num_classes (`int`, *optional*): number of classes of a class-conditional generator (`None`: unconditional);
            its class embedding (num_classes, latent_dim) multiplies the latent.
    """

    @register_to_config
    def __init__(
        self,
        latent_dim: int = 32,
        sample_size: int = 16,
        out_channels: int = 1,
        base_channels: int = 32,
        num_classes: int | None = None,
    ):
        super().__init__()
        doublings = _num_doublings(sample_size)
        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes, latent_dim)
        channels = [base_channels * 2 ** (doublings - i) for i in range(doublings + 1)]  # 4x4 ... full size
        self.project = nn.Sequential(
            nn.Linear(latent_dim, channels[0] * 16, bias=False),
            nn.Unflatten(1, (channels[0], 4, 4)),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        )
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            latents (`torch.Tensor`): `(B, latent_dim)` (or `(B, latent_dim, 1, 1)`), standard normal.
            class_labels (`torch.Tensor`, *optional*): long `(B,)`; required exactly when `num_classes` is set.

        Returns:
            `torch.Tensor`: images `(B, out_channels, sample_size, sample_size)` in [-1, 1].
        """
        latents = latents.reshape(latents.shape[0], -1)
        if latents.shape[1] != self.config.latent_dim:
            raise ValueError(f"`latents` must have {self.config.latent_dim} dimensions, got {latents.shape[1]}.")
        _check_class_labels(class_labels, self.config.num_classes, latents.shape[0])
        if class_labels is not None:
            latents = latents * self.class_embedding(class_labels)  # (B, latent_dim)
        h = self.project(latents)  # (B, C0, 4, 4)
        h = self.blocks(h)  # (B, base_channels, S, S)
        return torch.tanh(self.to_image(h))


class DCGANDiscriminator(ModelMixin, ConfigMixin):
    r"""
    DCGAN discriminator with spectral normalisation, for training `DCGANGenerator`.

    Returns one logit per image (real vs generated). With `num_classes` set it adds the projection term
    `<embed(y), features(x)>`, which makes it a class-conditional discriminator.

    Args:
        sample_size (`int`, defaults to 16): side of the input images (4 * 2^k).
        in_channels (`int`, defaults to 1): image channels.
        base_channels (`int`, defaults to 32): channels after the first convolution; doubled at every halving.
        num_classes (`int`, *optional*): number of classes of a class-conditional discriminator.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 1,
        base_channels: int = 32,
        num_classes: int | None = None,
    ):
        super().__init__()
        doublings = _num_doublings(sample_size)
        channels = [base_channels * 2**i for i in range(doublings + 1)]
        layers = [spectral_norm(nn.Conv2d(in_channels, channels[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, C * 4 * 4)
        feature_dim = channels[-1] * 16
        self.to_logit = spectral_norm(nn.Linear(feature_dim, 1))
        if num_classes is not None:
            self.class_embedding = spectral_norm(nn.Embedding(num_classes, feature_dim))

    def forward(self, images: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            images (`torch.Tensor`): `(B, in_channels, sample_size, sample_size)` in [-1, 1].
            class_labels (`torch.Tensor`, *optional*): long `(B,)`; required exactly when `num_classes` is set.

        Returns:
            `torch.Tensor`: logits `(B,)`, positive for "real".
        """
        _check_class_labels(class_labels, self.config.num_classes, images.shape[0])
        h = self.features(images)  # (B, F)
        logits = self.to_logit(h).squeeze(1)
        if class_labels is not None:
            logits = logits + (self.class_embedding(class_labels) * h).sum(dim=1)
        return logits
