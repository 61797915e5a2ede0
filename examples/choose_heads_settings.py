#!/usr/bin/env python
"""Give trained 7to3 heads the sampler settings that `train_heads` now chooses from data, without retraining them.

`s2m_diffusers.training.train_heads` ends with `choose_sampling_settings`: the negation and presence margins and the
strength of `logit D_v`, chosen on held-out real and generated images and stored in the heads' config, and a `D_v`
temperature never below 1 (calibration must not sharpen a discriminator). Heads trained before that step existed
(the shipped Digits-7to3 heads, the benchmarks' Fashion-7to3 heads) get the same step here: the held-out split of the
real data that their training kept apart (same seed, same fraction) and `--num_generated` fresh proposal samples
(DDIM with the heads' step count for a DDPM). The heads' weights are unchanged; their config, `D_v` temperature and
`metrics.json` are updated in place.

```sh
python examples/choose_heads_settings.py --dataset digits --kinds gan ddpm gan_conditional
python examples/choose_heads_settings.py --dataset fashion --kinds gan ddpm gan_conditional
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from s2m_diffusers.demo import DDIM_STEPS, digits_train_data, load_generator
from s2m_diffusers.models.heads import S2MHeads
from s2m_diffusers.proposals import DDIMProposal
from s2m_diffusers.training import choose_sampling_settings, save_heads

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from pretrained_roots import PRETRAINED_ROOTS  # noqa: E402


@torch.no_grad()
def generated_images(kind: str, root: str, n: int, seed: int) -> torch.Tensor:
    """`n` fresh samples of a shipped generator, in [-1, 1] (a conditional GAN's classes drawn uniformly)."""
    components = load_generator(kind, root)
    generator = torch.Generator().manual_seed(seed + 777)
    if kind == "ddpm":
        proposal = DDIMProposal(components["unet"], components["scheduler"], DDIM_STEPS, micro_batch_size=256)
        return proposal(n, generator)
    gan = components["gan"]
    z = torch.randn(n, gan.config.latent_dim, generator=generator)
    if kind == "gan_conditional":
        labels = torch.randint(gan.config.num_classes, (n,), generator=generator)
        return gan(z, labels)
    return gan(z)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(PRETRAINED_ROOTS), default="digits")
    parser.add_argument("--kinds", nargs="+", default=["gan", "ddpm", "gan_conditional"])
    parser.add_argument("--num_generated", type=int, default=1024)
    parser.add_argument("--heldout_fraction", type=float, default=0.2, help="as the heads were trained (default)")
    parser.add_argument("--seed", type=int, default=0, help="as the heads were trained (default)")
    args = parser.parse_args(argv)
    root = PRETRAINED_ROOTS[args.dataset]
    _, heldout = digits_train_data(dataset=args.dataset).split(args.heldout_fraction, seed=args.seed)
    for kind in args.kinds:
        folder = os.path.join(root, f"heads_{kind}")
        heads = S2MHeads.from_pretrained(folder).eval()
        with open(os.path.join(folder, "metrics.json")) as f:
            metrics = json.load(f)
        fitted = metrics.get("dv_temperature_fitted", metrics.get("dv_temperature", 1.0))
        heads.set_temperatures(dv=max(1.0, fitted))
        chosen = choose_sampling_settings(
            heads,
            heldout.images,
            heldout.labels,
            generated_images(kind, root, args.num_generated, args.seed),
            dv_temperature_fitted=fitted,
        )
        metrics.update(chosen, dv_temperature=max(1.0, fitted), dv_temperature_fitted=fitted)
        save_heads(heads, folder)
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(
            f"{args.dataset} {kind}: lambda={chosen['negation_margin']:.3g} kappa={chosen['presence_margin']:.3g} "
            f"beta={chosen['dv_strength']:.3g} ESS={chosen['dv_ess_share']:.3f} degenerate={chosen['dv_degenerate']}"
        )
        print("  support:", {k: round(v, 3) for k, v in chosen["generated_support"].items()})


if __name__ == "__main__":
    main()
