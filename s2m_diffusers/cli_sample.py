"""`s2m sample`: sample a target from a saved S2M pipeline into a folder of PNGs, `stats.json` and the latents, one
pipeline call of at most `--images-per-call` images at a time, written whole (beside the destination, then moved into
place); under `accelerate launch` the images are split over the processes. Registered in `s2m_diffusers.cli`; the run
function imports what it needs (torch, diffusers) itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence

from .cli_common import EXIT_BUDGET, EXIT_OK, EXIT_USAGE, _fail, _shown_number, _write_json
from .utils import FolderBusyError, replace_folder_atomically

__all__ = ["sample", "call_seed", "merge_call_stats", "sample_grid"]

# the files `s2m sample` writes (and `s2m evaluate` added before it wrote beside the folder): a folder of only these
# may be replaced with --overwrite
SAMPLE_FILES = re.compile(r"^(\d{4,}\.png|grid\.png|stats\.json|latents\.safetensors|evaluation\.json)$")
GRID_FILE = "grid.png"  # the images of an `s2m sample` run's first call in one picture, under a header naming it
# `s2m sample --images-per-call`: the images of one pipeline call, written before the next call starts
IMAGES_PER_CALL = 1024
# what `s2m sample` keeps of each image until stats.json is written last (its name, on-target flag and class label,
# as Python objects and as JSON): the part of its memory that grows with --num-images
BOOKKEEPING_BYTES = 160


_SAMPLE_EPILOG = (
    "examples:\n"
    '  s2m sample --pipeline my-s2m --target "black_hair & male & ~smiling" --num-images 16 \\\n'
    "      --output samples/ --seed 0\n"
    '  s2m sample --pipeline user/s2m-digits --revision 3f2c1ab --target "A | B" --num-images 4 \\\n'
    "      --output out/ --kernel independent --max-proposals 20000\n"
    "  accelerate launch --num_processes 4 -m s2m_diffusers.cli sample --pipeline my-s2m \\\n"
    "      --target 'a & b' --num-images 64 --output samples/ --seed 0\n"
    "\n"
    "several processes: under `accelerate launch` (or `torchrun`) the images are split over the processes,\n"
    "each on its own device, and the main process writes them all (stats summed over the processes). On a\n"
    "machine without GPUs use `accelerate launch --multi_gpu --num_processes N` (CPU processes). The same\n"
    "--seed gives the same images for the same number of processes.\n"
    "\n"
    "targets: attribute names with & (and), | (or), ~ (not) and parentheses, e.g. 'a & (b | c) & ~d',\n"
    "or the paper's form 'a+b-c'.\n"
    "\n"
    "output: the folder is written whole (beside it, then moved into place): a run that is stopped leaves\n"
    "no folder or the previous one. A folder that already holds files is refused unless --overwrite,\n"
    "which replaces the whole folder of an earlier `s2m sample`; a folder another run is writing is refused.\n"
    "\n"
    "many images: the pipeline is called for at most --images-per-call images at a time (1024), and each\n"
    "call's PNGs are written before the next, so memory does not grow with --num-images (a run refuses, before\n"
    "it starts, a count whose images, chains or bookkeeping cannot fit). Call k draws from a seed derived\n"
    "from --seed and k (the first call: --seed itself): the same --seed, --num-images and --images-per-call\n"
    "give the same images; grid.png shows the first call's images.\n"
    "Exit status: 0 done, 1 budget exhausted, 2 invalid input, 3 unexpected error."
)


def _sample_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sample",
        help="draw images that satisfy a target with a saved S2M pipeline",
        description=(
            "Draw images that satisfy a target (a boolean formula over the heads' attributes) with a saved S2M "
            "pipeline, and write them as PNGs with a stats.json (proposals drawn, acceptance rate, proposals per "
            "image, seconds in the generator, the heads and the sampler), latents.safetensors (the latent "
            "each image came from) and grid.png (all the images, under the target)."
        ),
        epilog=_SAMPLE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pipeline", required=True, metavar="DIR", help="folder saved by S2MPipeline.save_pretrained, or a Hub repo"
    )
    p.add_argument("--revision", default=None, help="commit, branch or tag of a Hub repo (pin a commit)")
    p.add_argument("--target", default=None, help="the target, e.g. 'a & ~b'; defaults to the pipeline's default")
    p.add_argument("--num-images", type=int, default=4, metavar="N", help="images to draw (default: 4)")
    p.add_argument("--output", required=True, metavar="IMGDIR", help="folder for the PNGs, grid.png and stats.json")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output when it already holds the files of an earlier `s2m sample` (refused otherwise)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, recorded in stats)")
    p.add_argument(
        "--kernel",
        choices=("pcn", "mala", "independent"),
        default=None,
        help="how the chains move in the noise space: 'pcn' local steps (default), 'mala' gradient-guided local steps "
        "(a GAN), 'independent' independent draws from the prior (the paper's)",
    )
    p.add_argument(
        "--screen",
        type=_screen_value,
        default=None,
        metavar="{auto,off,S}",
        help="for a diffusion generator: judge each proposal on its predicted clean image after S denoising steps "
        "and stop those rejected there (exact: delayed acceptance); 'auto' screens after a tenth of the steps where "
        "that saves (not a wrapped pipeline, which reruns what passes), 'off' never screens (default: auto)",
    )
    p.add_argument(
        "--screen-min-finish",
        type=float,
        default=None,
        metavar="P",
        help="with a screen, the least probability (in (0, 1]) with which a draw of the entry pool is run to the "
        "end whatever its screen says; 1 does not screen the pool (default: 0.5)",
    )
    p.add_argument("--max-proposals", type=int, default=None, metavar="N", help="proposal budget (generator calls)")
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=64,
        metavar="N",
        help="latents per generator and heads call (device memory; default 64)",
    )
    p.add_argument(
        "--num-chains",
        type=int,
        default=None,
        metavar="N",
        help="chains side by side (default: a quarter of the images, at most 256)",
    )
    p.add_argument(
        "--cpu-offload",
        action="store_true",
        help="keep the models on the CPU and move each to the accelerator only while it runs (large generators)",
    )
    p.add_argument("--negation-margin", type=float, default=None, help="lambda of negated literals (default: heads')")
    p.add_argument(
        "--presence-margin",
        type=float,
        default=None,
        help="kappa in [0, 1]: a required attribute counts only within kappa of the strongest (default: heads')",
    )
    p.add_argument("--num-inference-steps", type=int, default=None, help="steps of a diffusion proposal")
    p.add_argument(
        "--class-label",
        default="auto",
        help="class of a conditional proposal: 'auto' (default), 'none' (drawn with the latent), or an attribute",
    )
    p.add_argument("--allow-partial", action="store_true", help="write the images found if the budget runs out")
    p.add_argument(
        "--images-per-call",
        type=int,
        default=IMAGES_PER_CALL,
        metavar="N",
        help=f"images per pipeline call; each call's images are written before the next call, so memory holds at "
        f"most N images (default: {IMAGES_PER_CALL}; the images depend on it, as on --seed)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def sample(args: argparse.Namespace) -> int:
    """Run `s2m sample`."""
    from .distributed import get_state, launched_processes
    from .pipeline_s2m import S2MPipeline
    from .sampling import BudgetExhaustedError
    from .targets import TargetError

    # Under `accelerate launch` / `torchrun` every process runs this function; the main process reports and writes.
    state = get_state() if launched_processes() > 1 else None
    main_process = state is None or state.is_main_process

    problem = _check_sample_arguments(args) or _output_problem(args.output, args.overwrite)
    if problem is not None:
        return _fail_on(main_process, problem, EXIT_USAGE)
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    try:
        pipe = S2MPipeline.from_pretrained(args.pipeline, revision=args.revision)
    except (OSError, ValueError) as err:
        return _fail_on(main_process, f"could not load the pipeline {args.pipeline!r}: {err}", EXIT_USAGE)
    try:
        problem = _memory_problem(args, pipe)
        if problem is not None:
            return _fail_on(main_process, problem, EXIT_USAGE)
        _place_pipeline(pipe, args, state)
        seed = _sample_seed(args.seed, state)
        if main_process:
            return _sample_into_output(pipe, args, seed, state)
        if not _agree(state, None):  # the main process could not take --output, and says why
            return EXIT_USAGE
        stats = _sample_calls(pipe, args, seed, state, None)  # the main process holds the same output and writes it
        return EXIT_BUDGET if stats["budget_exhausted"] else EXIT_OK
    except BudgetExhaustedError as err:
        return _fail_on(main_process, _budget_message(err, args), EXIT_BUDGET)
    except TargetError as err:
        cause = err.__cause__  # the parser's own message, without what the pipeline adds for unknown attributes
        if isinstance(cause, TargetError) and cause.unknown_attribute is None:
            err = cause
        return _fail_on(main_process, str(err), EXIT_USAGE)
    except ValueError as err:
        return _fail_on(main_process, _cli_words(str(err)), EXIT_USAGE)
    except FolderBusyError as err:
        who = f"another process (PID {err.pid})" if err.pid is not None else "another process"
        return _fail_on(
            main_process,
            f"--output {args.output!r} is being written by {who} right now (another `s2m sample`, or a save); two "
            "runs into one folder would mix their images. Wait for it to finish and choose another --output (or "
            "--overwrite its folder then), or write this run elsewhere.",
            EXIT_USAGE,
        )
    except OSError as err:  # writing the images: a full disk, a folder without write permission
        return _fail_on(
            main_process,
            f"could not write --output {args.output!r} ({err}); nothing was written there. Free space or choose a "
            "folder you can write to.",
            EXIT_USAGE,
        )


def _fail_on(main_process: bool, message: str, code: int) -> int:
    """`_fail` on the main process; the other processes of a launched run return the code silently."""
    return _fail(message, code) if main_process else code


def _check_sample_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments of `s2m sample` before anything is loaded, or `None`."""
    if args.num_images < 1:
        return f"--num-images must be at least 1, got {args.num_images}."
    if args.num_chains is not None and args.num_chains < 1:
        return f"--num-chains must be at least 1, got {args.num_chains}."
    if args.images_per_call < 1:
        return f"--images-per-call must be at least 1, got {args.images_per_call}."
    if not os.path.isdir(args.pipeline) and (args.pipeline.count("/") != 1 or os.path.exists(args.pipeline)):
        return (
            f"--pipeline {args.pipeline!r} is neither a folder nor a Hub repo id ('user/name'). Save one with "
            "S2MPipeline.save_pretrained(DIR)."
        )
    return None


