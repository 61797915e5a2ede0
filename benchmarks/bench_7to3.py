#!/usr/bin/env python
"""S2M sampling of the seven 7to3 combinations: ours at its defaults beside the previous default, the official recipe,
an i.i.d. reference of the same size and an evaluator oracle; and whether issue 27's goals are met.

For each dataset (Digits-7to3, Fashion-7to3), each proposal (the DCGAN; the DDPM sampled as 10-step DDIM), each
combination of `SEVEN_TARGETS` and each seed, every method draws `--num-images` (N) images, scored with that
dataset's evaluator. Each row (and the JSON) holds:

| column | meaning |
|---|---|
| `accuracy` | share of the images the evaluator judges on target (`formula_accuracy`) |
| `frechet` | Fréchet distance in the evaluator's features to the real held-out images of that combination |
| `proposals_per_image` | generator calls per returned image (every call of the method: the entry pool included) |
| `unet_calls_per_image` | DDPM: UNet calls (denoising steps) per returned image, the main cost there |
| `distinct_share` | distinct latents among the returned images / images returned (`-` where unknown) |
| `num_images` / `num_images_asked` | images returned / asked (fewer: the budget ran out) |
| `warnings` | the call's diagnostics beyond their authors' thresholds (`out.stats["warnings"]`) |
| `pool_share` | the entry pool's share of the call's generator calls |
| `seconds` | wall time of the sampling (scoring excluded) |
| `fidelity` | with `--fidelity`: the energy distance of the images to the heads' exact target (below) |

With `--fidelity` each call is also scored against the heads' exact target itself: the energy distance, in the
evaluator's features, of its images to `IID_DRAWS` prior draws weighted by the pipeline's own weights (one
reference per combination, seed ``424_242 + k``); `fidelity_floor` is its expectation for as many i.i.d. draws of that
target (``E|Y - Y'| / n``). Unlike the distinct share it sees images that differ by little, and unlike Fréchet it
compares with the sampler's own target, not with real images (not for `ours_conditional`, whose generator and
target differ).

Methods:

- `raw`: N proposals, no selection.
- `official`: the official recipe (`sample_official`: N chains x 200 IMH steps from the prior, final states returned
  on target or not, 201 generator calls per image) with the official weights (`common.official_evaluate`).
- `previous`: the previous default sampler (latent refitting, the worst-case bound), run from its own commit
  (`--previous-commit`, default e5ce922) in a git worktree: that checkout's `benchmarks/bench_7to3.py --methods M`
  for the same datasets, proposals, targets, seeds, N, DDIM steps and threads (`common.run_previous`). M is the method
  that ran that commit's defaults: `ours` for the GAN; for the DDPM `ours_screen_heads` (`--previous-ddpm-method`):
  that commit's `ours` ran the DDPM with ``screen=None``, while its default screened (``"auto"``) with the shipped
  screen heads. Its rows keep their calls per image, accuracy and Fréchet distance; it reported neither distinct
  latents nor diagnostics (`-`).
- `iid`: the reference: N images importance-resampled, with replacement, from `IID_DRAWS` prior draws (16,384 for the
  GAN, 4,096 for the DDPM; seed ``10_000 + 1000 * seed + k``) weighted by the pipeline's own weights at the defaults.
  Its calls per image are the prior draws it weighed per image (a reference, not a sampler's cost).
- `ours`: `S2MPipeline` at its defaults (chains that move locally in the noise space, pCN, from a pool of prior
  draws; the DDPM screened where it pays): only `micro_batch_size` set, with a budget of 201 generator calls per image
  (the official recipe's cost) and `allow_partial=True` (a call whose budget runs out returns the images found).
- `ours_mala` (GAN only): ours with ``kernel="mala"`` (Langevin moves with the gradient of the weights).
- `ours_noscreen` (DDPM only): ours with ``screen=None``, to show where the screen pays.
- `ours_wrapped` (DDPM only): ours with the same UNet taken as a wrapped diffusers pipeline
  (`s2m_diffusers.testing.pipelines.LatentsDDIMPipeline` through `PipelineProposal`), the path any wrapped pipeline
  takes.
- `ours_conditional` (GAN only): ours on the class-conditional DCGAN (`gan_conditional/`) with heads that have
  ``D_f`` (`heads_gan_conditional/`).
- `oracle`: proposals kept by the evaluator itself until N are on target (an upper bound on accuracy, and the cost of
  plain rejection with a perfect selector).

Goals (issue 27; the goals table states each for the run's cells, numbers side by side):

- Digits GAN, 64 images, seeds 0-2: mean accuracy >= iid's - 0.01; Fréchet <= iid's + 0.5; <= 10 generator calls per
  image; >= 95% of the returned images distinct. Digits GAN, 16 images: every combination returns 16 images at <= 16
  generator calls per image.
- Digits DDPM (10 steps), 16 and 64 images: accuracy >= 0.96 and UNet calls per image <= the oracle's (per target and
  on the mean); the screen on where it pays (ours' UNet calls <= ours_noscreen's).
- Fashion GAN and DDPM: every combination returns images; accuracy >= the iid reference's - 0.02.
- Every call of ours within the diagnostics' thresholds (R-hat, the reading check within 3 standard errors); where
  not, its row says so (`warned` in the tables, the text under "Warnings").

The models come from `PRETRAINED_ROOTS` (`benchmarks/pretrained_roots.py`): Digits' are shipped in the package,
Fashion's are in `benchmarks/pretrained/fashion7to3/` (see `benchmarks/RESULTS.md`). Fashion-MNIST itself is read from
`$S2M_FASHION_MNIST` or the Debian package `dataset-fashion-mnist`. A dataset or a model that is missing is reported
and skipped.

Usage (the issue's goals):

```sh
python benchmarks/bench_7to3.py --datasets digits --proposals gan --seeds 0 1 2 \\
    --methods previous iid ours ours_mala ours_conditional oracle --json digits_gan_64.json
python benchmarks/bench_7to3.py --datasets digits --proposals gan --num-images 16 --seeds 0 1 2 \\
    --methods ours ours_mala ours_conditional --json digits_gan_16.json
python benchmarks/bench_7to3.py --datasets digits --proposals ddpm --num-images 16 \\
    --methods previous iid ours ours_noscreen ours_wrapped oracle --json digits_ddpm_16.json
python benchmarks/bench_7to3.py --datasets digits --proposals ddpm --num-images 64 \\
    --methods previous iid ours ours_noscreen ours_wrapped oracle --json digits_ddpm_64.json
python benchmarks/bench_7to3.py --datasets fashion --methods previous iid ours oracle --json fashion.json
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402  (the same folder)
    OFFICIAL_STEPS,
    PREVIOUS_COMMIT,
    earlier_rows,
    fmt,
    mean,
    official_evaluate,
    run_previous,
    sample_quietly,
    short_warning,
    spread,
    verdict,
)
from pretrained_roots import PRETRAINED_ROOTS  # noqa: E402

from s2m_diffusers.demo import (  # noqa: E402
    DATASETS,
    MICRO_BATCH_SIZE,
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
from s2m_diffusers.pipeline_s2m import S2MPipeline  # noqa: E402
from s2m_diffusers.sampling import S2MSamplingConfig, sample_official  # noqa: E402
from s2m_diffusers.targets import parse_target  # noqa: E402
from s2m_diffusers.utils import jsonable, write_json_atomically  # noqa: E402

METHODS = (
    "raw",
    "official",
    "previous",
    "iid",
    "ours",
    "ours_mala",
    "ours_noscreen",
    "ours_wrapped",
    "ours_conditional",
    "oracle",
)
PROPOSALS = ("gan", "ddpm")
# Methods for one kind of proposal only.
ONLY = {"ours_mala": "gan", "ours_conditional": "gan", "ours_noscreen": "ddpm", "ours_wrapped": "ddpm"}
# The pipeline's settings beside the defaults, per variant of ours.
OURS_VARIANTS: dict[str, dict] = {
    "ours": {},
    "ours_mala": {"kernel": "mala"},
    "ours_noscreen": {"screen": None},
    "ours_wrapped": {},
    "ours_conditional": {},
}
# Latents per generator call (memory and speed, not the images).
MICRO_BATCH = {"gan": 256, "ddpm": MICRO_BATCH_SIZE["ddpm"]}
# Ours' budget: the official recipe's cost per image.
BUDGET_PER_IMAGE = OFFICIAL_STEPS + 1
# The i.i.d. reference's prior draws (as `bench_reading.py` weighs).
IID_DRAWS = {"gan": 16_384, "ddpm": 4096}


@dataclass
class World:
    """One (dataset, proposal): the pipelines, the evaluator, the held-out images and their features per target."""

    dataset: str
    kind: str
    pipe: S2MPipeline
    conditional: S2MPipeline | None
    evaluator: object
    heldout: object
    real: dict = field(default_factory=dict)
    exact: dict | None = None  # with --fidelity: k -> the exact target's (features, weights, E|Y - Y'|)

    @property
    def steps(self) -> int | None:
        """UNet calls of one proposal (`None` for a GAN)."""
        return getattr(self.pipe.get_proposal(1), "num_steps", None)

    def real_features(self, k: int) -> torch.Tensor:
        if k not in self.real:
            self.real[k] = evaluator_features(self.evaluator, self.heldout.images[self.heldout.source_classes == k])
        return self.real[k]


@dataclass
class Draw:
    """What a method returned: images in [-1, 1], generator calls, and what it knows of them."""

    images: torch.Tensor
    proposals: int
    unet_calls: int | None = None
    distinct: int | None = None
    warnings: list[str] | None = None
    pool: int | None = None
    reference: bool = False
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def weighed_prior_draws(world: World, target: str, generator: torch.Generator):
    """`IID_DRAWS` prior draws through the pipeline with its own weights at the defaults: (images, ``log w`` on the
    CPU in float64, the generator calls spent, the draws' and the weights' measurements included)."""
    pipe = world.pipe
    parsed = pipe.parse_target(target)
    proposal, plan, _, weigher, measured = pipe._prepare(parsed, S2MSamplingConfig(), MICRO_BATCH[world.kind], None)
    m = IID_DRAWS[world.kind]
    z = StandardNormal(plan.latent_shape(proposal.latent_shape)).sample(m, generator=generator)
    x, log_w, _ = weigher.for_target(parsed)(z)
    return x, log_w.double().cpu(), m + measured


@torch.no_grad()
def exact_reference(world: World, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The heads' exact target for combination ``k`` in the evaluator's features: the on-target draws of
    `IID_DRAWS` prior draws with their self-normalised weights, and the target's own mean distance ``E|Y - Y'|``;
    made once per combination."""
    if k not in world.exact:
        x, log_w, _ = weighed_prior_draws(world, SEVEN_TARGETS[k], torch.Generator().manual_seed(424_242 + k))
        on = torch.isfinite(log_w)
        y = evaluator_features(world.evaluator, x[on.to(x.device)].float()).double().cpu()
        p = torch.softmax(log_w[on], 0)
        world.exact[k] = (y, p, float(p @ torch.cdist(y, y) @ p))
    return world.exact[k]


