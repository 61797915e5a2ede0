#!/usr/bin/env python
"""S2M sampling throughput against micro-batch size and process count, and where the wall time goes.

The proposal is the shipped Digits-7to3 DDPM run as DDIM (`load_demo_pipeline("ddpm")`, a diffusion proposal) with
its shipped heads. For every process count and micro-batch size, one call draws `--num-images` images of `--target`
(after one untimed warm-up call), and the table reports:

| column | meaning |
|---|---|
| `processes` | processes sampling together (`pipe(..., distributed=True)`; CPU processes: `debug_launcher`) |
| `micro_batch` | latents per generator call and images per heads call |
| `images_per_second` | returned images / wall time of the call (gathering and image conversion included) |
| `proposals_per_second` | generator calls / wall time |
| `generator_share` | seconds in generator calls / (wall time x processes) |
| `heads_share` | seconds in head passes / (wall time x processes) |
| `bookkeeping_share` | the rest (1 - the two above): the pool, the chains' proposals and acceptances, the |
| | screen's bookkeeping, the diagnostics, gathering, conversion to PIL images, waiting for other processes |
| `sampler_share` | the pipeline's own figure for the sampler's bookkeeping: ``seconds_sampler / seconds_wall`` of |
| | its ``stats`` (summed over the processes) |

The call runs at the pipeline's defaults (chains that move locally, the screen where it pays) but for
``micro_batch_size``, ``num_inference_steps`` and ``max_proposals``. Each process runs one torch thread
(`--num-threads`), so that 2 processes use 2 cores. The pipeline's own ``seconds_sampler`` leaves out the work after
sampling (gathering, statistics, PIL conversion); this benchmark also times the whole call from outside, so that
``bookkeeping_share`` counts everything that is neither a generator call nor a head pass. With several processes each
process's seconds are gathered here and summed (the pipeline reports its own process's; where it reports them summed
already, every process holds the same figures, and they are taken once).

Usage:

```sh
python benchmarks/bench_throughput.py                                   # prints the table
python benchmarks/bench_throughput.py --micro-batches 16 64 256 --processes 1 2 --json throughput.json
python benchmarks/bench_throughput.py --micro-batches 16 --processes 1 --num-images 4    # a smoke run
```
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

COLUMNS = (
    "processes",
    "micro_batch",
    "num_images",
    "proposals",
    "wall_seconds",
    "images_per_second",
    "proposals_per_second",
    "generator_share",
    "heads_share",
    "bookkeeping_share",
    "sampler_share",
)
# The seconds of a call's stats that are per process.
SECONDS = ("seconds_generator", "seconds_heads", "seconds_sampler", "seconds_wall")
_PIPE = None  # loaded once in the parent; forked processes share it


def _pipeline():
    global _PIPE
    if _PIPE is None:
        from s2m_diffusers.demo import load_demo_pipeline

        _PIPE = load_demo_pipeline("ddpm")
        _PIPE.set_progress_bar_config(disable=True)
    return _PIPE


def _call(args: argparse.Namespace, micro_batch: int, num_images: int, distributed: bool, seed: int) -> dict:
    return _pipeline()(
        args.target,
        num_images=num_images,
        generator=torch.Generator().manual_seed(seed),
        micro_batch_size=micro_batch,
        num_inference_steps=args.num_inference_steps,
        max_proposals=args.max_proposals,
        allow_partial=True,
        distributed=distributed,
    ).stats


def measure(args: argparse.Namespace, micro_batch: int, processes: int, state=None) -> dict:
    """One timed call (after a warm-up call); with several processes every process runs this."""
    distributed = state is not None
    _call(args, micro_batch, max(processes, 4), distributed, seed=args.seed + 1)  # warm-up
    if state is not None:
        state.wait_for_everyone()
    start = time.perf_counter()
    stats = _call(args, micro_batch, args.num_images, distributed, seed=args.seed)
    wall = time.perf_counter() - start
    seconds = {key: stats[key] for key in SECONDS}
    if state is not None:  # the slowest process's wall time; every process's seconds
        from s2m_diffusers.distributed import gather_objects

        wall = max(gather_objects(wall, state))
        seconds = summed(gather_objects(seconds, state))
    process_seconds = wall * processes
    generator_share = seconds["seconds_generator"] / process_seconds
    heads_share = seconds["seconds_heads"] / process_seconds
    return {
        "processes": processes,
        "micro_batch": micro_batch,
        "num_images": stats["num_images"],
        "proposals": stats["proposals"],
        "wall_seconds": wall,
        "images_per_second": stats["num_images"] / wall,
        "proposals_per_second": stats["proposals"] / wall,
        "generator_share": generator_share,
        "heads_share": heads_share,
        "bookkeeping_share": 1.0 - generator_share - heads_share,
        "sampler_share": seconds["seconds_sampler"] / seconds["seconds_wall"],  # the pipeline's own figure
        "unet_calls_per_image": stats.get("unet_calls_per_image"),
        "screen": stats.get("screen"),
        "warnings": stats.get("warnings"),
        "target": args.target,
        "num_threads": args.num_threads,
    }


def summed(per_process: list[dict]) -> dict:
    """The processes' seconds summed; taken once where every process holds the same figures (a pipeline that
    gathered them already: its wall time is then the slowest process's, counted once per process)."""
    if all(p == per_process[0] for p in per_process):
        one = dict(per_process[0])
        one["seconds_wall"] *= len(per_process)
        return one
    return {key: sum(p[key] for p in per_process) for key in per_process[0]}


def _worker(args: argparse.Namespace, path: str) -> None:
    """What each of several processes runs (under `accelerate.debug_launcher`)."""
    from accelerate.state import AcceleratorState

    from s2m_diffusers.distributed import get_state

    AcceleratorState._reset_state(reset_partial_state=True)  # the forked process starts from scratch
    state = get_state()
    torch.set_num_threads(args.num_threads)
    rows = [measure(args, micro_batch, state.num_processes, state) for micro_batch in args.micro_batches]
    if state.is_main_process:
        with open(path, "w") as f:
            json.dump(rows, f)


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.num_threads)
    _pipeline()
    rows = []
    for processes in args.processes:
        if processes == 1:
            rows += [measure(args, micro_batch, 1) for micro_batch in args.micro_batches]
            continue
        from accelerate import debug_launcher

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rows.json")
            debug_launcher(_worker, args=(args, path), num_processes=processes)
            with open(path) as f:
                rows += json.load(f)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| processes | micro_batch | images | proposals | wall s | images/s | proposals/s | generator | heads "
        "| bookkeeping | sampler (own figure) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['micro_batch']} | {r['num_images']} | {r['proposals']} | "
            f"{r['wall_seconds']:.2f} | {r['images_per_second']:.2f} | {r['proposals_per_second']:.1f} | "
            f"{r['generator_share']:.1%} | {r['heads_share']:.1%} | {r['bookkeeping_share']:.1%} | "
            f"{r['sampler_share']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[16, 64, 256], metavar="N")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], metavar="P")
    parser.add_argument("--num-images", type=int, default=64, help="images per timed call (default 64)")
    parser.add_argument("--target", default="A & B", help="target (default 'A & B')")
    parser.add_argument("--num-inference-steps", type=int, default=10, help="DDIM steps (default 10, the demo's)")
    parser.add_argument("--max-proposals", type=int, default=None, help="proposal budget (default: the pipeline's)")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="S2M sampling")  # the diagnostics' warnings are in the JSON rows
    rows = run(args)
    print(markdown(rows))
    if args.json:
        from s2m_diffusers.utils import write_json_atomically

        write_json_atomically(args.json, rows)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