def _output_problem(output: str, overwrite: bool) -> str | None:
    """What is wrong with `--output` of `s2m sample` before anything is loaded, or `None`: a file, a folder that holds
    files (without `--overwrite`, or with it for a folder that `s2m sample` did not write), the working directory."""
    if os.path.lexists(output) and not os.path.isdir(output):
        return f"--output {output!r} exists and is not a folder; give the path of a folder for the images."
    real, cwd = os.path.realpath(output), os.path.realpath(os.getcwd())
    if cwd == real or cwd.startswith(real + os.sep):
        return f"--output {output!r} is the working directory or holds it; write the images to a folder inside it."
    entries = sorted(os.listdir(output)) if os.path.isdir(output) else []
    if not entries:
        return None
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    if not overwrite:
        return (
            f"--output {output!r} already holds files ({shown}). `s2m sample` writes a whole folder, and mixing its "
            "images with these would let `s2m evaluate` count stale ones. Choose a new or empty folder, or pass "
            "--overwrite to replace this one."
        )
    others = [e for e in entries if not SAMPLE_FILES.match(e)]
    if others:
        return (
            f"--overwrite replaces only a folder written by `s2m sample`, and {output!r} also holds "
            f"{', '.join(others[:4])}{' ...' if len(others) > 4 else ''}. Choose another --output."
        )
    return None


