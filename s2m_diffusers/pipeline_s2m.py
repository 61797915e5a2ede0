"""`S2MPipeline`: any diffusers diffusion model or GAN as the proposal, the S2M heads, and the sampler (spec §4-6).

The pipeline only composes; each step is one hop away:

    check inputs   target text -> `targets.parse_target` -> `Target`; settings -> `sampling.S2MSamplingConfig`
    proposal       the generator's adapter (`proposals`), and the class plan of a class-conditional one
    weights        `_Weigher`: latents z --(adapter)--> images x in [-1, 1] --(heads)--> D_v, D_r, D_f
                   --(`maths.log_weight`)--> log w, one callable per refitting stage (`Target.stages`)
    sample         `sampling.sample_s2m` (refitting stages, then independent MH with `maths.imh_accept`)
    postprocess    images as PIL / numpy / torch, statistics

The sampler sees only ``evaluate(z) -> (x, log_w)`` callables and a latent density; it never sees a model.
Saving, loading and sharing are in `hub`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin, UNet2DModel
from diffusers.utils import BaseOutput, replace_example_docstring

from . import hub, maths
from .callbacks import _Interrupted, _ProgressCallback, _SilentBar, _StepEndCallback
from .data import prepare_images
from .densities import StandardNormal
from .distributed import RunPlan
from .memory import check_call_memory
from .models.heads import S2MHeads
from .proposals import (
    ClassPlan,
    PipelineProposal,
    ProposalAdapter,
    check_components,
    check_screen_heads,
    describe_proposal,
    eval_mode,
    make_proposal,
)
from .sampling import (
    BudgetExhaustedError,
    LatentFit,
    S2MSamplingConfig,
    SampleResult,
    SamplerStats,
    budget_error,
    fit_latent,
    load_fits,
    sample_s2m,
    save_fits,
)
from .targets import Target, TargetError, parse_target
from .weights import Weigher

__all__ = ["S2MPipeline", "S2MPipelineOutput"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Chains run side by side when a call does not set `num_chains`: at most this many, so that the images kept for the
# chains' states stay bounded however many images are asked for ("Memory" in `S2MPipeline.__call__`).
DEFAULT_MAX_CHAINS = 256
# The settings a fitted latent density depends on (the rest only change how it is sampled from).
# "auto" dv_strength: p_z draws of the full target, in batches, until this many are on it or this many are drawn.
_DV_PILOT_BATCH, _DV_PILOT_ON_TARGET, _DV_PILOT_MAX = 256, 128, 2048
_FIT_SETTINGS = (
    "dv_strength",
    "negation_margin",
    "presence_margin",
    "dr_temperature",
    "priors",
    "class_label",
    "refit",
    "fit_size",
    "fit_batch",
    "rank",
    "n_components",
    "defensive",
    "covariance_scale",
    "fit_families",
    "pilot_size",
    "fit_seed",
)
# A diffusion proposal's fit screens its draws and weighs its candidates by the screened cost: these key it too.
_SCREENED_FIT_SETTINGS = ("screen", "screen_min_finish")

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
        screen_heads ([`~s2m_diffusers.models.heads.S2MHeads`], *optional*): heads distilled to read ``unet``'s
            predicted clean images part-way through the denoising (`s2m_diffusers.screen_heads.distil_screen_heads`),
            which the screen (``screen="auto"``) reads instead of ``heads`` at the timesteps they were trained on.

    Large generators: a call runs the generator and the heads ``micro_batch_size`` images at a time, keeps only one
    micro-batch of generated images on the execution device, and lets heads trained on smaller images see a
    downscaled copy (see "Memory" in [`~S2MPipeline.__call__`]). `enable_model_cpu_offload()` keeps every model on the
    CPU and moves each one to the accelerator only while it runs (``model_cpu_offload_seq``; a wrapped
    ``proposal_pipeline`` gets its own offloading). Several processes: ``pipe(..., distributed=True)`` under
    ``accelerate launch`` (see `s2m_diffusers.distributed`).
    """

    # diffusers' `enable_model_cpu_offload` order: the generator, then the heads. `proposal_pipeline` is a pipeline,
    # not a module: diffusers skips it here, and `enable_model_cpu_offload` below offloads its own models.
    model_cpu_offload_seq = "proposal_pipeline->unet->screen_heads->gan->heads"
    _optional_components = ["heads", "gan", "unet", "scheduler", "proposal_pipeline", "screen_heads"]
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
        screen_heads: S2MHeads | None = None,
    ):
        super().__init__()
        check_components(heads, gan, unet, scheduler, proposal_pipeline)
        check_screen_heads(screen_heads, heads, unet)
        self.register_modules(
            heads=heads,
            gan=gan,
            unet=unet,
            scheduler=scheduler,
            proposal_pipeline=proposal_pipeline,
            screen_heads=screen_heads,
        )
        self.register_to_config(
            proposal_kwargs=dict(proposal_kwargs) if proposal_kwargs else None,
            latent_shape=None if latent_shape is None else [int(s) for s in latent_shape],
            num_inference_steps=int(num_inference_steps),
            default_target=default_target,
        )
        self._deterministic_checked: set[int] = set()
        self._screen_checks: dict[int, dict] = {}  # a wrapped pipeline's `check_screen`, by pipeline and setting

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
        """The proposal adapter of this pipeline's generator (`s2m_diffusers.proposals.make_proposal`). Its
        ``proposal(n, generator)`` is also the callable that training ``D_v`` needs (`training.train_heads`).

        Args:
            micro_batch_size (`int`, defaults to 64): latents per generator call.
            num_inference_steps (`int`, *optional*): overrides ``config.num_inference_steps``.
        """
        return make_proposal(self.components, self.config, micro_batch_size, num_inference_steps)

    def proposal_description(self) -> dict:
        """A summary of the proposal for the model card and the statistics."""
        return describe_proposal(self.components, self.config)

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

    # ----- saving, loading, sharing: `hub` ------------------------------------------------------------------------
    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `ConfigMixin.load_config`, reading the shims of the remote-code layout back to the installed modules
        (parsed, never executed), so that `S2MPipeline.from_pretrained` needs no ``trust_remote_code``."""
        out = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        return hub.resolve_local_config(out, pretrained_model_name_or_path)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> S2MPipeline:
        """Load a saved S2M pipeline from a folder or a Hub repo, without remote code.

        A Hub repo is fetched with `huggingface_hub.snapshot_download` (``revision``, ``cache_dir``, ``token``,
        ``local_files_only`` and ``proxies`` are passed on); the classes come from the installed `s2m_diffusers`.
        Other arguments are those of `DiffusionPipeline.from_pretrained`.
        """
        path = hub.snapshot_path(pretrained_model_name_or_path, kwargs)
        pipe = super().from_pretrained(path, **kwargs)
        pipe._fits = load_fits(os.path.join(path, "fits"))
        strengths = os.path.join(path, "fits", "dv_strength.json")
        if os.path.isfile(strengths):
            with open(strengths, encoding="utf-8") as f:
                pipe._auto_dv_strengths = {str(k): float(v) for k, v in json.load(f).items()}
        return pipe

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
            if heads is not None:
                components["heads"] = heads
            for key in [k for k in kwargs if k in components]:
                components[key] = kwargs.pop(key)
            return cls(**components, **{**pipeline.parameters, **kwargs})
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
        `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`, with `diffusers-cli run` and from the Hub,
        with a model card (README.md); weights are safetensors. See `s2m_diffusers.hub.save_pipeline`.

        Args:
            save_directory (`str`): the folder.
            safe_serialization (`bool`, defaults to `True`): weights are saved as safetensors only; `False` warns and
                saves safetensors anyway (loading refuses pickle).
            variant (`str`, *optional*), max_shard_size (*optional*): as in `DiffusionPipeline.save_pretrained`.
            push_to_hub (`bool`, defaults to `False`): then upload the folder to ``repo_id`` (defaults to the
                folder's name) with a model card pinned to the uploaded commit; see [`push_to_hub`].
            training_data (`dict` or `str`, *optional*): a description of the heads' training data for the card.
            kwargs: ``license``, ``base_model`` and ``sampling`` (the call settings its snippets show) for the card
                (see `s2m_diffusers.hub.model_card`); ``repo_id``, ``token``, ``private``, ``commit_message``,
                ``create_pr``, ``api`` for the upload.
        """
        card = {k: kwargs.pop(k) for k in ("license", "base_model", "sampling") if k in kwargs}
        folder = hub.save_pipeline(
            self,
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            training_data=training_data,
            **card,
        )
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(folder))
            hub.push_pipeline(self, repo_id, folder=folder, training_data=training_data, **card, **kwargs)

    def push_to_hub(self, repo_id: str, training_data: dict | str | None = None, **kwargs):
        """Upload the pipeline in the layout of [`save_pretrained`], with a model card whose loading snippets pin
        ``revision=`` to the uploaded commit (see `s2m_diffusers.hub.push_pipeline`).

        Args:
            repo_id (`str`): ``"user/name"``.
            training_data (`dict` or `str`, *optional*): a description of the heads' training data for the card.
            kwargs: ``commit_message``, ``private``, ``token``, ``create_pr`` (as in `huggingface_hub.HfApi`),
                ``license``, ``base_model``, ``sampling`` (the card, as in [`save_pretrained`]),
                ``safe_serialization``, ``variant`` (as in [`save_pretrained`]) and ``api`` (an `HfApi` or a
                stand-in).

        Returns:
            `CommitInfo` of the commit holding the code and weights; its ``oid`` is the revision the card pins.
        """
        return hub.push_pipeline(self, repo_id, training_data=training_data, **kwargs)

    # ----- checking inputs ----------------------------------------------------------------------------------------
    def parse_target(self, target: str | Target | None) -> Target:
        """``target`` (or ``config.default_target``) parsed against the heads' attributes."""
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
            if getattr(err, "unknown_attribute", None) is None:
                raise
            raise TargetError(
                f"{err} These are the attributes this pipeline's heads were trained on; to target another attribute, "
                "train heads on single-positive data that includes it.",
                unknown_attribute=err.unknown_attribute,
            ) from err

    def check_inputs(self, num_images, output_type, tensor_inputs) -> None:
        check_components(self.heads, self.gan, self.unet, self.scheduler, self.proposal_pipeline)
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        unknown = sorted(set(tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}."
            )

    def check_image_shape(self, shape: tuple[int, ...], proposal: ProposalAdapter) -> None:
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
        resized with antialiased bilinear filtering, then a centre crop), as `train_heads` does."""
        hc = self.heads.config
        size, channels = int(hc.sample_size), int(hc.in_channels)
        if tuple(images.shape[1:]) == (channels, size, size):
            return images
        return prepare_images(images, size, channels)

    def _prepare(self, target, config, micro_batch_size, num_inference_steps, callback, tensor_inputs):
        """The proposal adapter, its class plan, the settings with ``dv_strength`` resolved, the weigher of one call or
        fit, and the cost record of measuring ``dv_strength`` when ``"auto"`` measured it now (else `None`)."""
        proposal = self._prepare_proposal(micro_batch_size, num_inference_steps)
        config = self.heads_reading(config)
        name = self.proposal_description()["class"]
        plan = ClassPlan.choose(target, proposal, self.heads.config, config.class_label, name)
        num_fit_stages = config.num_fit_stages(len(target.stages()))
        args = (micro_batch_size, num_fit_stages, callback, tensor_inputs)
        measured = None
        if config.dv_strength == "auto":  # measure beta with the weights of beta = 1, then weigh with it
            pilot = Weigher(self, target, proposal, plan, config.replace(dv_strength=1.0), *args)
            beta, measured = self._auto_dv_strength(target, config, pilot, num_inference_steps)
            config = config.replace(dv_strength=beta)
        weigher = Weigher(self, target, proposal, plan, config, *args)
        return proposal, plan, config, weigher, measured

    def heads_reading(self, config: S2MSamplingConfig) -> S2MSamplingConfig:
        """``config`` with the settings it leaves to the heads filled in from their config (chosen from data when they
        were trained, `s2m_diffusers.training.choose_sampling_settings`): ``negation_margin``, ``presence_margin``
        (else 0) and ``dv_strength`` (else 1, the paper's target)."""
        stored = {
            "negation_margin": getattr(self.heads.config, "negation_margin", None) or maths.DEFAULT_NEGATION_MARGIN,
            "presence_margin": getattr(self.heads.config, "presence_margin", None) or 0.0,
            "dv_strength": getattr(self.heads.config, "dv_strength", None),
        }
        stored["dv_strength"] = 1.0 if stored["dv_strength"] is None else stored["dv_strength"]
        return config.replace(**{k: float(v) for k, v in stored.items() if getattr(config, k) is None})

    def _auto_dv_strength(self, target, config, weigher: Weigher, steps: int | None) -> tuple[float, dict | None]:
        """``dv_strength="auto"``: `maths.dv_strength` of the target's weights over up to 2,048 generated samples
        (until 128 are on the target), measured once per target and settings. Returns beta and, when it was measured
        now, the record of that measurement (its proposals count in the call)."""
        key = self._fit_key(target, config, weigher.plan, steps)
        measured = None
        if key not in self.auto_dv_strengths:
            p_z = StandardNormal(weigher.plan.latent_shape(weigher.proposal.latent_shape))
            generator, rests, dvs, drawn = torch.Generator().manual_seed(config.fit_seed), [], [], 0
            with eval_mode(self.heads):
                while drawn < _DV_PILOT_MAX and sum(int(torch.isfinite(r).sum()) for r in rests) < _DV_PILOT_ON_TARGET:
                    rest, dv = weigher.log_rest_and_dv(target, p_z.sample(_DV_PILOT_BATCH, generator))
                    rests.append(rest)
                    dvs.append(dv)
                    drawn += _DV_PILOT_BATCH
            self.auto_dv_strengths[key] = maths.dv_strength(torch.cat(dvs), torch.cat(rests))
            measured = {"dv_strength": self.auto_dv_strengths[key], "proposals": drawn}
        return self.auto_dv_strengths[key], measured

    @property
    def auto_dv_strengths(self) -> dict[str, float]:
        """The ``dv_strength`` that ``"auto"`` measured, by proposal setting (saved with the fits)."""
        if not hasattr(self, "_auto_dv_strengths"):
            self._auto_dv_strengths = {}
        return self._auto_dv_strengths

    def _prepare_proposal(self, micro_batch_size: int, num_inference_steps: int | None) -> ProposalAdapter:
        proposal = self.get_proposal(micro_batch_size, num_inference_steps)
        if proposal.image_shape is not None:
            self.check_image_shape(proposal.image_shape, proposal)
        if isinstance(proposal, PipelineProposal) and id(self.proposal_pipeline) not in self._deterministic_checked:
            proposal.check_deterministic()
            self._deterministic_checked.add(id(self.proposal_pipeline))
        if isinstance(proposal, PipelineProposal):
            proposal.screen_checks = self._screen_checks.setdefault(id(self.proposal_pipeline), {})
        return proposal

    # ----- fitting the latent density: once per target -----------------------------------------------------------
    @property
    def fits(self) -> dict[str, LatentFit]:
        """The latent proposal densities fitted so far, by target and settings (spec §6); `save_pretrained` saves
        them and `from_pretrained` brings them back, so that a target's fit is paid once."""
        if not hasattr(self, "_fits"):
            self._fits = {}
        return self._fits

    @torch.no_grad()
    def fit(
        self,
        target: str | Target,
        sampling: S2MSamplingConfig | dict | None = None,
        micro_batch_size: int = 64,
        num_inference_steps: int | None = None,
        max_proposals: int | None = None,
        **sampling_kwargs,
    ) -> LatentFit:
        """Fit the latent proposal density of ``target`` now (`sampling.fit_latent`), every refitting stage (a call
        fits only as far as its images are worth), and cache it in [`fits`]; a call for the same target and settings
        then starts sampling at once, whatever its number of images. Arguments as in [`__call__`].

        Returns:
            [`~s2m_diffusers.sampling.LatentFit`]: the chosen density (``chosen``: ``"prior"`` or ``"stage k"``) and,
            in ``stats.stages``, each fitting stage and each candidate's pilot.
        """
        target = self.parse_target(target)
        config = S2MSamplingConfig.resolve(sampling, **sampling_kwargs)
        runs = RunPlan.plan(None, 1, False, max_proposals, config, config.num_fit_stages(len(target.stages())))
        _, plan, config, weigher, _ = self._prepare(
            target, config, micro_batch_size, num_inference_steps, None, ["latents"]
        )
        with eval_mode(self.heads):
            return self._cached_fit(target, config, plan, weigher, runs, num_inference_steps, None)

    def _fit_key(self, target: Target, config: S2MSamplingConfig, plan: ClassPlan, steps: int | None) -> str:
        names = _FIT_SETTINGS + (_SCREENED_FIT_SETTINGS if self.proposal_kind != "gan" else ())
        fields = {name: getattr(config, name) for name in names}
        steps = steps or self.config.num_inference_steps if self.proposal_kind != "gan" else None
        return json.dumps({"target": str(target), "class": plan.describe(), "steps": steps, **fields}, sort_keys=True)

    def _cached_fit(self, target, config, plan, weigher, runs, steps, num_images: int | None) -> LatentFit:
        """The cached fit for this target and settings, or a new one (made by the main process with its own generator,
        seeded by ``config.fit_seed``, and shared with the others); a new fit's cost is added to ``runs.results``.

        A call fits for its ``num_images`` (`sampling.fit_latent`: the stages spend at most what they could save on
        them); a cached fit that this limit stopped early serves calls for as many images or fewer, and a call for
        more fits again. ``num_images=None`` (`fit`): every stage runs."""
        key = self._fit_key(target, config, plan, steps)
        if key in self.fits and self.fits[key].serves(num_images):
            return self.fits[key]
        fit = None
        if runs.is_main_process:
            evaluates = [weigher.for_stage(stage) for stage in target.stages()]
            p_z = StandardNormal(plan.latent_shape(weigher.proposal.latent_shape))
            generator = torch.Generator().manual_seed(config.fit_seed)
            with self.progress_bar(total=weigher.num_fit_stages) as bar:
                bar.set_description("fitting q")
                fit = fit_latent(
                    evaluates,
                    p_z,
                    config,
                    num_samples=num_images,
                    max_proposals=runs.remaining,
                    generator=generator,
                    callback=_ProgressCallback(bar, weigher=weigher),
                )
            runs.results.append(SampleResult.empty(fit.stats))
        if runs.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            fit = broadcast_object_list([fit], from_process=0)[0]
        if not fit.stats.budget_exhausted:
            self.fits[key] = fit
        return fit

    def write_extra_files(self, folder: str) -> None:
        """Called by `hub.save_pipeline` inside the folder being saved: the fitted densities go to ``fits/``."""
        if self.fits or self.auto_dv_strengths:
            save_fits(self.fits, os.path.join(folder, "fits"))
            with open(os.path.join(folder, "fits", "dv_strength.json"), "w", encoding="utf-8") as f:
                json.dump(self.auto_dv_strengths, f, indent=1)

    # ----- __call__ -----------------------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        """The phases of the last call, as ``callback_on_step_end`` numbers them (its ``timestep`` argument): one per
        refitting stage, then the final sampling, whose phase is ``num_timesteps - 1``. The number of rounds in each
        is not known in advance (the sampler runs until its chains have returned their images)."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def interrupt(self) -> bool:
        """Set ``pipe.interrupt = True`` (or, as in diffusers, ``pipe._interrupt = True``), e.g. from
        ``callback_on_step_end``, to stop the call in progress at the end of the round: it returns the images already
        finished (see "Interrupting" in [`__call__`]). Every call starts with it `False`."""
        return getattr(self, "_interrupt", False)

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        target: str | Target | None = None,
        num_images: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_inference_steps: int | None = None,
        max_proposals: int | None = None,
        allow_partial: bool = False,
        micro_batch_size: int = 64,
        distributed: bool = False,
        sampling: S2MSamplingConfig | dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **sampling_kwargs,
    ) -> S2MPipelineOutput | tuple:
        r"""Draw ``num_images`` images that satisfy ``target``.

        Args:
            target (`str`): a boolean formula over the heads' attributes: ``"a & ~b"``, ``"a & (b | c)"``, the
                paper's ``"a+b-c"``. Defaults to ``config.default_target``.
            num_images (`int`, defaults to 1): images to return.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the source of all randomness; the
                same seed gives the same images. A list of ``num_images`` generators makes image ``i`` a function of
                ``generator[i]`` alone, as in diffusers pipelines: each image is drawn by its own sampler run
                (refitting included), which costs about ``num_images`` times the refitting proposals of one generator.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"`` (`(N, H, W, C)` in [0, 1]), ``"pt"``
                (`(N, C, H, W)` in [0, 1]) or ``"latent"`` (the latents).
            return_dict (`bool`, defaults to `True`): return an [`S2MPipelineOutput`]; otherwise the tuple
                ``(images, latents, on_target, stats)``.
            num_inference_steps (`int`, *optional*): steps of a diffusion proposal; defaults to the config's.
            max_proposals (`int`, *optional*): the proposal budget (generator calls, refitting included; for a
                diffusion proposal, whole denoising runs: one screened out after ``s`` of its ``K`` steps counts
                ``s / K``). Defaults to ``max(10000, 1000 * num_images + 20 * fit_size * stages)``. When it runs
                out first, a `BudgetExhaustedError` says how far the sampler got and what to try.
            allow_partial (`bool`, defaults to `False`): when the budget runs out, return the images found (with
                ``stats["budget_exhausted"] = True``) instead of raising.
            micro_batch_size (`int`, defaults to 64): latents per generator call and images per heads call; the
                memory setting (the results do not depend on it).
            distributed (`bool`, defaults to `False`): spread the images over the processes started by
                ``accelerate launch`` (`s2m_diffusers.distributed`). Every process makes the same call, samples its
                contiguous block of images (refitting included) and **returns the whole output** in image order;
                ``stats`` sums counts and seconds over the processes (``seconds_wall``: the longest process's), and
                ``max_proposals`` is split in proportion to each process's images. With a list of generators the
                images are the same for any number of processes; with one, each process derives its own from it
                (`s2m_diffusers.distributed.process_generator`).
            sampling ([`~s2m_diffusers.sampling.S2MSamplingConfig`] or `dict`, *optional*): how the target is read
                from the heads (margins, ``D_r`` temperature, priors, the class of a conditional proposal) and the
                sampler's settings (refitting, steps, chains, fit sizes); every field and default is documented there.
            sampling_kwargs: single fields of [`~s2m_diffusers.sampling.S2MSamplingConfig`] by name, e.g.
                ``refit="off"``, ``negation_margin=30.0``, ``fit_size=128``; they override ``sampling``.
            callback_on_step_end (`Callable`, *optional*): called once per sampler round (one batch of proposals
                through generator and heads) as ``callback_on_step_end(pipeline, round, phase, callback_kwargs)``
                (diffusers' ``(pipe, step, timestep, callback_kwargs)``; a `diffusers.callbacks.PipelineCallback`
                works too): ``phase`` is ``k`` during the ``k``-th refitting stage (from 0) and
                ``pipeline.num_timesteps - 1`` during the final sampling; ``callback_kwargs`` holds exactly the
                tensors named in ``callback_on_step_end_tensor_inputs``, for that round's proposals. It returns a
                dict (or `None`): a returned ``"log_w"`` (same shape, `-inf` off target) **replaces the round's log
                weights in the final sampling**, so that the chains target ``p_z exp(log_w')`` (e.g. add a term, or
                veto images with `-inf`); during refitting it is ignored, since a fit is cached per target and
                settings for later calls without the callback. ``"latents"`` and ``"images"`` cannot be changed
                (returning other values raises): the acceptance needs latents drawn from the sampler's proposal
                density and images that are the generator's output for them. Do not modify them in place.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): any of ``"latents"``, ``"images"``,
                ``"log_w"`` (``pipeline._callback_tensor_inputs``); defaults to ``["latents"]``. ``"images"`` (on the
                CPU) makes the refitting stages keep their images, which they otherwise drop.

        Memory: the generator and the heads run ``micro_batch_size`` latents at a time, and each micro-batch's images
        leave the execution device for the CPU once the heads have seen them. The CPU holds the images of the chains
        in flight (at most ``num_chains``, by default ``min(num_images, 256)``) and those returned; refitting stages
        keep no images. Heads trained on smaller images than the proposal makes see a downscaled copy
        ([`heads_view`]). For a large proposal, `enable_model_cpu_offload()` keeps only the running model on the
        accelerator.

        Interrupting: ``pipe.interrupt = True`` (from the callback, or another thread) stops the call at the end of
        the round. During the final sampling, the call returns the images its chains had already finished (fewer
        than ``num_images``, possibly none) with ``stats["interrupted"] = True``, and no budget error; during
        refitting, no image is finished yet: it returns none, and the fit is not cached. With several processes
        (``distributed=True``) an interrupt takes effect in the final sampling only, in the processes that set it.

        Returns:
            [`S2MPipelineOutput`] or `tuple`. ``stats`` holds: ``target``, ``refit``, ``num_images`` (returned),
            ``proposals`` (generator calls), ``accepted``, ``acceptance_rate``, ``proposals_per_image``,
            ``on_target_images``, ``unique_images``, ``chains_started``, ``chains_entered``, ``rounds``, ``stages``
            (per refitting stage: proposals, on-target share, ESS), ``budget_exhausted``, ``max_proposals``,
            ``budget_spent`` (what the budget counts: proposals, one screened out after ``s`` of ``K`` steps counting
            ``s / K``),
            ``class_label``, ``proposal``, ``seconds_generator``, ``seconds_heads``, ``seconds_sampler`` (the rest),
            ``seconds_total`` (their sum), ``num_processes``, ``seconds_wall`` and ``interrupted``; for a diffusion
            proposal ``unet_calls`` and ``unet_calls_per_image`` (denoising steps, fitting included; the fitting's
            alone in ``fit_unet_calls``, with ``fit_proposals`` its proposals), and ``screen``
            (with ``screen=``: the step, the surrogate's floor, the calibration, the share screened out).

        Raises:
            TargetError: the target names an attribute the heads do not know, or is malformed.
            ValueError: the heads expect another image size or channel count than the proposal produces; heads or
                proposal missing; an invalid argument.
            BudgetExhaustedError: the budget ran out before ``num_images`` on-target images (unless
                ``allow_partial``); ``err.result`` holds what was found.

        Examples:
        """
        tensor_inputs = list(
            callback_on_step_end_tensor_inputs or getattr(callback_on_step_end, "tensor_inputs", None) or ["latents"]
        )
        self.check_inputs(num_images, output_type, tensor_inputs)
        self._interrupt = False
        target = self.parse_target(target)
        config = S2MSamplingConfig.resolve(sampling, **sampling_kwargs)
        stages = target.stages()
        num_fit_stages = config.num_fit_stages(len(stages))
        self._num_timesteps = num_fit_stages + 1  # the phases: refitting stages, then the final sampling
        runs = RunPlan.plan(generator, num_images, distributed, max_proposals, config, num_fit_stages)
        if config.num_chains is None and runs.size:
            config = config.replace(num_chains=min(runs.size, DEFAULT_MAX_CHAINS))
        check_call_memory(self, num_images, config.num_chains, output_type, images_per_run=runs.size)
        step_end = _StepEndCallback(callback_on_step_end, tensor_inputs, num_fit_stages, runs.num_processes == 1)

        proposal, plan, config, weigher, measured = self._prepare(
            target, config, micro_batch_size, num_inference_steps, step_end, tensor_inputs
        )
        if measured is not None and runs.is_main_process:  # "auto" measured beta in this call: its cost counts
            calls = (getattr(proposal, "num_steps", None) or 0) * measured["proposals"]  # its UNet calls count too
            measured_stats = SamplerStats(
                proposals=measured["proposals"], unet_calls=calls, cost=measured["proposals"], stages=[measured]
            )
            runs.results.append(SampleResult.empty(measured_stats))
        start = time.perf_counter()
        with eval_mode(self.heads):
            try:
                fit = self._cached_fit(
                    target, config, plan, weigher, runs, num_inference_steps, config.fit_for(num_images)
                )
            except _Interrupted:  # during refitting: no image is finished yet, and the fit is not cached
                fit = None
            if fit is not None:
                weigher.phase = num_fit_stages  # the final sampling: its images are kept
                self._sample(
                    runs, [weigher.for_stage(s) for s in stages], weigher, target, config, allow_partial, plan, fit
                )
        result = SampleResult.concat(runs.results)
        if not result.num_samples:
            result = self._empty_result(proposal, plan, result.stats)
        timings = weigher.timings(time.perf_counter() - start, runs.budget)
        result, stats = self._gather(result, timings, runs, target, config, plan)
        stats["interrupted"] = self.interrupt
        if result.stats.budget_exhausted and not allow_partial:
            raise self._budget_error(result, target, config, num_images, stats["max_proposals"], plan)
        z = result.z
        labels = plan.split(z, proposal.latent_shape)[1] if plan.mode != "none" and z.shape[0] else None
        images = self._postprocess(result.x, z, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, z, result.on_target, stats
        return S2MPipelineOutput(
            images=images, latents=z, on_target=result.on_target, stats=stats, class_labels=labels
        )

    # ----- the steps of a call ------------------------------------------------------------------------------------
    def _sample(self, runs, evaluates, weigher, target, config, allow_partial, plan, fit) -> None:
        """The sampler runs of this process (`sampling.sample_s2m`), into ``runs.results``, under a progress bar.

        Several processes must not raise while others wait for them: each keeps what it found, and the gathered
        result is checked against the budget afterwards."""
        keep_partial = allow_partial or runs.dist_state is not None
        p_z = StandardNormal(plan.latent_shape(weigher.proposal.latent_shape))
        bar_context = self.progress_bar(total=len(runs.share)) if runs.is_main_process else _SilentBar()
        with bar_context as bar:
            for i, gen in enumerate(runs.generators):
                if runs.remaining < 1:  # an earlier image's run spent the budget
                    if not keep_partial:
                        partial = SampleResult.concat(runs.results)
                        raise self._budget_error(partial, target, config, len(runs.share), runs.budget, plan)
                    runs.results.append(SampleResult.empty(SamplerStats(budget_exhausted=True)))
                    break
                try:
                    result = sample_s2m(
                        evaluates,
                        p_z,
                        runs.size,
                        config,
                        max_proposals=runs.remaining,
                        generator=gen,
                        allow_partial=keep_partial,
                        callback=_ProgressCallback(bar, i * runs.size, stop=lambda: self.interrupt),
                        fit=fit,
                    )
                except BudgetExhaustedError as err:
                    runs.results.append(err.result)
                    partial = SampleResult.concat(runs.results)
                    raise self._budget_error(partial, target, config, len(runs.share), runs.budget, plan) from err
                runs.results.append(result)
                if result.stats.budget_exhausted or self.interrupt:
                    break

    def _empty_result(self, proposal: ProposalAdapter, plan: ClassPlan, stats: SamplerStats) -> SampleResult:
        """No image: empty tensors of the right shapes (so that several processes' results can be gathered)."""
        hc = self.heads.config
        image_shape = proposal.image_shape or (int(hc.in_channels), int(hc.sample_size), int(hc.sample_size))
        z = torch.zeros((0, *plan.latent_shape(proposal.latent_shape)))
        empty = SampleResult.empty(stats)
        empty.z, empty.x = z, torch.zeros((0, *image_shape))
        return empty

    def _gather(self, result, timings, runs, target, config, plan) -> tuple[SampleResult, dict]:
        """The result of every process, in image order, and the call's statistics."""
        stats = result.stats
        if runs.num_processes > 1:
            from . import distributed as dist

            state = runs.dist_state
            gathered = [dist.gather_rows(getattr(result, k), state) for k in ("z", "x", "log_w", "on_target")]
            per_process = dist.gather_objects((stats, timings), state)
            stats = SamplerStats.merge([s for s, _ in per_process], label="process")
            timings = {k: sum(t[k] for _, t in per_process) for k in timings}
            timings["seconds_wall"] = max(t["seconds_wall"] for _, t in per_process)
            result = SampleResult(*gathered, stats, result.q)
        z, n = result.z, result.num_samples
        return result, {
            "target": str(target),
            "refit": config.refit,
            "num_images": n,
            "proposals": stats.proposals,
            "accepted": stats.accepted,
            "acceptance_rate": stats.acceptance_rate,
            "proposals_per_image": stats.proposals / n if n else math.inf,
            "on_target_images": int(result.on_target.sum()),
            "unique_images": int(torch.unique(z.reshape(n, -1), dim=0).shape[0]) if n else 0,
            "chains_started": stats.chains_started,
            "chains_entered": stats.chains_entered,
            "rounds": timings["rounds"],
            "stages": stats.stages,
            "fit": stats.fit,  # the latent density sampled from: "prior" or "stage k" (see `fit_latent`)
            "fit_proposals": sum(stage.get("proposals", 0) for stage in stats.stages),  # 0 when the fit was cached
            "fit_unet_calls": sum(stage.get("unet_calls", 0) for stage in stats.stages),  # its screened draws too
            "dv_strength": config.dv_strength,  # beta: the weights target p_G^(1 - beta) p_data^beta on the target
            "negation_margin": config.negation_margin,  # lambda and kappa as used (the heads' own unless set)
            "presence_margin": config.presence_margin,
            "mixing": stats.mixing,  # T, the distance bound reached and how, W, the thinning
            # UNet calls (denoising steps) per returned image, fitting included; None for a GAN proposal
            "unet_calls": stats.unet_calls if self.proposal_kind != "gan" else None,
            "unet_calls_per_image": (stats.unet_calls / n if n else math.inf) if self.proposal_kind != "gan" else None,
            "screen": stats.screen,  # delayed acceptance: the step, floor, calibration, share screened out
            "budget_exhausted": stats.budget_exhausted,
            "max_proposals": timings["max_proposals"],
            "budget_spent": stats.cost,  # in proposals, one screened out after s of K steps counting s / K
            "class_label": plan.describe(),
            "proposal": self.proposal_kind,
            "seconds_generator": timings["seconds_generator"],
            "seconds_heads": timings["seconds_heads"],
            "seconds_sampler": timings["seconds_sampler"],
            "seconds_total": timings["seconds_generator"] + timings["seconds_heads"] + timings["seconds_sampler"],
            "num_processes": runs.num_processes,
            "seconds_wall": timings["seconds_wall"],
        }

    def _budget_error(self, partial, target, config, num_images, budget, plan) -> BudgetExhaustedError:
        """`sampling.budget_error` with what to try in this pipeline's words."""
        tries = []
        if config.refit != "sequential":
            tries.append(
                f"refit='sequential' (this call used refit={config.refit!r}): each stage then adds one literal"
            )
        tries.append(f"a larger budget, e.g. max_proposals={4 * budget}")
        if plan.mode != "fixed":
            tries.append(
                "a class-conditional proposal (a generator conditioned on one of the target's attributes, with heads "
                "trained with D_f)"
            )
        if partial.num_samples:
            tries.append(f"allow_partial=True to keep the {partial.num_samples} image(s) found")
        return budget_error(partial, num_images, budget, target=str(target), tries=tries, unit="images")

    def _postprocess(self, images: torch.Tensor, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = (images.float().cpu() / 2 + 0.5).clamp(0, 1)  # (N, C, H, W) in [0, 1]
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        return array if output_type == "np" else self.numpy_to_pil(array)
