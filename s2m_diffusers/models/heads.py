"""The S2M heads: one model holding the classifiers ``D_v``, ``D_r`` and ``D_f`` of S2M sampling (spec §2).

| head | trained on | optimum (the sampler uses its log) |
|---|---|---|
| ``D_v(x)`` | real images vs proposal samples, balanced | ``p_data / (p_data + p_G)``; logit = ``log p_data/p_G`` |
| ``D_r(c|x)`` | real images, their single-positive label | ``p(x|y_c=1) p_data(c) / p_data(x)`` |
| ``D_f(c|x)`` | class-conditional proposal samples, their class | ``p_G(x|c) p_G(c) / p_G(x)`` |

Each head reads features of a backbone: a small built-in CNN (the default) or any `transformers` vision model, built
from a config dict stored in this model's config or loaded once from a local checkpoint. The backbone can be shared
by the heads or, the default and the better choice measured on Digits-7to3 (see `benchmarks/bench_heads.py`), one
backbone per head. The outputs are calibrated: the logits are divided by temperatures fitted on held-out data
(`s2m_diffusers.training.train_heads`), stored as buffers so that they travel with the weights.

Inputs are always images `(B, in_channels, sample_size, sample_size)` in [-1, 1], the proposal's format.
`S2MHeads.backbone_inputs` is the one place where they are brought to what a transformers backbone expects (its
image size, channel count and normalisation).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from ..maths import DEFAULT_NEGATION_MARGIN, LABELLINGS, log_p_data, log_priors
from ..targets import check_attribute_names
from ..utils import hub_repo_id, optional_dependency

HEAD_NAMES = ("dv", "dr", "df")


@dataclass
class S2MHeadsOutput(BaseOutput):
    """Output of [`S2MHeads`].

    Args:
        dv_logit (`torch.Tensor` of shape `(B,)`):
            Calibrated ``logit D_v(x)``, an estimate of ``log p_data(x) / p_G(x)``.
        dr_log_probs (`torch.Tensor` of shape `(B, n)`):
            Calibrated ``log D_r(c|x)`` over the `n` attributes.
        df_log_probs (`torch.Tensor` of shape `(B, n)`, *optional*):
            Calibrated ``log D_f(c|x)``; `None` when the proposal is not class-conditional.
    """

    dv_logit: torch.Tensor
    dr_log_probs: torch.Tensor
    df_log_probs: torch.Tensor | None = None


class SmallCNN(nn.Module):
    """The built-in backbone: stages of two 3x3 convolutions (GroupNorm, SiLU), 2x average pooling between stages,
    global average pooling at the end. About 0.3M parameters with the default widths `(32, 64, 128)`.

    Args:
        in_channels (`int`): channels of the input images.
        channels (`Sequence[int]`): width of each stage.
        dropout (`float`): dropout on the pooled features.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(channels):
            if i > 0:
                layers.append(nn.AvgPool2d(2))
            for _ in range(2):
                layers += [
                    nn.Conv2d(previous, width, 3, padding=1),
                    nn.GroupNorm(min(8, width), width),
                    nn.SiLU(),
                ]
                previous = width
        self.layers = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.num_features = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layers(x).mean(dim=(2, 3)))  # (B, F)


