#!/usr/bin/env python
"""S2M sampling of the seven 7to3 combinations: the official recipe, ours and two references, side by side.

For each dataset (Digits-7to3, Fashion-7to3), each proposal (the DCGAN, the DDPM sampled as 10-step DDIM) and each
combination of `SEVEN_TARGETS`, every method draws `N` images, scored with that dataset's evaluator:

| column | meaning |
|---|---|
| `accuracy` | share of the images the evaluator judges on target (`formula_accuracy`) |
| `frechet` | Fréchet distance in the evaluator's features to the real held-out images of that combination |
| `proposals/image` | generator calls per returned image (refitting included) |
| `seconds` | wall time of the sampling (scoring excluded) |

Methods:

- `raw`: `N` proposals, no selection.
- `official`: the official recipe (`sample_official`: `N` chains x 200 IMH steps from the prior, final states
  returned on target or not, 201 proposals per image) with the official weights: hand-set ``gamma_c`` (0.1 for a
  present attribute, 1.0 for an absent one, i.e. ``log pi_c = log gamma_c + log p_data(c)``), negation margin 1 and
  the official temperature on ``D_r`` (1.2 for one present attribute, 1.0 for two, 0.2 for three:
  ``log_softmax(dr_log_probs / T)``), plus ``logit D_v``.
- `ours`: `S2MPipeline` at its defaults (`OURS_SETTINGS` only sets the micro-batch): calibrated heads read with
  their own margins and ``D_v`` strength, chosen from data when they were trained (`choose_sampling_settings`).
  `previous` is the sampler before its tolerance (`PREVIOUS_SETTINGS`). `ours_full_fit` is ours before the fit's
  spend limit: every refitting stage runs (`pipe.fit(target)`), then the call; both counted. Its budget is the
  official recipe's cost, 201 proposals per image. A call whose budget runs out returns the images found
  (`budget_exhausted` in the JSON row; accuracy and Fréchet distance over those, proposals per image over them,
  infinite when none was found).
- `ours_conditional` (GAN only): `S2MPipeline` on the class-conditional DCGAN (`gan_conditional/`, trained on the
  single-positive labels) with heads that have ``D_f`` (`heads_gan_conditional/`): the proposal is conditioned on the
  target's first present attribute and ``D_f`` corrects for it (spec §4).
- `oracle`: proposals accepted by the evaluator itself until `N` are on target (an upper bound on accuracy that no
  sampler without the evaluator can reach, and the cost of plain rejection with a perfect selector).

The models come from `PRETRAINED_ROOTS` (`benchmarks/pretrained_roots.py`): Digits' are shipped in the package,
Fashion's are trained by the example scripts into `benchmarks/pretrained/fashion7to3/` (see `benchmarks/RESULTS.md` for
the commands). Fashion-MNIST itself is read from `$S2M_FASHION_MNIST` or the Debian package `dataset-fashion-mnist`.
A dataset or a model that is missing is reported and skipped.

Usage:

```sh
python benchmarks/bench_7to3.py --datasets digits --proposals gan             # the issue's goal row
python benchmarks/bench_7to3.py --seeds 0 1 2 --json 7to3.json                 # everything
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
from pretrained_roots import PRETRAINED_ROOTS  # noqa: E402  (the same folder)

from s2m_diffusers.demo import (  # noqa: E402
    DATASETS,
    DEMO_SETTINGS,
    SEVEN_TARGETS,
    load_7to3,
    load_demo_pipeline,
    load_evaluator,
)
from s2m_diffusers.densities import StandardNormal  # noqa: E402
from s2m_diffusers.evaluation import (  # noqa: E402
    evaluator_class_probs,
    evaluator_features,
    formula_accuracy,
    frechet_distance,
)
from s2m_diffusers.maths import log_p_data, log_weight  # noqa: E402
from s2m_diffusers.pipeline_s2m import S2MPipeline  # noqa: E402
from s2m_diffusers.sampling import sample_official  # noqa: E402
from s2m_diffusers.targets import Target, parse_target  # noqa: E402
from s2m_diffusers.utils import write_json_atomically  # noqa: E402

METHODS = (
    "raw",
    "official",
    "previous",
    "ours",
    "ours_full_fit",
    "ours_screen",
    "ours_screen_heads",
    "ours_wrapped",
    "ours_again",
    "ours_conditional",
    "oracle",
)
# `ours_screen`: ours with delayed-acceptance screening of the diffusion proposals (`screen="auto"`: the step and the
# surrogate's floor calibrated on the pilot; a no-op for the GAN), the heads reading the predicted clean images;
# `ours_screen_heads`: the same with the DDPM's screen heads reading them (`screen_heads_ddpm/`, distilled by
# `examples/distil_screen_heads.py`). `ours` never screens, and no method but `ours_screen_heads` sees screen heads.
# `ours_wrapped`: `ours_screen` with the same UNet taken as a wrapped diffusers pipeline (`PipelineProposal` around
# `s2m_diffusers.testing.pipelines.LatentsDDIMPipeline`, the text-to-image pipelines' step-callback contract): it is
# stopped after the screen step through its callback and a proposal that passes is rerun whole (K UNet calls, not
# K - s), the path every wrapped pipeline takes (DDPM only).
SCREEN_SETTINGS = {"screen": "auto"}
NO_SCREEN_SETTINGS = {"screen": None}
SCREEN_METHODS = ("ours_screen", "ours_screen_heads", "ours_wrapped")
PROPOSALS = ("gan", "ddpm")
COLUMNS = ("accuracy", "frechet", "proposals_per_image")
# Ours: the pipeline's keyword arguments per proposal (see the module docstring and benchmarks/RESULTS.md).
# Ours: the pipeline's defaults (tolerance 0.01, sequential refitting that keeps a fit only where it beats the prior,
# 8 samples per chain), the heads read with their own margins and D_v strength (chosen from data when they were
# trained: `s2m_diffusers.training.choose_sampling_settings`). The same for every kind of proposal.
OURS_SETTINGS: dict[str, dict] = {
    "gan": {"micro_batch_size": 256},
    "ddpm": {"micro_batch_size": DEMO_SETTINGS["ddpm"]["micro_batch_size"]},
}
# The previous sampler's recipe (before the tolerance): 3 MH steps after entry, one sample per chain, refitting with
# 128 latents per stage, unwidened, for the GAN; no refitting for the DDPM (its refitting failed in DDIM noise). The
# heads are read as ours reads them (it used hand-set margins, 30 and 0.5, before the heads chose their own).
PREVIOUS_SETTINGS: dict[str, dict] = {
    "gan": {
        **OURS_SETTINGS["gan"],
        "refit": "sequential",
        "mixing_tolerance": None,
        "steps_after_entry": 3,
        "samples_per_chain": 1,
        "fit_size": 128,
        "covariance_scale": 1.0,
    },
    "ddpm": {
        **OURS_SETTINGS["ddpm"],
        "refit": "off",
        "mixing_tolerance": None,
        "steps_after_entry": 3,
        "samples_per_chain": 1,
    },
}
# A second call for a target whose fit is cached (the goal: <= 10 proposals per image).
AGAIN_IMAGES = 16
# The official code's D_r temperature by the number of present attributes of the target.
OFFICIAL_TEMPERATURES = {1: 1.2, 2: 1.0, 3: 0.2}
OFFICIAL_GAMMA_PRESENT, OFFICIAL_GAMMA_ABSENT = 0.1, 1.0
OFFICIAL_STEPS = 200


def official_evaluate(heads, proposal, target: Target, micro_batch_size: int = 256, many: float | None = None):
    """``evaluate(z) -> (x, log_w)`` with the official recipe's weights (hand-set gammas, temperature, margin 1).

    Args:
        heads (`S2MHeads`): the heads.
        proposal (`ProposalAdapter`): an unconditional proposal (`pipe.get_proposal()`, `GeneratorProposal`).
        target (`Target`): a conjunction over the heads' attributes.
        micro_batch_size (`int`, defaults to 256): latents per generator and heads call.
        many (`float`, *optional*): the temperature for more than 3 present attributes, which the official
            scripts do not have (an error when `None`).

    Returns:
        `Callable`: the evaluate function of `sample_official`; images in [-1, 1].
    """
    names = list(heads.config.attribute_names)
    present = set(target.present)
    gammas = torch.tensor(
        [OFFICIAL_GAMMA_PRESENT if n in present else OFFICIAL_GAMMA_ABSENT for n in names], dtype=torch.float64
    )
    log_data = log_p_data(heads.config.label_counts, len(names))
    log_priors = gammas.log() + log_data
    temperature = OFFICIAL_TEMPERATURES.get(len(present), many)
    if temperature is None:
        raise ValueError(f"The official recipe has temperatures for 1-3 present attributes; {target} has {present}.")

    @torch.no_grad()
    def evaluate(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, weights = [], []
        for chunk in z.split(micro_batch_size):
            x = proposal.generate(chunk)
            out = heads(x)
            images.append(x)
            weights.append(
                log_weight(
                    target,
                    out.dr_log_probs,
                    out.dv_logit,
                    log_data,
                    log_priors,
                    negation_margin=1.0,
                    dr_temperature=temperature,
                )
            )
        return torch.cat(images), torch.cat(weights)

    return evaluate


@torch.no_grad()
def wrapped_pipeline(pipe):
    """``pipe``'s UNet and heads with the UNet taken as a wrapped diffusers pipeline (`ours_wrapped`); made once."""
    if getattr(pipe, "_wrapped", None) is None:
        from diffusers import DDIMScheduler

        from s2m_diffusers.testing.pipelines import LatentsDDIMPipeline

        if pipe.unet is None:
            raise ValueError("ours_wrapped needs a UNet + scheduler pipeline (--proposals ddpm).")
        inner = LatentsDDIMPipeline(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config))
        wrapped = S2MPipeline(
            heads=pipe.heads, proposal_pipeline=inner, num_inference_steps=pipe.config.num_inference_steps
        )
        wrapped.set_progress_bar_config(disable=True)
        pipe._wrapped = wrapped
    pipe._wrapped.register_to_config(num_inference_steps=pipe.config.num_inference_steps)
    return pipe._wrapped


