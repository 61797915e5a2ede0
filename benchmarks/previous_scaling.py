"""The previous default sampler on Shapes: run by `bench_scaling.py` inside the previous checkout.

`bench_scaling.py` runs this file with ``PYTHONPATH`` the checkout of `common.PREVIOUS_COMMIT` (e5ce922), so that
``s2m_diffusers`` is the old package. It calls the old `S2MPipeline` as that commit's `benchmarks/bench_scaling.py`
called it for its methods ``ours_norefit`` (``refit="off"``) and ``ours`` (``refit="sequential"``), with that
script's defaults (5 MH steps after entry, 256 latents per refitting stage, one Gaussian, unwidened), the heads
`bench_scaling.py` trained (``--heads-dir``) and the same seeds (``1000 * k + seed``), except that every call fits
anew. That script itself cannot be run: it reads ``stage["proposals"]`` of every refitting stage, and a stage that
the fit's spend limit skipped has none (a KeyError). This file scores nothing: it saves every call's images,
generator calls and figures (`torch.save`), which `bench_scaling.py` scores as it scores the other methods.

    PYTHONPATH=<checkout> python previous_scaling.py --methods ours_norefit ours --ks 1 2 --seeds 0 \\
        --num-images 200 --presence-margin 0.5 --max-proposals 5000000 --heads-dir DIR --out calls.pt
"""

from __future__ import annotations

import argparse
import time

import torch

from s2m_diffusers.models.heads import S2MHeads
from s2m_diffusers.pipeline_s2m import S2MPipeline
from s2m_diffusers.testing.shapes import ShapesGenerator

# That commit's bench_scaling.py defaults for its two methods.
SETTINGS = {
    "steps_after_entry": 5,
    "fit_size": 256,
    "mixing_tolerance": None,
    "max_steps_after_entry": 5000,
    "n_components": 1,
    "covariance_scale": 1.0,
    "micro_batch_size": 256,
}


@torch.no_grad()
def call(pipe: S2MPipeline, method: str, k: int, seed: int, args: argparse.Namespace) -> dict:
    """One call of the old pipeline: its images in [-1, 1], generator calls, seconds and what it reported."""
    target = " & ".join(pipe.heads.attribute_names[:k])
    pipe.fits.clear()  # every call fits anew and pays for it (that script let a later seed reuse the first one's fit)
    start = time.perf_counter()
    out = pipe(
        target,
        num_images=args.num_images,
        generator=torch.Generator().manual_seed(1000 * k + seed),
        output_type="pt",
        refit="sequential" if method == "ours" else "off",
        presence_margin=args.presence_margin,
        max_proposals=args.max_proposals,
        **SETTINGS,
    )
    s = out.stats
    return {
        "method": method,
        "k": k,
        "seed": seed,
        "images": out.images * 2 - 1,
        "proposals": int(s["proposals"]),
        "seconds": time.perf_counter() - start,
        "unique_images": int(s["unique_images"]),
        "acceptance_rate": float(s["acceptance_rate"]),
        "fit_proposals": int(s.get("fit_proposals") or 0),
        "fit": s.get("fit"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["ours_norefit", "ours"], choices=["ours_norefit", "ours"])
    parser.add_argument("--ks", type=int, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--presence-margin", type=float, default=0.5)
    parser.add_argument("--max-proposals", type=int, default=5_000_000)
    parser.add_argument("--heads-dir", required=True, help="the heads bench_scaling.py trained")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = S2MPipeline(heads=S2MHeads.from_pretrained(args.heads_dir).eval(), gan=ShapesGenerator().eval())
    pipe.set_progress_bar_config(disable=True)
    calls = []
    for k in args.ks:
        for seed in args.seeds:
            for method in args.methods:
                calls.append(call(pipe, method, k, seed, args))
                c = calls[-1]
                print(
                    f"k={k} seed={seed} {method}: {c['proposals'] / len(c['images']):.1f} calls per image, "
                    f"{c['seconds']:.1f} s",
                    flush=True,
                )
    torch.save(calls, args.out)


if __name__ == "__main__":
    main()
