"""What a sampling call will hold in memory, checked against what the machine has before any work starts.

A call keeps every image it returns until it returns (as float32, plus the copy of its ``output_type``), their
latents, the state of its chains (each a latent and an image, and a proposal of each per round), and the images of
its entry pool's on-target draws (at least one per pair of chains, up to `chains.MAX_ON_TARGET`). A count that
cannot fit (``num_images=10**9``) would otherwise start, hold more and more, and fail hours later in the allocator.
[`check_call_memory`] refuses it at once, naming the count, the bytes it needs, the bytes available and the fix;
`S2MPipeline.__call__` calls it first, and `s2m sample` checks its own runs with [`call_memory`] (it writes images as
they come, so that its memory does not grow with ``--num-images``).

The estimate is a lower bound (the models, the refitting and Python's own objects come on top): it refuses only
what cannot fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .chains import pool_on_target

__all__ = ["available_memory", "call_memory", "call_shapes", "check_call_memory", "most_that_fit", "format_bytes"]

FLOAT_BYTES = 4  # images and latents are held as float32
# bytes per image value of the copy each output type returns beside the float32 images (PIL: uint8; "latent": none)
OUTPUT_COPY_BYTES = {"pil": 1, "np": FLOAT_BYTES, "pt": FLOAT_BYTES, "latent": 0}
CHAIN_STATE_BYTES = 64  # a chain's scalars: its log weight, counters, flags
_MEMINFO = "/proc/meminfo"
_CGROUP = "/sys/fs/cgroup"


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``, ``3 * 2**40`` -> ``"3.0 TiB"``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _meminfo_available(path: str = _MEMINFO) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: str = _CGROUP) -> int | None:
    """What a cgroup v2 memory limit (a container's) leaves: ``memory.max - memory.current``; `None` without one."""
    try:
        with open(os.path.join(root, "memory.max"), encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(root, "memory.current"), encoding="ascii") as f:
            current = int(f.read().strip())
        return max(int(limit) - current, 0)
    except (OSError, ValueError):
        return None


def available_memory() -> tuple[int | None, str]:
    """The bytes a new allocation can take without swapping, and where the number comes from.

    ``MemAvailable`` of ``/proc/meminfo`` (Linux), lowered to what a container's cgroup memory limit leaves; else the
    free physical pages (``os.sysconf``); else `None` (unknown: nothing is refused).

    Returns:
        `tuple[int | None, str]`: the bytes, and their source for messages.
    """
    available, source = _meminfo_available(), f"MemAvailable in {_MEMINFO}"
    if available is None:
        try:
            pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            if pages > 0 and page_size > 0:
                available, source = pages * page_size, "free physical memory (os.sysconf)"
        except (AttributeError, ValueError, OSError):
            pass
    limited = _cgroup_available()
    if limited is not None and (available is None or limited < available):
        available, source = limited, f"what the cgroup memory limit ({_CGROUP}/memory.max) leaves"
    return available, source


def call_shapes(pipeline) -> tuple[tuple[int, ...], int]:
    """``(image_shape, latent_numel)`` of an `S2MPipeline`'s proposal, known without running it: the generator's
    image shape when its config tells it, else the heads' input (which the images are at least); the values of one
    latent (a class drawn with it adds one)."""
    proposal = pipeline.get_proposal()
    shape = proposal.image_shape
    if shape is None:
        hc = pipeline.heads.config
        shape = (int(hc.in_channels), int(hc.sample_size), int(hc.sample_size))
    latent = math.prod(proposal.latent_shape) + (1 if proposal.is_conditional else 0)
    return tuple(int(s) for s in shape), int(latent)


def call_memory(
    num_images: int, num_chains: int, image_shape: Sequence[int], latent_numel: int, output_type: str = "pil"
) -> dict[str, int]:
    """The bytes a call holds at its end, by part (a lower bound).

    Args:
        num_images (`int`): images returned.
        num_chains (`int`): chains side by side.
        image_shape (`Sequence[int]`): `(C, H, W)` of one image.
        latent_numel (`int`): values of one latent.
        output_type (`str`, defaults to `"pil"`): the returned copy's format.

    Returns:
        `dict[str, int]`: ``{"images": ..., "latents": ..., "chains": ..., "pool": ...}`` (the pool: the images of
        the entry pool's on-target draws it holds at the least, `chains.pool_on_target`).
    """
    values = math.prod(int(s) for s in image_shape)
    image = values * (FLOAT_BYTES + OUTPUT_COPY_BYTES.get(output_type, FLOAT_BYTES))
    latent = latent_numel * FLOAT_BYTES
    chain = 2 * (values + latent_numel) * FLOAT_BYTES + CHAIN_STATE_BYTES  # its state, and its round's proposal
    pool = pool_on_target(num_chains) * (values + latent_numel) * FLOAT_BYTES
    return {"images": num_images * image, "latents": num_images * latent, "chains": num_chains * chain, "pool": pool}


def most_that_fit(parts: dict[str, int], free: int, num_images: int, num_chains: int) -> tuple[str, int]:
    """The count to lower so that a call of these ``parts`` ([`call_memory`]) fits in ``free`` bytes, and the most it
    may be: ``("chains", n)`` where the chains and the entry pool hold more than the images and their latents, else
    ``("images", n)``."""
    held = parts["images"] + parts["latents"]
    running = parts["chains"] + parts["pool"]
    if running > held:
        return "chains", max((free - held) // max(running // num_chains, 1), 0)
    return "images", max((free - running) // max(held // num_images, 1), 0)


def _describe(parts: dict[str, int], num_images: int, num_chains: int, image_shape: Sequence[int], kind: str) -> str:
    shape = "x".join(str(s) for s in image_shape)
    return (
        f"{num_images} images of {shape} as float32 with their {kind} copy: {format_bytes(parts['images'])}; their "
        f"latents: {format_bytes(parts['latents'])}; {num_chains} chains: {format_bytes(parts['chains'])}; the entry "
        f"pool's on-target images: {format_bytes(parts['pool'])}"
    )


def check_call_memory(
    pipeline,
    num_images: int,
    num_chains: int | None,
    output_type: str,
    images_per_run: int | None = None,
    available: tuple[int | None, str] | None = None,
) -> dict[str, Any]:
    """Refuse, before any work, a call of an `S2MPipeline` whose images, latents and chains cannot fit in the memory
    the machine has ([`available_memory`]).

    Args:
        pipeline (`S2MPipeline`): the pipeline (its proposal gives the image and latent sizes: [`call_shapes`]).
        num_images (`int`): the images the call returns.
        num_chains (`int`, *optional*): the call's ``num_chains`` (default: one per image).
        output_type (`str`): the call's ``output_type``.
        images_per_run (`int`, *optional*): images per sampler run (a list of generators runs one per image); the
            chains of a run never outnumber its images.
        available (`tuple`, *optional*): ``(bytes, source)`` instead of [`available_memory`] (tests).

    Returns:
        `dict`: the estimate (``needed``, ``available``, the parts).

    Raises:
        ValueError: naming ``num_images`` or ``num_chains``, the bytes needed and available, and the fix.
    """
    image_shape, latent_numel = call_shapes(pipeline)
    run = num_images if images_per_run is None else max(1, min(images_per_run, num_images))
    chains = min(num_chains or run, run)
    parts = call_memory(num_images, chains, image_shape, latent_numel, output_type)
    needed = sum(parts.values())
    free, source = available if available is not None else available_memory()
    estimate = {"needed": needed, "available": free, "source": source, **parts}
    if free is None or needed <= free:
        return estimate
    lower, most = most_that_fit(parts, free, num_images, chains)
    if lower == "chains":
        count = f"num_chains={num_chains}"
        fix = f"Run fewer chains side by side (num_chains=, default min(num_images, 256); at most about {most} here)"
    else:
        count = f"num_images={num_images}"
        fix = (
            f"Ask for fewer images per call (at most about {most} here) and call again with another generator for more"
        )
    raise ValueError(
        f"{count} would hold at least {format_bytes(needed)} in memory until the call returns ("
        + _describe(parts, num_images, chains, image_shape, repr(output_type))
        + f"), but {format_bytes(free)} is available ({source}). {fix}; output_type='latent' keeps no images. "
        "`s2m sample` writes its images as they come and holds only those of one call."
    )
