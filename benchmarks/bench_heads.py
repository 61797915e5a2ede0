#!/usr/bin/env python
"""Quality of the S2M heads on Digits-7to3 (spec §8) with the shipped, trained DCGAN as the proposal.

Trains the heads with `train_heads`' default recipe on the `train` split of Digits-7to3 (single-positive labels
only) and the shipped unconditional generator, then measures them on data that training never saw: the `heldout`
split of real images (whose full attribute sets are known) and fresh generated images (whose attribute sets the
shipped evaluator gives).

| figure | meaning (goal) |
|---|---|
| `dr_accuracy` | top class of ``D_r`` = the single-positive label, real held-out (optimum ~0.69: labels are random) |
| `dr_set_accuracy` | top class of ``D_r`` is one of the image's attributes (optimum 1) |
| `dv_accuracy` | ``D_v`` tells held-out real from fresh generated images, balanced |
| `ece_before`, `ece_after` | the larger of the ``D_v`` and ``D_r`` calibration errors (goal: `ece_after <= 0.03`) |
| `dv_ece_floor`, `dr_ece_floor` | ECE a perfectly calibrated head with these predictions shows on as many images |
| `dr_ece_oracle` | ECE of the best ``D_r`` these labels allow (each combination's label shares in the train split) |
| `absent_mass` | mean ``D_r`` mass on attributes a real held-out image lacks (optimum 0; goal `<= 0.05`) |
| `absent_mass_generated` | the same on generated images, attributes as the evaluator gives them (goal `<= 0.10`), |
| | over the images the evaluator sees at least one attribute in (`generated_no_attribute_share` are the others) |
| `train_time_s` | training time on this machine's CPU |

The recipe, measured here with the shipped generator and evaluator (seed 0, 1 thread on a shared 2-core CPU;
every run's step-`k` randomness depends on `k` alone, so a 2000-step run is the prefix of a 3000-step one; ECE after
calibration):

| recipe (`--train_kwargs`) | dv acc | dv ECE | dr ECE | absent | absent gen. |
|---|---|---|---|---|---|
| `{"shared_backbone":true,"ema_decay":null,"dr_augment":null}` + 3000 steps | 0.929 | 0.011 | 0.104 | 0.067 | 0.204 |
| `{"dv_auxiliary_classifier": false}` | 0.833 | 0.045 | 0.059 | 0.018 | 0.069 |
| `{"dv_auxiliary_classifier": false, "ema_decay": null}` | 0.808 | 0.023 | 0.071 | 0.024 | 0.080 |
| `{"dv_auxiliary_classifier": false}` + 4000 steps | 0.938 | 0.029 | 0.059 | 0.018 | 0.069 |
| `{}`: the default | 0.945 | 0.020 | 0.059 | 0.018 | 0.072 |

The default: separate backbones, EMA, artefact augmentation for ``D_r``, ``D_v``'s auxiliary classifier, 2000
steps. (Rows 2-4 were measured with an earlier save of the shipped evaluator, which only enters `absent gen.`.)

The shared backbone gives ``D_r`` three times the absent mass on generated images; separate backbones give ``D_v``
weaker features unless its backbone also learns the labels (the auxiliary classifier). ``D_r``'s calibration error
stays above 0.03: on 379 held-out images a perfectly calibrated ``D_r`` with the same predictions shows about 0.047
(`dr_ece_floor`), and the best ``D_r`` these single-positive labels allow shows 0.024 (`dr_ece_oracle`).

Usage:

```sh
python benchmarks/bench_heads.py                    # prints the table
python benchmarks/bench_heads.py --json heads.json  # and writes the figures
python benchmarks/bench_heads.py --train_kwargs '{"shared_backbone": true, "ema_decay": null}'  # another recipe
```
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time

import torch
from pretrained_roots import PRETRAINED_ROOTS

from s2m_diffusers import calibration, maths
from s2m_diffusers.data import SinglePositiveDataset
from s2m_diffusers.models.heads import S2MHeads
from s2m_diffusers.targets import parse_target
from s2m_diffusers.training import expected_calibration_error, nll, train_heads


def gan_proposal(generator_model: torch.nn.Module) -> callable:
    """`proposal(n, generator)`: images of an unconditional latent generator from standard-normal latents."""
    generator_model.eval()
    latent_dim = generator_model.config.latent_dim

    @torch.no_grad()
    def proposal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return generator_model(torch.randn(n, latent_dim, generator=generator))

    return proposal


@torch.no_grad()
def evaluate_heads(
    heads: S2MHeads,
    real_images: torch.Tensor,
    real_labels: torch.Tensor,
    real_attributes: torch.Tensor,
    fake_images: torch.Tensor,
    fake_attributes: torch.Tensor,
    oracle_label_shares: torch.Tensor | None = None,
) -> dict[str, float]:
    """Held-out figures of calibrated heads (see the module docstring).

    Args:
        heads ([`S2MHeads`]): trained, calibrated heads.
        real_images (`torch.Tensor`): `(N, C, S, S)` real held-out images.
        real_labels (`torch.Tensor`): `(N,)` their single-positive labels.
        real_attributes (`torch.Tensor`): `(N, n)` bool, their full attribute sets.
        fake_images (`torch.Tensor`): `(M, C, S, S)` fresh proposal samples.
        fake_attributes (`torch.Tensor`): `(M, n)` bool, their attribute sets as an evaluator labels them.
        oracle_label_shares (`torch.Tensor`, *optional*): `(N, n)`: for each real image, the share of each label
            among training images of the same attribute combination; gives `dr_ece_oracle`.

    Returns:
        `dict[str, float]`: the figures, for ``D_v`` and ``D_r`` separately and combined.
    """
    heads.eval()
    real, fake = heads(real_images), heads(fake_images)
    temperatures = heads.temperatures()
    n_real, n_fake = len(real_images), len(fake_images)
    # D_v: held-out real (1) against fresh generated (0), each half of the weight.
    z = torch.cat([real.dv_logit, fake.dv_logit])
    y = torch.cat([torch.ones(n_real), torch.zeros(n_fake)]).long()
    w = torch.cat([torch.full((n_real,), 0.5 / n_real), torch.full((n_fake,), 0.5 / n_fake)])
    dr_probs = real.dr_log_probs.exp()
    top = dr_probs.argmax(dim=1)
    figures = {
        "dr_accuracy": float((top == real_labels).float().mean()),
        "dr_set_accuracy": float(real_attributes[torch.arange(n_real), top].float().mean()),
        "dr_nll": float(nll(real.dr_log_probs, real_labels)),
        "dr_ece_before": expected_calibration_error(real.dr_log_probs * temperatures["dr"], real_labels),
        "dr_ece_after": expected_calibration_error(real.dr_log_probs, real_labels),
        "dv_accuracy": float((((z > 0).long() == y).float() * w).sum()),
        "dv_nll": float(nll(z, y, w)),
        "dv_ece_before": expected_calibration_error(z * temperatures["dv"], y, w),
        "dv_ece_after": expected_calibration_error(z, y, w),
        "absent_mass": float((dr_probs * (~real_attributes).float()).sum(dim=1).mean()),
        # Over generated images holding at least one attribute: the data, and so D_r, only covers those; images
        # with none are D_v's to reject (their share is reported).
        "absent_mass_generated": float(
            (fake.dr_log_probs.exp() * (~fake_attributes).float()).sum(dim=1)[fake_attributes.any(dim=1)].mean()
        ),
        "generated_no_attribute_share": float((~fake_attributes.any(dim=1)).float().mean()),
        "dv_temperature": temperatures["dv"],
        "dr_temperature": temperatures["dr"],
    }
    # What a perfectly calibrated head with these predictions would show on this many images: labels drawn from
    # the head's own probabilities (mean over 20 draws). Calibration errors near it are sampling noise.
    draws = torch.Generator().manual_seed(0)
    dr_floor, dv_floor = [], []
    for _ in range(20):
        labels = torch.multinomial(dr_probs, 1, generator=draws).squeeze(1)
        dr_floor.append(expected_calibration_error(real.dr_log_probs, labels))
        is_real = torch.bernoulli(torch.sigmoid(z), generator=draws).long()
        dv_floor.append(expected_calibration_error(z, is_real, w))
    figures["dr_ece_floor"] = sum(dr_floor) / len(dr_floor)
    figures["dv_ece_floor"] = sum(dv_floor) / len(dv_floor)
    # The floor of D_r's calibration error on these labels: the per-combination label shares of the training
    # split, the best any D_r could learn from them, scored on the same held-out images.
    if oracle_label_shares is not None:
        shares = oracle_label_shares.clamp_min(1e-6)
        figures["dr_ece_oracle"] = expected_calibration_error(shares.log(), real_labels)
    figures["ece_before"] = max(figures["dv_ece_before"], figures["dr_ece_before"])
    figures["ece_after"] = max(figures["dv_ece_after"], figures["dr_ece_after"])
    figures.update(generated_reading(heads, fake.dv_logit, fake.dr_log_probs, fake_attributes))
    return figures


def generated_reading(
    heads: S2MHeads, dv_logit: torch.Tensor, dr_log_probs: torch.Tensor, attributes: torch.Tensor
) -> dict:
    """How the sampler reads generated images with the heads' own margins and ``D_v`` strength, judged by the
    evaluator's attribute sets `attributes` `(M, n)`: per combination the share of the generated images the evaluator
    puts in it (`raw_share`) and the share of those that keep a positive weight for it (`support`); the weights'
    effective sample size share over all generated images at the heads' strength (`weights_ess`) and at strength 1."""
    names = heads.attribute_names
    lam, kappa, beta = heads.negation_margin, heads.presence_margin, heads.dv_strength
    per_combination = {}
    for size in range(1, len(names) + 1):
        for chosen in itertools.combinations(range(len(names)), size):
            literals = [names[i] if i in chosen else f"~{names[i]}" for i in range(len(names))]
            target = parse_target(" & ".join(literals), names)
            members = (attributes == torch.tensor([i in chosen for i in range(len(names))])).all(dim=1)
            log_r = maths.log_r(
                target, dr_log_probs.double(), heads.log_p_data().double(), heads.log_priors(), lam, kappa,
                heads.config.labelling,
            )  # fmt: skip
            support = torch.isfinite(log_r)[members].double().mean() if members.any() else torch.tensor(math.nan)
            per_combination[" & ".join(literals)] = {
                "raw_share": float(members.double().mean()),
                "support": float(support),
            }
    return {
        "negation_margin": lam,
        "presence_margin": kappa,
        "dv_strength": beta,
        "weights_ess": calibration.ess_share(beta * dv_logit.double()),
        "weights_ess_strength_1": calibration.ess_share(dv_logit.double()),
        "combinations": per_combination,
    }


