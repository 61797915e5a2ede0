"""Scoring generated images: an evaluator classifier, per-target accuracy, and the Fréchet distance.

The evaluator (`AttributeEvaluator`) is a small CNN trained on held-out real images with their **full** attribute
sets. It classifies an image into one of K attribute *combinations* (`class_attributes`, e.g. the 7 non-empty subsets
of {A, B, C} for 7to3, optionally plus the empty set for "no attribute"), so the probability that an image satisfies
any conjunction is a sum of its class probabilities. Its penultimate layer gives the features of the Fréchet
distance (fidelity and diversity of the returned images against real images of the same combination).

Any transformers image-classification model serves as well (`TransformersEvaluator`, loaded with `load_evaluator`):
each of its labels is given an attribute set, and its label probabilities are summed as the combinations' are.

The model classes are the only stateful part; everything else here is a pure function of an evaluator and a tensor.
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

import json
import os
import re
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .targets import parse_target
from .utils import optional_dependency


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


# the attribute names a target can use (as `s2m train-heads` folder names)
_ATTRIBUTE_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class TransformersEvaluator(nn.Module):
    r"""
    A transformers image-classification model as an attribute evaluator, as k-diffusion's `external.py` wraps foreign
    models: each of its labels is given an attribute set (``label_attributes``), so the probability that an image
    satisfies a target is the summed probability of the labels whose set satisfies it, as for the combinations of an
    [`AttributeEvaluator`]. The scoring functions of this module take either.

    Images `(B, C, H, W)` in [-1, 1] go through the model's image processor as the 8-bit images they came from (as
    `processor(images=[PIL images])` would see the files); without one, they go to the model in [-1, 1] at its
    ``config.image_size`` (the mean 0.5, std 0.5 normalisation of ViT-style processors). The Fréchet distance's
    features are the input of the model's ``classifier`` layer.

    Args:
        model (`transformers.PreTrainedModel`): an `AutoModelForImageClassification` model.
        label_attributes (`Mapping[str, Sequence[str]]`): the attribute set of each of the model's labels
            (``model.config.id2label`` values), e.g. ``{"smiling_man": ["smiling", "male"], "neutral_woman": []}``;
            an empty set is a label with none of the attributes.
        image_processor (`transformers.BaseImageProcessor`, *optional*): the model's image processor.

    Examples:

    ```py
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from s2m_diffusers.evaluation import TransformersEvaluator, formula_accuracy
    >>> config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                    intermediate_size=32, id2label={0: "smiling_man", 1: "neutral_woman"})
    >>> evaluator = TransformersEvaluator(ViTForImageClassification(config),
    ...                                   {"smiling_man": ["smiling", "male"], "neutral_woman": []})
    >>> evaluator.config.attribute_names
    ['smiling', 'male']
    >>> 0.0 <= formula_accuracy(evaluator, torch.zeros(2, 3, 16, 16), "smiling & ~male") <= 1.0
    True
    ```
    """

    def __init__(self, model: nn.Module, label_attributes: Mapping[str, Sequence[str]], image_processor=None):
        super().__init__()
        labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        class_attributes = _check_label_attributes(label_attributes, labels)
        attribute_names = list(dict.fromkeys(name for names in class_attributes for name in names))
        if not attribute_names:
            raise ValueError(
                "label_attributes gives every label an empty attribute set; map the labels that show an attribute to "
                'it, e.g. {"smiling_man": ["smiling", "male"], ...}.'
            )
        image_size = getattr(model.config, "image_size", None)
        if image_processor is None and image_size is None:
            raise ValueError(
                f"{type(model).__name__} comes without an image processor (no preprocessor_config.json) and its "
                "config gives no image_size, so the size and normalisation of its inputs are unknown. Save its image "
                "processor in the model folder (`AutoImageProcessor.from_pretrained(...).save_pretrained(folder)`)."
            )
        self.model = model
        self.image_processor = image_processor
        self.config = SimpleNamespace(
            attribute_names=attribute_names,
            class_attributes=class_attributes,
            labels=labels,
            # with a processor, images are read at their own size and the processor resizes them (`None`)
            sample_size=None if image_processor is not None else int(image_size),
            in_channels=int(getattr(model.config, "num_channels", 3)),
        )
        table = [[name in attributes for name in attribute_names] for attributes in class_attributes]
        self.register_buffer("class_table", torch.tensor(table, dtype=torch.bool), persistent=False)  # (K, n)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, label_attributes: Mapping[str, Sequence[str]], **kwargs
    ) -> TransformersEvaluator:
        """The model of a folder (or Hub id) saved by transformers, with its image processor when it has one
        (``preprocessor_config.json``); ``kwargs`` go to both ``from_pretrained`` calls."""
        with optional_dependency("transformers", "A transformers classifier as evaluator"):
            from transformers import AutoImageProcessor, AutoModelForImageClassification
        try:
            model = AutoModelForImageClassification.from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ValueError as err:
            # its first sentence, without the list of every model type
            reason = str(err).split("\n")[0].split(" Model type should be one of")[0].rstrip(".")
            raise ValueError(
                f"{pretrained_model_name_or_path!r} is not a transformers image-classification model "
                f"(AutoModelForImageClassification cannot load it: {reason}). Give a model folder saved from an "
                "image-classification class (e.g. ViTForImageClassification), or an AttributeEvaluator folder."
            ) from None
        processor = None
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
            try:
                processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
            except OSError:
                processor = None  # a Hub model without one
        return cls(model.eval(), label_attributes, processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input for images `(B, C, H, W)` in [-1, 1]."""
        dtype = next(self.model.parameters()).dtype
        if self.image_processor is None:
            return images.to(self.device, dtype)
        pixels = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        arrays = list(pixels.permute(0, 2, 3, 1).numpy())  # (H, W, C) 8-bit images, as read from the files
        values = self.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
        return values.to(self.device, dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Label logits `(B, K)` of images `(B, C, H, W)` in [-1, 1]."""
        return self.model(pixel_values=self._pixel_values(images)).logits

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The input of the model's ``classifier`` layer `(B, F)` for images `(B, C, H, W)` in [-1, 1]."""
        classifier = getattr(self.model, "classifier", None)
        if not isinstance(classifier, nn.Module):
            raise ValueError(
                f"{type(self.model).__name__} has no `classifier` layer whose input could serve as the features of "
                "the Frechet distance; score it without reference images, or use an AttributeEvaluator."
            )
        seen = []
        handle = classifier.register_forward_hook(lambda module, args, output: seen.append(args[0]))
        try:
            self(images)
        finally:
            handle.remove()
        return seen[0].flatten(1)


def _check_label_attributes(label_attributes: Mapping[str, Sequence[str]], labels: list[str]) -> list[list[str]]:
    """The attribute set of each label, in label order; refused with the fix when the mapping does not fit."""
    example = '{"smiling_man": ["smiling", "male"], "neutral_woman": []}'
    if not isinstance(label_attributes, Mapping):
        raise ValueError(f"label_attributes must map each label to a list of attributes, e.g. {example}.")
    unknown = [label for label in label_attributes if label not in labels]
    if unknown:
        raise ValueError(
            f"label_attributes names {unknown}, which are not labels of the model; its labels are {labels}."
        )
    missing = [label for label in labels if label not in label_attributes]
    if missing:
        raise ValueError(
            f"label_attributes gives no attribute set for the label(s) {missing}: map every label of the model "
            f"({labels}), with [] for a label that shows none of the attributes, e.g. {example}."
        )
    sets = []
    for label in labels:
        names = label_attributes[label]
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f'label_attributes[{label!r}] must be a list of attribute names, e.g. ["smiling"], got {names!r}.'
            )
        bad = [n for n in names if not _ATTRIBUTE_NAME.match(n)]
        if bad:
            raise ValueError(
                f"label_attributes[{label!r}] holds {bad}: attribute names are letters, digits, '_' and '.' "
                "(they appear in targets such as 'smiling & ~male')."
            )
        sets.append(list(dict.fromkeys(names)))
    return sets


