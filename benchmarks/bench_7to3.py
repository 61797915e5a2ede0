#!/usr/bin/env python
"""S2M sampling of the seven Digits-7to3 combinations: the official recipe, ours and two references.

For every combination of `SEVEN_TARGETS` and every method, `N` images are drawn with the shipped DCGAN proposal and
its shipped heads (`load_demo_pipeline("gan")`) and scored with the shipped evaluator:

| column | meaning |
|---|---|
| `accuracy` | share of the images the evaluator judges on target (`formula_accuracy`) |
| `frechet` | Fréchet distance in the evaluator's features to the real held-out images of that combination |
| `proposals/image` | generator calls per returned image |
| `seconds` | wall time of the sampling (scoring excluded) |

Methods:

- `raw`: `N` proposals, no selection.
- `official`: the official recipe (`sample_official`: `N` chains x 200 IMH steps from the prior, final states
  returned on target or not, 201 proposals per image) with the official weights: hand-set ``gamma_c`` (0.1 for a
  present attribute, 1.0 for an absent one, i.e. ``log pi_c = log gamma_c + log p_data(c)``), negation margin 1 and
  the official temperature on ``D_r`` (1.2 for one present attribute, 1.0 for two, 0.2 for three:
  ``log_softmax(dr_log_probs / T)``), plus ``logit D_v``.
- `ours`: `S2MPipeline` with its defaults (calibrated heads, `refit="sequential"`).
- `oracle`: proposals accepted by the evaluator itself until `N` are on target (an upper bound on accuracy that no
  sampler without the evaluator can reach).

Usage:

```sh
python benchmarks/bench_7to3.py                             # prints the table
python benchmarks/bench_7to3.py --num-images 32 --json 7to3.json
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from s2m_diffusers.demo import formula_accuracy, load_demo_pipeline, load_evaluator  # noqa: E402
from s2m_diffusers.evaluation import evaluator_class_probs, evaluator_features, frechet_distance  # noqa: E402
from s2m_diffusers.refit import StandardNormal  # noqa: E402
from s2m_diffusers.sampling import sample_official  # noqa: E402
from s2m_diffusers.seven_to_three import SEVEN_TARGETS, load_digits_7to3  # noqa: E402
from s2m_diffusers.targets import Target, log_r, log_w, parse_target  # noqa: E402

METHODS = ("raw", "official", "ours", "oracle")
# The official code's D_r temperature by the number of present attributes of the target.
OFFICIAL_TEMPERATURES = {1: 1.2, 2: 1.0, 3: 0.2}
OFFICIAL_GAMMA_PRESENT, OFFICIAL_GAMMA_ABSENT = 0.1, 1.0
OFFICIAL_STEPS = 200


def _log_p_data(heads) -> torch.Tensor:
    counts = torch.tensor(heads.config.label_counts, dtype=torch.float64)
    return (counts / counts.sum()).log()


def official_evaluate(pipe, target: Target, micro_batch_size: int = 256):
    """``evaluate(z) -> (x, log_w)`` with the official recipe's weights (hand-set gammas, temperature, margin 1).

    Args:
        pipe (`S2MPipeline`): an unconditional pipeline with heads.
        target (`Target`): a conjunction over the heads' attributes.
        micro_batch_size (`int`, defaults to 256): latents per generator and heads call.

    Returns:
        `Callable`: the evaluate function of `sample_official`; images in [-1, 1].
    """
    heads = pipe.heads
    names = list(heads.config.attribute_names)
    proposal = pipe.get_proposal(micro_batch_size)
    present = set(target.present)
    gammas = torch.tensor(
        [OFFICIAL_GAMMA_PRESENT if n in present else OFFICIAL_GAMMA_ABSENT for n in names], dtype=torch.float64
    )
    log_p_data = _log_p_data(heads)
    log_priors = gammas.log() + log_p_data
    temperature = OFFICIAL_TEMPERATURES.get(len(present))
    if temperature is None:
        raise ValueError(f"The official recipe has temperatures for 1-3 present attributes; {target} has {present}.")

    @torch.no_grad()
    def evaluate(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, weights = [], []
        for chunk in z.split(micro_batch_size):
            x = proposal.generate(chunk)
            out = heads(x)
            dr = torch.log_softmax(out.dr_log_probs.double() / temperature, dim=1)
            lr = log_r(target, dr, log_p_data, log_priors, negation_margin=1.0)
            images.append(x)
            weights.append(log_w(lr, out.dv_logit.double()))
        return torch.cat(images), torch.cat(weights)

    return evaluate, proposal


@torch.no_grad()
def run_method(method: str, pipe, evaluator, target: str, num_images: int, seed: int, max_oracle: int):
    """Draw `num_images` images of `target` with `method`; returns (images in [-1, 1], proposals, seconds)."""
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    if method == "raw":
        images = pipe.get_proposal(256).sample(num_images, generator).images
        proposals = num_images
    elif method == "official":
        parsed = parse_target(target, list(pipe.heads.config.attribute_names))
        evaluate, proposal = official_evaluate(pipe, parsed)
        result = sample_official(
            evaluate, StandardNormal(proposal.latent_shape), num_images, OFFICIAL_STEPS, generator=generator
        )
        images, proposals = result.x, result.stats.proposals
    elif method == "ours":
        out = pipe(target, num_images=num_images, generator=generator, output_type="pt")
        images, proposals = out.images * 2 - 1, out.stats["proposals"]
    elif method == "oracle":
        parsed = parse_target(target, list(evaluator.config.attribute_names))
        in_target = parsed.holds_batch(evaluator.class_table.cpu())
        proposal = pipe.get_proposal(256)
        kept, found, proposals = [], 0, 0
        while found < num_images:
            if proposals >= max_oracle:
                raise RuntimeError(f"oracle: {found}/{num_images} on target after {proposals} proposals for {target}.")
            x = proposal.sample(256, generator).images
            ok = evaluator_class_probs(evaluator, x)[:, in_target].sum(1) > 0.5
            needed = num_images - found
            if int(ok.sum()) >= needed:  # count the draws up to the last image needed, not the whole batch
                last = int(torch.nonzero(ok).flatten()[needed - 1])
                ok[last + 1 :] = False
                proposals += last + 1
            else:
                proposals += len(x)
            kept.append(x[ok])
            found += int(ok.sum())
        images = torch.cat(kept)
    else:
        raise ValueError(f"Unknown method {method!r}; choose among {list(METHODS)}.")
    return images.float().cpu(), proposals, time.perf_counter() - t0


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=64, help="images per target and method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-oracle-proposals", type=int, default=200_000)
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    pipe = load_demo_pipeline("gan")
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_evaluator()
    heldout = load_digits_7to3(size=int(pipe.heads.config.sample_size)).heldout()

    rows = []
    for k, target in enumerate(SEVEN_TARGETS):
        real = evaluator_features(evaluator, heldout.images[heldout.source_classes == k])
        for method in args.methods:
            images, proposals, seconds = run_method(
                method, pipe, evaluator, target, args.num_images, args.seed + k, args.max_oracle_proposals
            )
            row = {
                "dataset": "digits",
                "proposal": "gan",
                "target": target,
                "method": method,
                "accuracy": formula_accuracy(evaluator, images, target),
                "frechet": frechet_distance(evaluator_features(evaluator, images), real),
                "proposals_per_image": proposals / len(images),
                "seconds": seconds,
            }
            rows.append(row)
            print(
                f"{target:<12} {method:<9} acc {row['accuracy']:.3f}  frechet {row['frechet']:8.3f}  "
                f"prop/img {row['proposals_per_image']:8.1f}  {seconds:6.1f} s",
                flush=True,
            )

    header = f"| target | {' | '.join(args.methods)} |"
    print(f"\nDigits-7to3, GAN proposal, {args.num_images} images, seed {args.seed}")
    print("cells: accuracy / frechet / proposals per image / seconds\n")
    print(header)
    print("|---" * (len(args.methods) + 1) + "|")
    cell = {(r["target"], r["method"]): r for r in rows}
    for target in SEVEN_TARGETS:
        cells = []
        for m in args.methods:
            r = cell[(target, m)]
            cells.append(
                f"{_fmt(r['accuracy'])} / {_fmt(r['frechet'])} / {_fmt(r['proposals_per_image'])} / {r['seconds']:.1f}"
            )
        print(f"| `{target}` | {' | '.join(cells)} |")
    means = []
    for m in args.methods:
        mine = [r for r in rows if r["method"] == m]
        avg = {key: sum(r[key] for r in mine) / len(mine) for key in ("accuracy", "frechet", "proposals_per_image")}
        secs = sum(r["seconds"] for r in mine)
        means.append(
            f"{_fmt(avg['accuracy'])} / {_fmt(avg['frechet'])} / {_fmt(avg['proposals_per_image'])} / {secs:.1f}"
        )
    print(f"| **mean** (seconds: total) | {' | '.join(means)} |")

    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.json)
    return rows


if __name__ == "__main__":
    main()