def fidelity(world: World, k: int, features: torch.Tensor) -> tuple[float, float]:
    """The energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` of a call's images (features ``X``, a V-statistic)
    to the weighted exact target ``Y``, and its expectation for as many i.i.d. draws of ``Y`` (``E|Y - Y'| / n``)."""
    y, p, yy = exact_reference(world, k)
    x = features.double().cpu()
    n = x.shape[0]
    return 2 * float((torch.cdist(x, y) @ p).mean()) - float(torch.cdist(x, x).mean()) - yy, yy / n


def draw_raw(world: World, target: str, n: int, generator: torch.Generator) -> Draw:
    return Draw(world.pipe.get_proposal(256).sample(n, generator).images, n, distinct=n)


def draw_official(world: World, target: str, n: int, generator: torch.Generator) -> Draw:
    pipe = world.pipe
    proposal = pipe.get_proposal(256)
    evaluate = official_evaluate(pipe.heads, proposal, parse_target(target, list(pipe.heads.config.attribute_names)))
    result = sample_official(evaluate, StandardNormal(proposal.latent_shape), n, OFFICIAL_STEPS, generator=generator)
    return Draw(result.x, result.stats.proposals, distinct=result.stats.unique_returned)


@torch.no_grad()
def draw_iid(world: World, target: str, n: int, generator: torch.Generator) -> Draw:
    """N images importance-resampled, with replacement, from `IID_DRAWS` prior draws weighed by the pipeline's own
    weights at the defaults."""
    x, log_w, calls = weighed_prior_draws(world, target, generator)
    on = int(torch.isfinite(log_w).sum())
    if not on:
        return Draw(x[:0], calls, distinct=0, reference=True, extra={"on_target_draws": 0})
    picks = torch.multinomial(torch.softmax(log_w, 0), n, replacement=True, generator=generator)
    ess = float(torch.softmax(log_w, 0).pow(2).sum().reciprocal())
    distinct = int(torch.unique(picks).numel())
    return Draw(x[picks], calls, distinct=distinct, reference=True, extra={"on_target_draws": on, "ess": ess})


