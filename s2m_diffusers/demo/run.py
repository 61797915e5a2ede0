"""`s2m demo`: S2M sampling of all seven Digits-7to3 combinations with the shipped DCGAN and DDPM, offline.

The shipped weights live in `s2m_diffusers/demo/pretrained/digits7to3/`: the generators (`gan/`, `ddpm/`), their
heads (`heads_gan/`, `heads_ddpm/`, trained by `examples/train_demo_heads.py`, i.e. [`train_demo_heads`]) and the
evaluator (`evaluator/`) that scores the samples. [`run_demo`] assembles an `S2MPipeline` per generator and saves it
as a complete pipeline folder (`pipelines/gan/`, `pipelines/ddpm/`), samples every combination of `SEVEN_TARGETS`
with each, and writes a labelled image grid (`grid.png`: one row per combination, one column block per generator),
`report.md` and `report.json` (one row per generator and combination: evaluator accuracy, proposals per image,
acceptance rate, seconds).

Examples:

```py
>>> from s2m_diffusers.demo import run_demo
>>> report = run_demo("s2m-demo", num_images=8, seed=0)  # doctest: +SKIP
>>> report["paths"]["grid"]  # doctest: +SKIP
's2m-demo/grid.png'
```
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence

import torch

from ..evaluation import AttributeEvaluator, formula_accuracy
from ..utils import jsonable, save_pretrained_atomically, write_json_atomically, write_text_atomically
from .seven_to_three import DIGITS_7TO3_PRETRAINED, SEVEN_TARGETS, load_7to3

GENERATORS = ("gan", "ddpm")
# Every trained generator kind: the demo's two, and the class-conditional DCGAN (proposal of the D_f benchmark).
GENERATOR_KINDS = (*GENERATORS, "gan_conditional")
# DDIM steps of the DDPM proposal: the shipped heads were trained on samples drawn with this many steps.
DDIM_STEPS = 10
# The demo samples with the pipeline's defaults, for both generators: what differs is only how many latents go
# through the generator at once (memory and speed, not the images: `micro_batch_size`).
MICRO_BATCH_SIZE: dict[str, int] = {"gan": 256, "ddpm": 128}


# ----------------------------------------------------------------------------------------------------------------
# Loading and (re)training


def load_generator(kind: str, root: str = DIGITS_7TO3_PRETRAINED) -> dict:
    """A shipped Digits-7to3 generator (or one trained the same way, in `root`) as `S2MPipeline` components.

    Args:
        kind (`str`): `"gan"` (the DCGAN in `root/gan`), `"gan_conditional"` (the class-conditional DCGAN in
            `root/gan_conditional`) or `"ddpm"` (the DDPMPipeline folder `root/ddpm`).
        root (`str`): the folder of the shipped weights.

    Returns:
        `dict`: `{"gan": DCGANGenerator}` or `{"unet": UNet2DModel, "scheduler": DDPMScheduler}`, in eval mode
        (`s2m_diffusers.hub.load_generator_folder`).
    """
    from ..hub import load_generator_folder

    if kind not in GENERATOR_KINDS:
        raise ValueError(f"Unknown generator {kind!r}; choose one of {list(GENERATOR_KINDS)}.")
    return load_generator_folder(os.path.join(root, kind))[1]


def digits_train_data(sample_size: int = 16, dataset: str = "digits"):
    """The 7to3 train split (Digits by default) as a `SinglePositiveDataset` (the held-out split is for scoring)."""
    from ..data import SinglePositiveDataset

    train = load_7to3(dataset, size=sample_size).train()
    return SinglePositiveDataset.from_tensors(train.images, train.single_labels, list(train.attribute_names))


def training_proposal(kind: str, components: dict, ddim_steps: int = DDIM_STEPS, bank_size: int = 3000, seed: int = 0):
    """The proposal `proposal(n, generator)` the heads of a shipped generator are trained on.

    The GAN itself; for the DDPM a bank of `bank_size` DDIM samples drawn once (`s2m_diffusers.training.sample_bank`:
    a DDIM sample costs `ddim_steps` UNet calls, too many to draw afresh at every training step on a CPU).
    """
    from ..proposals import DDIMProposal, GeneratorProposal
    from ..training import sample_bank

    if kind in ("gan", "gan_conditional"):
        return GeneratorProposal(components["gan"])
    proposal = DDIMProposal(components["unet"], components["scheduler"], ddim_steps, micro_batch_size=256)
    return sample_bank(proposal, bank_size, seed)


def train_demo_heads(
    kind: str,
    output_dir: str | os.PathLike | None = None,
    num_steps: int = 2000,
    ddim_steps: int = DDIM_STEPS,
    bank_size: int = 3000,
    seed: int = 0,
    generator_root: str = DIGITS_7TO3_PRETRAINED,
    progress: bool = True,
    dataset: str = "digits",
    **train_kwargs,
):
    """Train the S2M heads of a shipped generator on the Digits-7to3 train split with `train_heads`.

    Args:
        kind (`str`): `"gan"`, `"gan_conditional"` (heads with D_f) or `"ddpm"`.
        output_dir (`str`, *optional*): where the heads (`save_pretrained`) and `metrics.json` go.
        num_steps (`int`, defaults to 2000): optimizer steps.
        ddim_steps (`int`, defaults to `DDIM_STEPS`): DDIM steps of the DDPM proposal.
        bank_size (`int`, defaults to 3000): pre-generated DDIM samples the DDPM heads are trained on.
        seed (`int`, defaults to 0): seed of the split, the proposal draws and training.
        generator_root (`str`): the folder holding `gan/` and `ddpm/`.
        progress (`bool`, defaults to `True`): progress bars.
        dataset (`str`, defaults to `"digits"`): the 7to3 source of the real images, `"digits"` or `"fashion"`.
        train_kwargs: more arguments of [`~s2m_diffusers.training.train_heads`].

    Returns:
        `tuple[S2MHeads, dict]`: the heads and `train_heads`' metrics, plus `generator` (and `ddim_steps`,
        `bank_size` for the DDPM).
    """
    from ..training import train_heads

    components = load_generator(kind, generator_root)
    proposal = training_proposal(kind, components, ddim_steps, bank_size, seed)
    heads, metrics = train_heads(
        digits_train_data(dataset=dataset),
        proposal,
        output_dir=output_dir,
        num_steps=num_steps,
        seed=seed,
        progress=progress,
        **train_kwargs,
    )
    metrics.update(generator=kind, dataset=dataset)
    if kind == "ddpm":
        metrics.update(ddim_steps=ddim_steps, bank_size=bank_size)
    if output_dir is not None:
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return heads, metrics


def load_demo_pipeline(
    kind: str, root: str = DIGITS_7TO3_PRETRAINED, heads_root: str | None = None, screen_heads: bool = True
):
    """`S2MPipeline` of a shipped generator with its heads (`heads_root/heads_KIND`, default `root`), and for the
    DDPM its screen heads (`heads_root/screen_heads_ddpm`, `examples/distil_screen_heads.py`) where they exist and
    ``screen_heads`` is true."""
    from ..models.heads import S2MHeads
    from ..pipeline_s2m import S2MPipeline

    heads_dir = os.path.join(heads_root or root, f"heads_{kind}")
    if not os.path.isfile(os.path.join(heads_dir, "config.json")):
        raise FileNotFoundError(
            f"No trained heads in {heads_dir!r}. Train them with `python examples/train_demo_heads.py` or run "
            "`s2m demo --retrain`."
        )
    heads = S2MHeads.from_pretrained(heads_dir).eval()
    extra = {"num_inference_steps": DDIM_STEPS} if kind == "ddpm" else {}
    screen_dir = os.path.join(heads_root or root, f"screen_heads_{kind}")
    if screen_heads and os.path.isfile(os.path.join(screen_dir, "config.json")):
        extra["screen_heads"] = S2MHeads.from_pretrained(screen_dir).eval()
    return S2MPipeline(heads=heads, **load_generator(kind, root), **extra)


def load_evaluator(root: str = DIGITS_7TO3_PRETRAINED):
    """The shipped `AttributeEvaluator` of Digits-7to3."""
    return AttributeEvaluator.from_pretrained(os.path.join(root, "evaluator")).eval()


# ----------------------------------------------------------------------------------------------------------------
# Scoring and writing


def _to_pil(images01: torch.Tensor):
    from PIL import Image

    array = (images01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if array.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L").convert("RGB") for a in array]
    return [Image.fromarray(a).convert("RGB") for a in array]


def make_grid(
    blocks: dict[str, dict[str, torch.Tensor]],
    targets: Sequence[str],
    cell: int = 48,
    pad: int = 4,
    label_width: int = 120,
):
    """A labelled image grid: one row per target, one column block per generator.

    Args:
        blocks (`dict`): `{generator: {target: images (B, C, H, W) in [0, 1]}}`.
        targets (`Sequence[str]`): the row order; the label of each row.
        cell (`int`, defaults to 48): side of one image in pixels (nearest-neighbour upscaled).
        pad (`int`, defaults to 4): gap between images.
        label_width (`int`, defaults to 120): width of the label column.

    Returns:
        `PIL.Image.Image`: the grid (RGB).
    """
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw

    def tile(image=None) -> Image.Image:
        """One cell and the gap after it, white where there is no image."""
        out = Image.new("RGB", (cell + pad, cell + pad), "white")
        if image is not None:
            out.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (0, 0))
        return out

    names = list(blocks)
    columns = {g: max((len(blocks[g].get(t, [])) for t in targets), default=0) for g in names}
    header = 18
    block_widths = {g: max(columns[g] * (cell + pad), 60) for g in names}
    width = label_width + sum(block_widths.values()) + pad * len(names)
    height = header + len(targets) * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    x0 = label_width
    for g in names:
        draw.text((x0 + 2, 3), g, fill="black")
        if columns[g]:  # one block per generator: diffusers' grid of its rows, padded with white cells
            tiles = []
            for target in targets:
                row = _to_pil(blocks[g][target]) if target in blocks[g] else []
                tiles += [tile(image) for image in row] + [tile() for _ in range(columns[g] - len(row))]
            grid.paste(make_image_grid(tiles, rows=len(targets), cols=columns[g]), (x0, header))
        x0 += block_widths[g] + pad
    for row, target in enumerate(targets):
        draw.text((4, header + row * (cell + pad) + cell // 2 - 6), target, fill="black")
    return grid


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def report_markdown(report: dict) -> str:
    """The markdown report: a table per generator and the settings."""
    lines = [
        "# S2M demo: Digits-7to3",
        "",
        f"{report['num_images']} images per combination, seed {report['seed']}, "
        f"wall time {report['wall_seconds']:.1f} s{' (heads retrained)' if report['retrain'] else ''}.",
        "Accuracy: share of images the shipped evaluator judges on target.",
        "",
        "| generator | target | accuracy | proposals / image | UNet calls / image | acceptance rate | distinct | "
        "seconds | warnings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['generator']} | `{r['target']}` | {_fmt(r['accuracy'])} | {_fmt(r['proposals_per_image'])} | "
            f"{_fmt(r['unet_calls_per_image'])} | {_fmt(r['acceptance_rate'])} | {r['unique_images']} | "
            f"{_fmt(r['seconds'])} | {'; '.join(r['warnings']) or '-'} |"
        )
    lines += ["", "| generator | mean accuracy | mean proposals / image | seconds |", "|---|---|---|---|"]
    for g, s in report["summary"].items():
        lines.append(
            f"| {g} | {_fmt(s['mean_accuracy'])} | {_fmt(s['mean_proposals_per_image'])} | {_fmt(s['seconds'])} |"
        )
    lines += ["", "Sampler settings: the defaults; call arguments " + json.dumps(report["settings"])]
    folders = ", ".join(f"`pipelines/{g}`" for g in report["paths"]["pipelines"])
    lines += ["", f"Pipelines (load with `S2MPipeline.from_pretrained`): {folders}"]
    lines += ["", "![grid](grid.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The demo

# The files `run_demo` writes into its output folder, by their key in the report's `paths`.
_REPORT_FILES = {"grid": "grid.png", "markdown": "report.md", "json": "report.json"}


def run_demo(
    output_dir: str | os.PathLike = "s2m-demo",
    num_images: int = 16,
    seed: int = 0,
    retrain: bool = False,
    generators: Sequence[str] = GENERATORS,
    targets: Sequence[str] = SEVEN_TARGETS,
    root: str = DIGITS_7TO3_PRETRAINED,
    retrain_steps: int = 1000,
    settings: dict[str, dict] | None = None,
    progress: bool = True,
) -> dict:
    """Sample every target with each shipped generator, score the images and write the grid, reports and pipelines.

    Args:
        output_dir (`str`, defaults to `"s2m-demo"`): where `grid.png`, `report.md`, `report.json`, the pipeline
            folders `pipelines/gan/`, `pipelines/ddpm/` (and, with `retrain`, the retrained heads `heads_gan/`,
            `heads_ddpm/`) go.
        num_images (`int`, defaults to 16): images per generator and target.
        seed (`int`, defaults to 0): seed of the sampling (and of the retraining).
        retrain (`bool`, defaults to `False`): retrain the heads of each generator first (`retrain_steps` steps
            each, a few minutes on a CPU); the generators and the evaluator stay the shipped ones.
        generators (`Sequence[str]`, defaults to `("gan", "ddpm")`): which generators.
        targets (`Sequence[str]`, defaults to `SEVEN_TARGETS`): the combinations, one grid row each.
        root (`str`): the folder of the shipped weights.
        retrain_steps (`int`, defaults to 1000): training steps of each head set with `retrain`.
        settings (`dict`, *optional*): per-generator pipeline call arguments beside the defaults (by default only
            `micro_batch_size`, `MICRO_BATCH_SIZE`).
        progress (`bool`, defaults to `True`): progress bars.

    Returns:
        `dict`: the report (as in `report.json`): `rows` (one per generator and target: `generator`, `target`,
        `accuracy`, `proposals_per_image`, `acceptance_rate`, `seconds`, `num_images`, `unet_calls_per_image`,
        `unique_images`, `warnings` (the diagnostics'), `proposals`, `budget_exhausted`), `summary` per generator,
        `settings`, `wall_seconds`, and `paths` of the files written (`grid`, `markdown`, `json`, and `pipelines`:
        `{generator: folder}`).
    """
    start = time.perf_counter()
    settings = demo_settings(num_images, generators, settings)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)

    training = retrain_heads(generators, output_dir, retrain_steps, seed, root, progress) if retrain else {}
    evaluator = load_evaluator(root)
    pipes = load_pipelines(generators, root, output_dir if retrain else root, progress)
    pipeline_paths = save_pipelines(pipes, output_dir)
    blocks, rows = sample_combinations(pipes, targets, num_images, seed, settings, progress)
    score_rows(rows, blocks, evaluator)

    paths = {name: os.path.join(output_dir, file) for name, file in _REPORT_FILES.items()}
    write_grid(blocks, targets, paths["grid"])
    report = {
        "dataset": "digits7to3",
        "num_images": num_images,
        "seed": seed,
        "retrain": retrain,
        "rows": rows,
        "summary": summarize(rows, generators),
        "settings": settings,
        "training": training,
        "wall_seconds": time.perf_counter() - start,
        "paths": {**paths, "pipelines": pipeline_paths},
    }
    write_text_atomically(paths["markdown"], report_markdown(report))
    write_json_atomically(paths["json"], jsonable(report))
    return report


def demo_settings(num_images: int, generators: Sequence[str], overrides: dict[str, dict] | None) -> dict[str, dict]:
    """The pipeline call arguments of each generator: its `micro_batch_size`, updated by `overrides`, after
    checking; every sampler setting is the pipeline's default."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    unknown = [g for g in generators if g not in GENERATORS]
    if unknown:
        raise ValueError(f"Unknown generators {unknown}; choose among {list(GENERATORS)}.")
    return {g: {"micro_batch_size": MICRO_BATCH_SIZE[g], **((overrides or {}).get(g, {}))} for g in generators}


def retrain_heads(
    generators: Sequence[str], output_dir: str, num_steps: int, seed: int, root: str, progress: bool
) -> dict[str, dict]:
    """Train the heads of each generator into `output_dir/heads_KIND`; their `D_v`/`D_r` metrics and time."""
    training = {}
    for g in generators:
        _, metrics = train_demo_heads(
            g,
            os.path.join(output_dir, f"heads_{g}"),
            num_steps=num_steps,
            seed=seed,
            generator_root=root,
            progress=progress,
        )
        training[g] = {k: v for k, v in metrics.items() if k.startswith(("dv_", "dr_")) or k == "train_time_s"}
    return training


def load_pipelines(generators: Sequence[str], root: str, heads_root: str, progress: bool) -> dict:
    """`{generator: S2MPipeline}`: each shipped generator with its heads from `heads_root`."""
    pipes = {}
    for g in generators:
        pipes[g] = load_demo_pipeline(g, root, heads_root)
        pipes[g].set_progress_bar_config(disable=not progress, leave=False)
    return pipes


def save_pipelines(pipes: dict, output_dir: str) -> dict[str, str]:
    """Save each pipeline as a complete S2M pipeline folder `output_dir/pipelines/KIND`; print and return the paths.

    Each folder loads with `S2MPipeline.from_pretrained(path)` and samples any target of the demo.
    """
    paths = {}
    for g, pipe in pipes.items():
        paths[g] = os.path.join(output_dir, "pipelines", g)
        save_pretrained_atomically(pipe, paths[g])
        print(f"pipeline {g}: {paths[g]}")
    return paths


def sample_combinations(
    pipes: dict, targets: Sequence[str], num_images: int, seed: int, settings: dict[str, dict], progress: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    """Sample `num_images` images of each target with each pipeline (target `i` with seed `seed + i`).

    Returns:
        `tuple`: the images `{generator: {target: (B, C, H, W) in [0, 1]}}` and one row per generator and target
        (the sampler's figures; `accuracy` is `None` until [`score_rows`] fills it).
    """
    from tqdm.auto import tqdm

    rows, blocks = [], {}
    bar = tqdm(total=len(pipes) * len(targets), desc="demo", disable=not progress)
    for g, pipe in pipes.items():
        blocks[g] = {}
        for i, target in enumerate(targets):
            bar.set_postfix_str(f"{g}: {target}")
            t0 = time.perf_counter()
            out = pipe(
                target,
                num_images=num_images,
                generator=torch.Generator().manual_seed(seed + i),
                output_type="pt",
                allow_partial=True,
                **settings[g],
            )
            seconds = time.perf_counter() - t0
            stats = out.stats
            blocks[g][target] = out.images
            rows.append(
                {
                    "generator": g,
                    "target": target,
                    "accuracy": None,
                    "proposals_per_image": stats["proposals_per_image"],
                    "acceptance_rate": stats["acceptance_rate"],
                    "seconds": seconds,
                    "num_images": int(len(out.images)),
                    "unet_calls_per_image": stats["unet_calls_per_image"],
                    "unique_images": stats["unique_images"],
                    "warnings": stats["warnings"],
                    "proposals": stats["proposals"],
                    "budget_exhausted": bool(stats["budget_exhausted"]),
                }
            )
            bar.update(1)
    bar.close()
    return blocks, rows


def score_rows(rows: list[dict], blocks: dict[str, dict[str, torch.Tensor]], evaluator) -> None:
    """Fill each row's `accuracy`: the share of its images the evaluator judges on target (`None` for no image)."""
    for row in rows:
        images01 = blocks[row["generator"]][row["target"]]
        row["accuracy"] = formula_accuracy(evaluator, images01 * 2 - 1, row["target"]) if len(images01) else None


def summarize(rows: list[dict], generators: Sequence[str]) -> dict[str, dict]:
    """Per generator: mean accuracy (over targets with images), mean proposals per image and total seconds."""
    summary = {}
    for g in generators:
        mine = [r for r in rows if r["generator"] == g]
        accs = [r["accuracy"] for r in mine if r["accuracy"] is not None]
        summary[g] = {
            "mean_accuracy": sum(accs) / len(accs) if accs else None,
            "mean_proposals_per_image": sum(r["proposals_per_image"] for r in mine) / len(mine),
            "seconds": sum(r["seconds"] for r in mine),
        }
    return summary


def write_grid(blocks: dict[str, dict[str, torch.Tensor]], targets: Sequence[str], path: str) -> None:
    """[`make_grid`] of the images, saved as PNG to `path` (through a temporary file: never a half-written grid)."""
    tmp = os.path.join(os.path.dirname(path), ".grid.tmp.png")
    make_grid(blocks, list(targets)).save(tmp)
    os.replace(tmp, path)
