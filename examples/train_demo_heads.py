#!/usr/bin/env python
"""Train the S2M heads of the shipped Digits-7to3 generators, as used by `s2m demo`.

The shipped weights are in `s2m_diffusers/demo/pretrained/digits7to3/`. For the shipped DCGAN (`gan/`) the proposal
is the generator itself; for the shipped DDPM (`ddpm/`) it is the UNet run as deterministic DDIM with `--ddim_steps`
steps. As a DDIM sample costs that many UNet calls, the DDPM heads are trained on a bank of `--bank_size` DDIM
samples drawn once (an `ImageBank`, of which `train_heads` keeps a share apart for calibration). The real
data is the train split of Digits-7to3 with its single-positive labels. The work is done by
`s2m_diffusers.demo.train_demo_heads`, which `s2m demo --retrain` calls too.

    python examples/train_demo_heads.py                      # both, into s2m_diffusers/demo/pretrained/digits7to3/
    python examples/train_demo_heads.py --generators gan --num_steps 500 --output_root /tmp/heads
    python examples/train_demo_heads.py --generators gan_conditional       # heads with D_f, for bench_7to3
    python examples/train_demo_heads.py --dataset fashion --generators gan gan_conditional ddpm

The heads are written with `save_pretrained` to `OUTPUT_ROOT/heads_gan` and `OUTPUT_ROOT/heads_ddpm` with their
`metrics.json` (held-out accuracy, NLL and calibration of D_v and D_r, the estimated priors).
"""

import argparse
import os
import sys
import time

import torch

from s2m_diffusers.demo import (
    DATASETS,
    DDIM_STEPS,
    GENERATOR_KINDS,
    GENERATORS,
    train_demo_heads,
)

# The trained models by dataset (Fashion's live in this checkout's benchmarks/pretrained/, not in the package).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from pretrained_roots import PRETRAINED_ROOTS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generators", nargs="+", choices=GENERATOR_KINDS, default=list(GENERATORS))
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="Digits-7to3 or Fashion-7to3")
    parser.add_argument(
        "--generator_root", default=None, help="folder of the generators (default: the dataset's pretrained root)"
    )
    parser.add_argument(
        "--output_root", default=None, help="heads go to OUTPUT_ROOT/heads_KIND (default: GENERATOR_ROOT)"
    )
    parser.add_argument("--num_steps", type=int, default=2000)
    parser.add_argument("--ddim_steps", type=int, default=DDIM_STEPS)
    parser.add_argument("--bank_size", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    args.generator_root = args.generator_root or PRETRAINED_ROOTS[args.dataset]
    args.output_root = args.output_root or args.generator_root
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.num_threads)
    results = {}
    for kind in args.generators:
        start = time.perf_counter()
        output_dir = os.path.join(args.output_root, f"heads_{kind}")
        _, metrics = train_demo_heads(
            kind,
            output_dir,
            args.num_steps,
            ddim_steps=args.ddim_steps,
            bank_size=args.bank_size,
            seed=args.seed,
            generator_root=args.generator_root,
            dataset=args.dataset,
        )
        metrics["wall_s"] = time.perf_counter() - start
        results[kind] = metrics
        summary = {k: round(v, 4) for k, v in metrics.items() if k.split("_")[0] in ("dv", "dr") and "step" not in k}
        print(f"{kind}: {summary} priors {metrics['priors']} ({metrics['wall_s']:.0f} s) -> {output_dir}")
    return results


if __name__ == "__main__":
    main()