class TransformersBackbone(nn.Module):
    """A `transformers` vision model (`AutoModel`) whose pooled output serves as features.

    Uses `pooler_output` where the model has one, else the mean of `last_hidden_state` over tokens or pixels.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_features = None  # probed by S2MHeads with one dummy forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=x)
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            hidden = outputs.last_hidden_state
            pooled = hidden.mean(dim=1) if hidden.ndim == 3 else hidden.mean(dim=(2, 3))  # (B, F)
        return pooled.flatten(1)


def _transformers_model(config_dict: dict) -> nn.Module:
    """Build a randomly initialised `transformers` `AutoModel` from a config dict holding `model_type`."""
    with optional_dependency("transformers", "A transformers backbone (`transformers_config`)"):
        from transformers import AutoConfig, AutoModel

    kwargs = {k: v for k, v in config_dict.items() if k not in ("transformers_version", "_name_or_path")}
    if "model_type" not in kwargs:
        raise ValueError(
            f"`transformers_config` needs a `model_type` key (e.g. 'vit', 'convnext'); got keys {sorted(kwargs)}."
        )
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoModel.from_config(config)


def _copied_backbone(model: nn.Module) -> TransformersBackbone:
    """A backbone around a copy of a loaded `transformers` model (one per head, unless shared)."""
    return TransformersBackbone(copy.deepcopy(model))


def _configured_backbone(config_dict: dict) -> TransformersBackbone:
    """A backbone around a new `transformers` model built from a config dict."""
    return TransformersBackbone(_transformers_model(config_dict))


def _hub_offline() -> bool:
    """Whether downloads are switched off (``HF_HUB_OFFLINE``, read now rather than at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _checkpoint_model(
    path: str, revision: str | None = None
) -> tuple[nn.Module, dict, list[float] | None, list[float] | None]:
    """Load a `transformers` vision model from a local folder, or from a Hub repo id when downloads are allowed (at
    `revision`), with its config dict and image mean/std if known."""
    with optional_dependency("transformers", "A transformers backbone (`transformers_checkpoint`)"):
        from transformers import AutoModel

    local = os.path.isdir(path)
    if not local and (hub_repo_id(path) is None or _hub_offline()):
        hub = "" if hub_repo_id(path) is None else " and HF_HUB_OFFLINE is set, so it is not downloaded"
        raise FileNotFoundError(
            f"`transformers_checkpoint` {path!r} is not a local folder{hub}. Pass the folder written by the model's "
            "`save_pretrained`, a Hub repo id with downloads allowed (unset HF_HUB_OFFLINE), or `transformers_config` "
            "to build a model from a config."
        )
    model = AutoModel.from_pretrained(path, local_files_only=local, revision=None if local else revision)
    config_dict = model.config.to_diff_dict()
    config_dict["model_type"] = model.config.model_type
    pre = _preprocessor_config(path, None if local else revision)
    return model, config_dict, pre.get("image_mean"), pre.get("image_std")


def _preprocessor_config(path: str, revision: str | None) -> dict:
    """The model's `preprocessor_config.json` (its image mean and std), or `{}` where it has none."""
    if os.path.isdir(path):
        file = os.path.join(path, "preprocessor_config.json")
        if not os.path.exists(file):
            return {}
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            file = hf_hub_download(path, "preprocessor_config.json", revision=revision)
        except EntryNotFoundError:
            return {}
    with open(file) as f:
        return json.load(f)


class S2MHeads(ModelMixin, ConfigMixin):
    r"""The classifiers ``D_v``, ``D_r`` and (for a class-conditional proposal) ``D_f`` of S2M sampling.

    Train and calibrate them with [`~s2m_diffusers.training.train_heads`].

    Args:
        attribute_names (`list[str]`): names of the `n >= 2` attributes, matching `[A-Za-z0-9_.]+`, unique.
        sample_size (`int`, defaults to 32): side of the (square) input images, the proposal's size.
        in_channels (`int`, defaults to 3): channels of the input images.
        conditional (`bool`, defaults to `False`): whether the proposal is class-conditional (adds ``D_f``).
        cnn_channels (`list[int]`, defaults to `[32, 64, 128]`): stage widths of the built-in CNN backbone.
        dropout (`float`, defaults to 0.0): dropout on the backbone features.
        transformers_config (`dict`, *optional*): config of a `transformers` vision backbone (with `model_type`,
            e.g. `{"model_type": "vit", "hidden_size": 32, ...}`); built with `AutoModel.from_config`.
        transformers_checkpoint (`str`, *optional*): a `transformers` vision model: a local folder, or a Hub repo id
            (downloaded unless ``HF_HUB_OFFLINE`` is set; pin `transformers_revision`); loaded once at construction,
            its config is then stored in `transformers_config` and its weights in this model's safetensors (the folder
            or repo is not needed afterwards).
        transformers_revision (`str`, *optional*): the commit, branch or tag of a Hub `transformers_checkpoint`;
            pin a commit sha, so that the backbone is the one reviewed.
        backbone_image_mean (`list[float]`, *optional*), backbone_image_std (`list[float]`, *optional*):
            normalisation a transformers backbone expects for inputs in [0, 1] (read from the checkpoint's
            `preprocessor_config.json` when there is one). `None` keeps the [-1, 1] range.
        freeze_backbone (`bool`, defaults to `False`): train only the linear heads.
        shared_backbone (`bool`, defaults to `False`): one backbone for all heads (as the paper's code) instead of
            one per head.
        dv_auxiliary_classifier (`bool`, defaults to `True`): with separate backbones, also train ``D_v``'s
            backbone to classify the real images' labels (a training-only linear head), so that its features learn
            the attributes as a shared backbone's do (on Digits-7to3: ``D_v`` accuracy 0.94 instead of 0.83 after
            2000 steps).
        label_counts (`list[int]`, *optional*): number of single-positive labels per attribute, giving
            ``p_data(c)``. Set by training.
        priors (`list[float]`, *optional*): attribute priors ``pi_c`` (any common scale). `None`: use ``p_data``.
        negation_margin (`float`, defaults to `DEFAULT_NEGATION_MARGIN`, 10.0): the margin lambda of negated literals
            (spec §3). Training sets it from data (`s2m_diffusers.calibration.choose_margins`).
        presence_margin (`float`, *optional*): the margin kappa of required literals (spec §3), chosen from data by
            training; `None`: 0, the paper's formula.
        dv_strength (`float`, *optional*): ``beta`` in [0, 1], the weight of ``logit D_v`` that the sampler uses by
            default (the target is then ``p_G^(1 - beta) p_data^beta`` restricted to the combination); chosen by
            training as the largest ``beta`` whose weights keep an effective sample size of 10% over held-out
            generated images (`s2m_diffusers.maths.dv_strength`). `None`: 1, the paper's target.
        proposal_class_probs (`list[float]`, *optional*): ``p_G(c)``, the class share of a class-conditional
            proposal. Set by training.
        labelling (`str`, defaults to `"independent"`): how the single-positive training data were labelled (spec
            §1): ``"independent"`` (each attribute's folder samples the images that hold it; an image may be in
            several) or ``"one_label_per_image"`` (each image in one folder, labelled with one of its attributes).
            It decides how ``D_r`` is read (`s2m_diffusers.maths.log_g`).
        screen_steps (`list[int]`, *optional*), screen_num_steps (`int`, *optional*), screen_timesteps (`list[int]`,
            *optional*): set on *screen heads* only (`s2m_diffusers.screen_heads.distil_screen_heads`): heads
            distilled to read a diffusion proposal's predicted clean image after these steps of ``screen_num_steps``,
            at these scheduler timesteps. The sampler's screen uses them for views within those timesteps.

    Examples:

    ```py
    >>> import torch
    >>> from s2m_diffusers.models.heads import S2MHeads
    >>> heads = S2MHeads(attribute_names=["A", "B", "C"], sample_size=16, in_channels=1).eval()
    >>> out = heads(torch.zeros(2, 1, 16, 16))
    >>> out.dv_logit.shape, out.dr_log_probs.shape, out.df_log_probs
    (torch.Size([2]), torch.Size([2, 3]), None)
    ```
    """

    @register_to_config
    def __init__(
        self,
        attribute_names: Sequence[str] = ("A", "B"),
        sample_size: int = 32,
        in_channels: int = 3,
        conditional: bool = False,
        cnn_channels: Sequence[int] = (32, 64, 128),
        dropout: float = 0.0,
        transformers_config: dict | None = None,
        transformers_checkpoint: str | None = None,
        transformers_revision: str | None = None,
        backbone_image_mean: Sequence[float] | None = None,
        backbone_image_std: Sequence[float] | None = None,
        freeze_backbone: bool = False,
        shared_backbone: bool = False,
        dv_auxiliary_classifier: bool = True,
        label_counts: Sequence[int] | None = None,
        priors: Sequence[float] | None = None,
        negation_margin: float = DEFAULT_NEGATION_MARGIN,
        proposal_class_probs: Sequence[float] | None = None,
        labelling: str = "independent",
        presence_margin: float | None = None,
        dv_strength: float | None = None,
        screen_steps: Sequence[int] | None = None,
        screen_num_steps: int | None = None,
        screen_timesteps: Sequence[int] | None = None,
    ):
        super().__init__()
        names = list(attribute_names)
        if labelling not in LABELLINGS:
            raise ValueError(
                f"`labelling` must be one of {list(LABELLINGS)}, got {labelling!r}: 'independent' when each "
                "attribute's folder samples the images that hold it, 'one_label_per_image' when each image sits in "
                "exactly one folder."
            )
        check_attribute_names(names)
        n = len(names)
        for field, values in (
            ("label_counts", label_counts),
            ("priors", priors),
            ("proposal_class_probs", proposal_class_probs),
        ):
            if values is not None and len(values) != n:
                raise ValueError(f"`{field}` has {len(values)} entries but there are {n} attributes {names}.")
        if negation_margin < 1.0:
            raise ValueError(f"`negation_margin` must be >= 1 (spec §3), got {negation_margin}.")
        if presence_margin is not None and not 0.0 <= presence_margin <= 1.0:
            raise ValueError(f"`presence_margin` must lie in [0, 1] (spec §3), got {presence_margin}.")
        if dv_strength is not None and not 0.0 <= dv_strength <= 1.0:
            raise ValueError(f"`dv_strength` must lie in [0, 1] (1 is the paper's target), got {dv_strength}.")

        if transformers_checkpoint is not None:
            model, config_dict, mean, std = _checkpoint_model(transformers_checkpoint, transformers_revision)
            backbone_image_mean = backbone_image_mean if backbone_image_mean is not None else mean
            backbone_image_std = backbone_image_std if backbone_image_std is not None else std
            # From now on the model is rebuilt from its config; its weights live in this model's safetensors.
            self.register_to_config(
                transformers_config=config_dict,
                transformers_checkpoint=None,
                transformers_revision=None,
                backbone_image_mean=backbone_image_mean,
                backbone_image_std=backbone_image_std,
            )
            make_backbone = functools.partial(_copied_backbone, model)
        elif transformers_config is not None:
            make_backbone = functools.partial(_configured_backbone, dict(transformers_config))
        else:
            make_backbone = functools.partial(SmallCNN, in_channels, cnn_channels, dropout)

        mean = None if backbone_image_mean is None else torch.tensor(backbone_image_mean).view(1, -1, 1, 1)
        std = None if backbone_image_std is None else torch.tensor(backbone_image_std).view(1, -1, 1, 1)
        self.register_buffer("_image_mean", mean, persistent=False)
        self.register_buffer("_image_std", std, persistent=False)

        heads = ["dv", "dr"] + (["df"] if conditional else [])
        self.backbones = nn.ModuleDict(
            {"shared": make_backbone()} if shared_backbone else {h: make_backbone() for h in heads}
        )
        first = next(iter(self.backbones.values()))
        num_features = first.num_features or self._probe_num_features(first)
        self.dv_head = nn.Linear(num_features, 1)
        self.dr_head = nn.Linear(num_features, n)
        self.df_head = nn.Linear(num_features, n) if conditional else None
        # Training only: a classifier on D_v's own backbone (multi-task features for D_v); unused by `forward`.
        self.dv_aux_head = nn.Linear(num_features, n) if dv_auxiliary_classifier and not shared_backbone else None
        if freeze_backbone:
            self.backbones.requires_grad_(False)

        # Calibration temperatures (fitted on held-out data by training), saved with the weights.
        for h in HEAD_NAMES:
            self.register_buffer(f"{h}_temperature", torch.ones(1))

    # ----- config views -------------------------------------------------------------------------------------
    @property
    def attribute_names(self) -> list[str]:
        return list(self.config.attribute_names)

    @property
    def num_attributes(self) -> int:
        return len(self.config.attribute_names)

    @property
    def conditional(self) -> bool:
        return bool(self.config.conditional)

    @property
    def negation_margin(self) -> float:
        return float(self.config.negation_margin)

    @property
    def presence_margin(self) -> float:
        """kappa: the heads' presence margin (0 when training chose none)."""
        value = getattr(self.config, "presence_margin", None)
        return 0.0 if value is None else float(value)

    @property
    def dv_strength(self) -> float:
        """beta: the heads' strength of ``logit D_v`` (1, the paper's target, when training chose none)."""
        value = getattr(self.config, "dv_strength", None)
        return 1.0 if value is None else float(value)

    @property
    def label_counts(self) -> list[int] | None:
        return None if self.config.label_counts is None else list(self.config.label_counts)

    @property
    def priors(self) -> list[float] | None:
        return None if self.config.priors is None else list(self.config.priors)

    def log_p_data(self) -> torch.Tensor:
        """``log p_data(c)``, `(n,)`: log share of single-positive labels per attribute (uniform if unknown)."""
        return log_p_data(self.config.label_counts, self.num_attributes).float()

    def log_priors(self) -> torch.Tensor | None:
        """``log pi_c``, `(n,)`, or `None` when no priors are set (then ``pi = p_data``)."""
        priors = log_priors(self.config.priors, self.num_attributes)
        return None if priors is None else priors.float()

    def log_proposal_class_probs(self) -> torch.Tensor | None:
        """``log p_G(c)``, `(n,)`, for a class-conditional proposal (uniform if unknown); `None` otherwise."""
        if not self.conditional:
            return None
        probs = torch.tensor(self.config.proposal_class_probs or [1.0] * self.num_attributes, dtype=torch.float64)
        return (probs / probs.sum()).log().float()

    def temperatures(self) -> dict[str, float]:
        """The calibration temperatures of the heads that exist."""
        return {h: float(getattr(self, f"{h}_temperature")) for h in self.head_names}

    @property
    def head_names(self) -> list[str]:
        return ["dv", "dr"] + (["df"] if self.conditional else [])

    @torch.no_grad()
    def set_temperatures(self, **temperatures: float) -> None:
        """Set calibration temperatures, e.g. `set_temperatures(dv=1.3, dr=0.9)`."""
        for name, value in temperatures.items():
            if name not in HEAD_NAMES:
                raise ValueError(f"Unknown head {name!r}; the heads are {list(HEAD_NAMES)}.")
            if not value > 0:
                raise ValueError(f"A temperature must be positive, got {name}={value}.")
            getattr(self, f"{name}_temperature").fill_(float(value))

    # ----- computation --------------------------------------------------------------------------------------
    def backbone_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The one place where input images are checked and brought to what the backbone expects.

        Inputs are `(B, in_channels, sample_size, sample_size)` in [-1, 1]. The built-in CNN takes them as they are.
        A transformers backbone gets them resized (bilinear) to its `image_size`, with channels repeated (1 -> 3) or
        averaged (3 -> 1) to its `num_channels`, and mapped to [0, 1] then normalised by
        `backbone_image_mean`/`backbone_image_std` where those are set.
        """
        c, s = self.config.in_channels, self.config.sample_size
        if images.ndim != 4 or images.shape[1] != c or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(
                f"S2MHeads expects images of shape (B, {c}, {s}, {s}) in [-1, 1], got {tuple(images.shape)}. "
                "Bring images to the proposal's format with `s2m_diffusers.data.prepare_images`."
            )
        config = self.config.transformers_config
        if config is None:
            return images
        size = config.get("image_size", s)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        channels = config.get("num_channels", c)
        if channels != c:
            if c == 1:
                images = images.expand(-1, channels, -1, -1)
            elif channels == 1:
                images = images.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"Cannot map {c}-channel images to a backbone with num_channels={channels}.")
        if self._image_mean is not None:
            images = ((images + 1.0) / 2.0 - self._image_mean) / self._image_std
        return images

    def _probe_num_features(self, backbone: nn.Module) -> int:
        """Feature width of a backbone, from one dummy forward (on the meta device while diffusers loads)."""
        dummy = torch.zeros(1, self.config.in_channels, self.config.sample_size, self.config.sample_size)
        dummy = self.backbone_inputs(dummy).to(next(backbone.parameters()).device)
        with torch.no_grad():
            return backbone(dummy).shape[-1]

    def raw_logits(self, images: torch.Tensor, heads: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Uncalibrated logits of the chosen heads; each backbone runs once.

        Args:
            images (`torch.Tensor`): `(B, in_channels, sample_size, sample_size)` in [-1, 1].
            heads (`Sequence[str]`, *optional*): subset of `("dv", "dr", "df")`; defaults to every head present.

        Returns:
            `dict[str, torch.Tensor]`: `"dv"` `(B,)`, `"dr"` `(B, n)`, `"df"` `(B, n)`.
        """
        heads = self.head_names if heads is None else list(heads)
        x = self.backbone_inputs(images)
        features: dict[str, torch.Tensor] = {}
        out = {}
        for h in heads:
            if h not in self.head_names and not (h == "dv_aux" and self.dv_aux_head is not None):
                raise ValueError(f"Head {h!r} does not exist here; the heads are {self.head_names}.")
            key = "shared" if self.config.shared_backbone else h.removesuffix("_aux")
            if key not in features:
                features[key] = self.backbones[key](x)  # (B, F)
            logits = getattr(self, f"{h}_head")(features[key])
            out[h] = logits.squeeze(-1) if h == "dv" else logits
        return out

    def forward(self, images: torch.Tensor, return_dict: bool = True) -> S2MHeadsOutput | tuple:
        """Calibrated head outputs.

        Args:
            images (`torch.Tensor`): `(B, in_channels, sample_size, sample_size)` in [-1, 1].
            return_dict (`bool`, defaults to `True`): return an [`S2MHeadsOutput`] instead of a tuple.

        Returns:
            [`S2MHeadsOutput`] or `tuple`: `dv_logit` `(B,)`, `dr_log_probs` `(B, n)`, `df_log_probs` `(B, n)` or
            `None`.
        """
        logits = self.raw_logits(images)
        dv_logit = logits["dv"] / self.dv_temperature
        dr_log_probs = torch.log_softmax(logits["dr"] / self.dr_temperature, dim=-1)
        df_log_probs = torch.log_softmax(logits["df"] / self.df_temperature, dim=-1) if "df" in logits else None
        if not return_dict:
            return dv_logit, dr_log_probs, df_log_probs
        return S2MHeadsOutput(dv_logit=dv_logit, dr_log_probs=dr_log_probs, df_log_probs=df_log_probs)
