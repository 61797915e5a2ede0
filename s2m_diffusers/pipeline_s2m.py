"""`S2MPipeline`: any diffusers diffusion model or GAN as the proposal, the S2M heads, and the sampler (spec §4-6).

The pipeline is the one place where a proposal, the heads and the sampler meet. Data flows one way:

    latents z --(proposal adapter)--> images x in [-1, 1] --(heads)--> D_v, D_r, D_f
        --(targets.log_r, targets.log_w)--> log w --(sampling.sample_s2m)--> accepted latents and images

The sampler sees only ``evaluate(z) -> (x, log_w)`` functions (one per refitting stage) and a latent density; it
never sees a model.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin, UNet2DModel
from diffusers.utils import BaseOutput, replace_example_docstring

from . import hub
from .data import prepare_images
from .models.heads import S2MHeads
from .proposals import (
    DDIMProposal,
    GeneratorProposal,
    PipelineProposal,
    ProposalAdapter,
    eval_mode,
    execution_device,
    standard_normal_cdf,
)
from .refit import StandardNormal
from .sampling import BudgetExhaustedError, SampleResult, SamplerStats, sample_s2m
from .targets import And, Attr, Target, TargetError, auto_dr_temperature, log_r, log_w, parse_target, temper_dr

__all__ = ["S2MPipeline", "S2MPipelineOutput"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_SAMPLER_DEFAULTS = {k: p.default for k, p in inspect.signature(sample_s2m).parameters.items()}
REFIT_MODES = ("off", "once", "sequential")
# Chains run side by side when a call does not set `num_chains`: at most this many, so that the images kept for the
# chains' states stay bounded however many images are asked for (see "Memory" in `S2MPipeline.__call__`).
DEFAULT_MAX_CHAINS = 256
# Statistics that add up over the processes of a distributed call.
_SUMMED_STATS = (
    "proposals",
    "accepted",
    "chains_started",
    "chains_entered",
    "rounds",
    "max_proposals",
    "seconds_generator",
    "seconds_heads",
    "seconds_sampler",
    "seconds_total",
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from s2m_diffusers import S2MPipeline
        >>> from s2m_diffusers.models.gan import DCGANGenerator
        >>> from s2m_diffusers.models.heads import S2MHeads

        >>> # Untrained tiny models, to show the calls; load trained ones with S2MPipeline.from_pretrained(DIR).
        >>> gan = DCGANGenerator(latent_dim=16, sample_size=8, out_channels=1)
        >>> heads = S2MHeads(["A", "B", "C"], sample_size=8, in_channels=1, cnn_channels=(4, 8))
        >>> pipe = S2MPipeline(heads=heads, gan=gan)
        >>> out = pipe("A & B", num_images=4, generator=torch.Generator().manual_seed(0), fit_size=32)
        >>> len(out.images), out.stats["proposals_per_image"] * 4 == out.stats["proposals"]
        (4, True)
        ```
"""