def run_method(
    method: str, pipe, evaluator, target: str, num_images: int, seed: int, max_oracle: int, ours: dict | None = None
):
    """Draw `num_images` images of `target` with `method`; returns (images in [-1, 1], proposals, seconds).

    `pipe` is the unconditional pipeline, or for `ours_conditional` the class-conditional one; `ours` holds the
    pipeline's keyword arguments for `ours` and `ours_conditional`.
    """
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    extra = {}
    if method == "raw":
        images = pipe.get_proposal(256).sample(num_images, generator).images
        proposals = num_images
    elif method == "official":
        parsed = parse_target(target, list(pipe.heads.config.attribute_names))
        proposal = pipe.get_proposal(256)
        evaluate = official_evaluate(pipe.heads, proposal, parsed)
        result = sample_official(
            evaluate, StandardNormal(proposal.latent_shape), num_images, OFFICIAL_STEPS, generator=generator
        )
        images, proposals = result.x, result.stats.proposals
    elif method == "ours_full_fit":
        # Ours as it was before the fit's spend limit: every stage runs whatever the call's size (`pipe.fit` fits for
        # no particular number of images), then the call samples from that fit; the fit's proposals count in the call.
        # The cache is cleared before (ours' own fit, limited or not, must not be reused) and restored after.
        saved = dict(pipe.fits)
        pipe.fits.clear()
        settings = {"fit_seed": seed, **(ours or {})}
        budget = (OFFICIAL_STEPS + 1) * num_images
        fit = pipe.fit(target, max_proposals=budget, **{k: v for k, v in settings.items() if k != "max_proposals"})
        left = max(1, budget - fit.stats.proposals)
        out = pipe(
            target,
            num_images=num_images,
            generator=generator,
            output_type="pt",
            allow_partial=True,
            **{**settings, "max_proposals": left},
        )
        pipe.fits.clear()
        pipe.fits.update(saved)
        images, proposals = out.images * 2 - 1, out.stats["proposals"] + fit.stats.proposals
        extra = {"fit_proposals": fit.stats.proposals, "fit": out.stats["fit"], "mixing": out.stats["mixing"]}
        if out.stats.get("unet_calls") is not None:
            extra["unet_calls"] = out.stats["unet_calls"] + fit.stats.unet_calls
            extra["fit_unet_calls"] = fit.stats.unet_calls
    elif method in ("previous", "ours", *SCREEN_METHODS, "ours_again", "ours_conditional"):
        # The budget is the official recipe's cost (201 proposals per image); allow_partial: a combination the heads
        # can barely reach is reported (fewer images), not a crash. Every seed fits anew (`fit_seed`), and its fit's
        # proposals count in its call; `ours_again` is a later call of AGAIN_IMAGES images that reuses that fit.
        n = AGAIN_IMAGES if method == "ours_again" else num_images
        settings = {"max_proposals": (OFFICIAL_STEPS + 1) * n, "fit_seed": seed, **NO_SCREEN_SETTINGS, **(ours or {})}
        if method == "ours_wrapped":
            pipe = wrapped_pipeline(pipe)
        if method in SCREEN_METHODS:  # it pays its own fit, as ours does (the cache would hand it ours')
            settings.update(SCREEN_SETTINGS)
            pipe.fits.clear()
        screen_heads = getattr(pipe, "screen_heads", None)
        if method != "ours_screen_heads":
            pipe.register_modules(screen_heads=None)
        elif screen_heads is None:
            raise ValueError("ours_screen_heads needs the DDPM's screen heads: run examples/distil_screen_heads.py.")
        try:
            out = pipe(target, num_images=n, generator=generator, output_type="pt", allow_partial=True, **settings)
        finally:
            pipe.register_modules(screen_heads=screen_heads)
        images, proposals = out.images * 2 - 1, out.stats["proposals"]
        extra = {"fit_proposals": out.stats["fit_proposals"], "fit": out.stats["fit"], "mixing": out.stats["mixing"]}
        if out.stats.get("unet_calls") is not None:  # a diffusion proposal: its UNet calls, screening included
            extra["unet_calls"], extra["fit_unet_calls"] = out.stats["unet_calls"], out.stats["fit_unet_calls"]
            extra["screen"] = {k: v for k, v in out.stats["screen"].items() if k != "candidates"}
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
    steps = getattr(pipe.get_proposal(1), "num_steps", None)  # UNet calls per proposal of a diffusion model
    if steps and "unet_calls" not in extra:
        extra["unet_calls"] = proposals * steps
    return images.float().cpu(), proposals, time.perf_counter() - t0, extra


