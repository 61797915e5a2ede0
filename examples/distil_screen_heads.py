#!/usr/bin/env python
"""Distil screen heads for a shipped DDPM: heads that read its predicted clean images part-way through the denoising.

The screen (`screen="auto"`, delayed acceptance) stops a DDIM proposal after a few of its steps when the heads,
reading the predicted clean image, reject it. `s2m_diffusers.screen_heads.distil_screen_heads` trains a copy of the
DDPM's heads to read those early predictions as the heads read the finished images; the pipeline's screen uses them
(`S2MPipeline(..., screen_heads=...)`, which `load_demo_pipeline("ddpm")` does when `screen_heads_ddpm/` exists).

    python examples/distil_screen_heads.py                       # Digits-7to3, into the package's pretrained folder
    python examples/distil_screen_heads.py --dataset fashion     # Fashion-7to3, into benchmarks/pretrained/

The screen heads are written with `save_pretrained` to `ROOT/screen_heads_ddpm` with a `metrics.json` (the held-out
distillation loss of the heads and of the screen heads at each screen step).
"""

import argparse
import json
import os
import sys
import time

import torch

from s2m_diffusers.demo import DDIM_STEPS, load_demo_pipeline
from s2m_diffusers.screen_heads import distil_screen_heads
from s2m_diffusers.training import save_heads
from s2m_diffusers.utils import write_json_atomically

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from pretrained_roots import PRETRAINED_ROOTS  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(PRETRAINED_ROOTS), default="digits")
    p.add_argument("--num_samples", type=int, default=4096, help="denoising runs to distil on (default 4096)")
    p.add_argument("--num_epochs", type=int, default=8)
    p.add_argument("--ddim_steps", type=int, default=DDIM_STEPS, help=f"K (default {DDIM_STEPS}, as the demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.num_threads)
    root = PRETRAINED_ROOTS[args.dataset]
    pipe = load_demo_pipeline("ddpm", root, screen_heads=False)
    start = time.perf_counter()
    screen_heads, metrics = distil_screen_heads(
        pipe,
        num_samples=args.num_samples,
        num_inference_steps=args.ddim_steps,
        num_epochs=args.num_epochs,
        seed=args.seed,
    )
    metrics["wall_s"] = time.perf_counter() - start
    output_dir = os.path.join(root, "screen_heads_ddpm")
    save_heads(screen_heads, output_dir)
    write_json_atomically(os.path.join(output_dir, "metrics.json"), metrics)
    print(json.dumps(metrics, indent=1))
    print(f"-> {output_dir}")
    return metrics


if __name__ == "__main__":
    main()