def draw_ours(world: World, method: str, target: str, n: int, generator: torch.Generator, overrides: dict) -> Draw:
    """A pipeline call at the defaults (plus the variant's setting), a budget of 201 generator calls per image."""
    pipe = world.pipe
    if method == "ours_conditional":
        pipe = world.conditional
    elif method == "ours_wrapped":
        pipe = wrapped_pipeline(pipe)
    settings = {
        "micro_batch_size": MICRO_BATCH[world.kind],
        "max_proposals": BUDGET_PER_IMAGE * n,
        **OURS_VARIANTS[method],
        **overrides,
    }
    out = sample_quietly(pipe, target, n, generator, **settings)  # the diagnostics' warnings go in the row
    s = out.stats
    chains = s.get("chains") or {}
    diagnostics = s.get("diagnostics") or {}
    extra = {
        "chains": chains,
        "rhat_used": diagnostics.get("rhat_used"),
        "returned_ess": diagnostics.get("returned_ess"),
        **raw_diagnostics(diagnostics),
        "budget_spent": s.get("budget_spent"),
        "acceptance_rate": s.get("acceptance_rate"),
    }
    return Draw(
        out.images * 2 - 1,
        s["proposals"],
        s.get("unet_calls"),
        s.get("unique_images"),
        list(s.get("warnings") or []),
        pool_proposals(chains),
        extra=extra,
    )


def pool_proposals(chains: dict) -> int | None:
    """The entry pool's generator calls, from ``stats["chains"]`` (one run, or several under ``runs``)."""
    runs = chains.get("runs") or [chains]
    pools = [(r.get("pool") or {}).get("proposals") for r in runs]
    return None if any(p is None for p in pools) else sum(pools)


@torch.no_grad()
def draw_oracle(world: World, target: str, n: int, generator: torch.Generator, max_proposals: int) -> Draw:
    """Proposals kept by the evaluator until N are on target; the draws after the last one kept are not counted."""
    evaluator = world.evaluator
    in_target = parse_target(target, list(evaluator.config.attribute_names)).holds_batch(evaluator.class_table.cpu())
    proposal = world.pipe.get_proposal(256)
    kept, found, proposals = [], 0, 0
    while found < n:
        if proposals >= max_proposals:
            raise RuntimeError(f"oracle: {found}/{n} on target after {proposals} proposals for {target}.")
        x = proposal.sample(256, generator).images
        ok = evaluator_class_probs(evaluator, x)[:, in_target].sum(1) > 0.5
        needed = n - found
        if int(ok.sum()) >= needed:
            last = int(torch.nonzero(ok).flatten()[needed - 1])
            ok[last + 1 :] = False
            proposals += last + 1
        else:
            proposals += len(x)
        kept.append(x[ok])
        found += int(ok.sum())
    return Draw(torch.cat(kept), proposals, distinct=n)


