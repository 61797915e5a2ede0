"""Proposal adapters: pretrained generators behind one interface (spec §4), as k-diffusion's `external.py` does.

S2M samples in latent space: a proposal is a deterministic map ``x = G(z)`` from a standard-normal latent ``z`` to
an image, and ``z`` is *all* the randomness of one sample. Each adapter wraps one kind of generator:

- [`DDIMProposal`]: a diffusers `UNet2DModel` with its scheduler, run as DDIM with ``eta = 0``; the latent is the
  initial noise ``x_T`` `(C, H, W)`. It can stop after a step and resume (``start``, ``finish``, ``generate_views``),
  which screening needs (`S2MSamplingConfig.screen`).
- [`PipelineProposal`]: any diffusers pipeline that accepts ``latents=`` and ``output_type="pt"`` (e.g.
  text-to-image with a fixed prompt, decoded by its VAE); the latent is the pipeline's initial latents. Where its
  step callback allows ([`PipelineProposal.check_screen`]) it is screened too: stopped after a step, read on its
  predicted clean image, and rerun whole when it passes (``screen_restarts``).
- [`GeneratorProposal`]: a GAN generator, [`~s2m_diffusers.models.gan.DCGANGenerator`] or any `ModelMixin` whose
  forward maps latents (and optionally class labels) to images; the latent is the generator's latent.

Every adapter offers the same methods:

- ``latent_shape``: the shape of one latent; ``p_z()``: the latent prior ``p_z = N(0, I)`` as a
  [`~s2m_diffusers.densities.StandardNormal`]; ``log_prob(z)``: ``log p_z(z)``, the latent log-density.
- ``generate(latents, class_labels=None, output_device=None)``: the deterministic map, run in micro-batches of
  ``micro_batch_size`` latents (the memory setting: peak memory grows with it, the result does not depend on it);
  ``output_device="cpu"`` moves each micro-batch's images off the accelerator as soon as they are made.
- ``sample(n, generator)``: a [`ProposalSample`] with latents, images and the latents' log-density.
- ``proposal(n, generator)``: images only, or ``(images, class_labels)`` for a class-conditional generator, with
  classes drawn from ``class_probs``: the proposal callable that training ``D_v`` (and ``D_f``) expects.

**Images are float tensors `(B, C, H, W)` in [-1, 1]**, the diffusers convention for model inputs, on the
generator's device. A pipeline's ``output_type="pt"`` images (in [0, 1] for diffusers' pipelines) are mapped to
[-1, 1] in one place, [`PipelineProposal.generate`]; a GAN's images in another range (e.g. [0, 255]) by its
``output_range`` ([`GeneratorProposal`]).

``generate`` checks at the boundary: latents must be finite; images must be finite (a generator that returns NaN
is named at once, not after the whole budget); and on the first micro-batch the images of a GAN or a pipeline must lie
in [-1, 1] up to a small tolerance (``range_tolerance``), since images outside are a generator in another range,
which clamping would silently saturate (a first micro-batch without any negative value is warned about: [0, 1]?).
Within the tolerance they are clamped to [-1, 1], as are a diffusion UNet's, whose last step may overshoot.

Generators run in `eval()` mode while they generate (batch normalisation then uses its stored statistics, so that
every image is a function of its own latent only), and the mode they had is restored afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .class_plan import ClassPlan
from .densities import StandardNormal
from .utils import module_device_dtype

__all__ = [
    "ProposalSample",
    "ProposalAdapter",
    "ClassPlan",
    "check_components",
    "make_proposal",
    "describe_proposal",
    "DDIMProposal",
    "PipelineProposal",
    "GeneratorProposal",
    "eval_mode",
    "execution_device",
]


@dataclass
class ProposalSample:
    """What [`ProposalAdapter.sample`] returns.

    Args:
        latents (`torch.Tensor` of shape `(n, *latent_shape)`): the latents ``z``.
        images (`torch.Tensor` of shape `(n, C, H, W)`): ``G(z)`` in [-1, 1].
        log_prob (`torch.Tensor` of shape `(n,)`): ``log p_z(z)`` under the standard normal prior.
        class_labels (`torch.Tensor` of shape `(n,)`, *optional*): classes of a class-conditional generator.
    """

    latents: torch.Tensor
    images: torch.Tensor
    log_prob: torch.Tensor
    class_labels: torch.Tensor | None = None


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put modules in `eval()` mode for the duration of the block and restore each submodule's mode afterwards."""
    saved = []
    for module in modules:
        if isinstance(module, nn.Module):
            saved.extend((m, m.training) for m in module.modules())
            module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def _check_micro_batch_size(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"micro_batch_size must be a positive integer (latents per generator or heads call), got {value!r}. "
            "Lower it if the generator runs out of memory; the images do not depend on it."
        )
    return value


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on: its offloading hook's execution device when it is CPU-offloaded (diffusers'
    `enable_model_cpu_offload` keeps the weights on the CPU and moves them there for each call), else the device of
    its weights."""
    for m in module.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return module_device_dtype(module)[0]


class ProposalAdapter:
    """Base class of the adapters: micro-batching, the prior, sampling, the checks of latents and images at the
    boundary. Subclasses implement `_generate`.

    Args:
        latent_shape (`Sequence[int]`): the shape of one latent.
        micro_batch_size (`int`, defaults to 64): latents per call of the wrapped generator.
        num_classes (`int`, *optional*): number of classes of a class-conditional generator.
        class_probs (`Sequence[float]`, *optional*): ``p_G(c)``, the class share used by ``proposal(n)``
            (uniform by default).
    """

    def __init__(
        self,
        latent_shape: Sequence[int],
        micro_batch_size: int = 64,
        num_classes: int | None = None,
        class_probs: Sequence[float] | None = None,
    ):
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if not self.latent_shape or any(s < 1 for s in self.latent_shape):
            raise ValueError(f"latent_shape must be a non-empty shape of positive sizes, got {tuple(latent_shape)}.")
        self.micro_batch_size = _check_micro_batch_size(micro_batch_size)
        self.num_classes = num_classes
        if class_probs is not None and num_classes is not None and len(class_probs) != num_classes:
            raise ValueError(f"class_probs has {len(class_probs)} entries for a generator with {num_classes} classes.")
        self.class_probs = None if class_probs is None else torch.tensor(class_probs, dtype=torch.float64)
        self.range_checked = False  # the first micro-batch's images were found in [-1, 1]

    # how far beyond [-1, 1] the first micro-batch's images may reach before the generator is taken to work in
    # another range (values within it are clamped); `None`: no check
    range_tolerance: float | None = 0.1
    # Screening (`S2MSamplingConfig.screen`): the denoising steps of one image (`None`: not a diffusion model), and why
    # the adapter cannot stop after a step and resume (`None`: it can, with `start`, `finish` and `generate_views`).
    num_steps: int | None = None
    screen_unavailable: str | None = "a GAN generator has no denoising steps to screen after."
    # Whether finishing a screened proposal reruns it from its latent (``K`` UNet calls) instead of resuming it after
    # the screen step (``K - s``): the sampler's cost accounting and calibration follow it.
    screen_restarts: bool = False

    # --- what subclasses provide -----------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """`(C, H, W)` of the images when the generator's config tells it without running it, else `None`."""
        return None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _generate(self, latents: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _models(self) -> list[nn.Module]:
        return []

    def _range_fix(self, low: float = 0, high: float = 255) -> str:
        """How to tell this adapter that its generator's images lie in ``[low, high]`` (for the range messages)."""
        return "Rescale the generator's output to [-1, 1] (a tanh output layer, or a wrapper module that rescales it)."

    def generator_name(self) -> str:
        """The generator's class and the adapter's, for messages: ``"DCGANGenerator (GeneratorProposal)"``."""
        models = self._models()
        return f"{type(models[0]).__name__} ({type(self).__name__})" if models else type(self).__name__

    # --- shared ----------------------------------------------------------------------------------------------
    @property
    def is_conditional(self) -> bool:
        return self.num_classes is not None

    def p_z(self) -> StandardNormal:
        """The latent prior ``p_z = N(0, I)`` over ``latent_shape``."""
        return StandardNormal(self.latent_shape)

    def log_prob(self, latents: torch.Tensor) -> torch.Tensor:
        """``log p_z(z)`` `(n,)`: the latents' log-density under the standard normal prior."""
        return self.p_z().log_prob(latents)

    def _check_labels(self, class_labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError(f"{type(self).__name__} wraps an unconditional generator; pass no class_labels.")
            return None
        if class_labels is None:
            raise ValueError(
                f"This generator is class-conditional ({self.num_classes} classes): pass class_labels, a long tensor "
                f"of shape ({n},) with values in 0..{self.num_classes - 1}."
            )
        class_labels = torch.as_tensor(class_labels, dtype=torch.long)
        if class_labels.shape != (n,):
            raise ValueError(f"class_labels must have shape ({n},), got {tuple(class_labels.shape)}.")
        return class_labels

    @torch.no_grad()
    def generate(
        self,
        latents: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        output_device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Run the generator on latents, ``micro_batch_size`` at a time.

        Args:
            latents (`torch.Tensor` of shape `(n, *latent_shape)`): standard-normal latents.
            class_labels (`torch.Tensor` of shape `(n,)`, *optional*): classes, for a class-conditional generator.
            output_device (`torch.device` or `str`, *optional*): where each micro-batch's images go as soon as they
                are made (e.g. ``"cpu"``, so that the generator's device holds one micro-batch at a time); by default
                they stay on the generator's device.

        Returns:
            `torch.Tensor` of shape `(n, C, H, W)`: images in [-1, 1], on ``output_device`` or the generator's device.

        Raises:
            ValueError: latents of another shape or with NaN or infinite values; images with NaN or infinite values;
                on the first micro-batch, images outside [-1, 1] by more than ``range_tolerance`` (a generator in
                another range: give it with ``output_range``).
        """
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"{type(self).__name__} expects latents of shape (n, {', '.join(map(str, self.latent_shape))}), "
                f"got {tuple(latents.shape)}."
            )
        bad = int((~torch.isfinite(latents)).reshape(latents.shape[0], -1).any(1).sum()) if latents.numel() else 0
        if bad:
            raise ValueError(
                f"{bad} of the {latents.shape[0]} latents given to {self.generator_name()} hold NaN or infinite "
                "values; latents must be finite draws of the standard normal prior (`p_z().sample(n, generator)`). "
                "If they came from a density of your own (the sampler's `q`) or your own code, check it for a "
                "division by zero or an overflow."
            )
        class_labels = self._check_labels(class_labels, latents.shape[0])
        out = []
        with eval_mode(*self._models()):
            for start in range(0, latents.shape[0], self.micro_batch_size):
                chunk = latents[start : start + self.micro_batch_size]
                labels = None if class_labels is None else class_labels[start : start + self.micro_batch_size]
                images = self._checked(self._generate(chunk, labels)).clamp(-1.0, 1.0)
                out.append(images if output_device is None else images.to(output_device))
        if not out:
            shape = self.image_shape or (0, 0, 0)
            return torch.zeros((0, *shape), device=output_device or self.device)
        return torch.cat(out)

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        """One micro-batch's images `(b, C, H, W)`, refused when they are not finite, or, on the first micro-batch,
        outside [-1, 1] by more than ``range_tolerance``."""
        finite = torch.isfinite(images).reshape(images.shape[0], -1).all(1)
        if not bool(finite.all()):
            raise ValueError(
                f"{self.generator_name()} returned images with NaN or infinite values for "
                f"{int((~finite).sum())} of {images.shape[0]} finite latents. Its weights are damaged or it "
                "overflows: load its weights again, run it in float32 (float16 overflows easily), or check its "
                "forward on a few latents."
            )
        if self.range_tolerance is not None and not self.range_checked and images.numel():
            low, high = float(images.min()), float(images.max())
            if low < -1.0 - self.range_tolerance or high > 1.0 + self.range_tolerance:
                raise ValueError(
                    f"{self.generator_name()} returned images in [{low:.4g}, {high:.4g}] on its first "
                    f"{images.shape[0]} latents; images must lie in [-1, 1] (the diffusers convention), and clamping "
                    f"these would saturate them silently. {self._range_fix()}"
                )
            if low >= 0.0 and images.numel() >= 1024:
                warnings.warn(
                    f"{self.generator_name()} returned no negative value in its first {images.shape[0]} images "
                    f"([{low:.3g}, {high:.3g}]): are they in [0, 1] rather than [-1, 1]? The heads would then see "
                    f"them brighter than the real images. {self._range_fix(0, 1)}",
                    UserWarning,
                    stacklevel=3,
                )
            self.range_checked = True
        return images

    # Whether `generate_with_grad` can differentiate the images by the latents (for `kernel="mala"`).
    differentiable: bool = False

    def generate_with_grad(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The images of one micro-batch of latents `(b, C, H, W)` in [-1, 1], keeping the autograd graph from the
        latents (MALA's gradient of ``log w``, `s2m_diffusers.kernels.mala_propose`).

        Raises:
            ValueError: a generator that cannot be differentiated here (a diffusion model).
        """
        if not self.differentiable:
            raise ValueError(
                f"{self.generator_name()} cannot be differentiated by its latents here (kernel='mala' needs a GAN "
                "generator); use kernel='pcn', which needs no gradient."
            )
        labels = self._check_labels(class_labels, latents.shape[0])
        with torch.enable_grad(), eval_mode(*self._models()):
            return self._checked(self._generate(latents, labels)).clamp(-1.0, 1.0)

    def _check_step(self, step: int) -> None:
        if not (isinstance(step, int) and 1 <= step < self.num_steps):
            raise ValueError(f"A screen step must lie in 1..{self.num_steps - 1} (of {self.num_steps}), got {step!r}.")

    def _chunks(self, latents: torch.Tensor, class_labels: torch.Tensor | None, check: bool = True):
        """``(micro-batch, its labels)`` pairs, in `eval()` mode, with the latents checked as [`generate`] checks
        them."""
        if check and tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"{type(self).__name__} expects latents of shape (n, {self.latent_shape}).")
        class_labels = self._check_labels(class_labels, latents.shape[0])
        with eval_mode(*self._models()):
            for start in range(0, latents.shape[0], self.micro_batch_size):
                labels = None if class_labels is None else class_labels[start : start + self.micro_batch_size]
                yield latents[start : start + self.micro_batch_size], labels

    def draw_class_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``n`` classes drawn from ``class_probs`` (uniform by default); `None` for an unconditional generator."""
        if self.num_classes is None:
            return None
        probs = self.class_probs if self.class_probs is not None else torch.ones(self.num_classes, dtype=torch.float64)
        gen_device = generator.device if generator is not None else "cpu"
        return torch.multinomial(probs.to(gen_device), n, replacement=True, generator=generator).cpu()

    def sample(
        self, n: int, generator: torch.Generator | None = None, class_labels: torch.Tensor | None = None
    ) -> ProposalSample:
        """Draw ``n`` latents from the prior and generate their images.

        Args:
            n (`int`): number of samples.
            generator (`torch.Generator`, *optional*): the source of the latents (and of the classes).
            class_labels (`torch.Tensor`, *optional*): classes for a class-conditional generator; drawn from
                ``class_probs`` when omitted.

        Returns:
            [`ProposalSample`].
        """
        return self._sample(n, generator, class_labels)

    def _sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        class_labels: torch.Tensor | None = None,
        output_device: torch.device | str | None = None,
    ) -> ProposalSample:
        latents = self.p_z().sample(n, generator=generator)
        if class_labels is None:
            class_labels = self.draw_class_labels(n, generator)
        images = self.generate(latents, class_labels, output_device=output_device)
        return ProposalSample(latents, images, self.log_prob(latents), class_labels)

    def __call__(self, n: int, generator: torch.Generator | None = None):
        """The proposal callable of ``D_v`` training: images `(n, C, H, W)` in [-1, 1] on the CPU, or
        ``(images, class_labels)`` for a class-conditional generator. Each micro-batch goes to the CPU as soon as it is
        made."""
        s = self._sample(n, generator, output_device="cpu")
        images = s.images.float()
        return images if s.class_labels is None else (images, s.class_labels)


# ------------------------------------------------------------------------------------------------------------------
# Diffusion UNet + scheduler, as deterministic DDIM


def _sample_size(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class DDIMProposal(ProposalAdapter):
    """A diffusers `UNet2DModel` (or any UNet with the same call) run as DDIM with ``eta = 0``.

    The scheduler is rebuilt as ``DDIMScheduler.from_config(scheduler.config)``: same noise schedule and prediction
    type as the model was trained with, deterministic steps. The initial noise ``x_T`` is the latent, so an image is
    a function of its latent alone. Images are the final sample, clamped to [-1, 1] (pixel-space UNets; for a
    latent-diffusion model use [`PipelineProposal`] on its pipeline, which decodes through the VAE).

    Args:
        unet (`UNet2DModel`): the denoiser; class-conditional when its config has ``num_class_embeds``.
        scheduler (`SchedulerMixin`): the scheduler it was trained with (any diffusers noise scheduler).
        num_inference_steps (`int`, defaults to 25): DDIM steps.
        micro_batch_size (`int`, defaults to 64): latents per UNet call.
        class_probs (`Sequence[float]`, *optional*): ``p_G(c)`` for ``proposal(n)`` of a class-conditional UNet.

    Examples:

    ```py
    >>> import torch
    >>> from diffusers import DDPMScheduler, UNet2DModel
    >>> from s2m_diffusers.proposals import DDIMProposal
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...                    norm_num_groups=8, layers_per_block=1)
    >>> proposal = DDIMProposal(unet, DDPMScheduler(), num_inference_steps=3)
    >>> s = proposal.sample(2, torch.Generator().manual_seed(0))
    >>> s.latents.shape, s.images.shape
    (torch.Size([2, 1, 8, 8]), torch.Size([2, 1, 8, 8]))
    ```
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        num_inference_steps: int = 25,
        micro_batch_size: int = 64,
        class_probs: Sequence[float] | None = None,
    ):
        from diffusers import DDIMScheduler

        if unet is None or scheduler is None:
            raise ValueError(
                "DDIMProposal needs both the UNet and the scheduler it was trained with (`unet=`, `scheduler=`)."
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        config = unet.config
        h, w = _sample_size(config.sample_size)
        super().__init__(
            (config.in_channels, h, w),
            micro_batch_size=micro_batch_size,
            num_classes=getattr(config, "num_class_embeds", None),
            class_probs=class_probs,
        )
        self.unet = unet
        self.num_inference_steps = num_inference_steps
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.scheduler.set_timesteps(num_inference_steps)

    # no range check: a diffusion model's last step overshoots [-1, 1] (an untrained or lightly trained one by far),
    # and diffusers' pipelines clamp it, as `generate` does
    range_tolerance = None
    screen_unavailable = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.latent_shape

    @property
    def device(self) -> torch.device:
        return execution_device(self.unet)

    def _models(self) -> list[nn.Module]:
        return [self.unet]

    @property
    def num_steps(self) -> int:
        """``K``: the UNet calls of one image."""
        return self.num_inference_steps

    def _generate(self, latents: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        return self._denoise(self._initial(latents), class_labels, 0, self.num_steps)[0].float()

    def _initial(self, latents: torch.Tensor) -> torch.Tensor:
        device, dtype = execution_device(self.unet), module_device_dtype(self.unet)[1]
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma  # (B, C, H, W)

    def _denoise(
        self, x: torch.Tensor, class_labels: torch.Tensor | None, first: int, last: int, views: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """DDIM steps ``first .. last - 1`` from the sample ``x`` `(B, C, H, W)`: the sample after them, and the
        predicted clean image (``pred_original_sample``, clamped to [-1, 1]) after ``s`` steps for each ``s`` in
        ``views``."""
        labels = None if class_labels is None else class_labels.to(x.device)
        channels, seen = x.shape[1], {}
        for i in range(first, last):
            t = self.scheduler.timesteps[i]
            model_input = self.scheduler.scale_model_input(x, t)
            model_output = self.unet(model_input, t, class_labels=labels).sample
            if model_output.shape[1] == 2 * channels:  # a learned-variance model: keep the mean prediction
                model_output = model_output[:, :channels]
            out = self.scheduler.step(model_output, t, x, eta=0.0)
            x = out.prev_sample
            if i + 1 in views:
                seen[i + 1] = out.pred_original_sample.float().clamp(-1.0, 1.0)
        return x, seen

    # --- screening (delayed acceptance, `s2m_diffusers.sampling.sample_imh`): stop after a step, resume later -------
    @torch.no_grad()
    def generate_views(
        self, latents: torch.Tensor, class_labels: torch.Tensor | None = None, steps: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """As [`generate`], and the predicted clean image after each of ``steps`` (of the K) steps `(n, C, H, W)`."""
        images, views = [], {s: [] for s in steps}
        for chunk, labels in self._chunks(latents, class_labels):
            x, seen = self._denoise(self._initial(chunk), labels, 0, self.num_steps, steps)
            images.append(self._checked(x.float()).clamp(-1.0, 1.0))
            for s in steps:
                views[s].append(seen[s])
        return torch.cat(images), {s: torch.cat(v) for s, v in views.items()}

    @torch.no_grad()
    def start(
        self, latents: torch.Tensor, class_labels: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``step`` DDIM steps: the intermediate samples `(n, C, H, W)` (to resume from with [`finish`]) and
        the predicted clean images after them `(n, C, H, W)` in [-1, 1]."""
        self._check_step(step)
        states, views = [], []
        for chunk, labels in self._chunks(latents, class_labels):
            x, seen = self._denoise(self._initial(chunk), labels, 0, step, (step,))
            states.append(x)
            views.append(seen[step])
        return torch.cat(states), torch.cat(views)

    @torch.no_grad()
    def finish(
        self, states: torch.Tensor, class_labels: torch.Tensor | None, step: int, views: Sequence[int] | None = None
    ):
        """The remaining ``K - step`` steps from [`start`]'s intermediate samples: images `(n, C, H, W)` in [-1, 1],
        equal to [`generate`]'s for the same latents; with ``views`` (steps after ``step``), also the predicted clean
        image after each of them (a dict, as [`generate_views`] gives)."""
        self._check_step(step)
        images, seen = [], {s: [] for s in views or ()}
        for chunk, labels in self._chunks(states, class_labels, check=False):
            x, chunk_seen = self._denoise(chunk, labels, step, self.num_steps, tuple(views or ()))
            images.append(self._checked(x.float()).clamp(-1, 1))
            for s in seen:
                seen[s].append(chunk_seen[s])
        if views is None:
            return torch.cat(images)
        return torch.cat(images), {s: torch.cat(v) for s, v in seen.items()}

    def view_timestep(self, step: int) -> int:
        """The scheduler timestep of the predicted clean image after ``step`` steps (that of the ``step``-th step):
        what screen heads trained at one number of steps are matched by at another."""
        self._check_step(step)
        return int(self.scheduler.timesteps[step - 1])


# ------------------------------------------------------------------------------------------------------------------
# Any diffusers pipeline that accepts `latents=`


def _infer_pipeline_latent_shape(pipeline, pipeline_kwargs: dict) -> tuple[int, ...]:
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    config = getattr(denoiser, "config", None)
    if config is None or getattr(config, "in_channels", None) is None or getattr(config, "sample_size", None) is None:
        raise ValueError(
            f"Cannot infer the latent shape of {type(pipeline).__name__}: it has no `unet` or `transformer` with "
            "`in_channels` and `sample_size` in its config. Pass `latent_shape=(C, H, W)`, the shape of one latent "
            "the pipeline accepts in `latents=`."
        )
    h, w = _sample_size(config.sample_size)
    height, width = pipeline_kwargs.get("height"), pipeline_kwargs.get("width")
    scale = getattr(pipeline, "vae_scale_factor", None)
    if height is not None and width is not None and scale:
        h, w = int(height) // scale, int(width) // scale
    return (int(config.in_channels), h, w)


class PipelineProposal(ProposalAdapter):
    """Any diffusers pipeline that accepts ``latents=`` and ``output_type="pt"``, with fixed call arguments.

    For example a text-to-image pipeline with a fixed prompt: ``PipelineProposal(sd_pipe, pipeline_kwargs={"prompt":
    "a portrait photo", "guidance_scale": 5.0})``. The pipeline's initial latents are the latent ``z``; its images
    are decoded as the pipeline decodes them (through its VAE). The batch size is passed as ``num_images_per_prompt``
    when the pipeline takes a prompt, else as ``batch_size`` when it has that argument.

    The pipeline must be deterministic given its latents (an ODE sampler such as DDIM with ``eta = 0``, Euler,
    DPM-Solver++, flow matching): a sampler that adds fresh noise at each step makes the image depend on more than
    its latent and biases S2M. [`check_deterministic`] tests this on one latent; [`~S2MPipeline`] calls it once.

    Screening (`S2MSamplingConfig.screen`): the adapter watches the pipeline's denoising loop through
    ``callback_on_step_end`` and a wrapper around ``scheduler.step`` (for the step's ``pred_original_sample``), stops
    it after the screen step with ``interrupt``, decodes the predicted clean latents with the pipeline's VAE, and
    reruns a proposal that passes from its latent ([`start`], [`finish`]; ``screen_restarts``). [`check_screen`] says,
    once, whether the pipeline allows it.

    Args:
        pipeline (`DiffusionPipeline`): the loaded pipeline; its weights are used, not copied.
        latent_shape (`Sequence[int]`, *optional*): shape of one latent. Inferred from the pipeline's `unet` or
            `transformer` config (``(in_channels, sample_size, sample_size)``, or ``height // vae_scale_factor``...
            when `height`/`width` are among the fixed arguments).
        pipeline_kwargs (`dict`, *optional*): fixed call arguments (prompt, guidance scale, size, ...).
        num_inference_steps (`int`, *optional*): passed to the pipeline when given.
        micro_batch_size (`int`, defaults to 64): latents per pipeline call.
        output_range (`tuple[float, float]`, defaults to `(0.0, 1.0)`): the value range of the pipeline's
            ``output_type="pt"`` images (``[0, 1]`` for diffusers' pipelines); mapped linearly to [-1, 1].
    """

    def __init__(
        self,
        pipeline,
        latent_shape: Sequence[int] | None = None,
        pipeline_kwargs: dict | None = None,
        num_inference_steps: int | None = None,
        micro_batch_size: int = 64,
        output_range: tuple[float, float] = (0.0, 1.0),
    ):
        if pipeline is None or not callable(pipeline):
            raise ValueError("PipelineProposal needs a loaded diffusers pipeline.")
        self.pipeline = pipeline
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.parameters = inspect.signature(pipeline.__call__).parameters
        for name in ("latents", "output_type"):
            if name not in self.parameters:
                raise ValueError(
                    f"{type(pipeline).__name__} does not accept `{name}=`, so it cannot serve as an S2M proposal "
                    "(the latents must be given to it, and its images returned as tensors). Use a pipeline that "
                    "takes `latents=` and `output_type='pt'`, or wrap its UNet with DDIMProposal."
                )
        for name in ("latents", "output_type", "return_dict", "generator"):
            if name in self.pipeline_kwargs:
                raise ValueError(f"pipeline_kwargs must not set `{name}`: the adapter sets it.")
        if latent_shape is None:
            latent_shape = _infer_pipeline_latent_shape(pipeline, self.pipeline_kwargs)
        super().__init__(latent_shape, micro_batch_size=micro_batch_size)
        if num_inference_steps is not None:
            self.pipeline_kwargs["num_inference_steps"] = int(num_inference_steps)
        self.output_range = _check_output_range(output_range)
        steps = self.pipeline_kwargs.get("num_inference_steps", self.parameters.get("num_inference_steps"))
        steps = getattr(steps, "default", steps)
        self.num_steps = int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else None

    @property
    def device(self) -> torch.device:
        device = getattr(self.pipeline, "_execution_device", None) or getattr(self.pipeline, "device", None)
        return device if isinstance(device, torch.device) else torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        denoiser = getattr(self.pipeline, "unet", None) or getattr(self.pipeline, "transformer", None)
        dtype = getattr(denoiser, "dtype", None) or getattr(self.pipeline, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    def _models(self) -> list[nn.Module]:
        components = getattr(self.pipeline, "components", {}) or {}
        return [m for m in components.values() if isinstance(m, nn.Module)]

    def generator_name(self) -> str:
        return f"{type(self.pipeline).__name__} ({type(self).__name__})"

    def _range_fix(self, low: float = 0, high: float = 255) -> str:
        return (
            f"Its output_type='pt' images were read as lying in {list(self.output_range)}: pass the range they lie "
            f"in, e.g. `PipelineProposal(..., output_range=({low}, {high}))`."
        )

    def _batch_kwargs(self, n: int) -> dict:
        takes_prompt = any(k in self.pipeline_kwargs for k in ("prompt", "prompt_embeds"))
        if "num_images_per_prompt" in self.parameters and takes_prompt:
            prompt = self.pipeline_kwargs.get("prompt")
            if isinstance(prompt, (list, tuple)) and len(prompt) != 1:
                raise ValueError("PipelineProposal takes one fixed prompt (a string), not a list of prompts.")
            return {"num_images_per_prompt": n}
        if "batch_size" in self.parameters:
            return {"batch_size": n}
        return {}

    def _call(self, latents: torch.Tensor, **call_kwargs):
        """One pipeline call on the latents ``(b, *latent_shape)`` with the fixed arguments, its progress bar off."""
        config = getattr(self.pipeline, "_progress_bar_config", None)
        self.pipeline.set_progress_bar_config(disable=True)
        try:
            return self.pipeline(
                **self.pipeline_kwargs,
                **self._batch_kwargs(latents.shape[0]),
                latents=latents.to(self.device, self._dtype()),
                return_dict=True,
                **call_kwargs,
            )
        finally:
            if config is None:
                del self.pipeline._progress_bar_config
            else:
                self.pipeline._progress_bar_config = config

    def _generate(self, latents: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        return self._library_range(self._call(latents, output_type="pt").images)

    def _library_range(self, images) -> torch.Tensor:
        """The pipeline's ``output_type="pt"`` images `(b, C, H, W)` (or channels-last) mapped from ``output_range``
        to [-1, 1]."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(
                f"{type(self.pipeline).__name__} returned {type(images).__name__} for output_type='pt'; a tensor "
                "(B, C, H, W) is needed."
            )
        if images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
            images = images.permute(0, 3, 1, 2)  # channels-last output
        low, high = self.output_range
        # The one place where a pipeline's output range is brought to the library's [-1, 1].
        return (2.0 * (images.float() - low) / (high - low) - 1.0).to(images.device)

    # --- screening (delayed acceptance, `s2m_diffusers.sampling.sample_imh`) -----------------------------------------
    # A pipeline runs its denoising loop in one call, so the adapter watches it: a wrapper around `scheduler.step`
    # keeps each step's `pred_original_sample` (the predicted clean latents), the step callback
    # (`callback_on_step_end`) picks it up after the screen step and stops the loop there (`pipe._interrupt`), and
    # the predicted clean latents are decoded by the pipeline's VAE. A pipeline cannot be resumed from a step, so a
    # proposal that passes the screen is rerun from its latent (`screen_restarts`): K UNet calls, not K - s.
    screen_restarts = True
    # [`check_screen`]'s answers, by number of steps and scheduler (`S2MPipeline` keeps one per pipeline)
    screen_checks: dict | None = None

    @property
    def screen_unavailable(self) -> str | None:
        """Why this pipeline cannot be screened, `None` when it can ([`check_screen`], run once per number of steps
        and scheduler)."""
        if not hasattr(self, "_screen_reason"):
            checks = self.screen_checks if self.screen_checks is not None else {}
            key = (self.num_steps, type(getattr(self.pipeline, "scheduler", None)).__name__)
            if key not in checks:
                checks[key] = self.check_screen()
            self._screen_reason = checks[key]
        return self._screen_reason

    @torch.no_grad()
    def check_screen(self, atol: float = 1e-3) -> str | None:
        """Whether the pipeline can be stopped after a denoising step and its predicted clean image read: `None`
        when it can, else the reason, naming what is missing.

        It needs a known number of steps (at least 2), a ``callback_on_step_end`` argument and an ``interrupt``
        property (diffusers' step-callback contract), a scheduler whose ``step`` output has ``pred_original_sample``
        (DDIM, Euler, DDPM do; DPM-Solver does not), and final images that equal its VAE's plain decode of its final
        latents (``vae.decode(latents / scaling_factor + shift_factor)``, as Stable Diffusion, SD 2, SD 3 and PixArt
        decode, or with the VAE's ``latents_mean`` and ``latents_std`` as SD XL does; a pipeline that unpacks its
        latents first, or upcasts its VAE to decode, is refused). One latent is run twice to check the last two, once
        whole and once stopped after a step.
        """
        name = type(self.pipeline).__name__
        if self.num_steps is None or self.num_steps < 2:
            return (
                f"{name}'s number of denoising steps is not known or below 2 (give `num_inference_steps=` of at least "
                "2) so there is no step to screen after."
            )
        if "callback_on_step_end" not in self.parameters or "callback_on_step_end" in self.pipeline_kwargs:
            return (
                f"{name} takes no `callback_on_step_end=` (or pipeline_kwargs sets its own), so the adapter cannot "
                "watch its denoising loop."
            )
        if not isinstance(getattr(type(self.pipeline), "interrupt", None), property):
            return f"{name} has no `interrupt` property, so its denoising loop cannot be stopped after a step."
        scheduler = getattr(self.pipeline, "scheduler", None)
        if not callable(getattr(scheduler, "step", None)):
            return f"{name} has no `scheduler` with a `step` method to read the predicted clean latents from."
        z = self.p_z().sample(1, generator=torch.Generator().manual_seed(0))
        with eval_mode(*self._models()):
            images, seen, final, _ = self._run(z, views=(1,), final=True)
            if seen.get(1) is None:
                return (
                    f"its scheduler {type(scheduler).__name__} does not return `pred_original_sample` from `step`, so "
                    "the predicted clean image is unknown part-way: use DDIMScheduler or EulerDiscreteScheduler, e.g. "
                    "`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`."
                )
            decoded = self._decode(final)
            if decoded.shape != images.shape or not torch.allclose(decoded, images.float(), atol=atol):
                return (
                    f"{name}'s final images are not its VAE's plain decode of its final latents (it unpacks or "
                    "rescales them first), so its predicted clean latents cannot be decoded as it would decode them."
                )
            _, _, _, calls = self._run(z, views=(1,), stop=1)
        if calls != 1:
            return f"{name} ran {calls} denoising steps when stopped after 1: it does not honour `interrupt`."
        return None

    def _run(self, latents: torch.Tensor, views: Sequence[int] = (), stop: int | None = None, final: bool = False):
        """One pipeline call on one micro-batch, watched: its images (``output_type="pt"``, as the pipeline returns
        them; `None` when stopped), the predicted clean latents after each of ``views`` steps, the final latents
        (with ``final``) and the number of scheduler steps it ran. With ``stop``, the loop is stopped after that many
        steps and nothing is decoded."""
        scheduler = self.pipeline.scheduler
        own = vars(scheduler).get("step")
        step = scheduler.step
        last: dict = {"calls": 0}
        seen: dict[int, torch.Tensor | None] = {}

        def watched(*args, **kwargs):
            return_dict = kwargs.pop("return_dict", True)
            out = step(*args, **kwargs, return_dict=True)
            last["x0"], last["calls"] = getattr(out, "pred_original_sample", None), last["calls"] + 1
            return out if return_dict else out.to_tuple()

        def on_step_end(pipe, i, t, tensors):
            if i + 1 in views:
                seen[i + 1] = last.get("x0")
            if final and i + 1 == self.num_steps:
                last["final"] = tensors["latents"]
            if stop is not None and i + 1 >= stop:
                pipe._interrupt = True
            return {}

        scheduler.step = watched
        try:
            out = self._call(latents, output_type="latent" if stop else "pt", callback_on_step_end=on_step_end)
        finally:
            if own is None:
                del scheduler.step
            else:
                scheduler.step = own
        return (None if stop else out.images), seen, last.get("final"), last["calls"]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents decoded as the pipeline decodes its final latents: its VAE (none: a pixel-space pipeline), then
        [0, 1], in the pipeline's ``output_type="pt"`` range."""
        vae = getattr(self.pipeline, "vae", None)
        if vae is None:
            image = latents
        else:
            config = vae.config
            latents = latents.to(vae.dtype)
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:  # as Stable Diffusion XL decodes with such a VAE
                shape = (1, len(mean), *[1] * (latents.ndim - 2))
                mean, std = (torch.tensor(v).view(shape).to(latents) for v in (mean, std))
                latents = latents * std / config.scaling_factor + mean
            else:
                latents = latents / config.scaling_factor
            if getattr(config, "shift_factor", None):
                latents = latents + config.shift_factor
            image = vae.decode(latents, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _view(self, latents: torch.Tensor) -> torch.Tensor:
        """Predicted clean latents as the library's images in [-1, 1]."""
        return self._library_range(self._decode(latents)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def generate_views(
        self, latents: torch.Tensor, class_labels: torch.Tensor | None = None, steps: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """As [`generate`], and the predicted clean image after each of ``steps`` (of the K) steps `(n, C, H, W)`
        (one run per latent; each view costs a VAE decode)."""
        images, views = [], {s: [] for s in steps}
        for chunk, _ in self._chunks(latents, class_labels):
            raw, seen, _, _ = self._run(chunk, views=tuple(steps))
            images.append(self._checked(self._library_range(raw)).clamp(-1.0, 1.0))
            for s in steps:
                views[s].append(self._view(seen[s]))
        return torch.cat(images), {s: torch.cat(v) for s, v in views.items()}

    @torch.no_grad()
    def start(
        self, latents: torch.Tensor, class_labels: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``step`` denoising steps, the pipeline stopped there: the states to finish from (the latents
        themselves: [`finish`] reruns them) and the predicted clean images after ``step`` steps `(n, C, H, W)`."""
        self._check_step(step)
        views = []
        for chunk, _ in self._chunks(latents, class_labels):
            views.append(self._view(self._run(chunk, views=(step,), stop=step)[1][step]))
        return latents, torch.cat(views)

    @torch.no_grad()
    def finish(
        self, states: torch.Tensor, class_labels: torch.Tensor | None, step: int, views: Sequence[int] | None = None
    ):
        """The images of [`start`]'s states, rerun whole (K steps): `(n, C, H, W)` in [-1, 1], equal to
        [`generate`]'s; with ``views`` (steps after ``step``), also the predicted clean image after each of them."""
        self._check_step(step)
        images, seen = self.generate_views(states, class_labels, tuple(views or ()))
        return images if views is None else (images, seen)

    @torch.no_grad()
    def check_deterministic(self, atol: float = 1e-4) -> None:
        """Generate one latent twice and raise if the images differ (a sampler that adds noise at each step).

        Raises:
            ValueError: naming the scheduler and the fix.
        """
        z = self.p_z().sample(1, generator=torch.Generator().manual_seed(0))
        a, b = self.generate(z), self.generate(z)
        if not torch.allclose(a, b, atol=atol):
            scheduler = type(getattr(self.pipeline, "scheduler", None)).__name__
            raise ValueError(
                f"{type(self.pipeline).__name__} is not deterministic given its latents: the same latent gave images "
                f"that differ by up to {float((a - b).abs().max()):.3g} (scheduler: {scheduler}). S2M samples in "
                "latent space and needs each image to be a function of its latent. Give the pipeline an ODE "
                "scheduler, e.g. `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` (eta = 0), or "
                "EulerDiscreteScheduler / DPMSolverMultistepScheduler."
            )


# ------------------------------------------------------------------------------------------------------------------
# GAN generators


def _output_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for name in ("sample", "images", "image"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        f"The generator returned {type(out).__name__}; expected a tensor of images (B, C, H, W) in [-1, 1] (or an "
        "output with a `sample` tensor)."
    )


class GeneratorProposal(ProposalAdapter):
    """A GAN generator, or any `ModelMixin` whose forward maps latents (and optionally class labels) to images.

    The forward is called as ``model(latents)`` or, for a class-conditional model, ``model(latents,
    class_labels=labels)``, and must return images in [-1, 1] (a ``tanh`` output), or in the range given by
    ``output_range``, as a tensor or an output with a ``sample`` field. The reference is
    [`~s2m_diffusers.models.gan.DCGANGenerator`].

    Args:
        model (`ModelMixin`): the generator.
        latent_shape (`Sequence[int]`, *optional*): shape of one latent; read from the config's ``latent_dim`` (or
            ``latent_shape``) when omitted.
        micro_batch_size (`int`, defaults to 64): latents per generator call.
        num_classes (`int`, *optional*): classes of a class-conditional model; read from the config's
            ``num_classes`` (or ``num_class_embeds``) when omitted.
        class_probs (`Sequence[float]`, *optional*): ``p_G(c)`` for ``proposal(n)`` (uniform by default).
        output_range (`tuple[float, float]`, *optional*): the range the model's images lie in, e.g. ``(0, 255)``;
            mapped linearly to [-1, 1]. Defaults to the model config's ``output_range`` (record it with
            ``model.register_to_config(output_range=[0, 255])`` before ``save_pretrained``, and every pipeline built
            on the saved generator rescales), else ``(-1, 1)``.
    """

    def __init__(
        self,
        model: nn.Module,
        latent_shape: Sequence[int] | None = None,
        micro_batch_size: int = 64,
        num_classes: int | None = None,
        class_probs: Sequence[float] | None = None,
        output_range: Sequence[float] | None = None,
    ):
        if model is None:
            raise ValueError("GeneratorProposal needs a generator model.")
        config = getattr(model, "config", None)
        if latent_shape is None:
            latent_shape = getattr(config, "latent_shape", None)
            if latent_shape is None and getattr(config, "latent_dim", None) is not None:
                latent_shape = (config.latent_dim,)
        if latent_shape is None:
            raise ValueError(
                f"Cannot tell the latent shape of {type(model).__name__}: its config has no `latent_dim` or "
                "`latent_shape`. Pass `latent_shape=` (e.g. `(128,)`), the shape of one latent its forward takes."
            )
        if num_classes is None:
            num_classes = getattr(config, "num_classes", None) or getattr(config, "num_class_embeds", None)
        super().__init__(latent_shape, micro_batch_size, num_classes, class_probs)
        self.model = model
        if output_range is None:
            output_range = getattr(config, "output_range", None) or (-1.0, 1.0)
        self.output_range = _check_output_range(output_range)

    def _range_fix(self, low: float = 0, high: float = 255) -> str:
        return (
            f"If the generator works in another range, e.g. [{low}, {high}], record it in its config and its images "
            f'are rescaled to [-1, 1]: add "output_range": [{low}, {high}] to the generator folder\'s config.json '
            f"(for `s2m train-heads --generator`), or call `gan.register_to_config(output_range=[{low}, {high}])` "
            "(a loaded S2MPipeline: `pipe.gan.register_to_config(...)`, then `pipe.save_pretrained(DIR)` to keep it); "
            f"or pass `GeneratorProposal(gan, output_range=({low}, {high}))`."
        )

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        config = getattr(self.model, "config", None)
        size = getattr(config, "sample_size", None)
        channels = getattr(config, "out_channels", None)
        if size is None or channels is None:
            return None
        h, w = _sample_size(size)
        return (int(channels), h, w)

    @property
    def device(self) -> torch.device:
        return execution_device(self.model)

    def _models(self) -> list[nn.Module]:
        return [self.model]

    differentiable = True

    def _generate(self, latents: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        device, dtype = execution_device(self.model), module_device_dtype(self.model)[1]
        z = latents.to(device=device, dtype=dtype)
        if class_labels is None:
            out = self.model(z)
        else:
            out = self.model(z, class_labels=class_labels.to(device))
        images = _output_tensor(out)
        if images.ndim != 4:
            raise ValueError(f"The generator returned a tensor of shape {tuple(images.shape)}; expected (B, C, H, W).")
        low, high = self.output_range
        if (low, high) == (-1.0, 1.0):
            return images.float()
        return 2.0 * (images.float() - low) / (high - low) - 1.0


def _check_output_range(output_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in output_range)
    except (TypeError, ValueError):
        raise ValueError(f"output_range must be (low, high), two numbers; got {output_range!r}.") from None
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"output_range must be (low, high) with finite high > low, got {output_range!r}.")
    return low, high


def components_from_pipe(pipeline) -> dict:
    """The proposal components of an S2M pipeline made from a loaded diffusers pipeline (`S2MPipeline.from_pipe`):
    ``unet`` and ``scheduler`` (run as DDIM) for a pipeline with a pixel-space `UNet2DModel` that takes no
    ``latents=`` (`DDPMPipeline`, `DDIMPipeline`), else ``proposal_pipeline`` (a pipeline that takes ``latents=``)."""
    from diffusers import DiffusionPipeline, UNet2DModel

    if not isinstance(pipeline, DiffusionPipeline):
        raise ValueError(
            f"from_pipe wraps a loaded diffusers pipeline; got {type(pipeline).__name__}. For a GAN generator use "
            "`S2MPipeline(heads=heads, gan=generator)`."
        )
    components = pipeline.components
    takes_latents = "latents" in inspect.signature(pipeline.__call__).parameters
    unet, scheduler = components.get("unet"), components.get("scheduler")
    if not takes_latents and isinstance(unet, UNet2DModel) and scheduler is not None:
        return {"unet": unet, "scheduler": scheduler}
    return {"proposal_pipeline": pipeline}


def check_components(heads, gan, unet, scheduler, proposal_pipeline, need_heads: bool = True) -> None:
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


def check_screen_heads(screen_heads, heads, unet) -> None:
    """Screen heads belong beside heads of the same attributes, for a UNet proposal, and say where they were
    trained (`s2m_diffusers.screen_heads.distil_screen_heads` sets ``screen_timesteps``)."""
    if screen_heads is None:
        return
    if unet is None:
        raise ValueError(
            "`screen_heads=` read a diffusion model's predicted clean images part-way through its denoising; this "
            "pipeline has no `unet=`. Leave screen_heads out for a GAN or a wrapped pipeline."
        )
    if not getattr(screen_heads.config, "screen_timesteps", None):
        raise ValueError(
            "`screen_heads=` has no `screen_timesteps` in its config: these are ordinary heads. Make screen heads "
            "with `s2m_diffusers.screen_heads.distil_screen_heads(pipe)`."
        )
    theirs = list(screen_heads.config.attribute_names)
    names = theirs if heads is None else list(heads.config.attribute_names)
    if names != theirs:
        raise ValueError(
            f"`screen_heads=` read the attributes {theirs}, but the heads read {names}: distil screen heads from "
            "these heads (`s2m_diffusers.screen_heads.distil_screen_heads`)."
        )


# ------------------------------------------------------------------------------------------------------------------
# The adapter of an S2M pipeline's components

_COMPONENTS = ("heads", "gan", "unet", "scheduler", "proposal_pipeline")


def make_proposal(
    components: dict, config, micro_batch_size: int = 64, num_inference_steps: int | None = None
) -> ProposalAdapter:
    """The adapter of an S2M pipeline's generator: ``components`` (``heads``, ``gan``, ``unet``, ``scheduler``,
    ``proposal_pipeline``) and its config (``latent_shape``, ``num_inference_steps``, ``proposal_kwargs``).

    Args:
        micro_batch_size (`int`, defaults to 64): latents per generator call.
        num_inference_steps (`int`, *optional*): overrides ``config.num_inference_steps``.
    """
    heads, gan, unet, scheduler, pipeline = (components.get(k) for k in _COMPONENTS)
    check_components(heads, gan, unet, scheduler, pipeline, need_heads=False)
    class_probs = getattr(getattr(heads, "config", None), "proposal_class_probs", None)
    latent_shape = config.latent_shape
    output_range = getattr(config, "output_range", None)  # a pipeline-level setting, when the config has one
    if gan is not None:
        num_classes = getattr(gan.config, "num_classes", None) if hasattr(gan, "config") else None
        if class_probs is not None and num_classes is not None and len(class_probs) != num_classes:
            class_probs = None  # checked with a teaching error in ClassPlan.choose
        return GeneratorProposal(
            gan, latent_shape, micro_batch_size, class_probs=class_probs, output_range=output_range
        )
    steps = num_inference_steps or config.num_inference_steps
    if unet is not None:
        num_classes = getattr(unet.config, "num_class_embeds", None)
        if class_probs is not None and num_classes is not None and len(class_probs) != num_classes:
            class_probs = None
        return DDIMProposal(unet, scheduler, steps, micro_batch_size, class_probs=class_probs)
    kwargs = dict(config.proposal_kwargs or {})
    takes_steps = "num_inference_steps" in inspect.signature(pipeline.__call__).parameters
    if num_inference_steps is not None or (takes_steps and "num_inference_steps" not in kwargs):
        kwargs["num_inference_steps"] = steps
    if output_range is not None:
        return PipelineProposal(
            pipeline, latent_shape, kwargs, micro_batch_size=micro_batch_size, output_range=output_range
        )
    return PipelineProposal(pipeline, latent_shape, kwargs, micro_batch_size=micro_batch_size)


def describe_proposal(components: dict, config) -> dict:
    """A summary of an S2M pipeline's proposal for the model card and the statistics (see [`make_proposal`])."""
    _, gan, unet, scheduler, pipe = (components.get(k) for k in _COMPONENTS)
    if gan is not None:
        out = {"kind": "GAN generator", "class": type(gan).__name__}
        gan_config = getattr(gan, "config", None)
        for key in ("latent_dim", "sample_size", "out_channels", "num_classes"):
            if getattr(gan_config, key, None) is not None:
                out[key] = getattr(gan_config, key)
    elif unet is not None:
        out = {
            "kind": "diffusion UNet run as DDIM (eta = 0) from its initial noise",
            "class": type(unet).__name__,
            "scheduler": type(scheduler).__name__,
            "num_inference_steps": config.num_inference_steps,
        }
    else:
        out = {"kind": "diffusers pipeline called with latents=", "class": type(pipe).__name__}
        if config.proposal_kwargs:
            out["proposal_kwargs"] = dict(config.proposal_kwargs)
        name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
        if isinstance(name, str) and name.count("/") == 1 and not os.path.exists(name):
            out["base_model"] = name
    if config.latent_shape:
        out["latent_shape"] = list(config.latent_shape)
    return out