def print_unet_table(rows: list[dict]) -> None:
    """UNet calls per returned image of the diffusion methods, beside accuracy and Fréchet distance (means over the
    targets and seeds run), and ours with the screen against ours."""
    mine = [r for r in rows if r.get("unet_calls_per_image") is not None]
    if not mine:
        return
    print("\nUNet calls per returned image (diffusion proposals; mean over targets and seeds)\n")
    print(
        "| dataset | method | accuracy | Fréchet | proposals/image | UNet calls/image | vs ours | "
        "sampling UNet calls/image (fit excluded) | vs ours | screen step |"
    )
    print("|---" * 10 + "|")
    for dataset, steps_k in sorted({(r["dataset"], r.get("num_inference_steps") or 0) for r in mine}):
        sel = [r for r in mine if r["dataset"] == dataset and (r.get("num_inference_steps") or 0) == steps_k]
        base = [r["unet_calls_per_image"] for r in sel if r["method"] == "ours"]
        base_sampling = [r["sampling_unet_calls_per_image"] for r in sel if r["method"] == "ours"]
        for method in [m for m in METHODS if any(r["method"] == m for r in sel)]:
            cell = [r for r in sel if r["method"] == method]
            calls = _mean([r["unet_calls_per_image"] for r in cell])
            steps = sorted({str(r.get("screen", {}).get("step")) for r in cell if r.get("screen")})
            ratio = calls / _mean(base) if base else float("nan")
            keys = ("accuracy", "frechet", "proposals_per_image")
            means = [_fmt(_mean([r[k] for r in cell])) for k in keys]
            sampling = [r["sampling_unet_calls_per_image"] for r in cell if "sampling_unet_calls_per_image" in r]
            sampling_ratio = _mean(sampling) / _mean(base_sampling) if sampling and base_sampling else float("nan")
            cells = [
                f"{dataset} ({steps_k} steps)",
                method,
                *means,
                _fmt(calls),
                _fmt(ratio, 2),
                _fmt(_mean(sampling)),
            ]
            cells += [_fmt(sampling_ratio, 2), ", ".join(steps) or "-"]
            print("| " + " | ".join(cells) + " |")