@torch.no_grad()
def wrapped_pipeline(pipe: S2MPipeline) -> S2MPipeline:
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


def run_cell(world: World, method: str, k: int, seed: int, args: argparse.Namespace) -> dict:
    """One method's images of target ``k`` with ``seed``, scored: the row."""
    target, n = SEVEN_TARGETS[k], args.num_images
    generator = torch.Generator().manual_seed((10_000 if method == "iid" else 0) + 1000 * seed + k)
    t0 = time.perf_counter()
    if method == "raw":
        draw = draw_raw(world, target, n, generator)
    elif method == "official":
        draw = draw_official(world, target, n, generator)
    elif method == "iid":
        draw = draw_iid(world, target, n, generator)
    elif method in OURS_VARIANTS:
        draw = draw_ours(world, method, target, n, generator, args.ours_overrides)
    elif method == "oracle":
        draw = draw_oracle(world, target, n, generator, args.max_oracle_proposals)
    else:
        raise ValueError(f"Unknown method {method!r}; choose among {list(METHODS)}.")
    seconds = time.perf_counter() - t0
    if world.steps and draw.unet_calls is None:
        draw.unet_calls = draw.proposals * world.steps
    return score(world, method, k, seed, n, draw, seconds)


def score(world: World, method: str, k: int, seed: int, n: int, draw: Draw, seconds: float) -> dict:
    """The row of a draw: the evaluator's accuracy and Fréchet distance beside the method's own figures."""
    images = draw.images.float().cpu()
    found = len(images)
    target = SEVEN_TARGETS[k]

    def per_image(count):
        return None if count is None else (count / found if found else math.inf)

    features = evaluator_features(world.evaluator, images) if found >= 2 else None
    scored = world.exact is not None and features is not None and method != "ours_conditional"  # another generator
    distance, floor = fidelity(world, k, features) if scored else (None, None)
    return {
        "dataset": world.dataset,
        "proposal": world.kind,
        "target": target,
        "target_index": k,
        "method": method,
        "seed": seed,
        "num_images": found,
        "num_images_asked": n,
        "budget_exhausted": found < n,
        "accuracy": formula_accuracy(world.evaluator, images, target) if found else math.nan,
        "frechet": frechet_distance(features, world.real_features(k)) if features is not None else math.nan,
        "proposals": draw.proposals,
        "proposals_per_image": per_image(draw.proposals),
        "unet_calls_per_image": per_image(draw.unet_calls),
        "distinct_share": None if draw.distinct is None or not found else draw.distinct / found,
        "warnings": draw.warnings,
        "num_warnings": None if draw.warnings is None else len(draw.warnings),
        "pool_share": None if draw.pool is None or not draw.proposals else draw.pool / draw.proposals,
        "seconds": seconds,
        "reference": draw.reference,
        "num_inference_steps": world.steps,
        "fidelity": distance,
        "fidelity_floor": floor,
        **draw.extra,
    }


def previous_rows(args: argparse.Namespace, dataset: str, kind: str) -> list[dict]:
    """The previous default's rows for (dataset, kind), run by its own commit's `bench_7to3.py`."""
    method = args.previous_ddpm_method if kind == "ddpm" else "ours"
    argv = ["benchmarks/bench_7to3.py", "--datasets", dataset, "--proposals", kind, "--methods", method]
    argv += ["--num-images", str(args.num_images), "--num-threads", str(args.num_threads)]
    argv += ["--seeds", *map(str, args.seeds)]
    if args.targets is not None:
        argv += ["--targets", *map(str, args.targets)]
    if args.num_inference_steps is not None:
        argv += ["--num-inference-steps", str(args.num_inference_steps)]
    print(f"previous: {args.previous_commit}'s bench_7to3.py --methods {method} for {dataset} {kind}", flush=True)
    try:
        old = run_previous(argv, args.previous_commit, show=lambda line: line.startswith(f"{dataset:<8} "))
    except RuntimeError as err:
        print(f"{err}\nGoing on without `previous`.", flush=True)
        return []
    return [previous_row(r, args.previous_commit) for r in old if r.get("method") == method]


