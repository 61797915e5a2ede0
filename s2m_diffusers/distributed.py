"""Several processes with `accelerate`: the process state, how images are split, per-process seeds, gathering.

[`S2MPipeline`](s2m_diffusers.pipeline_s2m.S2MPipeline) with ``distributed=True`` and
[`train_heads`](s2m_diffusers.training.train_heads) use these helpers; both run under

    accelerate launch --num_processes N script.py       # N GPUs (or `--multi_gpu`)
    accelerate launch --multi_gpu --num_processes N script.py   # on a machine without GPUs: N CPU processes (gloo)
    torchrun --nproc_per_node N script.py                # the same, without accelerate's launcher

On a machine without accelerator, `accelerate launch --cpu --num_processes N` starts *one* process (accelerate expects
`mpirun` for several CPU processes); use `--multi_gpu` or `torchrun` there: [`get_state`] sees several processes and
no accelerator and chooses CPU processes with the gloo backend (as ``ACCELERATE_USE_CPU=1`` would).

What a seed reproduces across process counts (see [`process_generator`] and `S2MPipeline.__call__`):

- a list of per-image generators: image ``i`` depends on ``generator[i]`` alone, so the images are the same for any
  number of processes;
- one generator (or none): every process derives its own generator from one integer drawn from it and its process
  index; the images are reproducible for a fixed number of processes, and differ when that number changes. With one
  process the generator is used as given, so ``distributed=True`` on one process equals a plain call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather, gather_object, pad_across_processes, parse_flag_from_env

if TYPE_CHECKING:
    from .results import SampleResult

__all__ = [
    "get_state",
    "launched_processes",
    "image_share",
    "process_generator",
    "generator_list",
    "RunPlan",
    "gather_rows",
    "gather_objects",
]


def launched_processes() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 when run as a plain script)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def get_state() -> PartialState:
    """The `accelerate.PartialState` of this process, set up for CPU processes where there is no accelerator.

    Several processes on a machine without an accelerator (``accelerate launch --multi_gpu``, ``torchrun``,
    `accelerate.debug_launcher`) get CPU processes with the gloo backend, as with ``ACCELERATE_USE_CPU=1``; a plain
    `PartialState()` would see one process there. Once created, the state is shared by `accelerate.Accelerator`.

    Returns:
        `accelerate.PartialState`: ``num_processes``, ``process_index``, ``is_main_process``, ``device``.
    """
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (launched_processes() > 1 and not _has_accelerator())
    return PartialState(cpu=cpu)


def image_share(num_items: int, state: PartialState) -> range:
    """The indices ``0..num_items-1`` this process handles: contiguous blocks, in process order, whose sizes differ by
    at most one (as `PartialState.split_between_processes`); empty when there are more processes than items."""
    with state.split_between_processes(list(range(num_items))) as indices:
        indices = list(indices)
    return range(indices[0], indices[-1] + 1) if indices else range(0)


def process_generator(generator: torch.Generator | None, state: PartialState) -> torch.Generator | None:
    """A generator for this process, derived from one integer drawn from ``generator`` and the process index.

    With one process ``generator`` is returned unchanged. With several, every process draws the same integer from the
    same seeded ``generator`` (or from torch's global generator when it is `None`) and seeds its own generator with
    ``(integer, process_index)``: the processes draw different images, reproducibly for a fixed process count.

    Args:
        generator (`torch.Generator`, *optional*): the caller's generator, seeded the same on every process.
        state (`accelerate.PartialState`): the process state.

    Returns:
        `torch.Generator` or `None`: on the device of ``generator`` (the CPU for `None`).
    """
    if state.num_processes == 1:
        return generator
    device = generator.device if generator is not None else torch.device("cpu")
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    seed = np.random.SeedSequence([base, state.process_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(seed >> np.uint64(1)))


def gather_rows(tensor: torch.Tensor, state: PartialState) -> torch.Tensor:
    """Concatenate every process's rows along the first dimension, in process order, on every process (CPU).

    The processes may hold different numbers of rows (none included) of the same trailing shape: `accelerate`'s
    `pad_across_processes` pads them to the longest, `gather` collects them, and the padding is dropped again.
    Boolean tensors are sent as bytes.

    Args:
        tensor (`torch.Tensor`): `(n_p, *shape)` on process ``p``.
        state (`accelerate.PartialState`): the process state.

    Returns:
        `torch.Tensor`: `(sum_p n_p, *shape)` on the CPU.
    """
    if state.num_processes == 1:
        return tensor.cpu()
    is_bool = tensor.dtype == torch.bool
    send = (tensor.to(torch.uint8) if is_bool else tensor).to(state.device).contiguous()
    counts = gather(torch.tensor([send.shape[0]], device=state.device)).cpu().tolist()  # n_p of every process
    if max(counts) == 0:
        return tensor.cpu()
    padded = pad_across_processes(send, dim=0)  # (max n_p, *shape)
    everything = gather(padded).cpu().reshape(state.num_processes, max(counts), *send.shape[1:])
    out = torch.cat([everything[p, :n] for p, n in enumerate(counts)])
    return out.bool() if is_bool else out


def gather_objects(value, state: PartialState) -> list:
    """``[value of process 0, value of process 1, ...]`` on every process (small picklable values: statistics)."""
    if state.num_processes == 1:
        return [value]
    return list(gather_object([value]))


def generator_list(generator, num_images: int) -> list[torch.Generator | None]:
    if isinstance(generator, list | tuple):
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


def gather_result(result: SampleResult, runs: RunPlan) -> SampleResult:
    """Every process's result, in image order, with every process's statistics merged (this process's own when it
    runs alone); the pool's readings stay this process's."""
    if runs.num_processes == 1:
        return result
    from .results import SampleResult, SamplerStats

    state = runs.dist_state
    gathered = [gather_rows(getattr(result, k), state) for k in ("z", "x", "log_w", "on_target")]
    stats = SamplerStats.merge(gather_objects(result.stats, state))
    return SampleResult(*gathered, stats, pool_readings=result.pool_readings)


@dataclass
class RunPlan:
    """This process's share of a call: one sampler run per generator (one for all its images, or one per image with a
    list of generators), its images and its part of the budget."""

    generators: list
    size: int  # images per run
    share: range  # this process's image indices
    budget: int
    dist_state: object = None
    results: list[SampleResult] = field(default_factory=list)

    @classmethod
    def plan(cls, generator, num_images, distributed, max_proposals) -> RunPlan:
        generators = generator_list(generator, num_images)
        dist_state, share = None, range(num_images)
        if distributed:
            dist_state = get_state()
            share = image_share(num_images, dist_state)
        if max_proposals is not None and (not isinstance(max_proposals, int) or max_proposals < 1):
            raise ValueError(f"max_proposals must be a positive integer, got {max_proposals!r}.")
        if max_proposals is None:
            budget = max(10_000, 1_000 * len(share))
        elif dist_state is None:
            budget = max_proposals
        else:  # this process's part of the budget, in proportion to its images
            budget = (max_proposals * share.stop) // num_images - (max_proposals * share.start) // num_images
        if isinstance(generator, list | tuple):
            return cls([generators[i] for i in share], 1, share, budget, dist_state)
        gen = generators[0] if dist_state is None else process_generator(generators[0], dist_state)
        return cls([gen] if len(share) else [], len(share), share, budget, dist_state)

    def spend(self, proposals: int, num_steps: int | None) -> None:
        """Count ``proposals`` drawn outside the sampler's runs (measuring ``dv_strength="auto"``), by the main
        process."""
        if proposals and self.is_main_process:
            from .results import SampleResult, SamplerStats

            calls = (num_steps or 0) * proposals
            self.results.append(
                SampleResult.empty(SamplerStats(proposals=proposals, unet_calls=calls, cost=proposals))
            )

    @property
    def remaining(self) -> float:
        """What is left of this process's budget, in proposals (a proposal screened out after ``s`` of ``K`` steps
        counts ``s / K``: `SamplerStats.cost`)."""
        return max(0.0, self.budget - sum(r.stats.cost for r in self.results))

    @property
    def is_main_process(self) -> bool:
        return self.dist_state is None or self.dist_state.is_main_process

    @property
    def num_processes(self) -> int:
        return 1 if self.dist_state is None else self.dist_state.num_processes