def print_fit_table(rows: list[dict]) -> None:
    """Where ours spends its proposals: the fit (once per target and seed) and the sampling, per image."""
    mine = [r for r in rows if "fit_proposals" in r]
    if not mine:
        return
    print("\nproposals per image of the sampling alone, and the fit's proposals (mean over targets and seeds)\n")
    print("| dataset | proposal | method | sampling per image | fit proposals | fit chosen | bound reached |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted({(r["dataset"], r["proposal"], r["method"]) for r in mine}):
        sel = [r for r in mine if (r["dataset"], r["proposal"], r["method"]) == key]
        chosen = sorted({r["fit"] for r in sel})
        bounds = [r["mixing"].get("bound") for r in sel if r.get("mixing")]
        bound = max((b for b in bounds if b is not None), default=None)
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {_fmt(_mean([r['sampling_proposals_per_image'] for r in sel]))} | "
            f"{_fmt(_mean([r['fit_proposals'] for r in sel]))} | {', '.join(chosen)} | {_fmt(bound)} |"
        )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _spread(values: list[float]) -> str:
    """`mean` or `mean ± sd` over seeds."""
    if len(values) < 2:
        return _fmt(_mean(values))
    m = _mean(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{_fmt(m)} ± {_fmt(sd, 2)}"


def _missing(dataset: str, kind: str) -> str | None:
    """Why (dataset, kind) cannot run here, or None."""
    root = PRETRAINED_ROOTS[dataset]
    if dataset == "fashion":
        try:
            load_7to3("fashion", size=16)
        except FileNotFoundError as err:
            return f"{err} Going on without Fashion-7to3."
    needed = [kind, f"heads_{kind}", "evaluator"]
    absent = [name for name in needed if not os.path.isdir(os.path.join(root, name))]
    if absent:
        return (
            f"{dataset}: no {absent} in {root}. Train them with the commands in benchmarks/RESULTS.md "
            f"(examples/train_gan.py, train_ddpm.py, train_evaluator.py, train_demo_heads.py --dataset {dataset})."
        )
    return None


def print_table(rows: list[dict], dataset: str, kind: str, methods: list[str], num_images: int, seeds) -> None:
    """One markdown table for (dataset, proposal): per target and method, mean (± sd over seeds) of each column."""
    mine = [r for r in rows if r["dataset"] == dataset and r["proposal"] == kind]
    methods = [m for m in methods if any(r["method"] == m for r in mine)]
    if not mine:
        return
    print(f"\n{dataset}-7to3, {kind} proposal, {num_images} images per cell, seeds {list(seeds)}")
    print("cells: accuracy / Fréchet / proposals per image / seconds (mean ± sd over seeds)\n")
    print(f"| target | {' | '.join(methods)} |")
    print("|---" * (len(methods) + 1) + "|")

    def cell(selected: list[dict]) -> str:
        text = " / ".join(
            [_spread([r[k] for r in selected]) for k in COLUMNS] + [f"{_mean([r['seconds'] for r in selected]):.1f}"]
        )
        short = [r for r in selected if r.get("budget_exhausted")]
        if short:  # the budget ran out: say how many images were found
            found = [f"{r['num_images']}/{r.get('num_images_asked', num_images)}" for r in short]
            text += f" (budget: {', '.join(found)} images)"
        return text

    for target in SEVEN_TARGETS:
        cells = [cell([r for r in mine if r["target"] == target and r["method"] == m]) for m in methods]
        print(f"| `{target}` | {' | '.join(cells)} |")
    means = []
    for m in methods:
        per_seed = []
        for seed in seeds:
            sel = [r for r in mine if r["method"] == m and r["seed"] == seed]
            if sel:
                per_seed.append({k: _mean([r[k] for r in sel]) for k in COLUMNS})
        secs = _mean([r["seconds"] for r in mine if r["method"] == m])
        means.append(" / ".join(_spread([p[k] for p in per_seed]) for k in COLUMNS) + f" / {secs:.1f}")
    print(f"| **mean of the 7** | {' | '.join(means)} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--proposals", nargs="+", default=list(PROPOSALS), choices=PROPOSALS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num-images", type=int, default=64, help="images per target and method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    parser.add_argument(
        "--targets", type=int, nargs="+", default=None, help="indices into SEVEN_TARGETS to run (default: all 7)"
    )
    parser.add_argument("--num-inference-steps", type=int, default=None, help="DDIM steps of the DDPM (default 10)")
    parser.add_argument(
        "--ours-overrides",
        type=json.loads,
        default={},
        help="JSON of pipeline settings applied on top of OURS_SETTINGS for ours and ours_screen, e.g. "
        '\'{"refit": "off"}\'',
    )
    parser.add_argument(
        "--official-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the (costly) official recipe, default all of --seeds",
    )
    parser.add_argument("--max-oracle-proposals", type=int, default=200_000)
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)

    rows = []
    for dataset in args.datasets:
        root = PRETRAINED_ROOTS[dataset]
        for kind in args.proposals:
            why = _missing(dataset, kind)
            if why:
                print(why, flush=True)
                continue
            pipe = load_demo_pipeline(kind, root)
            pipe.set_progress_bar_config(disable=True)
            conditional = None
            if "ours_conditional" in args.methods and kind == "gan":
                why = _missing(dataset, "gan_conditional")
                if why:
                    print(why, flush=True)
                else:
                    conditional = load_demo_pipeline("gan_conditional", root)
                    conditional.set_progress_bar_config(disable=True)
            evaluator = load_evaluator(root)
            heldout = load_7to3(dataset, size=int(pipe.heads.config.sample_size)).heldout()
            if args.num_inference_steps is not None and kind == "ddpm":
                pipe.register_to_config(num_inference_steps=args.num_inference_steps)
            for k, target in enumerate(SEVEN_TARGETS):
                if args.targets is not None and k not in args.targets:
                    continue
                real = evaluator_features(evaluator, heldout.images[heldout.source_classes == k])
                for seed in args.seeds:
                    for method in args.methods:
                        if method == "ours_conditional" and conditional is None:
                            continue
                        if method == "official" and seed not in (args.official_seeds or args.seeds):
                            continue
                        settings = (PREVIOUS_SETTINGS if method == "previous" else OURS_SETTINGS)[kind]
                        if method in ("ours", *SCREEN_METHODS) and args.ours_overrides:
                            settings = {**settings, **args.ours_overrides}
                        images, proposals, seconds, extra = run_method(
                            method,
                            conditional if method == "ours_conditional" else pipe,
                            evaluator,
                            target,
                            args.num_images,
                            1000 * seed + k,
                            args.max_oracle_proposals,
                            settings,
                        )
                        found = len(images)
                        asked = AGAIN_IMAGES if method == "ours_again" else args.num_images
                        row = {
                            "dataset": dataset,
                            "proposal": kind,
                            "target": target,
                            "method": method,
                            "seed": seed,
                            "num_images": found,
                            "num_images_asked": asked,
                            "budget_exhausted": found < asked,
                            "accuracy": formula_accuracy(evaluator, images, target) if found else float("nan"),
                            "frechet": (
                                frechet_distance(evaluator_features(evaluator, images), real)
                                if found >= 2
                                else float("nan")
                            ),
                            "proposals_per_image": proposals / found if found else float("inf"),
                            "num_inference_steps": pipe.config.num_inference_steps if kind == "ddpm" else None,
                            "seconds": seconds,
                            **extra,
                        }
                        if "unet_calls" in extra:
                            row["unet_calls_per_image"] = extra["unet_calls"] / found if found else float("inf")
                            if "fit_unet_calls" in extra:  # the fit's UNet calls, its screened draws included
                                sampling_calls = extra["unet_calls"] - extra["fit_unet_calls"]
                                row["sampling_unet_calls_per_image"] = sampling_calls / found if found else math.inf
                        if "fit_proposals" in extra:
                            sampling = proposals - extra["fit_proposals"]
                            row["sampling_proposals_per_image"] = sampling / found if found else float("inf")
                        rows.append(row)
                        print(
                            f"{dataset:<8} {kind:<5} {target:<12} seed {seed} {method:<16} acc {row['accuracy']:.3f}  "
                            f"frechet {row['frechet']:8.3f}  prop/img {row['proposals_per_image']:8.1f}  "
                            f"{seconds:6.1f} s",
                            flush=True,
                        )
            print_table(rows, dataset, kind, args.methods, args.num_images, args.seeds)

    print(f"\nOurs: {OURS_SETTINGS}\nPrevious: {PREVIOUS_SETTINGS}")
    print_fit_table(rows)
    print_unet_table(rows)
    for dataset in args.datasets:
        for kind in args.proposals:
            print_table(rows, dataset, kind, args.methods, args.num_images, args.seeds)
    if args.json:
        write_json_atomically(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
