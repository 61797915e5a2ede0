"""Scoring generated images: an evaluator classifier, per-target accuracy, and the Fréchet distance.

The evaluator (`AttributeEvaluator`) is a small CNN trained on held-out real images with their **full** attribute
sets. It classifies an image into one of K attribute *combinations* (`class_attributes`, e.g. the 7 non-empty subsets
of {A, B, C} for 7to3, optionally plus the empty set for "no attribute"), so the probability that an image satisfies
any conjunction is a sum of its class probabilities. Its penultimate layer gives the features of the Fréchet
distance (fidelity and diversity of the returned images against real images of the same combination).

The model class is the only stateful part; everything else here is a pure function of an evaluator and a tensor.
Nothing here knows a particular dataset: the attributes and combinations are the evaluator's config.

Examples:

```py
>>> import os
>>> from s2m_diffusers.evaluation import AttributeEvaluator, target_accuracy
>>> from s2m_diffusers.demo import DIGITS_7TO3_PRETRAINED, load_digits_7to3
>>> evaluator = AttributeEvaluator.from_pretrained(os.path.join(DIGITS_7TO3_PRETRAINED, "evaluator"))
>>> data = load_digits_7to3().train()  # real images the evaluator never saw
>>> ones = data.images[data.source_classes == 1]  # the combination A & B & ~C
>>> target_accuracy(evaluator, ones, present=["A", "B"], absent=["C"]) > 0.9
True
```
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .targets import parse_target


class AttributeEvaluator(ModelMixin, ConfigMixin):
    r"""
    A small CNN that classifies an image into one attribute combination.

    Args:
        attribute_names (`Sequence[str]`): the attributes, e.g. `("A", "B", "C")`.
        class_attributes (`Sequence[Sequence[str]]`): the attribute set of each output class, e.g. the 7to3 table
            `s2m_diffusers.demo.SOURCE_CLASS_ATTRIBUTES`; an empty set is a "no attribute" class.
        sample_size (`int`, defaults to 16): side of the input images.
        in_channels (`int`, defaults to 1): image channels.
        base_channels (`int`, defaults to 32): channels of the first stage; doubled at each of the two halvings.
        dropout (`float`, defaults to 0.2): dropout before the classification layer (training only).
    """

    @register_to_config
    def __init__(
        self,
        attribute_names: Sequence[str],
        class_attributes: Sequence[Sequence[str]],
        sample_size: int = 16,
        in_channels: int = 1,
        base_channels: int = 32,
        dropout: float = 0.2,
    ):
        super().__init__()
        for attributes in class_attributes:
            unknown = [name for name in attributes if name not in attribute_names]
            if unknown:
                raise ValueError(f"`class_attributes` names {unknown}, which are not in {list(attribute_names)}.")
        table = [[name in attributes for name in attribute_names] for attributes in class_attributes]
        # (K, n) bool: the attribute set of each class. A buffer so that it follows the model's device.
        self.register_buffer("class_table", torch.tensor(table, dtype=torch.bool), persistent=False)

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        c = base_channels
        self.backbone = nn.Sequential(
            *conv(in_channels, c), *conv(c, c), nn.MaxPool2d(2),  # (B, c, S/2, S/2)
            *conv(c, 2 * c), *conv(2 * c, 2 * c), nn.MaxPool2d(2),  # (B, 2c, S/4, S/4)
            *conv(2 * c, 4 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 4c)
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * c, len(class_attributes)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features `(B, 4 * base_channels)` of images `(B, C, H, W)` in [-1, 1]."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits `(B, K)` of images `(B, C, H, W)` in [-1, 1]."""
        return self.classifier(self.features(images))


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by its own random integer offset in [-max_shift, max_shift]^2, filling with -1.

    The shift augmentation of the evaluator (and of GAN discriminators, where it is differentiable DiffAugment).

    Args:
        images (`torch.Tensor`): `(B, C, H, W)` in [-1, 1].
        max_shift (`int`): the largest offset in pixels (0 returns `images`).
        generator (`torch.Generator`, *optional*): source of the offsets (on the CPU).

    Returns:
        `torch.Tensor`: shifted images `(B, C, H, W)`.
    """
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = nn.functional.pad(images, (max_shift,) * 4, value=-1.0)  # (B, C, H + 2m, W + 2m)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(images.device)
    rows = offsets[0][:, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


@torch.no_grad()
def _batched(fn, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.cat(
        [fn(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    )


def evaluator_class_probs(evaluator: AttributeEvaluator, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Probabilities `(B, K)` of the evaluator's combinations (`evaluator.config.class_attributes`), in eval mode.

    Args:
        evaluator ([`AttributeEvaluator`]): the evaluator.
        images (`torch.Tensor`): `(B, C, H, W)` in [-1, 1].
        batch_size (`int`, defaults to 1024): images per forward pass.

    Returns:
        `torch.Tensor`: float `(B, K)` on the CPU, rows summing to 1.
    """
    evaluator.eval()
    return _batched(lambda x: evaluator(x).softmax(dim=1), images, batch_size, evaluator.device)


