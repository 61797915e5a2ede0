#!/usr/bin/env python
"""The target that trained heads define, without a sampler: how each way of reading the heads scores on 7to3.

Every S2M sampler draws (at best exactly) from ``p_G(x) w(x)`` with ``w`` the weight the heads give (spec §4). This
benchmark measures that target directly, so that the heads' reading is judged apart from any sampler's convergence:
it draws `--num_generated` images from the generator once, weighs them for each of the seven 7to3 combinations under
each reading, and scores the **weighted** images with the dataset's evaluator:

| column | meaning |
|---|---|
| `accuracy` | ``sum w P(on target) / sum w``: the evaluator accuracy of an exact sampler of the reading's target |
| `frechet` | Fréchet distance of the weighted evaluator features to the real held-out images of the combination |
| `support` | share of the combination's generated images (as the evaluator labels them) with a positive weight |
| `ess` | effective sample size of the weights, as a share of the images with a positive weight |

Readings:

- `heads`: the heads' own margins and ``D_v`` strength, chosen from data when they were trained (the default);
- `heads_beta1`: the same margins with ``beta = 1`` (the paper's target);
- `hand_set`: negation margin 30, presence margin 0.5, ``beta = 1`` (what the demo and benchmarks set by hand before
  the heads chose their own);
- `official`: the official recipe's weights (hand-set gammas, margin 1, ``D_r`` temperature by the number of present
  attributes, ``beta = 1``; `common.official_evaluate`);
- `raw`: every generated image, weight 1.

```sh
python benchmarks/bench_reading.py --dataset digits --kind gan
python benchmarks/bench_reading.py --dataset fashion --kind gan --json benchmarks/results/reading_fashion_gan.json
```
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from common import OFFICIAL_GAMMA_ABSENT, OFFICIAL_GAMMA_PRESENT, OFFICIAL_TEMPERATURES
from pretrained_roots import PRETRAINED_ROOTS

from s2m_diffusers import calibration, maths
from s2m_diffusers.demo import DDIM_STEPS, SEVEN_TARGETS, load_7to3, load_demo_pipeline, load_evaluator
from s2m_diffusers.evaluation import evaluator_class_probs, evaluator_features, frechet_distance
from s2m_diffusers.targets import parse_target

READINGS = ("heads", "heads_beta1", "hand_set", "official", "raw")


def reading_log_weights(heads, target, dv_logit: torch.Tensor, dr_log_probs: torch.Tensor, reading: str):
    """``log w`` `(M,)` of generated images under one reading of the heads (module docstring)."""
    names = heads.attribute_names
    log_data, log_priors = heads.log_p_data().double(), heads.log_priors()
    common = dict(log_p_data=log_data, labelling=heads.config.labelling)
    if reading == "raw":
        return torch.zeros(len(dv_logit), dtype=torch.float64)
    if reading == "official":
        present = set(target.present)
        gammas = torch.tensor([OFFICIAL_GAMMA_PRESENT if n in present else OFFICIAL_GAMMA_ABSENT for n in names])
        return maths.log_weight(
            target, dr_log_probs, dv_logit, log_data, gammas.double().log() + log_data, negation_margin=1.0,
            dr_temperature=OFFICIAL_TEMPERATURES[len(present)],
        )  # fmt: skip
    settings = {
        "heads": (heads.negation_margin, heads.presence_margin, heads.dv_strength),
        "heads_beta1": (heads.negation_margin, heads.presence_margin, 1.0),
        "hand_set": (30.0, 0.5, 1.0),
    }[reading]
    lam, kappa, beta = settings
    return maths.log_weight(
        target, dr_log_probs, dv_logit, log_priors=log_priors, negation_margin=lam, presence_margin=kappa,
        dv_strength=beta, **common,
    )  # fmt: skip


@torch.no_grad()
def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="The target trained heads define, scored without a sampler.")
    parser.add_argument("--dataset", default="digits", choices=sorted(PRETRAINED_ROOTS))
    parser.add_argument("--kind", default="gan", choices=["gan", "ddpm"])
    parser.add_argument("--num_generated", type=int, default=None, help="default: 16384 (GAN), 4096 (DDPM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = PRETRAINED_ROOTS[args.dataset]
    pipe = load_demo_pipeline(args.kind, root)
    heads, evaluator = pipe.heads.eval(), load_evaluator(root)
    m = args.num_generated or (16384 if args.kind == "gan" else 4096)
    proposal = pipe.get_proposal(256, DDIM_STEPS if args.kind == "ddpm" else None)
    images = proposal(m, torch.Generator().manual_seed(10_000 + args.seed))
    outputs = [heads(images[i : i + 1024]) for i in range(0, m, 1024)]
    dv = torch.cat([o.dv_logit for o in outputs]).double()
    dr = torch.cat([o.dr_log_probs for o in outputs]).double()
    probs = evaluator_class_probs(evaluator, images)  # (M, K) over the evaluator's combinations
    features = evaluator_features(evaluator, images)
    table = evaluator.class_table.cpu()
    heldout = load_7to3(args.dataset, size=int(heads.config.sample_size)).heldout()
    names = heads.attribute_names
    rows = []
    for k, text in enumerate(SEVEN_TARGETS):
        target = parse_target(text, names)
        on_target = probs[:, target.holds_batch(table)].sum(dim=1).double()  # P(on target) per image
        members = probs.argmax(dim=1) == int(target.holds_batch(table).nonzero()[0])
        real = evaluator_features(evaluator, heldout.images[heldout.source_classes == k])
        for reading in READINGS:
            log_w = reading_log_weights(heads, target, dv, dr, reading)
            positive = torch.isfinite(log_w)
            w = torch.softmax(log_w, 0) if positive.any() else torch.zeros_like(log_w)
            some = int(positive.sum()) >= 2  # a reading that leaves the combination no support scores nan
            rows.append(
                {
                    "dataset": args.dataset,
                    "proposal": args.kind,
                    "target": text,
                    "reading": reading,
                    "accuracy": float((w * on_target).sum()) if some else math.nan,
                    "frechet": frechet_distance(features[positive], real, weights_a=w[positive]) if some else math.nan,
                    "support": float(positive[members].double().mean()) if members.any() else math.nan,
                    "ess": calibration.ess_share(log_w[positive]),
                    "num_generated": m,
                }
            )
    print(f"{args.dataset}-7to3, {args.kind}: {m} generated images, the heads' reading: lambda="
          f"{heads.negation_margin:.3g}, kappa={heads.presence_margin:.3g}, beta={heads.dv_strength:.3g}")  # fmt: skip
    print("cells: accuracy / Fréchet / support / ESS share\n")
    print("| target | " + " | ".join(READINGS) + " |")
    print("|---" * (len(READINGS) + 1) + "|")
    for text in [*SEVEN_TARGETS, "mean"]:
        cells = []
        for reading in READINGS:
            sel = [r for r in rows if r["reading"] == reading and (text == "mean" or r["target"] == text)]
            mean = {key: sum(r[key] for r in sel) / len(sel) for key in ("accuracy", "frechet", "support", "ess")}
            cells.append(f"{mean['accuracy']:.3f} / {mean['frechet']:.2f} / {mean['support']:.2f} / {mean['ess']:.3f}")
        label = "**mean of the 7**" if text == "mean" else f"`{text}`"
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
