"""Shapes: a constructed generator whose attributes are known exactly, for benchmarks with 1 to n attributes (spec §8).

[`ShapesGenerator`] maps a standard-normal latent ``z = (z_0, ..., z_{n-1}, u_0, ..., u_{m-1})`` to a single-channel
image with ``n`` square patches laid out in two rows. Patch ``i`` has mean brightness ``amplitude * tanh(sharpness
* (z_i - threshold))`` and every pixel carries a nuisance texture ``texture / m * sum_j tanh(u_j) B_j`` where each
pattern ``B_j`` takes the values +-1 and has mean exactly 0 inside every patch. So

    attribute i is present  <=>  patch i's mean brightness > 0  <=>  z_i > threshold

and the attributes of any image are read from its pixels without an evaluator ([`ShapesGenerator.image_attributes`]).
Under the prior each attribute holds with probability ``1 - Phi(threshold)`` (0.3 with the default threshold), the
``n`` attributes independently, so a conjunction of ``k`` attributes holds with probability ``0.3^k`` (7.3e-4 for
``k = 6``): the cost of sampling it from the prior grows exponentially in ``k``, which the chains' local moves break.

Single-positive data ([`shapes_single_positive`]) is drawn as spec §1 states it: a label ``c`` uniform over the
attributes, then an image from ``p(x | y_c = 1)`` (``z_c`` drawn from the normal truncated to ``z_c > threshold``,
the rest from the prior; exact by inverse CDF). The generator is then a perfect model of the population; ``D_v``
still has to learn ``p_data / p_G``, which is ``|S(x)| / (n * 0.3)`` on images with attribute set ``S(x)`` and 0 on
images with none. [`ShapesGenerator.sample_latents`] draws exact latents of any conjunction (a reference sample of
the target), and [`ShapesGenerator.features`] gives a fixed feature space (patch means and texture coefficients) for
Fréchet distances.

Examples:

```py
>>> import torch
>>> from s2m_diffusers.testing.shapes import ShapesGenerator
>>> gen = ShapesGenerator()
>>> z = gen.sample_latents(4, torch.Generator().manual_seed(0), present=[0, 1])
>>> images = gen(z)
>>> images.shape, bool(gen.image_attributes(images)[:, :2].all())
(torch.Size([4, 1, 16, 16]), True)

```
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..data import SinglePositiveDataset

__all__ = ["ShapesGenerator", "shapes_attributes", "shapes_single_positive"]

# Phi^{-1}(0.7): each attribute holds with probability 0.3 under the prior.
DEFAULT_THRESHOLD = 0.5244005127080407


def _patch_layout(num_attributes: int, sample_size: int) -> list[tuple[int, int, int]]:
    """(row, column, side) of each patch's top-left corner: two rows (one for n <= 2), equal cells, 1-pixel gaps."""
    rows = 1 if num_attributes <= 2 else 2
    cols = math.ceil(num_attributes / rows)
    cell_h, cell_w = sample_size // rows, sample_size // cols
    side = min(cell_h, cell_w) - 1
    if side < 2:
        raise ValueError(
            f"sample_size={sample_size} leaves patches of side {side} for {num_attributes} attributes; patches need "
            f"side >= 2. Use sample_size >= {3 * cols} (e.g. 16 for 6 attributes)."
        )
    off_h, off_w = (cell_h - side) // 2, (cell_w - side) // 2
    return [((i // cols) * cell_h + off_h, (i % cols) * cell_w + off_w, side) for i in range(num_attributes)]


class ShapesGenerator(ModelMixin, ConfigMixin):
    r"""A constructed generator: latent ``(B, latent_dim)`` -> image ``(B, out_channels, S, S)`` in [-1, 1]
    whose attribute ``i`` is present exactly when ``z_i > threshold`` (see the module docstring).

    It has no trained weights: the nuisance patterns are drawn from ``seed`` and stored as a buffer, so the model
    round-trips through `save_pretrained` / `from_pretrained` like any diffusers component and serves as the ``gan``
    of an [`~s2m_diffusers.S2MPipeline`].

    Args:
        num_attributes (`int`, defaults to 6): patches, one per attribute (at least 2).
        latent_dim (`int`, defaults to 10): latent length; the ``latent_dim - num_attributes`` coordinates after the
            attributes' only change the texture.
        sample_size (`int`, defaults to 16): image side.
        out_channels (`int`, defaults to 1): the single-channel image is repeated over this many channels.
        threshold (`float`, defaults to ``Phi^{-1}(0.7)``): attribute ``i`` is present iff ``z_i > threshold``.
        sharpness (`float`, defaults to 4.0): slope of the patch brightness around the threshold.
        amplitude (`float`, defaults to 0.8): patch brightness ranges over ``(-amplitude, amplitude)``.
        texture (`float`, defaults to 0.15): largest absolute value of the nuisance texture.
        background (`float`, defaults to -0.8): brightness outside the patches.
        seed (`int`, defaults to 0): seed of the nuisance patterns.
    """

    @register_to_config
    def __init__(
        self,
        num_attributes: int = 6,
        latent_dim: int = 10,
        sample_size: int = 16,
        out_channels: int = 1,
        threshold: float = DEFAULT_THRESHOLD,
        sharpness: float = 4.0,
        amplitude: float = 0.8,
        texture: float = 0.15,
        background: float = -0.8,
        seed: int = 0,
    ):
        super().__init__()
        if num_attributes < 2:
            raise ValueError(f"num_attributes must be >= 2 (S2M combines attributes), got {num_attributes}.")
        if latent_dim < num_attributes:
            raise ValueError(
                f"latent_dim ({latent_dim}) must be >= num_attributes ({num_attributes}): one latent coordinate per "
                "attribute, the rest (latent_dim - num_attributes) change only the texture."
            )
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1 (the image is repeated over channels), got {out_channels}.")
        num_nuisance = latent_dim - num_attributes
        if amplitude + texture > 1.0 or abs(background) + texture > 1.0:
            raise ValueError(
                f"amplitude + texture ({amplitude} + {texture}) and |background| + texture must be <= 1 so that "
                "images stay in [-1, 1] without clamping (clamping would move patch means across the threshold)."
            )
        layout = _patch_layout(num_attributes, sample_size)
        masks = torch.zeros(num_attributes, sample_size, sample_size)
        for i, (r, c, side) in enumerate(layout):
            masks[i, r : r + side, c : c + side] = 1.0
        self.register_buffer("patch_masks", masks, persistent=False)  # (n, S, S), rebuilt from the config

        # Nuisance patterns: +-1 everywhere, with exactly as many +1 as -1 inside every patch (mean 0 there).
        g = torch.Generator().manual_seed(seed)
        patterns = torch.where(torch.rand(num_nuisance, sample_size, sample_size, generator=g) < 0.5, -1.0, 1.0)
        for j in range(num_nuisance):
            for r, c, side in layout:
                k = side * side  # an odd patch cannot split evenly: one pixel is 0
                values = torch.cat([torch.ones(k // 2), -torch.ones(k // 2), torch.zeros(k % 2)])
                patterns[j, r : r + side, c : c + side] = values[torch.randperm(k, generator=g)].view(side, side)
        self.register_buffer("nuisance_patterns", patterns)  # (m, S, S), saved with the model

    @property
    def num_nuisance(self) -> int:
        """Latent coordinates that only change the texture: ``latent_dim - num_attributes``."""
        return int(self.config.latent_dim - self.config.num_attributes)

    @property
    def attribute_names(self) -> list[str]:
        """``["s0", "s1", ...]``."""
        return [f"s{i}" for i in range(self.config.num_attributes)]

    @property
    def attribute_probability(self) -> float:
        """``P(z_i > threshold) = 1 - Phi(threshold)``: the prior probability of each attribute."""
        return 0.5 * math.erfc(self.config.threshold / math.sqrt(2.0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images of latents.

        Args:
            z (`torch.Tensor` of shape `(B, latent_dim)`): latents.

        Returns:
            `torch.Tensor` of shape `(B, out_channels, S, S)`: images in [-1, 1].
        """
        n, m = self.config.num_attributes, self.num_nuisance
        if z.ndim != 2 or z.shape[1] != n + m:
            raise ValueError(
                f"ShapesGenerator expects latents of shape (B, {n + m}) (latent_dim), got {tuple(z.shape)}."
            )
        c = self.config
        masks = self.patch_masks.to(z)  # (n, S, S)
        brightness = c.amplitude * torch.tanh(c.sharpness * (z[:, :n] - c.threshold))  # (B, n)
        inside = masks.sum(0).clamp(max=1.0)  # (S, S)
        image = torch.einsum("bn,nhw->bhw", brightness, masks) + c.background * (1.0 - inside)  # (B, S, S)
        if m:
            weights = c.texture / m * torch.tanh(z[:, n:])  # (B, m)
            image = image + torch.einsum("bm,mhw->bhw", weights, self.nuisance_patterns.to(z))
        return image.unsqueeze(1).expand(-1, c.out_channels, -1, -1).contiguous()  # (B, C, S, S)

    # ----- reading images ---------------------------------------------------------------------------------------
    def patch_means(self, images: torch.Tensor) -> torch.Tensor:
        """Mean brightness of each patch, `(B, num_attributes)` float64, of images `(B, out_channels, S, S)`."""
        c, s = self.config.out_channels, self.config.sample_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(f"Expected images of shape (B, {c}, {s}, {s}) in [-1, 1], got {tuple(images.shape)}.")
        masks = self.patch_masks.to(images.device, torch.float64)
        return torch.einsum("bhw,nhw->bn", images.double().mean(1), masks) / masks.sum((1, 2))

    def image_attributes(self, images: torch.Tensor) -> torch.Tensor:
        """The attribute sets the images show, `(B, num_attributes)` bool: patch ``i``'s mean brightness > 0."""
        return self.patch_means(images) > 0

    def latent_attributes(self, z: torch.Tensor) -> torch.Tensor:
        """The attribute sets of latents, `(B, num_attributes)` bool: ``z_i > threshold``."""
        return z[:, : self.config.num_attributes] > self.config.threshold

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """A fixed feature space for Fréchet distances, `(B, latent_dim)` float64: the patch means
        and the least-squares coefficients of the nuisance patterns outside the patches (``tanh(u_j)`` up to scale)."""
        means = self.patch_means(images)  # (B, n)
        m = self.num_nuisance
        if not m:
            return means
        outside = 1.0 - self.patch_masks.sum(0).clamp(max=1.0).to(images.device, torch.float64)  # (S, S)
        residual = (images.double().mean(1) - self.config.background) * outside  # (B, S, S)
        patterns = (self.nuisance_patterns.to(images.device, torch.float64) * outside).flatten(1)  # (m, S*S)
        coef = torch.linalg.lstsq(patterns.T, residual.flatten(1).T).solution.T  # (B, m)
        return torch.cat([means, coef * m / self.config.texture], dim=1)

    # ----- exact sampling ---------------------------------------------------------------------------------------
    def sample_latents(
        self,
        n: int,
        generator: torch.Generator | None = None,
        present: Sequence[int] = (),
        absent: Sequence[int] = (),
    ) -> torch.Tensor:
        """Exact latents of the prior conditioned on ``z_i > threshold`` for ``present`` and ``z_j <= threshold`` for
        ``absent`` (inverse-CDF draws of the truncated normal): images of the conjunction ``present & ~absent``.

        Args:
            n (`int`): number of latents.
            generator (`torch.Generator`, *optional*): CPU generator for every draw.
            present (`Sequence[int]`), absent (`Sequence[int]`): attribute indices.

        Returns:
            `torch.Tensor` of shape `(n, latent_dim)`, float32.
        """
        present, absent = [int(i) for i in present], [int(j) for j in absent]
        bad = [i for i in present + absent if not 0 <= i < self.config.num_attributes]
        if bad or set(present) & set(absent):
            raise ValueError(
                f"present={present} and absent={absent} must be disjoint attribute indices in "
                f"[0, {self.config.num_attributes - 1}]."
            )
        z = torch.randn(n, self.config.latent_dim, generator=generator, dtype=torch.float64)
        cdf_t = 0.5 * math.erfc(-self.config.threshold / math.sqrt(2.0))  # Phi(threshold)
        for indices, low, high in ((present, cdf_t, 1.0), (absent, 0.0, cdf_t)):
            if indices:
                u = torch.rand(n, len(indices), generator=generator, dtype=torch.float64)
                z[:, indices] = torch.special.ndtri(low + (high - low) * u.clamp(1e-12, 1 - 1e-12))
        return z.float()


def shapes_attributes(images: torch.Tensor, generator: ShapesGenerator | None = None) -> torch.Tensor:
    """The attribute sets that images of a [`ShapesGenerator`] show, `(B, n)` bool (default generator if None)."""
    generator = generator if generator is not None else ShapesGenerator()
    return generator.image_attributes(images)


def shapes_single_positive(
    generator: ShapesGenerator, num_images: int, seed: int = 0
) -> tuple[SinglePositiveDataset, torch.Tensor]:
    """Single-positive data as spec §1 states it: label ``c`` uniform over the attributes, image from ``p(x | y_c=1)``.

    Args:
        generator ([`ShapesGenerator`]): the construction.
        num_images (`int`): number of pairs.
        seed (`int`, defaults to 0): seed of the labels and latents.

    Returns:
        `tuple`: the [`~s2m_diffusers.data.SinglePositiveDataset`] (attributes ``s0, s1, ...``) and the images'
        full attribute sets `(num_images, n)` bool (for evaluation only).
    """
    g = torch.Generator().manual_seed(seed)
    n = generator.config.num_attributes
    labels = torch.randint(n, (num_images,), generator=g)
    z = torch.empty(num_images, generator.config.latent_dim)
    for c in range(n):
        rows = (labels == c).nonzero().flatten()
        z[rows] = generator.sample_latents(len(rows), g, present=[c])
    with torch.no_grad():
        images = generator(z)
    return SinglePositiveDataset(images, labels, generator.attribute_names), generator.latent_attributes(z)