def previous_row(old: dict, commit: str) -> dict:
    """An old `bench_7to3.py` row as a row of method `previous` (what it did not report is `None`)."""
    found = old["num_images"]
    unique = old.get("unique_images")
    per_image = old.get("proposals_per_image")
    return {
        "dataset": old["dataset"],
        "proposal": old["proposal"],
        "target": old["target"],
        "target_index": SEVEN_TARGETS.index(old["target"]),
        "method": "previous",
        "seed": old["seed"],
        "num_images": found,
        "num_images_asked": old.get("num_images_asked", found),
        "budget_exhausted": bool(old.get("budget_exhausted")),
        "accuracy": old.get("accuracy"),
        "frechet": old.get("frechet"),
        "proposals": None if per_image is None or not found else round(per_image * found),
        "proposals_per_image": per_image,
        "unet_calls_per_image": old.get("unet_calls_per_image"),
        "distinct_share": unique / found if unique is not None and found else None,
        "warnings": None,
        "num_warnings": None,
        "pool_share": None,
        "seconds": old.get("seconds"),
        "reference": False,
        "num_inference_steps": old.get("num_inference_steps"),
        "commit": commit,
        "fit_proposals": old.get("fit_proposals"),
        "fit": old.get("fit"),
        "previous_method": old.get("method"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Tables


def pick(rows: list[dict], **where) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def cost_key(kind: str) -> str:
    """The main cost column: UNet calls per image for the DDPM, generator calls per image for the GAN."""
    return "unet_calls_per_image" if kind == "ddpm" else "proposals_per_image"


def cell(selected: list[dict], kind: str) -> str:
    """accuracy / Fréchet / calls per image / distinct (mean ± sd over seeds), and what came short or warned."""
    if not selected:
        return "-"
    keys = ("accuracy", "frechet", cost_key(kind))
    text = " / ".join(
        [*(spread([r[k] for r in selected]) for k in keys), spread([r["distinct_share"] for r in selected], 2)]
    )
    short = [r for r in selected if r["num_images"] < r["num_images_asked"]]
    if short:
        text += " (returned " + ", ".join(f"{r['num_images']}/{r['num_images_asked']}" for r in short) + ")"
    warned = [r for r in selected if r.get("num_warnings")]
    if warned:
        text += f" (warned {len(warned)}/{len(selected)})"
    return text


def mean_cell(selected: list[dict], kind: str, seeds) -> str:
    """The cell of the mean over targets: per seed the mean over the targets, then mean ± sd over seeds."""
    keys = ("accuracy", "frechet", cost_key(kind), "distinct_share")
    per_seed = [
        {key: mean([r[key] for r in pick(selected, seed=seed)]) for key in keys}
        for seed in seeds
        if pick(selected, seed=seed)
    ]
    return " / ".join(spread([p[key] for p in per_seed], 2 if key == "distinct_share" else 3) for key in keys)


def print_tables(rows: list[dict], dataset: str, kind: str) -> None:
    """The tables of (dataset, kind): per target x method, the mean over targets, and each method's details."""
    mine = pick(rows, dataset=dataset, proposal=kind)
    if not mine:
        return
    methods = [m for m in METHODS if pick(mine, method=m)]
    seeds = sorted({r["seed"] for r in mine})
    asked = sorted({r["num_images_asked"] for r in mine})
    calls = "UNet calls per image" if kind == "ddpm" else "generator calls per image"
    print(f"\n{dataset}-7to3, {kind} proposal, {'/'.join(map(str, asked))} images per cell, seeds {seeds}")
    print(f"cells: accuracy / Fréchet / {calls} / distinct share (mean ± sd over seeds); iid's calls are the prior")
    print("draws it weighed (a reference)")
    for source in sorted({r["from"] for r in mine if r.get("from")}):
        earlier = [m for m in methods if pick(mine, method=m, **{"from": source})]
        print(f"the rows of {', '.join(earlier)} are an earlier run's, from {source}")
    print()
    print(f"| target | {' | '.join(methods)} |")
    print("|---" * (len(methods) + 1) + "|")
    for target in SEVEN_TARGETS:
        if pick(mine, target=target):
            cells = [cell(pick(mine, target=target, method=m), kind) for m in methods]
            print(f"| `{target}` | {' | '.join(cells)} |")
    cells = [mean_cell(pick(mine, method=m), kind, seeds) for m in methods]
    print(f"| **mean over targets** | {' | '.join(cells)} |")
    print_details(mine, methods, kind)


def print_details(mine: list[dict], methods: list[str], kind: str) -> None:
    """Per method: images returned / asked, generator (and UNet) calls per image, the pool's share of the calls, the
    calls that warned, seconds per call and images per second (all its images over all its seconds: e.g. MALA's
    costlier steps against pCN's); then the text of every warning."""
    scored = any(r.get("fidelity") is not None for r in mine)
    print(
        "\n| method | images returned / asked | generator calls / image | UNet calls / image | pool share of calls "
        "| calls that warned | seconds / call | images / second |"
        + (" energy distance to the exact target (i.i.d. floor) |" if scored else "")
    )
    print("|---" * (9 if scored else 8) + "|")
    for m in methods:
        sel = pick(mine, method=m)
        warned = [r for r in sel if r.get("num_warnings")]
        known = [r for r in sel if r.get("num_warnings") is not None]
        cells = [
            f"{sum(r['num_images'] for r in sel)} / {sum(r['num_images_asked'] for r in sel)}",
            fmt(mean([r["proposals_per_image"] for r in sel])) + (" (ref)" if m == "iid" else ""),
            fmt(mean([r["unet_calls_per_image"] for r in sel])) if kind == "ddpm" else "-",
            fmt(mean([r["pool_share"] for r in sel]), 2),
            f"{len(warned)} / {len(known)}" if known else "-",
            fmt(mean([r["seconds"] for r in sel])),
            fmt(sum(r["num_images"] for r in sel) / sum(r["seconds"] for r in sel)),
        ]
        if scored:
            known = [r for r in sel if r.get("fidelity") is not None]
            distance, floor = mean([r["fidelity"] for r in known]), mean([r["fidelity_floor"] for r in known])
            cells.append(f"{fmt(distance, 3)} ({fmt(floor, 3)})" if known else "-")
        print(f"| {m} | {' | '.join(cells)} |")
    warned = [r for r in mine if r.get("num_warnings")]
    if warned:
        print("\nWarnings (the calls whose diagnostics went beyond their thresholds; the values, without the text):\n")
        for r in warned:
            print(f"- {r['method']} `{r['target']}` seed {r['seed']}: {'; '.join(map(short_warning, r['warnings']))}")


# ----------------------------------------------------------------------------------------------------------------
# Goals


def cell_key(row: dict) -> tuple:
    """A row's cell: (dataset, proposal, images asked, target, seed)."""
    return tuple(row[name] for name in ("dataset", "proposal", "num_images_asked", "target_index", "seed"))


def paired(rows: list[dict], a: str, b: str) -> tuple[list[dict], list[dict]]:
    """The rows of methods ``a`` and ``b`` on the cells both ran, in the same order."""
    theirs = {cell_key(r): r for r in pick(rows, method=b)}
    mine = sorted((r for r in pick(rows, method=a) if cell_key(r) in theirs), key=cell_key)
    return mine, [theirs[cell_key(r)] for r in mine]


def describe(selected: list[dict]) -> str:
    """The cells a goal is judged on: how many targets, which seeds."""
    targets = len({r["target_index"] for r in selected})
    return f"{targets} of 7 targets, seeds {sorted({r['seed'] for r in selected})}"


def all_seven(selected: list[dict], met: bool) -> bool | None:
    """A goal over every combination: not met where a cell fails, undecided (`None`) where targets were left out."""
    return (met if len({r["target_index"] for r in selected}) == 7 else None) if met else False


def by_target(selected: list[dict], key: str) -> dict[str, float]:
    """The mean of ``key`` per target (over seeds)."""
    return {
        t: mean([r[key] for r in selected if r["target"] == t]) for t in dict.fromkeys(r["target"] for r in selected)
    }


def against(rows: list[dict], goal: str, key: str, bound: float, reference: str = "iid", **how) -> list:
    """A goal row: ours' mean of ``key`` against ``reference``'s mean plus ``bound``, at least (at most with
    ``larger=False``), on the cells both ran; with ``every_target=True`` also each target's mean over seeds (the
    targets that miss it are named)."""
    larger, every_target = how.get("larger", True), how.get("every_target", False)
    ours, ref = paired(rows, "ours", reference)
    if not ours:
        return [goal, describe(pick(rows, method="ours")), "-", f"(run {reference})", verdict(None)]

    def holds(mine: float, theirs: float) -> bool:
        return mine >= theirs + bound if larger else mine <= theirs + bound

    mine, theirs = mean([r[key] for r in ours]), mean([r[key] for r in ref])
    measured, bound_text = fmt(mine), f"{'>=' if larger else '<='} {fmt(theirs + bound)} ({reference} {fmt(theirs)})"
    misses = []
    if every_target:
        per_ref = by_target(ref, key)
        misses = [t for t, v in by_target(ours, key).items() if not holds(v, per_ref[t])]
        measured += f"; targets missing it: {misses or 'none'}"
    return [goal, describe(ours), measured, bound_text, verdict(holds(mine, theirs) and not misses)]


def goals_gan(rows: list[dict]) -> list[list]:
    """Digits GAN: at 64 images, ours against the iid reference and the calls and distinct bounds (on the mean over
    targets and seeds); at 16 images, every call returns its 16 images at <= 16 calls per image."""
    out = []
    sel = pick(rows, dataset="digits", proposal="gan", num_images_asked=64)
    ours = pick(sel, method="ours")
    if ours:
        name = "Digits GAN, 64 images:"
        out.append(against(sel, f"{name} accuracy >= iid's - 0.01 (mean)", "accuracy", -0.01))
        out.append(against(sel, f"{name} Fréchet <= iid's + 0.5 (mean)", "frechet", 0.5, larger=False))
        calls = [r["proposals_per_image"] for r in ours]
        measured = f"{fmt(mean(calls))} (worst cell {fmt(max(calls))})"
        out.append([f"{name} <= 10 generator calls per image (mean)", describe(ours), measured, "<= 10"])
        out[-1].append(verdict(mean(calls) <= 10))
        distinct = [r["distinct_share"] or 0.0 for r in ours]
        measured = f"{fmt(mean(distinct))} (least {fmt(min(distinct))})"
        out.append([f"{name} >= 95% of the images distinct (mean)", describe(ours), measured, ">= 0.95"])
        out[-1].append(verdict(mean(distinct) >= 0.95))
    ours = pick(rows, dataset="digits", proposal="gan", num_images_asked=16, method="ours")
    if ours:
        good = [r for r in ours if r["num_images"] == 16 and r["proposals_per_image"] <= 16]
        worst, fewest = max(r["proposals_per_image"] for r in ours), min(r["num_images"] for r in ours)
        measured = f"{len(good)} of {len(ours)} calls (worst {fmt(worst)} calls per image, fewest {fewest} images)"
        goal = "Digits GAN, 16 images: every combination returns 16 images at <= 16 calls per image"
        out.append([goal, describe(ours), measured, "every call", verdict(all_seven(ours, len(good) == len(ours)))])
    return out


def goals_ddpm(rows: list[dict]) -> list[list]:
    """Digits DDPM, per number of images: accuracy >= 0.96 and UNet calls per image <= the oracle's (on the mean and
    per target), and the screen where it pays (ours' UNet calls per image <= ours_noscreen's)."""
    out = []
    digits = pick(rows, dataset="digits", proposal="ddpm")
    for n in sorted({r["num_images_asked"] for r in pick(digits, method="ours")}):
        sel = pick(digits, num_images_asked=n)
        ours = pick(sel, method="ours")
        name = f"Digits DDPM, {n} images:"
        acc = mean([r["accuracy"] for r in ours])
        low = [t for t, v in by_target(ours, "accuracy").items() if not v >= 0.96]
        measured = f"{fmt(acc)}; targets missing it: {low or 'none'}"
        out.append([f"{name} accuracy >= 0.96 (mean; every target)", describe(ours), measured, ">= 0.96"])
        out[-1].append(verdict(acc >= 0.96 and not low))
        goal = f"{name} UNet calls per image <= the oracle's (mean; every target)"
        out.append(against(sel, goal, "unet_calls_per_image", 0.0, "oracle", larger=False, every_target=True))
        goal = f"{name} the screen where it pays: UNet calls per image <= ours_noscreen's (mean)"
        out.append(against(sel, goal, "unet_calls_per_image", 0.0, reference="ours_noscreen", larger=False))
    return out


def goals_fashion(rows: list[dict]) -> list[list]:
    """Fashion GAN and DDPM: every combination returns images; accuracy >= iid's - 0.02 (mean; every target)."""
    out = []
    for kind in PROPOSALS:
        sel = pick(rows, dataset="fashion", proposal=kind)
        ours = pick(sel, method="ours")
        if not ours:
            continue
        sizes = "/".join(str(n) for n in sorted({r["num_images_asked"] for r in ours}))
        name = f"Fashion {kind.upper()}, {sizes} images:"
        empty = sorted({r["target"] for r in ours if not r["num_images"]})
        measured = f"none returned on {empty}" if empty else "every call returned images"
        out.append([f"{name} every combination returns images", describe(ours), measured, "every call"])
        out[-1].append(verdict(all_seven(ours, not empty)))
        out.append(
            against(sel, f"{name} accuracy >= iid's - 0.02 (mean; every target)", "accuracy", -0.02, every_target=True)
        )
    return out


def raw_diagnostics(diagnostics: dict) -> dict:
    """The largest nested R-hat of a call (over ``log w`` and the attribute ratios) beside the authors' threshold and
    that reading's chance level (one per reading: its chains' effective draws), and the largest reading-check score
    (and whether the pool was large enough for it to be judged)."""
    nested = {
        k: v for k, v in (diagnostics.get("nested_rhat") or {}).items() if isinstance(v, float) and math.isfinite(v)
    }
    worst = max(nested, key=nested.get) if nested else None
    scores = [c["z"] for c in (diagnostics.get("reading_check") or {}).values() if math.isfinite(c.get("z", math.nan))]
    return {
        "nested_rhat_max": nested.get(worst),
        "nested_rhat_threshold": diagnostics.get("nested_rhat_threshold"),
        "nested_rhat_chance": (diagnostics.get("nested_rhat_chance") or {}).get(worst),
        "reading_check_max_z": max(scores) if scores else None,
        "reading_check_judged": diagnostics.get("reading_check_judged"),
    }


def goals_warnings(rows: list[dict]) -> list[list]:
    """Every call of ours (each variant) within the diagnostics' thresholds (nested R-hat below the authors'
    threshold, the reading check within 3 standard errors) or warned (issue 27: "where not, the call warns")."""
    out = []
    cells = {
        (r["dataset"], r["proposal"], r["num_images_asked"], r["method"])
        for r in rows
        if r.get("warnings") is not None
    }
    for dataset, kind, n, method in sorted(cells):
        sel = pick(rows, dataset=dataset, proposal=kind, num_images_asked=n, method=method)
        above = [r for r in sel if (r.get("nested_rhat_max") or 0) > (r.get("nested_rhat_threshold") or math.inf)]
        beyond = [r for r in sel if (r.get("reading_check_max_z") or 0) > 3]
        unwarned = [r for r in sel if (r in above or r in beyond) and not r["num_warnings"]]
        goal = f"{dataset.capitalize()} {kind.upper()}, {n} images, {method}: nested R-hat below the authors' "
        goal += "threshold and the reading check within 3 standard errors, or a warning"
        measured = (
            f"R-hat above on {len(above)} of {len(sel)} calls ({sum(bool(r['num_warnings']) for r in above)} "
            f"warned), reading check beyond on {len(beyond)} ({sum(bool(r['num_warnings']) for r in beyond)} warned); "
            f"{len(unwarned)} outside without a warning"
        )
        out.append([goal, describe(sel), measured, "every call", verdict(not unwarned)])
    return out


def print_goals(rows: list[dict]) -> None:
    """The goals table: each goal of issue 27 the run has cells for, the figures side by side, met or not."""
    lines = goals_gan(rows) + goals_ddpm(rows) + goals_fashion(rows) + goals_warnings(rows)
    if not lines:
        return
    print("\nGoals (issue 27) for this run's cells\n")
    print("| goal | cells | ours | bound | |")
    print("|---|---|---|---|---|")
    for line in lines:
        print("| " + " | ".join(line) + " |")


# ----------------------------------------------------------------------------------------------------------------
# Running


def load_world(dataset: str, kind: str, args: argparse.Namespace) -> World | None:
    """The models of (dataset, kind), or `None` (with the reason printed) where they are missing."""
    why = missing(dataset, kind)
    if why:
        print(why, flush=True)
        return None
    root = PRETRAINED_ROOTS[dataset]
    pipe = load_demo_pipeline(kind, root)
    pipe.set_progress_bar_config(disable=True)
    if args.num_inference_steps is not None and kind == "ddpm":
        pipe.register_to_config(num_inference_steps=args.num_inference_steps)
    conditional = None
    if "ours_conditional" in args.methods and kind == "gan":
        why = missing(dataset, "gan_conditional")
        if why:
            print(why, flush=True)
        else:
            conditional = load_demo_pipeline("gan_conditional", root)
            conditional.set_progress_bar_config(disable=True)
    evaluator = load_evaluator(root)
    heldout = load_7to3(dataset, size=int(pipe.heads.config.sample_size)).heldout()
    return World(dataset, kind, pipe, conditional, evaluator, heldout, exact={} if args.fidelity else None)


def missing(dataset: str, kind: str) -> str | None:
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


def run_world(world: World, args: argparse.Namespace) -> list[dict]:
    """Every method, target and seed of one (dataset, kind); `previous` first, in one subprocess."""
    methods = [m for m in args.methods if ONLY.get(m, world.kind) == world.kind]
    if "ours_conditional" in methods and world.conditional is None:
        methods.remove("ours_conditional")
    rows = previous_rows(args, world.dataset, world.kind) if "previous" in methods else []
    for k in args.targets if args.targets is not None else range(len(SEVEN_TARGETS)):
        for seed in args.seeds:
            for method in methods:
                if method == "previous" or (method == "official" and seed not in (args.official_seeds or args.seeds)):
                    continue
                row = run_cell(world, method, k, seed, args)
                rows.append(row)
                print(
                    f"{world.dataset:<8} {world.kind:<5} {row['target']:<12} seed {seed} {method:<16} "
                    f"acc {fmt(row['accuracy']):>5}  frechet {fmt(row['frechet']):>6}  "
                    f"calls/img {fmt(row[cost_key(world.kind)]):>6}  distinct {fmt(row['distinct_share'], 2):>4}  "
                    f"images {row['num_images']}/{row['num_images_asked']}  warnings {fmt(row['num_warnings'])}  "
                    f"{row['seconds']:6.1f} s",
                    flush=True,
                )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
        help="JSON of pipeline settings beside the defaults for every ours* method, e.g. '{\"jump_rate\": 0.2}'",
    )
    parser.add_argument(
        "--official-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the (costly) official recipe, default all of --seeds",
    )
    parser.add_argument("--max-oracle-proposals", type=int, default=200_000)
    parser.add_argument("--previous-commit", default=PREVIOUS_COMMIT, help="the commit of the previous default")
    parser.add_argument(
        "--previous-ddpm-method",
        default="ours_screen_heads",
        choices=("ours_screen_heads", "ours_screen", "ours"),
        help="the previous commit's method for the DDPM (default ours_screen_heads: its defaults; ours: unscreened)",
    )
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--baselines-from",
        default=None,
        help="an earlier run's JSON: its rows of the methods that are not ours (official, previous, iid, oracle, raw) "
        "and not run here, for this run's datasets, proposals, targets and seeds, are printed beside this run's",
    )
    parser.add_argument(
        "--fidelity",
        action="store_true",
        help="also score each call's energy distance to the heads' exact target (a weighted draw of IID_DRAWS prior "
        "draws per combination: 16,384 GAN or 4,096 DDPM calls more per combination)",
    )
    parser.add_argument("--json", default=None, help="write the rows to this file")
    return parser.parse_args(argv)