# the Python names of the pipeline's arguments, as `s2m sample` spells them
_CLI_OPTIONS = {
    name: "--" + name.replace("_", "-")
    for name in (
        "num_images",
        "max_proposals",
        "num_chains",
        "kernel",
        "screen",
        "screen_min_finish",
        "micro_batch_size",
        "negation_margin",
        "presence_margin",
        "class_label",
        "num_inference_steps",
    )
}


def _cli_words(message: str) -> str:
    """A pipeline's message in the words of `s2m sample`: ``max_proposals=400`` -> ``--max-proposals 400``,
    ``allow_partial=True`` -> ``--allow-partial``."""
    message = re.sub(r"\ballow_partial=True\b", "--allow-partial", message)
    pattern = r"`?\b(" + "|".join(_CLI_OPTIONS) + r")\b`?(=)?"
    return re.sub(pattern, lambda m: _CLI_OPTIONS[m.group(1)] + (" " if m.group(2) else ""), message)


def _budget_message(err, args: argparse.Namespace) -> str:
    """The pipeline's budget error (what the pool saw, what to try) in the words of `s2m sample`'s options; for a
    later call of a run of several (`--images-per-call`), which call it was and what the earlier calls found."""
    message = _cli_words(str(err))
    before = getattr(err, "found_before", 0)  # images the run's earlier pipeline calls found
    if before:
        message += (
            f" (This was the pipeline call for images {before + 1} to {before + err.requested} of {args.num_images}, "
            f"--images-per-call {args.images_per_call}, with what the earlier calls left of --max-proposals "
            f"{args.max_proposals}; they had found {before} images, which --allow-partial would write with these.)"
        )
    return message


