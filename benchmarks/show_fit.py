"""One sampling call of a 7to3 DDPM pipeline, with its fit's record: each pilot's predicted cost and each stage.

What `bench_7to3.py` reports as a row, opened up: per candidate density its pilot's on-target share, predicted
proposals per image, the share of them the screen would leave and the predicted cost per image (as the budget counts
it), per refitting stage its draws and UNet calls, then the call's images, UNet calls and screen.

```sh
python benchmarks/show_fit.py --dataset digits --target "A & C & ~B" --num-images 16
python benchmarks/show_fit.py --dataset digits --target "A & C & ~B" --num-images 16 --micro-batch-size 128
```
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_7to3 import OFFICIAL_STEPS  # noqa: E402  (the same folder: the budget of its rows)
from pretrained_roots import PRETRAINED_ROOTS  # noqa: E402  (the same folder)

from s2m_diffusers.demo import load_demo_pipeline  # noqa: E402

KEYS = (
    "pilot",
    "stage",
    "proposals",
    "on_target_share",
    "predicted_proposals_per_sample",
    "screen_predicted_share",
    "predicted_cost_per_sample",
    "cost",
    "completed_cost",
    "unet_calls",
    "skipped",
    "stopped",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(PRETRAINED_ROOTS), default="digits")
    parser.add_argument("--target", required=True)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the call's generator and its fit_seed")
    parser.add_argument("--screen", default="auto", help="'auto', 'off' or a step")
    parser.add_argument("--num-inference-steps", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_demo_pipeline("ddpm", PRETRAINED_ROOTS[args.dataset])
    pipe.set_progress_bar_config(disable=True)
    screen = None if args.screen == "off" else (args.screen if args.screen == "auto" else int(args.screen))
    out = pipe(
        args.target,
        num_images=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
        allow_partial=True,
        max_proposals=(OFFICIAL_STEPS + 1) * args.num_images,
        fit_seed=args.seed,
        screen=screen,
        micro_batch_size=args.micro_batch_size,
        num_inference_steps=args.num_inference_steps,
    )
    s = out.stats
    for record in s["stages"]:
        shown = {k: record[k] for k in KEYS if k in record}
        print(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    print(
        f"density {s['fit']}: {s['num_images']} images, {s['unet_calls']} UNet calls ({s['fit_unet_calls']} fitting), "
        f"{s['unet_calls_per_image']:.0f} per image; T {s['mixing'].get('steps_after_entry')}"
    )
    screen_record = s["screen"] or {}
    if screen_record.get("step"):
        print(
            f"screen: step {screen_record['step']} of {screen_record['num_steps']}, read by "
            f"{screen_record.get('surrogate')}, {screen_record['screened_out_share']:.2f} screened out"
        )
    return s


if __name__ == "__main__":
    main()