@dataclass
class S2MPipelineOutput(BaseOutput):
    """Output of [`S2MPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The returned images: PIL images (``output_type="pil"``), an array `(N, H, W, C)` in [0, 1] (``"np"``),
            a tensor `(N, C, H, W)` in [0, 1] (``"pt"``), or the latents (``"latent"``).
        latents (`torch.Tensor`):
            The latent each image came from, `(N, *latent_shape)` (a class-conditional proposal whose class is drawn
            with the latent adds one coordinate: `(N, prod(latent_shape) + 1)`).
        on_target (`torch.Tensor` of shape `(N,)`, bool):
            Whether the heads put each returned image inside the target (its weight is finite).
        stats (`dict`):
            Proposals drawn, acceptance rate, proposals per image, seconds in the generator, the heads and the
            sampler, refitting stages; see [`S2MPipeline.__call__`].
        class_labels (`torch.Tensor` of shape `(N,)`, *optional*):
            The class each image was generated with, for a class-conditional proposal.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    latents: torch.Tensor
    on_target: torch.Tensor
    stats: dict
    class_labels: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------------------------
# Class-conditional proposals


@dataclass
class _ClassPlan:
    """How a class-conditional proposal's class is chosen (see `S2MPipeline.__call__`, ``class_label``).

    ``mode``: ``"none"`` (unconditional proposal), ``"fixed"`` (every sample is generated with class ``index``;
    ``log w`` gets the ``D_f`` correction ``- log D_f(c|x) + log p_G(c)``) or ``"marginal"`` (the class is drawn from
    ``p_G(c)`` by one extra standard-normal latent coordinate ``u``: ``c = F^-1(Phi(u))``; the proposal is then the
    generator's marginal ``p_G(x)``, which ``D_v`` was trained against, and needs no ``D_f``).
    """

    mode: str = "none"
    index: int | None = None
    log_probs: torch.Tensor | None = None  # log p_G(c), (n,)
    names: tuple[str, ...] = ()

    def latent_shape(self, generator_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(generator_shape) + 1,) if self.mode == "marginal" else generator_shape

    def split(self, z: torch.Tensor, generator_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampler latents -> (generator latents, class labels or None)."""
        if self.mode == "none":
            return z, None
        if self.mode == "fixed":
            return z, torch.full((z.shape[0],), self.index, dtype=torch.long)
        flat = z.reshape(z.shape[0], -1)
        cdf = self.log_probs.exp().cumsum(0)[:-1].to(flat.device, torch.float64)  # (n - 1,)
        labels = torch.searchsorted(cdf, standard_normal_cdf(flat[:, -1].double()), right=True)
        return flat[:, :-1].reshape(z.shape[0], *generator_shape), labels.cpu()

    def describe(self) -> str | None:
        if self.mode == "fixed":
            return self.names[self.index]
        return "drawn from p_G(c)" if self.mode == "marginal" else None


# ------------------------------------------------------------------------------------------------------------------
# Bookkeeping of one call


@dataclass
class _CallState:
    seconds_generator: float = 0.0
    seconds_heads: float = 0.0
    round: int = 0
    phase: int = 0
    checked_shape: bool = False
    num_fit_stages: int = 0  # refitting stages before the final sampling (their images are not kept)
    keep_all_images: bool = False  # a callback asked for every round's images
    stages: list[dict] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock times land on the part that ran them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


class S2MPipeline(DiffusionPipeline):
    r"""S2M sampling: images that hold a combination of attributes, from a pretrained generator and heads trained on
    single-positive labels.

    Exactly one proposal is given:

    - ``gan``: a GAN generator (a [`~s2m_diffusers.models.gan.DCGANGenerator`] or any `ModelMixin` whose forward maps
      latents, and optionally ``class_labels``, to images in [-1, 1]);
    - ``unet`` with ``scheduler``: a pixel-space diffusion model, run as deterministic DDIM (``eta = 0``) from its
      initial noise;
    - ``proposal_pipeline``: any loaded diffusers pipeline that accepts ``latents=`` and ``output_type="pt"`` (a
      text-to-image pipeline with a fixed prompt in ``proposal_kwargs``, decoded by its VAE). Use
      [`S2MPipeline.from_pipe`] to wrap one without copying its weights.

    Args:
        heads ([`~s2m_diffusers.models.heads.S2MHeads`]): ``D_v``, ``D_r`` (and ``D_f``), trained on images of the
            proposal's size and channels.
        gan (`ModelMixin`, *optional*): a GAN generator.
        unet (`UNet2DModel`, *optional*), scheduler (`SchedulerMixin`, *optional*): a diffusion model.
        proposal_pipeline (`DiffusionPipeline`, *optional*): a pipeline used as the proposal.
        proposal_kwargs (`dict`, *optional*): fixed call arguments of ``proposal_pipeline`` (prompt, guidance
            scale, ...); saved in `model_index.json`.
        latent_shape (`list[int]`, *optional*): shape of one latent of ``gan`` or ``proposal_pipeline`` when their
            config does not tell it.
        num_inference_steps (`int`, defaults to 25): DDIM steps of ``unet``, and the steps passed to
            ``proposal_pipeline`` unless ``proposal_kwargs`` sets them.
        default_target (`str`, *optional*): the target used when a call names none (e.g. by `diffusers-cli run`
            without `--pipeline-kwargs`).

    Large generators: a call runs the generator and the heads ``micro_batch_size`` images at a time, keeps only one
    micro-batch of generated images on the execution device, and lets heads trained on smaller images see a
    downscaled copy (see "Memory" in [`~S2MPipeline.__call__`]). `enable_model_cpu_offload()` keeps every model on the
    CPU and moves each one to the accelerator only while it runs (``model_cpu_offload_seq``; a wrapped
    ``proposal_pipeline`` gets its own offloading). Several processes: ``pipe(..., distributed=True)`` under
    ``accelerate launch`` (see `s2m_diffusers.distributed`).
    """

    # diffusers' `enable_model_cpu_offload` order: the generator, then the heads. `proposal_pipeline` is a pipeline,
    # not a module: diffusers skips it here, and `enable_model_cpu_offload` below offloads its own models.
    model_cpu_offload_seq = "proposal_pipeline->unet->gan->heads"
    _optional_components = ["heads", "gan", "unet", "scheduler", "proposal_pipeline"]
    _callback_tensor_inputs = ["latents", "images", "log_w"]

    def __init__(
        self,
        heads: S2MHeads | None = None,
        gan: ModelMixin | None = None,
        unet: UNet2DModel | None = None,
        scheduler: SchedulerMixin | None = None,
        proposal_pipeline: DiffusionPipeline | None = None,
        proposal_kwargs: dict | None = None,
        latent_shape: list[int] | None = None,
        num_inference_steps: int = 25,
        default_target: str | None = None,
    ):
        super().__init__()
        _check_components(heads, gan, unet, scheduler, proposal_pipeline)
        self.register_modules(
            heads=heads, gan=gan, unet=unet, scheduler=scheduler, proposal_pipeline=proposal_pipeline
        )
        self.register_to_config(
            proposal_kwargs=dict(proposal_kwargs) if proposal_kwargs else None,
            latent_shape=None if latent_shape is None else [int(s) for s in latent_shape],
            num_inference_steps=int(num_inference_steps),
            default_target=default_target,
        )
        self._deterministic_checked: set[int] = set()

    # ----- proposal -----------------------------------------------------------------------------------------------
    @property
    def proposal_kind(self) -> str:
        """``"gan"``, ``"ddim"`` or ``"pipeline"``."""
        if self.gan is not None:
            return "gan"
        if self.unet is not None:
            return "ddim"
        return "pipeline"

    def get_proposal(self, micro_batch_size: int = 64, num_inference_steps: int | None = None) -> ProposalAdapter:
        """The proposal adapter of this pipeline's generator (see `s2m_diffusers.proposals`).

        Its ``proposal(n, generator)`` is also the callable that training ``D_v`` needs
        (`s2m_diffusers.training.train_heads`).

        Args:
            micro_batch_size (`int`, defaults to 64): latents per generator call.
            num_inference_steps (`int`, *optional*): overrides ``config.num_inference_steps``.
        """
        _check_components(self.heads, self.gan, self.unet, self.scheduler, self.proposal_pipeline, need_heads=False)
        heads_config = getattr(self.heads, "config", None)
        class_probs = getattr(heads_config, "proposal_class_probs", None)
        latent_shape = self.config.latent_shape
        if self.gan is not None:
            num_classes = getattr(self.gan.config, "num_classes", None) if hasattr(self.gan, "config") else None
            if class_probs is not None and num_classes is not None and len(class_probs) != num_classes:
                class_probs = None  # checked with a teaching error in _class_plan
            return GeneratorProposal(self.gan, latent_shape, micro_batch_size, class_probs=class_probs)
        steps = num_inference_steps or self.config.num_inference_steps
        if self.unet is not None:
            num_classes = getattr(self.unet.config, "num_class_embeds", None)
            if class_probs is not None and num_classes is not None and len(class_probs) != num_classes:
                class_probs = None
            return DDIMProposal(self.unet, self.scheduler, steps, micro_batch_size, class_probs=class_probs)
        kwargs = dict(self.config.proposal_kwargs or {})
        takes_steps = "num_inference_steps" in inspect.signature(self.proposal_pipeline.__call__).parameters
        if num_inference_steps is not None or (takes_steps and "num_inference_steps" not in kwargs):
            kwargs["num_inference_steps"] = steps
        return PipelineProposal(self.proposal_pipeline, latent_shape, kwargs, micro_batch_size=micro_batch_size)

    def proposal_description(self) -> dict:
        """A summary of the proposal for the model card and the statistics."""
        if self.gan is not None:
            out = {"kind": "GAN generator", "class": type(self.gan).__name__}
            config = getattr(self.gan, "config", None)
            for key in ("latent_dim", "sample_size", "out_channels", "num_classes"):
                if getattr(config, key, None) is not None:
                    out[key] = getattr(config, key)
        elif self.unet is not None:
            out = {
                "kind": "diffusion UNet run as DDIM (eta = 0) from its initial noise",
                "class": type(self.unet).__name__,
                "scheduler": type(self.scheduler).__name__,
                "num_inference_steps": self.config.num_inference_steps,
            }
        else:
            pipe = self.proposal_pipeline
            out = {"kind": "diffusers pipeline called with latents=", "class": type(pipe).__name__}
            if self.config.proposal_kwargs:
                out["proposal_kwargs"] = dict(self.config.proposal_kwargs)
            name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
            if isinstance(name, str) and name.count("/") == 1 and not os.path.exists(name):
                out["base_model"] = name
        if self.config.latent_shape:
            out["latent_shape"] = list(self.config.latent_shape)
        return out

    # ----- diffusers plumbing -------------------------------------------------------------------------------------
    def to(self, *args, **kwargs):
        """As `DiffusionPipeline.to`, and moves a wrapped ``proposal_pipeline`` too."""
        super().to(*args, **kwargs)
        if self.proposal_pipeline is not None:
            self.proposal_pipeline.to(*args, **kwargs)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """As `DiffusionPipeline.enable_model_cpu_offload`: every model stays on the CPU and is moved to the
        accelerator when it runs (the generator, then the heads, ``model_cpu_offload_seq``); a wrapped
        ``proposal_pipeline`` gets its own `enable_model_cpu_offload` (its UNet, text encoders and VAE one at a time).

        Args:
            gpu_id (`int`, *optional*), device (`torch.device` or `str`, *optional*): as in diffusers. diffusers raises
                without an accelerator unless ``device`` is given (``device="cpu"`` installs the hooks on a CPU
                machine, which saves nothing but runs the same code).
        """
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        inner = self.proposal_pipeline
        if inner is not None and getattr(inner, "model_cpu_offload_seq", None):
            inner.enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `ConfigMixin.load_config`, reading the shims of the remote-code layout back to the installed modules
        (parsed, never executed), so that `S2MPipeline.from_pretrained` needs no ``trust_remote_code``."""
        out = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        path = os.fspath(pretrained_model_name_or_path)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            return out
        config = hub.resolve_remote_code_layout(out[0] if isinstance(out, tuple) else out, folder)
        for value in config.values():
            # diffusers resolves a component's module from `sys.modules` only; ours may be imported here.
            if hub._is_component_entry(value) and str(value[0]).startswith("s2m_diffusers."):
                importlib.import_module(value[0])
        return (config, *out[1:]) if isinstance(out, tuple) else config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> S2MPipeline:
        """Load a saved S2M pipeline from a folder or a Hub repo, without remote code.

        A Hub repo is fetched with `huggingface_hub.snapshot_download` (``revision``, ``cache_dir``, ``token``,
        ``local_files_only`` and ``proxies`` are passed on); the classes come from the installed `s2m_diffusers`.
        Other arguments are those of `DiffusionPipeline.from_pretrained`.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(
                path,
                revision=kwargs.pop("revision", None),
                cache_dir=kwargs.get("cache_dir"),
                token=kwargs.get("token"),
                local_files_only=kwargs.get("local_files_only", False),
                proxies=kwargs.get("proxies"),
            )
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, heads: S2MHeads | None = None, **kwargs) -> S2MPipeline:
        """Wrap a loaded pipeline as the proposal of an S2M pipeline, without copying weights.

        - An `S2MPipeline`: its components and settings, with ``heads`` (and any component in ``kwargs``) replaced.
        - A pipeline that accepts ``latents=`` (e.g. a text-to-image pipeline): it becomes ``proposal_pipeline``;
          pass its fixed call arguments as ``proposal_kwargs={"prompt": ...}``.
        - A pipeline with a pixel-space `UNet2DModel` and a scheduler that does not take ``latents=`` (e.g.
          `DDPMPipeline`, `DDIMPipeline`): its ``unet`` and ``scheduler`` are used, run as DDIM.

        Args:
            pipeline (`DiffusionPipeline`): the loaded pipeline.
            heads ([`~s2m_diffusers.models.heads.S2MHeads`]): heads trained for that proposal.
            kwargs: other arguments of [`S2MPipeline`] (``proposal_kwargs``, ``latent_shape``,
                ``num_inference_steps``, ``default_target``).
        """
        if isinstance(pipeline, S2MPipeline):
            components = dict(pipeline.components)
            parameters = dict(pipeline.parameters)
            if heads is not None:
                components["heads"] = heads
            for key in list(kwargs):
                if key in components:
                    components[key] = kwargs.pop(key)
            return cls(**components, **{**parameters, **kwargs})
        if not isinstance(pipeline, DiffusionPipeline):
            raise ValueError(
                f"from_pipe wraps a loaded diffusers pipeline; got {type(pipeline).__name__}. For a GAN generator use "
                "`S2MPipeline(heads=heads, gan=generator)`."
            )
        components = pipeline.components
        takes_latents = "latents" in inspect.signature(pipeline.__call__).parameters
        unet, scheduler = components.get("unet"), components.get("scheduler")
        if not takes_latents and isinstance(unet, UNet2DModel) and scheduler is not None:
            return cls(heads=heads, unet=unet, scheduler=scheduler, **kwargs)
        return cls(heads=heads, proposal_pipeline=pipeline, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        training_data: dict | str | None = None,
        **kwargs,
    ) -> None:
        """Save in the layout that loads with `S2MPipeline.from_pretrained`, with
        `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`, with `diffusers-cli run` and from the Hub
        (see `s2m_diffusers.hub`), with a model card (README.md). Weights are safetensors.

        The folder is written next to its destination and moved into place entry by entry, `model_index.json` last,
        so that an interrupted save never leaves an index that points at missing files.

        Args:
            save_directory (`str`): the folder.
            safe_serialization (`bool`, defaults to `True`): must be `True` (weights are saved as safetensors only).
            variant (`str`, *optional*), max_shard_size (*optional*): as in `DiffusionPipeline.save_pretrained`.
            push_to_hub (`bool`, defaults to `False`): then upload the folder to ``repo_id`` (defaults to the
                folder's name) with a model card pinned to the uploaded commit; see [`push_to_hub`].
            training_data (`dict` or `str`, *optional*): a description of the heads' training data for the card.
            kwargs: ``repo_id``, ``token``, ``private``, ``commit_message``, ``create_pr``, ``api`` for the upload.
        """
        if not safe_serialization:
            raise ValueError("S2M pipelines are saved as safetensors only (no pickle): keep safe_serialization=True.")
        save_directory = os.path.abspath(os.fspath(save_directory))
        parent = os.path.dirname(save_directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save_directory)}.tmp-", dir=parent)
        try:
            super().save_pretrained(tmp, safe_serialization=True, variant=variant, max_shard_size=max_shard_size)
            hub.write_remote_code_layout(tmp, type(self).__module__, type(self).__name__)
            card = hub.model_card(self, training_data=training_data)
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
            _move_into_place(tmp, save_directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(save_directory))
            hub.upload_folder(
                save_directory,
                repo_id,
                card=lambda repo, revision: hub.model_card(self, repo, revision, training_data),
                **kwargs,
            )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        training_data: dict | str | None = None,
        api=None,
    ):
        """Upload the pipeline in the layout of [`save_pretrained`], with a model card whose loading snippets pin
        ``revision=`` to the uploaded commit (see `s2m_diffusers.hub.upload_folder`).

        Args:
            repo_id (`str`): ``"user/name"``.
            commit_message, private, token, create_pr: as in `huggingface_hub.HfApi.upload_folder`.
            safe_serialization (`bool`, defaults to `True`), variant (`str`, *optional*): as in [`save_pretrained`].
            training_data (`dict` or `str`, *optional*): a description of the heads' training data for the card.
            api (*optional*): an `huggingface_hub.HfApi` (or a stand-in with its ``create_repo``, ``upload_folder``,
                ``upload_file``); ``HfApi(token=token)`` by default.

        Returns:
            `CommitInfo` of the commit holding the code and weights; its ``oid`` is the revision the card pins.
        """
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "pipeline")
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return hub.upload_folder(
                folder,
                repo_id,
                card=lambda repo, revision: hub.model_card(self, repo, revision, training_data),
                api=api,
                token=token,
                private=private,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    # ----- the parts of a call ------------------------------------------------------------------------------------
    def _parse_target(self, target: str | Target | None) -> Target:
        names = list(self.heads.config.attribute_names)
        if target is None:
            target = self.config.default_target
        if target is None:
            raise ValueError(
                f"Name a target over the heads' attributes {names}, e.g. pipe('{names[0]} & ~{names[-1]}'); from "
                f'`diffusers-cli run`, pass --pipeline-kwargs \'{{"target": "{names[0]} & ~{names[-1]}"}}\'. '
                "A pipeline saved with `default_target=` uses that one."
            )
        if isinstance(target, Target):
            if list(target.attribute_names) != names:
                raise TargetError(
                    f"The target was parsed against attributes {list(target.attribute_names)}, but the heads know "
                    f"{names}. Pass the target as a string to parse it against the heads' attributes."
                )
            return target
        try:
            return parse_target(target, names)
        except TargetError as err:
            raise TargetError(
                f"{err} These are the attributes this pipeline's heads were trained on; to target another attribute, "
                "train heads on single-positive data that includes it."
            ) from err

    def _check_image_shape(self, shape: tuple[int, ...], proposal: ProposalAdapter) -> None:
        """The heads take the proposal's images as they are, or a downscaled copy when the images are larger."""
        hc = self.heads.config
        expected = (int(hc.in_channels), int(hc.sample_size), int(hc.sample_size))
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[0] != expected[0] or min(shape[1:]) < expected[1]:
            raise ValueError(
                f"The heads were trained for images of shape {expected} (in_channels={hc.in_channels}, "
                f"sample_size={hc.sample_size}), but the proposal ({type(proposal).__name__} of "
                f"{self.proposal_description()['class']}) produces images of shape {shape}. The heads can see a "
                "downscaled copy of larger images with the same channels, never a smaller one. Train heads on "
                f"the proposal's format (S2MHeads(sample_size={min(shape[1:])}, in_channels={shape[0]}) or smaller, "
                "with real images brought to it by `s2m_diffusers.data.prepare_images`), or use the proposal the "
                "heads were trained with."
            )

    def heads_view(self, images: torch.Tensor) -> torch.Tensor:
        """What the heads see of the proposal's images `(B, C, H, W)` in [-1, 1]: the images themselves at the heads'
        ``sample_size``, else a copy downscaled as real data is (`s2m_diffusers.data.prepare_images`: the shorter side
        resized with antialiased bilinear filtering, then a centre crop). `train_heads` downscales the proposal's
        images in the same way, so heads trained on small copies of a large generator's images can judge them."""
        hc = self.heads.config
        size, channels = int(hc.sample_size), int(hc.in_channels)
        if tuple(images.shape[1:]) == (channels, size, size):
            return images
        return prepare_images(images, size, channels)

    def _class_plan(self, target: Target, proposal: ProposalAdapter, class_label: int | str | None) -> _ClassPlan:
        names = tuple(self.heads.config.attribute_names)
        if not proposal.is_conditional:
            if class_label not in (None, "auto"):
                raise ValueError(
                    f"class_label={class_label!r} was given, but the proposal "
                    f"({self.proposal_description()['class']}) is unconditional. "
                    "Leave class_label='auto', or use a class-conditional generator."
                )
            return _ClassPlan()
        if proposal.num_classes != len(names):
            raise ValueError(
                f"The class-conditional proposal has {proposal.num_classes} classes, but the heads know "
                f"{len(names)} attributes {list(names)}. S2M's classes are the attributes: train the generator with "
                "one class per attribute (class i = attribute i), or use an unconditional proposal."
            )
        hc = self.heads.config
        probs = getattr(hc, "proposal_class_probs", None) or [1.0] * len(names)
        probs = torch.tensor(probs, dtype=torch.float64)
        log_probs = (probs / probs.sum()).log()
        has_df = bool(getattr(hc, "conditional", False))
        if class_label is None:
            return _ClassPlan("marginal", None, log_probs, names)
        if class_label == "auto":
            index = _first_present_attribute(target)
            if index is None or not has_df:
                return _ClassPlan("marginal", None, log_probs, names)
            return _ClassPlan("fixed", index, log_probs, names)
        if isinstance(class_label, str):
            if class_label not in names:
                raise ValueError(f"class_label={class_label!r} is not one of the attributes {list(names)}.")
            index = names.index(class_label)
        elif isinstance(class_label, int) and 0 <= class_label < len(names):
            index = int(class_label)
        else:
            raise ValueError(
                f"class_label must be 'auto', None, an attribute name or 0..{len(names) - 1}; got {class_label!r}."
            )
        if not has_df:
            raise ValueError(
                f"Generating every sample with class {names[index]!r} needs the D_f head to correct for it (spec §4), "
                "and these heads have none (conditional=False). Train heads with a class-conditional proposal "
                "(they then get D_f), or pass class_label=None to draw the class from p_G(c) with the latent."
            )
        return _ClassPlan("fixed", index, log_probs, names)

    def _evaluate_fn(
        self,
        target: Target,
        proposal: ProposalAdapter,
        plan: _ClassPlan,
        log_p_data: torch.Tensor,
        log_priors: torch.Tensor | None,
        negation_margin: float,
        presence_margin: float,
        dr_temperature: float,
        micro_batch_size: int,
        state: _CallState,
        on_round: Callable,
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``evaluate(z) -> (x, log_w)`` for one target (a refitting stage or the full target).

        Generator and heads run ``micro_batch_size`` latents at a time. Each micro-batch's images leave the execution
        device once the heads have seen them (to the CPU), so that it holds one micro-batch of generated images at a
        time; the images of the refitting stages, which only their latents and weights serve, are not kept at all
        (``x`` is then `None`) unless a callback asks for them.
        """
        heads = self.heads
        heads_device, heads_dtype = execution_device(heads), _module_device_dtype(heads)[1]

        def evaluate(z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            images, weights = [], []
            keep = state.keep_all_images or state.phase >= state.num_fit_stages
            for chunk in z.split(micro_batch_size):
                latents, labels = plan.split(chunk, proposal.latent_shape)
                t0 = time.perf_counter()
                x = proposal.generate(latents, labels)  # (b, C, H, W) in [-1, 1]
                _sync(x.device)
                t1 = time.perf_counter()
                state.seconds_generator += t1 - t0
                if not state.checked_shape:
                    self._check_image_shape(tuple(x.shape[1:]), proposal)
                    state.checked_shape = True
                out = heads(self.heads_view(x.to(heads_device)).to(dtype=heads_dtype))
                _sync(heads_device)
                state.seconds_heads += time.perf_counter() - t1
                dr = temper_dr(out.dr_log_probs.double(), dr_temperature)
                lr = log_r(target, dr, log_p_data, log_priors, negation_margin, presence_margin)
                if plan.mode == "fixed":
                    df = out.df_log_probs[:, plan.index].double()
                    lw = log_w(lr, out.dv_logit.double(), df, float(plan.log_probs[plan.index]))
                else:
                    lw = log_w(lr, out.dv_logit.double())
                if keep:
                    images.append(x.cpu())
                weights.append(lw)
            x, lw = (torch.cat(images) if keep else None), torch.cat(weights)
            on_round(z, x, lw)
            return x, lw

        return evaluate

    def _postprocess(self, images: torch.Tensor, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = (images.float().cpu() / 2 + 0.5).clamp(0, 1)  # (N, C, H, W) in [0, 1]
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        return array if output_type == "np" else self.numpy_to_pil(array)

    # ----- __call__ -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        target: str | Target | None = None,
        num_images: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        refit: str = "sequential",
        max_proposals: int | None = None,
        micro_batch_size: int = 64,
        num_chains: int | None = None,
        steps_after_entry: int | None = None,
        fit_size: int | None = None,
        negation_margin: float | None = None,
        presence_margin: float | None = None,
        dr_temperature: float | str | None = None,
        priors: Sequence[float] | None = None,
        class_label: int | str | None = "auto",
        num_inference_steps: int | None = None,
        allow_partial: bool = False,
        sampler_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        distributed: bool = False,
    ) -> S2MPipelineOutput | tuple:
        r"""Draw ``num_images`` images that satisfy ``target``.

        Args:
            target (`str`): a boolean formula over the heads' attributes: ``"a & ~b"``, ``"a & (b | c)"``, the
                paper's ``"a+b-c"``. Defaults to ``config.default_target``.
            num_images (`int`, defaults to 1): images to return.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the source of all randomness; the
                same seed gives the same images. A list of ``num_images`` generators makes image ``i`` a function of
                ``generator[i]`` alone, as in diffusers pipelines: each image is drawn by its own sampler run
                (refitting included) seeded by its generator, so ``pipe(t, 2, generator=[g0, g1]).images[1]`` equals
                ``pipe(t, 1, generator=[g1]).images[0]``. Each run refits on its own, so a list costs about
                ``num_images`` times the refitting proposals of one generator.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"`` (`(N, H, W, C)` in [0, 1]), ``"pt"``
                (`(N, C, H, W)` in [0, 1]) or ``"latent"`` (the latents).
            return_dict (`bool`, defaults to `True`): return an [`S2MPipelineOutput`]; otherwise the tuple
                ``(images, latents, on_target, stats)``.
            refit (`str`, defaults to `"sequential"`): latent refitting (spec §6). ``"sequential"`` fits the latent
                proposal to the target one literal at a time (``a``, then ``a & b``, ...); ``"once"`` fits it on the
                full target; ``"off"`` proposes from the prior ``N(0, I)``.
            max_proposals (`int`, *optional*): the proposal budget (generator calls, refitting included). Defaults to
                ``max(10000, 1000 * num_images + 20 * fit_size * stages)``. When it runs out first, a
                `BudgetExhaustedError` says how far the sampler got and what to try.
            micro_batch_size (`int`, defaults to 64): latents per generator call and images per heads call; the
                memory setting (the results do not depend on it).
            num_chains (`int`, *optional*): chains run side by side in the final stage (defaults to
                ``min(num_images, 256)``).
            steps_after_entry (`int`, *optional*): MH steps each chain takes after it first reaches the target;
                defaults to `sample_s2m`'s.
            fit_size (`int`, *optional*): on-target latents per refitting stage; defaults to `sample_s2m`'s.
            negation_margin (`float`, *optional*): lambda of negated literals; defaults to the heads' config.
            presence_margin (`float`, *optional*): ``kappa`` in [0, 1]: a required attribute counts only where its
                ratio comes within ``kappa`` of the image's strongest (`~s2m_diffusers.targets.log_r`). Exact heads
                are unchanged by it; soft heads stop counting faint attributes, which makes conjunctions such as
                ``"a & b & c"`` hold only where all three are clear. Defaults to 0 (the paper's formula).
            dr_temperature (`float` or `"auto"`, *optional*): read ``D_r`` tempered, ``softmax(log D_r / T)``
                (`~s2m_diffusers.targets.temper_dr`; exact heads are unchanged by it, soft heads are sharpened by
                ``T < 1``). ``None`` (default) uses the calibrated heads as they are; ``"auto"`` sharpens pure
                conjunctions of two or more attributes (``T = 0.2``) and leaves other targets at 1
                (`~s2m_diffusers.targets.auto_dr_temperature`). Every refitting stage uses the full target's value.
            priors (`Sequence[float]`, *optional*): attribute priors ``pi_c``; default the heads' (or ``p_data``).
            class_label (`int`, `str` or `None`, defaults to `"auto"`): for a class-conditional proposal, the class
                every sample is generated with (with the ``D_f`` correction). ``"auto"``: the first attribute the
                target requires at its top level (``"b & ~a"`` -> ``b``) when the heads have ``D_f``; otherwise (no
                required attribute, e.g. ``"a | b"`` or ``"~a"``, or no ``D_f``) the class is drawn from ``p_G(c)``
                by one extra latent coordinate, which needs no ``D_f``. ``None`` always draws the class.
            num_inference_steps (`int`, *optional*): steps of a diffusion proposal; defaults to the config's.
            allow_partial (`bool`, defaults to `False`): when the budget runs out, return the images found (with
                ``stats["budget_exhausted"] = True``) instead of raising.
            sampler_kwargs (`dict`, *optional*): more arguments of `s2m_diffusers.sampling.sample_s2m`, e.g. (``rank``,
                ``n_components``, ``defensive``, ``fit_batch``).
            callback_on_step_end (`Callable`, *optional*): called once per sampler round (one batch of proposals
                through generator and heads) as ``callback_on_step_end(pipeline, round, phase, callback_kwargs)``:
                ``phase`` is ``k`` during the ``k``-th refitting stage (from 0) and the number of refitting stages
                during the final sampling; ``callback_kwargs`` holds the tensors named in
                ``callback_on_step_end_tensor_inputs`` for that round's proposals, plus ``"num_on_target"``. Its
                return value is ignored (the sampler's state cannot be changed from outside).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): any of ``"latents"``, ``"images"``,
                ``"log_w"``; defaults to ``["latents"]``. ``"images"`` (on the CPU) makes the refitting stages keep
                their images, which they otherwise drop.
            distributed (`bool`, defaults to `False`): spread the images over the processes started by
                ``accelerate launch`` (or ``torchrun``; see `s2m_diffusers.distributed`). Every process must make
                the same call. The images are split in contiguous blocks (`split_between_processes` on the image
                indices); each process samples its block with its own sampler run(s), refitting included, on its own
                device, and the results are gathered in image order: **every process returns the whole output**
                (write files from the main process only). ``stats`` then sums counts and seconds over the processes
                (``proposals`` is the total over all of them; ``seconds_wall`` is the longest process's time;
                ``num_processes``), and ``max_proposals`` is split in proportion to each process's images. Seeds: with
                a list of generators image ``i`` depends on ``generator[i]`` alone, so the images are the same for
                any number of processes; with one generator each process derives its own from it and its index
                (`s2m_diffusers.distributed.process_generator`), so the images are reproducible for a given number of
                processes but change with it (one process: the plain call's images). When one process exhausts its
                budget the others finish theirs, and then every process raises `BudgetExhaustedError` (or, with
                ``allow_partial``, returns what all found).

        Memory: the generator and the heads run ``micro_batch_size`` latents at a time, and each micro-batch's images
        leave the execution device for the CPU once the heads have seen them, so that device memory holds one
        micro-batch of generated images. The CPU holds the images of the chains in flight (at most ``num_chains``,
        by default ``min(num_images, 256)``) and those returned; refitting stages keep no images. Heads trained on
        smaller images than the proposal makes (same channels) see a downscaled copy (`S2MPipeline.heads_view`: the
        antialiased resize and centre crop of `s2m_diffusers.data.prepare_images`, as `train_heads` applies to the
        proposal's images). For a large proposal, `enable_model_cpu_offload()` keeps only the model that runs on the
        accelerator.

        Returns:
            [`S2MPipelineOutput`] or `tuple`. ``stats`` holds: ``target``, ``refit``, ``num_images`` (returned),
            ``proposals`` (generator calls), ``accepted``, ``acceptance_rate``, ``proposals_per_image``
            (``proposals / num_images``), ``on_target_images``, ``unique_images``, ``chains_started``,
            ``chains_entered``, ``rounds``, ``stages`` (per refitting stage: proposals, on-target share, ESS),
            ``budget_exhausted``, ``max_proposals``, ``class_label``, ``proposal``, and ``seconds_generator``,
            ``seconds_heads``, ``seconds_sampler`` (the rest: sampling, refitting, bookkeeping), ``seconds_total``
            (their sum), ``num_processes`` and ``seconds_wall`` (see ``distributed``).

        Raises:
            TargetError: the target names an attribute the heads do not know, or is malformed.
            ValueError: the heads expect another image size or channel count than the proposal produces; heads or
                proposal missing; an invalid argument.
            BudgetExhaustedError: the budget ran out before ``num_images`` on-target images (unless
                ``allow_partial``); ``err.result`` holds what was found.

        Examples:
        """
        _check_components(self.heads, self.gan, self.unet, self.scheduler, self.proposal_pipeline)
        target = self._parse_target(target)
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        if refit not in REFIT_MODES:
            raise ValueError(
                f"refit must be one of {list(REFIT_MODES)}, got {refit!r}: 'sequential' refits one literal of the "
                "target at a time (the default), 'once' on the full target, 'off' samples from the prior."
            )
        generators = _generator_list(generator, num_images)
        per_image_generators = isinstance(generator, (list, tuple))
        dist_state, share = None, range(num_images)
        if distributed:
            from . import distributed as dist

            dist_state = dist.get_state()
            share = dist.image_share(num_images, dist_state)
        tensor_inputs = list(
            callback_on_step_end_tensor_inputs or getattr(callback_on_step_end, "tensor_inputs", None) or ["latents"]
        )
        unknown = sorted(set(tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}."
            )

        hc = self.heads.config
        names = list(hc.attribute_names)
        counts = getattr(hc, "label_counts", None) or [1] * len(names)
        counts = torch.tensor(counts, dtype=torch.float64)
        log_p_data = (counts / counts.sum()).log()
        priors = priors if priors is not None else getattr(hc, "priors", None)
        if priors is not None and len(priors) != len(names):
            raise ValueError(f"priors has {len(priors)} entries, but the heads know {len(names)} attributes {names}.")
        log_priors = None if priors is None else torch.tensor(priors, dtype=torch.float64).log()
        margin = float(negation_margin if negation_margin is not None else getattr(hc, "negation_margin", 1.0))
        presence = 0.0 if presence_margin is None else float(presence_margin)
        if not 0.0 <= presence <= 1.0:
            raise ValueError(f"presence_margin must lie in [0, 1] (0 is the paper's formula), got {presence}.")
        if dr_temperature is None:
            temperature = 1.0
        elif dr_temperature == "auto":
            temperature = auto_dr_temperature(target)
        elif isinstance(dr_temperature, int | float) and not isinstance(dr_temperature, bool) and dr_temperature > 0:
            temperature = float(dr_temperature)
        else:
            raise ValueError(
                f"dr_temperature must be None, 'auto' or a positive number, got {dr_temperature!r}; 1.0 (or None) "
                "reads the calibrated heads as they are."
            )

        proposal = self.get_proposal(micro_batch_size, num_inference_steps)
        if proposal.image_shape is not None:
            self._check_image_shape(proposal.image_shape, proposal)
        if isinstance(proposal, PipelineProposal) and id(self.proposal_pipeline) not in self._deterministic_checked:
            proposal.check_deterministic()
            self._deterministic_checked.add(id(self.proposal_pipeline))
        plan = self._class_plan(target, proposal, class_label)
        stages = target.stages()
        n_fit = {"off": 0, "once": 1, "sequential": len(stages)}[refit]
        settings = {"steps_after_entry": steps_after_entry, "fit_size": fit_size, **(sampler_kwargs or {})}
        settings = {k: v for k, v in settings.items() if v is not None}
        fit_size = settings.get("fit_size", _SAMPLER_DEFAULTS["fit_size"])
        if max_proposals is not None and (not isinstance(max_proposals, int) or max_proposals < 1):
            raise ValueError(f"max_proposals must be a positive integer, got {max_proposals!r}.")
        if max_proposals is None:
            budget = max(10_000, 1_000 * len(share) + 20 * fit_size * n_fit)
        elif dist_state is None:
            budget = max_proposals
        else:  # this process's part of the budget, in proportion to its images
            budget = (max_proposals * share.stop) // num_images - (max_proposals * share.start) // num_images

        # One sampler run per generator: one run for all of this process's images, or one per image.
        if per_image_generators:
            run_generators, run_size = [generators[i] for i in share], 1
        else:
            gen = generators[0] if dist_state is None else dist.process_generator(generators[0], dist_state)
            run_generators, run_size = ([gen] if len(share) else []), len(share)
        if num_chains is None:
            num_chains = min(run_size, DEFAULT_MAX_CHAINS) if run_size else None
        # Several processes must not raise while others wait for them: each keeps what it found, and the gathered
        # result is checked against the budget below.
        keep_partial = allow_partial or dist_state is not None

        state = _CallState(num_fit_stages=n_fit, keep_all_images="images" in tensor_inputs)
        prior = StandardNormal(plan.latent_shape(proposal.latent_shape))

        def on_round(z: torch.Tensor, x: torch.Tensor | None, lw: torch.Tensor) -> None:
            if callback_on_step_end is not None:
                tensors = {"latents": z, "images": x, "log_w": lw}
                kwargs = {k: tensors[k] for k in tensor_inputs}
                kwargs["num_on_target"] = int(torch.isfinite(lw).sum())
                callback_on_step_end(self, state.round, state.phase, kwargs)
            state.round += 1

        evaluates = [
            self._evaluate_fn(
                stage,
                proposal,
                plan,
                log_p_data,
                log_priors,
                margin,
                presence,
                temperature,
                micro_batch_size,
                state,
                on_round,
            )
            for stage in stages
        ]
        results: list[SampleResult] = []
        show_bar = dist_state is None or dist_state.is_main_process
        bar_context = self.progress_bar(total=len(share)) if show_bar else _SilentBar(len(share))
        start = time.perf_counter()
        with bar_context as bar, eval_mode(self.heads):
            for i, gen in enumerate(run_generators):
                state.phase = 0

                def sampler_callback(round_: int, info: dict, offset: int = i) -> None:
                    if "stage" in info:
                        state.phase += 1
                        bar.set_postfix(
                            stage=f"{info['stage'] + 1}/{n_fit}", on_target=f"{info['on_target_share']:.3g}"
                        )
                    else:
                        bar.n = offset + info["done"]
                        bar.refresh()

                remaining = budget - sum(r.stats.proposals for r in results)
                if remaining < 1:  # an earlier image's run spent the budget
                    if not keep_partial:
                        raise self._budget_error(target, refit, num_images, budget, results, plan)
                    if results:
                        results[-1].stats.budget_exhausted = True
                    else:
                        results.append(_empty_result(prior))
                    break
                try:
                    result = sample_s2m(
                        evaluates,
                        prior,
                        run_size,
                        refit=refit,
                        num_chains=num_chains,
                        max_proposals=remaining,
                        generator=gen,
                        allow_partial=keep_partial,
                        callback=sampler_callback,
                        **settings,
                    )
                except BudgetExhaustedError as err:
                    results.append(err.result)
                    raise self._budget_error(target, refit, num_images, budget, results, plan) from err
                results.append(result)
                if result.stats.budget_exhausted:
                    break
        seconds_total = time.perf_counter() - start

        z, x, log_weights, on_target = self._gather(results, proposal, plan)
        stats = self._stats(target, refit, budget, results, on_target, z, state, seconds_total, plan)
        if dist_state is not None and dist_state.num_processes > 1:
            z, x = dist.gather_rows(z, dist_state), dist.gather_rows(x, dist_state)
            log_weights, on_target = dist.gather_rows(log_weights, dist_state), dist.gather_rows(on_target, dist_state)
            stats = _merge_process_stats(dist.gather_objects(stats, dist_state), z, on_target)
        if stats["budget_exhausted"] and not allow_partial:
            s = SamplerStats(
                proposals=stats["proposals"],
                accepted=stats["accepted"],
                chains_started=stats["chains_started"],
                chains_entered=stats["chains_entered"],
                stages=stats["stages"],
                budget_exhausted=True,
            )
            partial = SampleResult(z, x, log_weights, on_target, s)
            raise self._budget_error_from(target, refit, num_images, stats["max_proposals"], s, partial, plan)
        labels = None if plan.mode == "none" else plan.split(z, proposal.latent_shape)[1] if z.shape[0] else None
        images = self._postprocess(x, z, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, z, on_target, stats
        return S2MPipelineOutput(images=images, latents=z, on_target=on_target, stats=stats, class_labels=labels)

    # ----- results ------------------------------------------------------------------------------------------------
    def _gather(
        self, results: list[SampleResult], proposal: ProposalAdapter, plan: _ClassPlan
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The runs' latents, images, log weights and on-target flags, concatenated on the CPU."""
        found = [r for r in results if r.x is not None and r.z.shape[0]]
        if not found:
            hc = self.heads.config
            shape = plan.latent_shape(proposal.latent_shape)
            image_shape = proposal.image_shape or (int(hc.in_channels), int(hc.sample_size), int(hc.sample_size))
            return (
                torch.zeros((0, *shape)),
                torch.zeros((0, *image_shape)),
                torch.zeros(0, dtype=torch.float64),
                torch.zeros(0, dtype=torch.bool),
            )
        return (
            torch.cat([r.z.cpu() for r in found]),
            torch.cat([r.x.cpu() for r in found]),
            torch.cat([r.log_w.cpu() for r in found]),
            torch.cat([r.on_target.cpu() for r in found]),
        )

    def _stats(
        self,
        target: Target,
        refit: str,
        budget: int,
        results: list[SampleResult],
        on_target: torch.Tensor,
        z: torch.Tensor,
        state: _CallState,
        seconds_total: float,
        plan: _ClassPlan,
    ) -> dict:
        s = SamplerStats()
        stages = []
        for run, r in enumerate(results):
            s.add(r.stats)
            s.chains_started += r.stats.chains_started
            s.chains_entered += r.stats.chains_entered
            s.budget_exhausted |= r.stats.budget_exhausted
            stages += [{**stage, "run": run} if len(results) > 1 else dict(stage) for stage in r.stats.stages]
        n = int(z.shape[0])
        seconds_sampler = max(0.0, seconds_total - state.seconds_generator - state.seconds_heads)
        return {
            "target": str(target),
            "refit": refit,
            "num_images": n,
            "proposals": s.proposals,
            "accepted": s.accepted,
            "acceptance_rate": s.acceptance_rate,
            "proposals_per_image": s.proposals / n if n else math.inf,
            "on_target_images": int(on_target.sum()),
            "unique_images": int(torch.unique(z.reshape(n, -1), dim=0).shape[0]) if n else 0,
            "chains_started": s.chains_started,
            "chains_entered": s.chains_entered,
            "rounds": state.round,  # every batch of proposals, refitting stages included
            "stages": stages,
            "budget_exhausted": s.budget_exhausted,
            "max_proposals": budget,
            "class_label": plan.describe(),
            "proposal": self.proposal_kind,
            "seconds_generator": state.seconds_generator,
            "seconds_heads": state.seconds_heads,
            "seconds_sampler": seconds_sampler,
            "seconds_total": state.seconds_generator + state.seconds_heads + seconds_sampler,
            "num_processes": 1,
            "seconds_wall": seconds_total,
        }

    def _budget_error(
        self,
        target: Target,
        refit: str,
        num_images: int,
        budget: int,
        results: list[SampleResult],
        plan: _ClassPlan,
    ) -> BudgetExhaustedError:
        s = SamplerStats()
        for r in results:
            s.add(r.stats)
            s.chains_started += r.stats.chains_started
            s.chains_entered += r.stats.chains_entered
            s.stages += r.stats.stages
        found = [r for r in results if r.x is not None and r.z.shape[0]]
        if found:  # every image found so far, over all runs
            partial = SampleResult(
                torch.cat([r.z.cpu() for r in found]),
                torch.cat([r.x.cpu() for r in found]),
                torch.cat([r.log_w.cpu() for r in found]),
                torch.cat([r.on_target.cpu() for r in found]),
                s,
                found[-1].proposal,
            )
        else:
            partial = SampleResult(torch.zeros(0), None, torch.zeros(0), torch.zeros(0, dtype=torch.bool), s)
        return self._budget_error_from(target, refit, num_images, budget, s, partial, plan)

    def _budget_error_from(
        self,
        target: Target,
        refit: str,
        num_images: int,
        budget: int,
        s: SamplerStats,
        partial: SampleResult,
        plan: _ClassPlan,
    ) -> BudgetExhaustedError:
        n_found = int(partial.z.shape[0]) if partial.x is not None else 0
        s.num_returned = n_found
        shares = [f"{st.get('on_target', 0)} of {st.get('proposals', 0)}" for st in s.stages]
        tries = []
        if refit != "sequential":
            tries.append(f"refit='sequential' (this call used refit={refit!r}): each stage then adds one literal")
        tries.append(f"a larger budget, e.g. max_proposals={4 * budget}")
        if plan.mode != "fixed":
            tries.append(
                "a class-conditional proposal (a generator conditioned on one of the target's attributes, with heads "
                "trained with D_f)"
            )
        tries.append(f"allow_partial=True to keep the {n_found} image(s) found")
        stage_text = f"; on-target proposals per refitting stage: {', '.join(shares)}" if shares else ""
        message = (
            f"The proposal budget of {budget} ran out after {s.proposals} proposals with {n_found} of {num_images} "
            f"on-target images for target {str(target)!r} (acceptance rate {s.acceptance_rate:.3g}; "
            f"{s.chains_entered} of {s.chains_started} chains reached the target{stage_text}). Try "
            + "; ".join(tries)
            + ". If no proposal ever reaches the target, check that the generator can produce this combination and "
            "that the heads recognise it."
        )
        return BudgetExhaustedError(message, partial)


# ------------------------------------------------------------------------------------------------------------------
# Helpers


def _empty_result(prior: StandardNormal) -> SampleResult:
    """No image and no proposal: a process whose part of the budget was empty."""
    stats = SamplerStats(budget_exhausted=True)
    return SampleResult(prior.sample(0), None, torch.zeros(0), torch.zeros(0, dtype=torch.bool), stats)


class _SilentBar(contextlib.nullcontext):
    """A progress bar that shows nothing (processes other than the main one)."""

    def __init__(self, total: int):
        super().__init__(self)
        self.total, self.n = total, 0

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def refresh(self) -> None:
        pass


def _merge_process_stats(per_process: list[dict], z: torch.Tensor, on_target: torch.Tensor) -> dict:
    """The statistics of a distributed call: counts and seconds summed over the processes, rates recomputed,
    ``seconds_wall`` the longest process's time, ``stages`` every process's refitting stages (with ``"process"``)."""
    out = dict(per_process[0])
    for key in _SUMMED_STATS:
        out[key] = sum(p[key] for p in per_process)
    n = int(z.shape[0])
    out.update(
        num_images=n,
        acceptance_rate=out["accepted"] / out["proposals"] if out["proposals"] else 0.0,
        proposals_per_image=out["proposals"] / n if n else math.inf,
        on_target_images=int(on_target.sum()),
        unique_images=int(torch.unique(z.reshape(n, -1), dim=0).shape[0]) if n else 0,
        budget_exhausted=any(p["budget_exhausted"] for p in per_process),
        stages=[{**stage, "process": i} for i, p in enumerate(per_process) for stage in p["stages"]],
        num_processes=len(per_process),
        seconds_wall=max(p["seconds_wall"] for p in per_process),
    )
    return out


def _check_components(heads, gan, unet, scheduler, proposal_pipeline, need_heads: bool = True) -> None:
    if need_heads and heads is None:
        raise ValueError(
            "S2MPipeline needs `heads`: S2MHeads trained for this proposal. Load them with "
            "`S2MHeads.from_pretrained(DIR)` and pass `heads=...`, or train them with "
            "`s2m_diffusers.training.train_heads` (`s2m train-heads` on the command line)."
        )
    given = [
        name for name, c in (("gan", gan), ("unet", unet), ("proposal_pipeline", proposal_pipeline)) if c is not None
    ]
    if not given:
        raise ValueError(
            "S2MPipeline needs a proposal: `gan=` (a GAN generator such as DCGANGenerator), `unet=` with "
            "`scheduler=` (a diffusion model, run as DDIM), or `proposal_pipeline=` (any diffusers pipeline that "
            "accepts `latents=`). To wrap a loaded pipeline: `S2MPipeline.from_pipe(pipe, heads=heads)`."
        )
    if len(given) > 1:
        raise ValueError(f"S2MPipeline takes exactly one proposal, got {given}. Keep one of them.")
    if unet is not None and scheduler is None:
        raise ValueError("`unet=` needs the `scheduler=` it was trained with (any diffusers noise scheduler).")
    if scheduler is not None and unet is None:
        raise ValueError("`scheduler=` belongs to a `unet=` proposal; a `gan` or `proposal_pipeline` takes none.")


def _first_present_attribute(target: Target) -> int | None:
    """The first attribute the target requires at its top level, in the order written (`target.stages()[0]`)."""
    expression = target.expression
    children = expression.children if isinstance(expression, And) else (expression,)
    for child in children:
        if isinstance(child, Attr):
            return child.index
    return None


def _generator_list(generator, num_images: int) -> list[torch.Generator | None]:
    if isinstance(generator, (list, tuple)):
        if len(generator) != num_images:
            raise ValueError(
                f"You passed a list of {len(generator)} generators but requested {num_images} images. Pass one "
                "generator per image (image i is then a function of generator[i] alone), or a single generator."
            )
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError("Every entry of the generator list must be a torch.Generator.")
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}.")
    return [generator]


def _move_into_place(source: str, destination: str) -> None:
    """Move a freshly written folder to ``destination``: by one rename when it is new or empty, else entry by entry
    (replacing entries of the same name, leaving others), with `model_index.json` last."""
    if not os.path.exists(destination) or (os.path.isdir(destination) and not os.listdir(destination)):
        if os.path.isdir(destination):
            os.rmdir(destination)
        os.replace(source, destination)
        return
    if not os.path.isdir(destination):
        raise ValueError(f"save_directory {destination!r} exists and is not a folder.")
    entries = sorted(os.listdir(source), key=lambda name: name == "model_index.json")
    for name in entries:
        src, dst = os.path.join(source, name), os.path.join(destination, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=destination)
            os.replace(dst, os.path.join(old, name))
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