def _place_pipeline(pipe, args: argparse.Namespace, state) -> None:
    """Put the pipeline on this process's device (or CPU-offload it) and set its progress bar by `--quiet`."""
    import torch

    if state is not None:
        device = args.device or state.device  # each process its own device
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet)


def _sample_seed(seed: int | None, state) -> int:
    """`--seed`, or a random seed (the main process's, under `accelerate launch`), recorded in stats.json."""
    import torch

    if seed is not None:
        return seed
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if state is not None:  # one random seed for all processes: the main process's
        from accelerate.utils import broadcast

        seed = int(broadcast(torch.tensor([seed], device=state.device), from_process=0).item())
    return seed


def _screen_value(value: str) -> str | int:
    """`--screen`: ``auto``, ``off``, or a positive number of denoising steps."""
    if value in ("auto", "off"):
        return value
    try:
        step = int(value)
    except ValueError:
        step = 0
    if step < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'off' or a positive number of steps, got {value!r}")
    return step


def _class_label(value: str) -> str | int | None:
    """`--class-label`: `"none"` -> `None`, digits -> a class index, anything else (`"auto"`, a name) as it is."""
    if value == "none":
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def call_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th pipeline call of an `s2m sample` run (`--images-per-call` images each): `seed`
    itself for the first, so that a run of one call draws what the Python call with that seed draws; then 63 bits of
    SHA-256 of both, so that no two calls of any runs share a seed by construction."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"s2m sample: seed {seed}, call {index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _agree(state, ok: bool | None) -> bool:
    """Under `accelerate launch`: the main process's `ok` (whether it took --output), told to every process, so that
    none starts sampling alone; `ok` itself otherwise."""
    if state is None:
        return bool(ok)
    import torch
    from accelerate.utils import broadcast

    flag = torch.tensor([1 if ok else 0], device=state.device)
    return bool(broadcast(flag, from_process=0).item())


def _memory_problem(args: argparse.Namespace, pipe) -> str | None:
    """Whether an `s2m sample` run fits in memory (`s2m_diffusers.memory`): one call's images, latents and chains,
    and the few bytes per image the run keeps until stats.json; `None` when it does, or when the memory available
    cannot be read."""
    from .memory import available_memory, call_memory, call_shapes, format_bytes, most_that_fit
    from .pipeline_s2m import DEFAULT_MAX_CHAINS

    per_call = min(args.num_images, args.images_per_call)
    chains = min(args.num_chains or min(per_call, DEFAULT_MAX_CHAINS), per_call)
    image_shape, latent_numel = call_shapes(pipe)
    parts = call_memory(per_call, chains, image_shape, latent_numel, "pil")
    bookkeeping = args.num_images * BOOKKEEPING_BYTES
    call = sum(parts.values())
    free, source = available_memory()
    if free is None or call + bookkeeping <= free:
        return None
    shape = "x".join(map(str, image_shape))
    held = (
        f"{format_bytes(call + bookkeeping)}: one call of {per_call} images of {shape} holds "
        f"{format_bytes(parts['images'] + parts['latents'])} and its {chains} chains and entry pool "
        f"{format_bytes(parts['chains'] + parts['pool'])}, "
        f"and the run keeps {BOOKKEEPING_BYTES} bytes per image until stats.json is written "
        f"({format_bytes(bookkeeping)})"
    )
    available = f"{format_bytes(free)} is available ({source})"
    if bookkeeping >= call:
        most = max((free - call) // BOOKKEEPING_BYTES, 0)
        return (
            f"--num-images {args.num_images} needs at least {held}, but {available}. Ask for at most about {most} "
            "images per run, and spread more over several runs into other --output folders with other --seed values."
        )
    lower, most = most_that_fit(parts, free - bookkeeping, per_call, chains)
    if lower == "chains":
        return (
            f"--num-chains {args.num_chains} needs at least {held}, but {available}. Use --num-chains {most} or less."
        )
    return (
        f"--images-per-call {args.images_per_call} needs at least {held}, but {available}. Use --images-per-call "
        f"{most} or fewer (the images then depend on it as on --seed)."
    )


def _sample_into_output(pipe, args: argparse.Namespace, seed: int, state) -> int:
    """The main process's run: take --output (refused at once while another run or save writes it), sample call by
    call into the hidden staging folder beside it, writing each call's images as they come, then move the folder
    into place whole (`replace_folder_atomically`) and say what was written."""
    agreed, done = [], {}

    def write(folder: str) -> None:
        problem = _output_problem(args.output, args.overwrite)  # again under the lock: a run that just finished
        if problem is not None:
            raise ValueError(problem)
        agreed.append(_agree(state, True))
        sink = _SampleFolder(folder)
        done["stats"] = stats = _sample_calls(pipe, args, seed, state, sink)
        done["count"] = sink.finish({"pipeline": args.pipeline, "revision": args.revision, "seed": seed}, stats)

    try:
        replace_folder_atomically(write, args.output, wait=False)
    except BaseException:
        if not agreed:
            _agree(state, False)
        raise
    stats, count = done["stats"], done["count"]
    calls = f", {stats['calls']} calls" if stats.get("calls", 1) > 1 else ""
    print(
        f"wrote {count} images to {args.output} ({stats['proposals']} proposals, "
        f"{_shown_number(stats.get('proposals_per_image'))} per image, acceptance rate "
        f"{_shown_number(stats.get('acceptance_rate'))}, {_shown_number(stats.get('seconds_total'))} s{calls})"
    )
    if stats["budget_exhausted"]:
        print(f"s2m: warning: the budget ran out with {count} of {args.num_images} images.", file=sys.stderr)
        return EXIT_BUDGET
    return EXIT_OK


def _sample_calls(pipe, args: argparse.Namespace, seed: int, state, sink: _SampleFolder | None) -> dict:
    """Call the pipeline for `--images-per-call` images at a time (call `k` with the generator of `call_seed(seed,
    k)`; `--max-proposals` shared: each call gets what the earlier ones left), hand each call's output to `sink`
    (the main process's folder) before the next call, and return the run's statistics (`merge_call_stats`)."""
    import torch

    from .sampling import BudgetExhaustedError

    stats, found = None, 0
    for index, start in enumerate(range(0, args.num_images, args.images_per_call)):
        count = min(args.images_per_call, args.num_images - start)
        budget = args.max_proposals
        if budget is not None and stats is not None:
            budget = max(1, math.floor(budget - (stats.get("budget_spent") or stats["proposals"])))
        try:
            out = pipe(
                args.target,
                num_images=count,
                generator=torch.Generator(device="cpu").manual_seed(call_seed(seed, index)),
                output_type="pil",
                kernel=args.kernel,
                max_proposals=budget,
                micro_batch_size=args.micro_batch_size,
                num_chains=args.num_chains,
                **({} if args.screen is None else {"screen": args.screen}),
                **({} if args.screen_min_finish is None else {"screen_min_finish": args.screen_min_finish}),
                negation_margin=args.negation_margin,
                presence_margin=args.presence_margin,
                class_label=_class_label(args.class_label),
                num_inference_steps=args.num_inference_steps,
                allow_partial=args.allow_partial,
                distributed=state is not None,
            )
        except BudgetExhaustedError as err:
            if index:
                err.found_before, err.requested = found, count
            raise
        if sink is not None:
            sink.add(out)
        found += len(out.images)
        stats = dict(out.stats) if stats is None else merge_call_stats(stats, out.stats)
        if out.stats["budget_exhausted"] or out.stats.get("interrupted"):
            break
    if stats.get("calls", 1) > 1:
        stats["images_per_call"] = args.images_per_call
        if args.max_proposals is not None:  # the run's budget (each call's was what the earlier calls left of it)
            stats["max_proposals"] = args.max_proposals
    return stats


# the statistics of an `s2m sample` run's calls that add up; the ratios are recomputed from them, and the rest (the
# target, the chains' record, their diagnostics, the screen) are the first call's
_ADDITIVE_STATS = (
    "num_images",
    "proposals",
    "accepted",
    "on_target_images",
    "unique_images",
    "rounds",
    "unet_calls",
    "budget_spent",
    "max_proposals",
    "seconds_generator",
    "seconds_heads",
    "seconds_sampler",
    "seconds_total",
    "seconds_wall",
)


def merge_call_stats(run: dict, call: dict) -> dict:
    """The statistics of an `s2m sample` run so far (`run`) with those of its next pipeline call: counts and seconds
    added (the chains' moves too), ``acceptance_rate`` and the per-image ratios recomputed, ``budget_exhausted`` and
    ``interrupted`` if any call's was, ``calls`` counted; every other entry stays the first call's."""

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    out = dict(run)
    for key in _ADDITIVE_STATS:
        if number(run.get(key)) and number(call.get(key)):
            out[key] = run[key] + call[key]
    for key in ("budget_exhausted", "interrupted"):
        out[key] = bool(run.get(key)) or bool(call.get(key))
    moves = [s.get("chains", {}).get("moves") for s in (run, call)]
    if all(number(m) for m in moves) and number(out.get("accepted")):  # accepted moves over the moves after burn-in
        out["chains"] = {**(run.get("chains") or {}), "moves": sum(moves)}
        out["acceptance_rate"] = out["accepted"] / out["chains"]["moves"] if out["chains"]["moves"] else None
    if number(out.get("num_images")) and out["num_images"]:
        for total, ratio in (("proposals", "proposals_per_image"), ("unet_calls", "unet_calls_per_image")):
            if number(out.get(total)):
                out[ratio] = out[total] / out["num_images"]
    out["calls"] = run.get("calls", 1) + 1
    return out


class _LatentsFile:
    """``latents.safetensors`` written a call at a time: the latents are appended to a raw file as they come, and
    the safetensors header (which states the final shape) is written before them at the end."""

    _DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int64": "I64"}

    def __init__(self, path: str):
        self.path, self.part = path, path + ".part"
        self.rows, self.shape, self.dtype = 0, None, None
        open(self.part, "wb").close()

    def add(self, latents) -> None:
        import torch

        latents = latents.detach().cpu().contiguous()
        if self.dtype is None:
            self.shape, self.dtype = tuple(latents.shape[1:]), latents.dtype
        if tuple(latents.shape[1:]) != self.shape:
            raise ValueError(f"latents of shape {tuple(latents.shape[1:])} after latents of shape {self.shape}")
        latents = latents.to(self.dtype)
        if latents.numel():
            with open(self.part, "ab") as f:
                f.write(latents.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.rows += int(latents.shape[0])

    def finish(self) -> None:
        size = os.path.getsize(self.part)
        dtype = self._DTYPES[str(self.dtype).removeprefix("torch.")]
        header = json.dumps(
            {"latents": {"dtype": dtype, "shape": [self.rows, *self.shape], "data_offsets": [0, size]}},
            separators=(",", ":"),
        ).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.path, "wb") as out, open(self.part, "rb") as data:
            out.write(len(header).to_bytes(8, "little") + header)
            while block := data.read(1 << 20):
                out.write(block)
        os.remove(self.part)


class _SampleFolder:
    """The staging folder of an `s2m sample` run: each call's PNGs and latents as they come (`add`), then grid.png,
    latents.safetensors and, last, stats.json (`finish`)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.names: list[str] = []
        self.on_target: list[bool] = []
        self.class_labels: list[int] | None = None
        self.grid_images: list = []  # the images of the first call that found any, for grid.png
        self.latents = _LatentsFile(os.path.join(folder, "latents.safetensors"))

    def add(self, out) -> None:
        for image in out.images:
            name = f"{len(self.names):04d}.png"
            image.save(os.path.join(self.folder, name))
            self.names.append(name)
        if not self.grid_images:
            self.grid_images = list(out.images)
        self.latents.add(out.latents)
        self.on_target += out.on_target.tolist()
        if out.class_labels is not None:
            self.class_labels = (self.class_labels or []) + out.class_labels.tolist()

    def finish(self, record: dict, stats: dict) -> int:
        names = self.names
        if names:
            grid = sample_grid(self.grid_images, stats["target"], total=len(names))
            grid.save(os.path.join(self.folder, GRID_FILE))
        self.latents.finish()
        record = {
            **record,
            "images": names,
            "grid": GRID_FILE if names else None,
            "on_target": self.on_target,
            "class_labels": self.class_labels,
            **stats,
        }
        _write_json(os.path.join(self.folder, "stats.json"), record)  # last
        return len(names)


def sample_grid(images: Sequence, target: str, min_side: int = 64, total: int | None = None):
    """The images of a run in one picture (`diffusers.utils.make_image_grid`, as square as it gets), under a header
    that names the target; small images are enlarged (nearest neighbour) to at least `min_side` pixels.

    Args:
        images (`Sequence[PIL.Image.Image]`): the images, of one size.
        target (`str`): the target, written in the header.
        min_side (`int`, defaults to 64): the least side of a cell.
        total (`int`, *optional*): the run's images, when `images` are the first of them (said in the header).

    Returns:
        `PIL.Image.Image`: the grid (RGB).
    """
    import math

    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw

    w, h = images[0].size
    scale = max(1, math.ceil(min_side / min(w, h)))
    cells = [image.convert("RGB").resize((w * scale, h * scale), Image.NEAREST) for image in images]
    cols = math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    cells += [Image.new("RGB", cells[0].size, "white")] * (rows * cols - len(cells))
    grid = make_image_grid(cells, rows=rows, cols=cols)
    shown = len(images)
    label = f"{target}  ({shown} images)" if total in (None, shown) else f"{target}  (first {shown} of {total} images)"
    header = 16
    text_width = int(ImageDraw.Draw(grid).textlength(label)) + 8
    out = Image.new("RGB", (max(grid.width, text_width), grid.height + header), "white")
    ImageDraw.Draw(out).text((4, 2), label, fill="black")
    out.paste(grid, (0, header))
    return out
