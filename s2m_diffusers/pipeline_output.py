"""What `S2MPipeline.__call__` returns: the output dataclass, the images in the asked type, the call's statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

__all__ = ["S2MPipelineOutput", "OUTPUT_TYPES", "postprocess", "call_stats", "call_budget_error", "empty_outputs"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


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
            What the call did and what it can say of its images; see [`S2MPipeline.__call__`].
        class_labels (`torch.Tensor` of shape `(N,)`, *optional*):
            The class each image was generated with, for a class-conditional proposal.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    latents: torch.Tensor
    on_target: torch.Tensor
    stats: dict
    class_labels: torch.Tensor | None = None


def postprocess(images: torch.Tensor, latents: torch.Tensor, output_type: str):
    """Images `(N, C, H, W)` in [-1, 1] as ``output_type`` asks (diffusers' conventions)."""
    if output_type == "latent":
        return latents
    images = (images.float().cpu() / 2 + 0.5).clamp(0, 1)  # (N, C, H, W) in [0, 1]
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    if output_type == "np":
        return array
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.numpy_to_pil(array)


def call_stats(result, timings: dict, runs, target, config, plan, proposal_kind: str) -> dict:
    """The ``stats`` of a call: counts, costs, the chains' record and diagnostics, the reading, the seconds."""
    stats = result.stats
    z, n = result.z, result.num_samples
    diffusion = proposal_kind != "gan"
    chains = stats.chains or {}
    return {
        "target": str(target),
        "num_images": n,
        "proposals": stats.proposals,
        "accepted": stats.accepted,
        "acceptance_rate": chains.get("acceptance") if "acceptance" in chains else stats.acceptance_rate,
        "proposals_per_image": stats.proposals / n if n else math.inf,
        "on_target_images": int(result.on_target.sum()),
        "unique_images": int(torch.unique(z.reshape(n, -1), dim=0).shape[0]) if n else 0,
        "rounds": timings["rounds"],
        "kernel": config.kernel,
        "chains": chains,  # the pool, the chains, the step sizes, the thinning, the acceptance, the screen
        "diagnostics": stats.diagnostics,  # R-hat, ESS, the reading check, their warnings
        "warnings": list((stats.diagnostics or {}).get("warnings", [])),
        "dv_strength": config.dv_strength,  # beta: the weights target p_G^(1 - beta) p_data^beta on the target
        "negation_margin": config.negation_margin,  # lambda and kappa as used (the heads' own unless set)
        "presence_margin": config.presence_margin,
        # UNet calls (denoising steps) per returned image, the pool included; None for a GAN proposal
        "unet_calls": stats.unet_calls if diffusion else None,
        "unet_calls_per_image": (stats.unet_calls / n if n else math.inf) if diffusion else None,
        "screen": stats.screen,  # delayed acceptance: the step, the floor, the share screened out
        "budget_exhausted": stats.budget_exhausted,
        "max_proposals": timings["max_proposals"],
        "budget_spent": stats.cost,  # in proposals, one screened out after s of K steps counting s / K
        "class_label": plan.describe(),
        "proposal": proposal_kind,
        "seconds_generator": timings["seconds_generator"],
        "seconds_heads": timings["seconds_heads"],
        "seconds_sampler": timings["seconds_sampler"],
        "seconds_total": timings["seconds_generator"] + timings["seconds_heads"] + timings["seconds_sampler"],
        "num_processes": runs.num_processes,
        "seconds_wall": timings["seconds_wall"],
    }


def call_budget_error(partial, target, num_images: int, budget, plan, weigher):
    """The call's `BudgetExhaustedError`: how far it got, what the entry pool saw of each literal and of the whole
    target (`weights.Weigher.pool_report`), and what to try, in the pipeline's words."""
    from .results import budget_error

    seen = weigher.pool_report(target, partial.pool_readings)
    tries = [f"a larger budget, e.g. max_proposals={4 * budget}"]
    if plan.mode != "fixed":
        tries.append(
            "a class-conditional proposal (a generator conditioned on one of the target's attributes, with heads "
            "trained with D_f)"
        )
    if partial.num_samples:
        tries.append(f"allow_partial=True to keep the {partial.num_samples} image(s) found")
    return budget_error(partial, num_images, budget, str(target), tries, "images", seen)


def empty_outputs(proposal, plan, heads_config) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and images of no image, shaped as the call's would be."""
    hc = heads_config
    image_shape = proposal.image_shape or (int(hc.in_channels), int(hc.sample_size), int(hc.sample_size))
    return torch.zeros((0, *plan.latent_shape(proposal.latent_shape))), torch.zeros((0, *image_shape))