def earlier_baselines(args: argparse.Namespace) -> list[dict]:
    """The baselines' rows of ``--baselines-from`` for this run's cells (they do not depend on this checkout's
    sampler: the previous default runs from its own commit, the others use no chains), marked with the file."""
    targets = set(args.targets if args.targets is not None else range(len(SEVEN_TARGETS)))

    def keep(r: dict) -> bool:
        return (
            not r["method"].startswith("ours")
            and r["method"] not in args.methods
            and r["dataset"] in args.datasets
            and r["proposal"] in args.proposals
            and r["target_index"] in targets
            and r["seed"] in args.seeds
        )

    return earlier_rows(args.baselines_from, keep, args.num_images, "baseline")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    rows = earlier_baselines(args) if args.baselines_from else []
    for dataset in args.datasets:
        for kind in args.proposals:
            world = load_world(dataset, kind, args)
            if world is not None:
                rows += run_world(world, args)
                print_tables(rows, dataset, kind)
    print(
        f"\nOurs: the pipeline's defaults, micro_batch_size {MICRO_BATCH}, a budget of {BUDGET_PER_IMAGE} generator "
        f"calls per image; variants {OURS_VARIANTS}; overrides {args.ours_overrides or 'none'}"
    )
    for dataset in args.datasets:
        for kind in args.proposals:
            print_tables(rows, dataset, kind)
    print_goals(rows)
    if args.json:
        write_json_atomically(args.json, jsonable(rows))
    return rows


if __name__ == "__main__":
    main()
