"""`S2MPipeline`: any diffusers diffusion model or GAN as the proposal, the S2M heads, and the sampler (spec §4-5b).
The pipeline only composes; each step is one hop away:

    check inputs   target text -> `targets.parse_target` -> `Target`; settings -> `sampling.S2MSamplingConfig`
    proposal       the generator's adapter (`proposals`), and the class plan of a class-conditional one
    weights        `weights.Weigher`: latents z --(adapter)--> images x in [-1, 1] --(heads)--> D_v, D_r, D_f
                   --(`maths.log_weight`)--> log w
    sample         `sampling.sample_s2m` -> `chains.sample_chains` (pool, burn-in, sampling) -> `kernels`
    postprocess    `pipeline_output`: images as PIL / numpy / torch, statistics

The sampler sees only an ``evaluate(z) -> (x, log_w, readings)`` callable and the prior; saving, loading: `hub`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin, UNet2DModel
from diffusers.utils import replace_example_docstring

from . import hub
from .callbacks import _ProgressCallback, _SilentBar, _StepEndCallback
from .densities import StandardNormal
from .distributed import RunPlan, gather_result
from .memory import check_call_memory
from .models.heads import S2MHeads
from .pipeline_output import (
    OUTPUT_TYPES,
    S2MPipelineOutput,
    call_budget_error,
    call_stats,
    empty_outputs,
    postprocess,
)
from .proposals import (
    ClassPlan,
    PipelineProposal,
    ProposalAdapter,
    check_components,
    check_screen_heads,
    components_from_pipe,
    describe_proposal,
    eval_mode,
    make_proposal,
)
from .sampling import S2MSamplingConfig, SampleResult, SamplerStats, sample_s2m
from .targets import Target, parse_target_for_heads
from .weights import (
    PHASES,
    Weigher,
    check_image_shape,
    heads_reading,
    heads_view,
    load_dv_strengths,
    resolve_dv_strength,
    save_dv_strengths,
)

__all__ = ["S2MPipeline", "S2MPipelineOutput"]

# Chains run side by side when a call does not set `num_chains`: at most this many, so that the images kept for the
# chains' states stay bounded however many images are asked for ("Memory" in `S2MPipeline.__call__`).
DEFAULT_MAX_CHAINS = 256

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
        >>> out = pipe("A & B", num_images=4, generator=torch.Generator().manual_seed(0))
        >>> len(out.images), out.stats["proposals_per_image"] * 4 == out.stats["proposals"]
        (4, True)
        ```
"""


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
        gan, unet, scheduler, proposal_pipeline: the proposal (above).
        proposal_kwargs (`dict`, *optional*): fixed call arguments of ``proposal_pipeline`` (prompt, guidance
            scale, ...); saved in `model_index.json`.
        latent_shape (`list[int]`, *optional*): shape of one latent of ``gan`` or ``proposal_pipeline`` when their
            config does not tell it.
        num_inference_steps (`int`, defaults to 25): DDIM steps of ``unet``, and the steps passed to
            ``proposal_pipeline`` unless ``proposal_kwargs`` sets them.
        default_target (`str`, *optional*): the target of a call that names none (e.g. `diffusers-cli run`).
        screen_heads ([`~s2m_diffusers.models.heads.S2MHeads`], *optional*): heads distilled to read ``unet``'s
            predicted clean images for the screen (`s2m_diffusers.screen_heads.distil_screen_heads`).

    Large generators, several processes: `docs/processes.md`.
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
        return "gan" if self.gan is not None else "ddim" if self.unet is not None else "pipeline"

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
        """As `DiffusionPipeline.enable_model_cpu_offload` (the generator, then the heads, ``model_cpu_offload_seq``;
        ``device="cpu"`` installs the hooks without an accelerator); a wrapped ``proposal_pipeline`` gets its own."""
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
        return hub.resolve_local_config(out, pretrained_model_name_or_path, S2MPipeline)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> S2MPipeline:
        """Load a saved S2M pipeline from a folder or a Hub repo, without remote code.

        A Hub repo is fetched with `huggingface_hub.snapshot_download` (``revision``, ``cache_dir``, ``token``,
        ``local_files_only`` and ``proxies`` are passed on); the classes come from the installed `s2m_diffusers`.
        Other arguments are those of `DiffusionPipeline.from_pretrained`.
        """
        path = hub.snapshot_path(pretrained_model_name_or_path, kwargs)
        pipe = super().from_pretrained(path, **kwargs)
        pipe._auto_dv_strengths = load_dv_strengths(path)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, heads: S2MHeads | None = None, **kwargs) -> S2MPipeline:
        """Wrap a loaded pipeline as the proposal of an S2M pipeline, without copying weights.

        - An `S2MPipeline`: its components and settings, with ``heads`` (and any component in ``kwargs``) replaced.
        - A pipeline that accepts ``latents=`` (e.g. a text-to-image pipeline): it becomes ``proposal_pipeline``;
          pass its fixed call arguments as ``proposal_kwargs={"prompt": ...}``.
        - A pipeline with a pixel-space `UNet2DModel` and a scheduler that does not take ``latents=`` (e.g.
          `DDPMPipeline`, `DDIMPipeline`): its ``unet`` and ``scheduler`` are used, run as DDIM.

        ``heads`` are heads trained for that proposal; ``kwargs`` other arguments of [`S2MPipeline`]
        (``proposal_kwargs``, ``latent_shape``, ``num_inference_steps``, ``default_target``).
        """
        if isinstance(pipeline, S2MPipeline):
            components = {**pipeline.components, **({"heads": heads} if heads is not None else {})}
            components.update({k: kwargs.pop(k) for k in list(kwargs) if k in components})
            return cls(**components, **{**pipeline.parameters, **kwargs})
        return cls(heads=heads, **components_from_pipe(pipeline), **kwargs)

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
        with a model card; weights are safetensors (`safe_serialization=False` warns and saves them anyway). Arguments
        as in `DiffusionPipeline.save_pretrained`, and ``training_data`` (a description for the card); ``kwargs``:
        ``license``, ``base_model``, ``sampling`` for the card (`s2m_diffusers.hub.model_card`), ``repo_id``,
        ``token``, ``private``, ``commit_message``, ``create_pr``, ``api`` for an upload (``push_to_hub=True``)."""
        settings = dict(safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size)
        if push_to_hub:  # the save and its upload under one lock: what is uploaded is this save
            hub.save_and_push(
                self, save_directory, kwargs.pop("repo_id", None), training_data=training_data, **settings, **kwargs
            )
        else:
            card = {k: kwargs.pop(k) for k in ("license", "base_model", "sampling") if k in kwargs}
            hub.save_pipeline(self, save_directory, training_data=training_data, **settings, **card)

    def push_to_hub(self, repo_id: str, training_data: dict | str | None = None, **kwargs):
        """Upload the pipeline to ``repo_id`` (``"user/name"``) in the layout of [`save_pretrained`], with a model card
        whose loading snippets pin ``revision=`` to the uploaded commit (`s2m_diffusers.hub.push_pipeline`; ``kwargs``
        as there). Returns the `CommitInfo` whose ``oid`` the card pins."""
        return hub.push_pipeline(self, repo_id, training_data=training_data, **kwargs)

    # ----- checking inputs ----------------------------------------------------------------------------------------
    def parse_target(self, target: str | Target | None) -> Target:
        """``target`` (or ``config.default_target``) parsed against the heads' attributes."""
        return parse_target_for_heads(target, list(self.heads.config.attribute_names), self.config.default_target)

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

    def heads_view(self, images: torch.Tensor) -> torch.Tensor:
        """What the heads see of the proposal's images `(B, C, H, W)` in [-1, 1]: the images themselves at the heads'
        ``sample_size``, else a copy downscaled as real data is (`s2m_diffusers.data.prepare_images`: the shorter side
        resized with antialiased bilinear filtering, then a centre crop), as `train_heads` does."""
        return heads_view(self.heads.config, images)

    def _prepare(self, target, config, micro_batch_size, steps, callback=None, inputs=("latents",)):
        """The proposal adapter, its class plan, the settings with the heads' reading filled in (``dv_strength``
        resolved), the call's weigher, and the proposals that measuring ``dv_strength="auto"`` drew now (else 0)."""
        proposal = self._prepare_proposal(micro_batch_size, steps)
        config = self.heads_reading(config)
        plan = ClassPlan.choose(
            target,
            proposal,
            self.heads.config,
            config.class_label,
            describe_proposal(self.components, self.config)["class"],
        )
        config, measured = resolve_dv_strength(self, target, config, plan, proposal, micro_batch_size, steps)
        weigher = Weigher(self, target, proposal, plan, config, micro_batch_size, callback, inputs)
        return proposal, plan, config, weigher, measured

    def heads_reading(self, config: S2MSamplingConfig) -> S2MSamplingConfig:
        """``config`` with the settings it leaves to the heads filled in from their config (chosen from data when they
        were trained, `s2m_diffusers.training.choose_sampling_settings`): ``negation_margin``, ``presence_margin``
        (else 0) and ``dv_strength`` (else 1, the paper's target)."""
        return heads_reading(self.heads.config, config)

    @property
    def auto_dv_strengths(self) -> dict[str, float]:
        """The ``dv_strength`` that ``"auto"`` measured, by target and reading (saved with the pipeline)."""
        if not hasattr(self, "_auto_dv_strengths"):
            self._auto_dv_strengths = {}
        return self._auto_dv_strengths

    def _prepare_proposal(self, micro_batch_size: int, num_inference_steps: int | None) -> ProposalAdapter:
        proposal = self.get_proposal(micro_batch_size, num_inference_steps)
        if proposal.image_shape is not None:
            check_image_shape(self.heads.config, proposal.image_shape, proposal, self.proposal_description()["class"])
        if isinstance(proposal, PipelineProposal):
            if id(self.proposal_pipeline) not in self._deterministic_checked:
                proposal.check_deterministic()
                self._deterministic_checked.add(id(self.proposal_pipeline))
            proposal.screen_checks = self._screen_checks.setdefault(id(self.proposal_pipeline), {})
        return proposal

    def write_extra_files(self, folder: str) -> None:
        """Called by `hub.save_pipeline` inside the folder being saved: the measured ``dv_strength="auto"`` values."""
        save_dv_strengths(self.auto_dv_strengths, folder)

    # ----- __call__ -----------------------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        """The phases of a call, as ``callback_on_step_end`` numbers them (its ``timestep`` argument): 0 the entry
        pool, 1 the burn-in, 2 the sampling."""
        return len(PHASES)

    @property
    def interrupt(self) -> bool:
        """Set ``pipe.interrupt = True`` (or, as in diffusers, ``pipe._interrupt = True``), e.g. from
        ``callback_on_step_end``, to stop the call in progress at the end of the round: it returns the images already
        finished. Every call starts with it `False`."""
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
        r"""Draw ``num_images`` images that satisfy ``target``: chains in the generator's noise space that enter the
        target from a pool of prior draws and move locally (`s2m_diffusers.chains`; spec §5b).

        Args:
            target (`str`): a boolean formula over the heads' attributes: ``"a & ~b"``, ``"a & (b | c)"``, the
                paper's ``"a+b-c"``. Defaults to ``config.default_target``.
            num_images (`int`, defaults to 1): images to return.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the source of all randomness; the
                same seed gives the same images. A list of ``num_images`` generators makes image ``i`` a function of
                ``generator[i]`` alone, as in diffusers pipelines: each image is then drawn by its own run (its own
                pool and chain), which costs far more per image.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"`` (`(N, H, W, C)` in [0, 1]), ``"pt"``
                (`(N, C, H, W)` in [0, 1]) or ``"latent"``.
            return_dict (`bool`, defaults to `True`): return an [`S2MPipelineOutput`]; otherwise the tuple
                ``(images, latents, on_target, stats)``.
            num_inference_steps (`int`, *optional*): steps of a diffusion proposal; defaults to the config's.
            max_proposals (`int`, *optional*): the budget in generator calls (for a diffusion proposal, whole
                denoising runs: one screened out after ``s`` of its ``K`` steps counts ``s / K``). Defaults to
                ``max(10000, 1000 * num_images)``. When it runs out first, a `BudgetExhaustedError` says what was
                seen and what to try.
            allow_partial (`bool`, defaults to `False`): when the budget runs out, return the images found (with
                ``stats["budget_exhausted"] = True``) instead of raising.
            micro_batch_size (`int`, defaults to 64): latents per generator call and images per heads call; the
                memory setting (the results do not depend on it).
            distributed (`bool`, defaults to `False`): spread the images over the processes started by
                ``accelerate launch``: every process makes the same call, runs the chains of its contiguous block of
                images and **returns the whole output** in image order; ``stats`` sums counts and seconds, and
                ``max_proposals`` is split in proportion to each process's images (`s2m_diffusers.distributed`).
            sampling ([`~s2m_diffusers.sampling.S2MSamplingConfig`] or `dict`, *optional*): how the target is read
                from the heads and the chains' settings; every field and default is documented there.
            sampling_kwargs: single fields of [`~s2m_diffusers.sampling.S2MSamplingConfig`] by name, e.g.
                ``kernel="mala"``, ``negation_margin=30.0``; they override ``sampling``.
            callback_on_step_end (`Callable`, *optional*): called once per round (one batch of proposals through the
                generator and the heads) as ``callback_on_step_end(pipeline, round, phase, callback_kwargs)``
                (diffusers' ``(pipe, step, timestep, callback_kwargs)``): ``phase`` is 0 for the entry pool, 1 for
                the burn-in and 2 for the sampling; ``callback_kwargs`` holds the tensors named in
                ``callback_on_step_end_tensor_inputs`` (``"latents"``, ``"images"``, ``"log_w"``; default
                ``["latents"]``). A returned ``{"log_w": ...}`` (same shape, `-inf` off target) replaces the round's
                log weights, so that the chains target ``p_z exp(log_w')``; latents and images cannot be changed.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): see ``callback_on_step_end``.

        Memory: the generator and the heads run ``micro_batch_size`` latents at a time; the CPU holds the images of the
        chains (at most 256 by default), of the pool's on-target draws and of those returned. Interrupting:
        ``pipe.interrupt = True`` stops the call after the round, returning the images finished so far.

        Returns:
            [`S2MPipelineOutput`] or `tuple`. ``stats`` (`pipeline_output.call_stats`): the calls, images, acceptance,
            the chains' record (``chains``), their ``diagnostics`` (R-hat, ESS, the reading check) and ``warnings``,
            the heads' reading, UNet calls for a diffusion proposal, the budget spent, and the seconds.

        Raises:
            TargetError: the target names an attribute the heads do not know, or is malformed.
            ValueError: heads and proposal that do not fit together; an invalid argument.
            BudgetExhaustedError: the budget ran out before ``num_images`` images (unless ``allow_partial``);
                ``err.result`` holds what was found.

        Examples:
        """
        inputs = list(
            callback_on_step_end_tensor_inputs or getattr(callback_on_step_end, "tensor_inputs", None) or ["latents"]
        )
        self.check_inputs(num_images, output_type, inputs)
        self._interrupt = False
        target = self.parse_target(target)
        config = S2MSamplingConfig.resolve(sampling, **sampling_kwargs)
        runs = RunPlan.plan(generator, num_images, distributed, max_proposals)
        if config.num_chains is None and runs.size:
            wanted = max(min(2, runs.size), math.ceil(runs.size / config.samples_per_chain))
            config = config.replace(num_chains=min(wanted, DEFAULT_MAX_CHAINS))
        check_call_memory(self, num_images, config.num_chains, output_type, images_per_run=runs.size)
        step_end = _StepEndCallback(callback_on_step_end, inputs)
        proposal, plan, config, weigher, measured = self._prepare(
            target, config, micro_batch_size, num_inference_steps, step_end, inputs
        )
        runs.spend(measured, proposal.num_steps)  # "auto" measured beta in this call: its proposals count
        start = time.perf_counter()
        with eval_mode(self.heads):
            self._sample(runs, weigher, target, config, plan)
        result = SampleResult.concat(runs.results)
        if not result.num_samples:  # empty tensors of the right shapes, so that processes' results can be gathered
            result.z, result.x = empty_outputs(proposal, plan, self.heads.config)
        timings = weigher.timings(time.perf_counter() - start, runs.budget)
        result, timings = gather_result(result, timings, runs)
        stats = call_stats(result, timings, runs, target, config, plan, self.proposal_kind)
        stats["interrupted"] = self.interrupt
        if result.stats.budget_exhausted and not allow_partial:
            raise call_budget_error(result, target, num_images, timings["max_proposals"], plan, weigher)
        z = result.z
        labels = plan.split(z, proposal.latent_shape)[1] if plan.mode != "none" and z.shape[0] else None
        images = postprocess(result.x, z, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, z, result.on_target, stats
        return S2MPipelineOutput(
            images=images, latents=z, on_target=result.on_target, stats=stats, class_labels=labels
        )

    # ----- the steps of a call ------------------------------------------------------------------------------------
    def _sample(self, runs, weigher, target, config, plan) -> None:
        """The sampler runs of this process (`sampling.sample_s2m`), into ``runs.results``, under a progress bar.

        Each run keeps what it found when the budget runs out (several processes must not raise while others wait
        for them); the gathered result is checked against the budget afterwards."""
        p_z = StandardNormal(plan.latent_shape(weigher.proposal.latent_shape))
        evaluate = weigher.for_target(target)
        bar_context = self.progress_bar(total=len(runs.share)) if runs.is_main_process else _SilentBar()
        with bar_context as bar:
            for i, gen in enumerate(runs.generators):
                if runs.remaining < 1:  # an earlier image's run spent the budget
                    runs.results.append(SampleResult.empty(SamplerStats(budget_exhausted=True)))
                    break
                result = sample_s2m(
                    evaluate,
                    p_z,
                    runs.size,
                    config,
                    max_proposals=runs.remaining,
                    generator=gen,
                    allow_partial=True,
                    callback=_ProgressCallback(bar, i * runs.size, stop=lambda: self.interrupt),
                    reading_names=self.heads.config.attribute_names,
                )
                runs.results.append(result)
                if result.stats.budget_exhausted or self.interrupt:
                    break
