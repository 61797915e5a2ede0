"""A pixel-space diffusers pipeline with the step-callback contract of diffusers' text-to-image pipelines.

diffusers' own pixel-space pipelines (`DDPMPipeline`, `DDIMPipeline`) take neither ``latents=`` nor
``callback_on_step_end=``; its latent-diffusion pipelines (Stable Diffusion and kin) take both. [`LatentsDDIMPipeline`]
is the pixel-space UNet with the latter's call contract (``latents=``, ``callback_on_step_end=``,
``callback_on_step_end_tensor_inputs=``, the ``interrupt`` property, ``output_type="pt"``), so that the benchmarks can
run a real trained UNet through `s2m_diffusers.proposals.PipelineProposal` (the path any wrapped pipeline takes) and
compare it with the same UNet as a `DDIMProposal`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["LatentsDDIMPipeline"]


class LatentsDDIMPipeline(DiffusionPipeline):
    """DDIM (``eta = 0``) with a pixel-space `UNet2DModel`, called as diffusers' text-to-image pipelines are.

    Args:
        unet (`UNet2DModel`): the denoiser.
        scheduler (`SchedulerMixin`): a scheduler with DDIM's ``step(..., eta=)`` (`DDIMScheduler`).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Denoise ``latents`` (or fresh noise) in ``num_inference_steps`` DDIM steps.

        Returns:
            `ImagePipelineOutput`: ``images`` in [0, 1] (``output_type="pt"``), or the final sample
            (``output_type="latent"``).
        """
        if any(name not in self._callback_tensor_inputs for name in callback_on_step_end_tensor_inputs or ()):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}.")
        self._interrupt = False
        config = self.unet.config
        size = config.sample_size if isinstance(config.sample_size, (list, tuple)) else (config.sample_size,) * 2
        shape = (batch_size, config.in_channels, *size)
        device, dtype = self.unet.device, self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        with self.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(self.scheduler.timesteps):
                if self.interrupt:
                    continue
                model_input = self.scheduler.scale_model_input(latents, t)
                noise = self.unet(model_input, t).sample
                latents = self.scheduler.step(noise, t, latents, eta=0.0, return_dict=False)[0]
                if callback_on_step_end is not None:
                    latents = callback_on_step_end(self, i, t, {"latents": latents}).pop("latents", latents)
                bar.update()
        if output_type == "latent":
            images = latents
        else:
            images = (latents.float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