GOALS = {
    "ece_after": 0.03,
    "dv_ece_after": 0.03,
    "dr_ece_after": 0.03,
    "absent_mass": 0.05,
    "absent_mass_generated": 0.10,
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Quality of the S2M heads on 7to3 with a shipped generator.")
    parser.add_argument("--dataset", default="digits", choices=sorted(PRETRAINED_ROOTS))
    parser.add_argument("--kind", default="gan", choices=["gan", "ddpm"], help="the generator (a DDPM: 10-step DDIM)")
    parser.add_argument(
        "--heads", default=None, help="measure these trained heads (e.g. the shipped ones) instead of new ones"
    )
    parser.add_argument("--num_steps", type=int, default=None, help="override the default number of steps")
    parser.add_argument(
        "--train_kwargs",
        default="{}",
        help="JSON of `train_heads` arguments that replace the defaults, e.g. '{\"shared_backbone\": true}'",
    )
    parser.add_argument("--num_generated", type=int, default=4000, help="fresh samples to measure on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output_dir", default=None, help="also save the trained heads here")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from s2m_diffusers.demo import DDIM_STEPS, load_7to3, load_generator, training_proposal
    from s2m_diffusers.evaluation import AttributeEvaluator, evaluator_attributes
    from s2m_diffusers.proposals import DDIMProposal

    root = PRETRAINED_ROOTS[args.dataset]
    data = load_7to3(args.dataset)
    train, heldout = data.train(), data.heldout()
    components = load_generator(args.kind, root)
    if args.kind == "gan":
        proposal = gan_proposal(components["gan"])
    else:
        proposal = DDIMProposal(components["unet"], components["scheduler"], DDIM_STEPS, micro_batch_size=256)
    evaluator = AttributeEvaluator.from_pretrained(os.path.join(root, "evaluator")).eval()

    start = time.perf_counter()
    kwargs = json.loads(args.train_kwargs)
    if args.num_steps is not None:
        kwargs["num_steps"] = args.num_steps
    if args.heads is not None:
        heads = S2MHeads.from_pretrained(args.heads).eval()
        with open(os.path.join(args.heads, "metrics.json")) as f:
            metrics = json.load(f)
    else:
        heads, metrics = train_heads(
            SinglePositiveDataset(train.images, train.single_labels, list(data.attribute_names)),
            training_proposal(args.kind, components, seed=args.seed) if args.kind == "ddpm" else proposal,
            seed=args.seed,
            output_dir=args.output_dir,
            progress=False,
            **kwargs,
        )
    train_time = time.perf_counter() - start if args.heads is None else metrics.get("train_time_s", math.nan)

    with torch.no_grad():
        fake = proposal(args.num_generated, torch.Generator().manual_seed(10_000 + args.seed))
    shares = torch.stack(
        [torch.bincount(train.single_labels[train.source_classes == k], minlength=3).float() for k in range(7)]
    )
    shares = (shares / shares.sum(dim=1, keepdim=True))[heldout.source_classes]  # (N, 3)
    figures = evaluate_heads(
        heads,
        heldout.images,
        heldout.single_labels,
        heldout.attributes,
        fake,
        evaluator_attributes(evaluator, fake),
        oracle_label_shares=shares,
    )
    figures.update(
        train_time_s=train_time,
        num_steps=metrics["steps"],
        dv_best_step=metrics.get("dv_best_step"),
        dr_best_step=metrics.get("dr_best_step"),
        priors=metrics["priors"],
        num_threads=args.threads,
        train_kwargs=kwargs,
    )

    print(
        f"S2M heads on {args.dataset}-7to3 with the {args.kind} ({len(train)} train / {len(heldout)} held-out real, "
        f"{len(fake)} generated)"
    )
    print(f"{'figure':<24}{'value':>10}  goal")
    for key in (
        "dr_accuracy", "dr_set_accuracy", "dv_accuracy", "dv_ece_before", "dv_ece_after", "dv_ece_floor",
        "dr_ece_before", "dr_ece_after", "dr_ece_floor", "dr_ece_oracle", "ece_before", "ece_after",
        "absent_mass", "absent_mass_generated", "generated_no_attribute_share", "train_time_s",
    ):  # fmt: skip
        goal = GOALS.get(key)
        mark = "" if goal is None else f"<= {goal:.2f} {'ok' if figures[key] <= goal else 'MISSED'}"
        print(f"{key:<24}{figures[key]:>10.4f}  {mark}")
    print(
        f"\nGenerated images read with the heads' own lambda={figures['negation_margin']:.3g}, "
        f"kappa={figures['presence_margin']:.3g}, beta={figures['dv_strength']:.3g}: weights' ESS "
        f"{figures['weights_ess']:.1%} of generated images ({figures['weights_ess_strength_1']:.1%} at beta = 1)"
    )
    print("| combination | raw share (evaluator) | support: share of its images with a positive weight |")
    print("|---|---|---|")
    for name, row in figures["combinations"].items():
        print(f"| `{name}` | {row['raw_share']:.3f} | {row['support']:.3f} |")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