def evaluator_features(evaluator: AttributeEvaluator, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate-layer features `(B, F)` (on the CPU, eval mode), for `frechet_distance`."""
    evaluator.eval()
    return _batched(evaluator.features, images, batch_size, evaluator.device)


def evaluator_attribute_probs(evaluator: AttributeEvaluator, images: torch.Tensor) -> torch.Tensor:
    """Probability `(B, n)` that each image holds each attribute (a sum of combination probabilities)."""
    return evaluator_class_probs(evaluator, images) @ evaluator.class_table.cpu().float()


def evaluator_attributes(evaluator: AttributeEvaluator, images: torch.Tensor) -> torch.Tensor:
    """Attribute set `(B, n)` bool of each image's most probable combination."""
    return evaluator.class_table.cpu()[evaluator_class_probs(evaluator, images).argmax(dim=1)]


def satisfies(
    attributes: torch.Tensor, present: Sequence[str], absent: Sequence[str] = (), *, attribute_names: Sequence[str]
) -> torch.Tensor:
    """Whether each attribute set satisfies the conjunction `present[0] & ... & ~absent[0] & ...`.

    Args:
        attributes (`torch.Tensor`): bool, `(B, n)` or `(n,)`: which of `attribute_names` each image holds.
        present (`Sequence[str]`): names that must be present.
        absent (`Sequence[str]`, defaults to `()`): names that must be absent.
        attribute_names (`Sequence[str]`): the names of the columns of `attributes`.

    Returns:
        `torch.Tensor`: bool, `(B,)` (or a 0-d tensor for a single row).
    """
    names = list(attribute_names)
    for name in [*present, *absent]:
        if name not in names:
            raise ValueError(f"Unknown attribute {name!r}; the attributes are {names}.")
    if attributes.shape[-1] != len(names):
        raise ValueError(
            f"`attributes` has {attributes.shape[-1]} columns but there are {len(names)} attribute names {names}."
        )
    attributes = attributes.bool()
    result = torch.ones(attributes.shape[:-1], dtype=torch.bool, device=attributes.device)
    for name in present:
        result &= attributes[..., names.index(name)]
    for name in absent:
        result &= ~attributes[..., names.index(name)]
    return result


def target_probabilities(
    evaluator: AttributeEvaluator, images: torch.Tensor, present: Sequence[str], absent: Sequence[str] = ()
) -> torch.Tensor:
    """Probability `(B,)` that each image satisfies the conjunction `present & ~absent`.

    Args:
        evaluator ([`AttributeEvaluator`]): the evaluator.
        images (`torch.Tensor`): `(B, C, H, W)` in [-1, 1].
        present (`Sequence[str]`): attributes that must be present.
        absent (`Sequence[str]`, defaults to `()`): attributes that must be absent.

    Returns:
        `torch.Tensor`: float `(B,)`: the summed probability of the combinations that satisfy the conjunction.
    """
    names = evaluator.config.attribute_names
    in_target = satisfies(evaluator.class_table.cpu(), present, absent, attribute_names=names)  # (K,)
    return evaluator_class_probs(evaluator, images)[:, in_target].sum(dim=1)


def target_accuracy(
    evaluator: AttributeEvaluator,
    images: torch.Tensor,
    present: Sequence[str],
    absent: Sequence[str] = (),
    threshold: float = 0.5,
) -> float:
    """Share of images that the evaluator judges to satisfy `present & ~absent` (probability above `threshold`).

    Args:
        evaluator ([`AttributeEvaluator`]): the evaluator.
        images (`torch.Tensor`): `(B, C, H, W)` in [-1, 1].
        present (`Sequence[str]`): attributes that must be present.
        absent (`Sequence[str]`, defaults to `()`): attributes that must be absent.
        threshold (`float`, defaults to 0.5): probability above which an image counts as on target.

    Returns:
        `float`: the accuracy in [0, 1].
    """
    if len(images) == 0:
        raise ValueError("`images` is empty; target accuracy needs at least one image.")
    return (target_probabilities(evaluator, images, present, absent) > threshold).float().mean().item()


def formula_accuracy(
    evaluator: AttributeEvaluator, images: torch.Tensor, target: str, threshold: float = 0.5
) -> float:
    """Share of images that the evaluator judges to satisfy `target`, any formula over its attributes.

    The probability of the target is the summed probability of the evaluator's combinations that satisfy it (for a
    conjunction, [`target_accuracy`] gives the same).

    Args:
        evaluator ([`AttributeEvaluator`]): the evaluator.
        images (`torch.Tensor`): `(B, C, H, W)` in [-1, 1].
        target (`str`): a formula over `evaluator.config.attribute_names`, e.g. `"A & (B | ~C)"`.
        threshold (`float`, defaults to 0.5): probability above which an image counts as on target.

    Returns:
        `float`: the accuracy in [0, 1].
    """
    if len(images) == 0:
        raise ValueError("`images` is empty; target accuracy needs at least one image.")
    parsed = parse_target(target, list(evaluator.config.attribute_names))
    in_target = parsed.holds_batch(evaluator.class_table.cpu())  # (K,)
    probs = evaluator_class_probs(evaluator, images)[:, in_target].sum(dim=1)
    return (probs > threshold).float().mean().item()


def combination_shares(
    evaluator: AttributeEvaluator, images: torch.Tensor, min_confidence: float = 0.5
) -> tuple[torch.Tensor, float]:
    """Share of images per combination, counting only confident predictions.

    Args:
        evaluator ([`AttributeEvaluator`]): the evaluator.
        images (`torch.Tensor`): `(B, C, H, W)` in [-1, 1].
        min_confidence (`float`, defaults to 0.5): an image whose most probable combination has a lower probability
            counts as "low confidence" and in no combination.

    Returns:
        `tuple[torch.Tensor, float]`: the shares `(K,)` of `evaluator.config.class_attributes`, and the share of
        low-confidence images (the K shares and it sum to 1).
    """
    confidence, classes = evaluator_class_probs(evaluator, images).max(dim=1)
    confident = confidence >= min_confidence
    counts = torch.bincount(classes[confident], minlength=len(evaluator.config.class_attributes))
    return counts.float() / len(images), 1.0 - confident.float().mean().item()


def frechet_distance(
    features_a: np.ndarray | torch.Tensor,
    features_b: np.ndarray | torch.Tensor,
    eps: float = 1e-6,
    weights_a: np.ndarray | torch.Tensor | None = None,
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula, on any features).

    `|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})`, computed in float64 with symmetric
    eigendecompositions (stable, no complex parts), after adding `eps * I` to both covariances.

    Args:
        features_a (`np.ndarray` or `torch.Tensor`): `(N_a, F)`, N_a >= 2.
        features_b (`np.ndarray` or `torch.Tensor`): `(N_b, F)`, N_b >= 2.
        eps (`float`, defaults to 1e-6): ridge added to the covariances.
        weights_a (`np.ndarray` or `torch.Tensor`, *optional*): `(N_a,)` non-negative weights of `features_a`: the
            Gaussian is fitted to the weighted features (e.g. importance weights, the target an exact sampler draws).

    Returns:
        `float`: the distance (>= 0 up to rounding).
    """
    a = np.asarray(features_a.detach().cpu() if torch.is_tensor(features_a) else features_a, dtype=np.float64)
    b = np.asarray(features_b.detach().cpu() if torch.is_tensor(features_b) else features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"Features must be two (N, F) arrays with the same F and N >= 2; got shapes {a.shape} and {b.shape}."
        )
    ridge = eps * np.eye(a.shape[1])
    w = None
    if weights_a is not None:
        w = np.asarray(weights_a.detach().cpu() if torch.is_tensor(weights_a) else weights_a, dtype=np.float64)
        if w.shape != (len(a),) or not np.all(w >= 0) or not w.sum() > 0:
            raise ValueError(f"weights_a must be {len(a)} non-negative weights with a positive sum.")
    cov_a, cov_b = np.cov(a, rowvar=False, aweights=w) + ridge, np.cov(b, rowvar=False) + ridge
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T  # S_a^{1/2}
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)  # eigenvalues of S_a^{1/2} S_b S_a^{1/2}
    trace_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    mean_term = np.sum((np.average(a, axis=0, weights=w) - b.mean(axis=0)) ** 2)
    return float(max(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt, 0.0))


def check_sample_folder(folder: str) -> list[str] | None:
    """Refuse to score a folder of samples that is not complete: a folder written by `s2m sample` holds exactly the
    images its `stats.json` lists (written last), and the grid of them it names (``"grid"``). A folder without
    `stats.json` is taken as a plain folder of images, unless it holds `latents.safetensors` (an `s2m sample` output
    that never finished) or is the hidden temporary folder of one.

    Args:
        folder (`str`): the folder of images.

    Returns:
        `list[str]` or `None`: the paths of the images to score, in the order `stats.json` lists them, for the folder
        of an `s2m sample` run; `None` for a plain folder of images (score all of them).

    Raises:
        ValueError: naming what is incomplete or extra, and what to do.
    """
    import json
    import os
    import re

    from .data import _list_images

    if not os.path.isdir(folder):
        return None  # the loader says so
    if re.match(r"^\..+\.(tmp|old)-", os.path.basename(os.path.normpath(folder))):
        raise ValueError(
            f"{folder!r} is the temporary folder of an `s2m sample` run that did not finish; score the folder that "
            "run was writing once it has finished, or sample again."
        )
    stats_path = os.path.join(folder, "stats.json")
    images = {os.path.basename(p) for p in _list_images(folder)}
    if not os.path.isfile(stats_path):
        if os.path.isfile(os.path.join(folder, "latents.safetensors")):
            raise ValueError(
                f"{folder!r} holds the images and latents of an `s2m sample` run but no stats.json, which that "
                "command writes last: the run did not finish. Sample again (into a new folder, or with --overwrite)."
            )
        return None
    try:
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
        order = [str(name) for name in stats["images"]]
        listed = set(order)
        images.discard(str(stats.get("grid")))  # the grid of the listed images, not a sample
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{stats_path!r} cannot be read ({type(err).__name__}: {err}); it is not the stats.json of a finished "
            "`s2m sample` run. Sample again into a new folder."
        ) from None
    missing, extra = sorted(listed - images), sorted(images - listed)
    if missing:
        raise ValueError(
            f"{folder!r} is incomplete: its stats.json lists {len(missing)} image(s) that are not there "
            f"({', '.join(missing[:5])}). Sample again into a new folder (or with --overwrite)."
        )
    if extra:
        raise ValueError(
            f"{folder!r} holds {len(extra)} image(s) that its stats.json does not list ({', '.join(extra[:5])}): "
            "left from another run or added later, they would be scored with these. Remove them, or sample again "
            "into a new folder."
        )
    return [os.path.join(folder, name) for name in order]


def load_sample_folder(folder: str, sample_size: int, in_channels: int) -> torch.Tensor:
    """The images to score in `folder` (see [`check_sample_folder`]): those an `s2m sample` run lists, in its order,
    or every image of a plain folder; in the evaluator's format (`s2m_diffusers.data.prepare_images`).

    Args:
        folder (`str`): the folder of images.
        sample_size (`int`), in_channels (`int`): the evaluator's image format.

    Returns:
        `torch.Tensor`: `(N, in_channels, sample_size, sample_size)` in [-1, 1].
    """
    from .data import _open_image, load_image_folder, prepare_images

    paths = check_sample_folder(folder)
    if paths is None:
        return load_image_folder(folder, sample_size, in_channels)
    if not paths:
        raise ValueError(f"{folder!r} is the output of an `s2m sample` run that found no image; nothing to score.")
    return prepare_images([_open_image(p) for p in paths], sample_size, in_channels)