def load_evaluator(
    path: str, label_attributes: Mapping[str, Sequence[str]] | None = None
) -> AttributeEvaluator | TransformersEvaluator:
    """The evaluator of a folder: an [`AttributeEvaluator`], or a transformers image-classification model with the
    attribute set of each of its labels ([`TransformersEvaluator`]).

    Args:
        path (`str`): the folder (``config.json``: diffusers' for an AttributeEvaluator, transformers' otherwise).
        label_attributes (`Mapping[str, Sequence[str]]`, *optional*): for a transformers model, required.

    Returns:
        [`AttributeEvaluator`] or [`TransformersEvaluator`], in eval mode.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{path!r} is not an evaluator folder (no config.json): save an AttributeEvaluator there with "
            "save_pretrained (e.g. s2m_diffusers/demo/pretrained/digits7to3/evaluator), or a transformers "
            "image-classification model (model.save_pretrained and its image processor's)."
        )
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    class_name = config.get("_class_name")
    if class_name == "AttributeEvaluator":
        if label_attributes is not None:
            raise ValueError(
                f"{path!r} is an AttributeEvaluator, whose classes carry their own attribute sets "
                f"({config.get('class_attributes')}); label_attributes is for a transformers classifier: leave it out."
            )
        return AttributeEvaluator.from_pretrained(path).eval()
    if class_name is not None or "model_type" not in config:
        raise ValueError(
            f"{path!r} holds a {class_name or 'model'} that is neither an AttributeEvaluator nor a transformers "
            "image-classification model."
        )
    id2label = config.get("id2label") or {}
    labels = [str(label) for _, label in sorted(id2label.items(), key=lambda item: int(item[0]))]
    if label_attributes is None:
        raise ValueError(
            f"{path!r} is a transformers classifier (labels {labels}): give label_attributes, the attribute set of "
            'each label, e.g. {"smiling_man": ["smiling", "male"], "neutral_woman": []}, so that a target can be read '
            "from its label probabilities."
        )
    return TransformersEvaluator.from_pretrained(path, label_attributes).eval()


def folder_image_size(folder: str) -> int:
    """The shorter side of the first image of a folder (an `s2m sample` run's first listed image): the size at
    which a [`TransformersEvaluator`] with an image processor reads the folder (the processor resizes)."""
    from .data import _list_images, _open_image

    paths = check_sample_folder(folder) or _list_images(folder)
    if not paths:
        raise ValueError(f"{folder!r} holds no images.")
    return min(_open_image(paths[0]).size)


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
