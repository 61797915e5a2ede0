"""`s2m train-heads`: train the three heads on a folder (or a datasets dataset) of single-positive images beside a
pretrained generator, and write the complete S2M pipeline folder (optionally uploaded). Registered in
`s2m_diffusers.cli`; the run function imports what it needs (torch, diffusers) itself.
"""

from __future__ import annotations

import argparse
import json
import os

from .cli_common import EXIT_OK, EXIT_USAGE, LR_SCHEDULERS, _fail, _float_or_auto
from .hub import TRAINING_FOLDER, check_save_directory, generator_image_shape, load_generator_folder, save_pipeline
from .utils import jsonable

__all__ = ["train_heads_command"]


_TRAIN_HEADS_EPILOG = (
    "examples:\n"
    "  s2m train-heads --pretrained_model_name_or_path my-ddpm/ --train_data_dir data/ --output_dir my-s2m\n"
    "  s2m train-heads --pretrained_model_name_or_path my-gan/ --train_data_dir data/ --output_dir my-s2m \\\n"
    "      --max_train_steps 500 --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 50 --seed 1\n"
    "  s2m train-heads --pretrained_model_name_or_path my-gan/ --dataset_name my-dataset/ \\\n"
    "      --image_column image --label_column label --output_dir my-s2m   # a datasets dataset\n"
    "  accelerate launch --num_processes 2 -m s2m_diffusers.cli train-heads \\\n"
    "      --pretrained_model_name_or_path my-ddpm/ --train_data_dir data/ --output_dir my-s2m \\\n"
    "      --mixed_precision bf16 --checkpointing_steps 500 --checkpoints_total_limit 2\n"
    "  ... the same command with --resume_from_checkpoint latest   # continue from the newest checkpoint\n"
    "\n"
    "flag names follow diffusers' training scripts; the earlier names (--generator, --data-dir, --output,\n"
    "--sample-size, --num-steps, --batch-size, ...) still work.\n"
    "data: --train_data_dir data/ with data/smiling/*.png, data/male/*.png, ... (the sub-folder name is the\n"
    "attribute; names [A-Za-z0-9_.]+), or --dataset_name: a datasets dataset (its train split; a ClassLabel or\n"
    "string label column names the attributes). Images are resized and converted to the generator's size and\n"
    "channels (or to --resolution: the heads then see downscaled copies of the generator's images, in training\n"
    "and sampling). The whole data set is held in memory.\n"
    "generator: a folder saved with save_pretrained, or its Hub repo id: a diffusers pipeline with a unet and\n"
    "a scheduler (e.g. DDPMPipeline; sampled as deterministic DDIM), or a GAN generator model (e.g.\n"
    "DCGANGenerator).\n"
    "checkpoints: --checkpointing_steps N saves the training state to OUTPUT_DIR/checkpoints/checkpoint-STEP\n"
    "(kept in the pipeline folder, never uploaded); --resume_from_checkpoint latest (or a checkpoint folder)\n"
    "continues from one (the model, optimizer, learning-rate schedule and random states). --report_to sends the\n"
    "metrics to an accelerate tracker (logs in OUTPUT_DIR/checkpoints, or --logging_dir).\n"
    "Exit status: 0 done, 2 invalid input."
)


def _train_heads_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-heads",
        help="train S2M heads for a pretrained generator on single-positive data; write an S2M pipeline",
        description=(
            "Train the S2M heads (D_v: real vs generated; D_r: which attribute) for a pretrained generator on "
            "single-positive data (a folder with one sub-folder of images per attribute, or a `datasets` dataset with "
            "an image and a label column), and write a complete S2M pipeline folder (generator + heads) that "
            "`s2m sample --pipeline OUTPUT_DIR` loads. Runs unchanged "
            "under `accelerate launch` (data parallel)."
        ),
        epilog=_TRAIN_HEADS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pretrained_model_name_or_path",
        "--generator",
        dest="generator",
        required=True,
        metavar="PATH",
        help="generator folder saved with save_pretrained, or its Hub repo id (the card's base_model)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--train_data_dir",
        "--data-dir",
        dest="train_data_dir",
        metavar="DIR",
        help="folder with one sub-folder of images per attribute",
    )
    source.add_argument(
        "--dataset_name",
        metavar="NAME",
        help="a `datasets` dataset instead: a folder saved with save_to_disk, a local folder that "
        "datasets.load_dataset reads, or a Hub dataset id (needs pip install 's2m-diffusers[datasets]')",
    )
    p.add_argument("--dataset_config_name", default=None, metavar="NAME", help="the dataset's configuration")
    p.add_argument(
        "--image_column", default="image", metavar="COLUMN", help="the dataset's image column (default: image)"
    )
    p.add_argument(
        "--label_column",
        default="label",
        metavar="COLUMN",
        help="the dataset's label column: a ClassLabel (its names are the attributes) or strings (default: label)",
    )
    p.add_argument(
        "--output_dir",
        "--output",
        dest="output_dir",
        required=True,
        metavar="OUT",
        help="folder for the S2M pipeline (and metrics.json, checkpoints/)",
    )
    p.add_argument(
        "--resolution",
        "--sample-size",
        dest="resolution",
        type=int,
        default=None,
        metavar="N",
        help="side of the images the heads see, at most the generator's (default: the generator's; smaller for a "
        "large generator: its images are downscaled)",
    )
    p.add_argument(
        "--max_train_steps",
        "--num-steps",
        dest="max_train_steps",
        type=int,
        default=2000,
        metavar="N",
        help="training steps (default: 2000)",
    )
    p.add_argument(
        "--train_batch_size",
        "--batch-size",
        dest="train_batch_size",
        type=int,
        default=64,
        metavar="N",
        help="real images per step, over all processes and accumulation steps (default: 64)",
    )
    p.add_argument(
        "--learning_rate",
        "--learning-rate",
        dest="learning_rate",
        type=float,
        default=1e-3,
        help="AdamW learning rate (default: 1e-3)",
    )
    p.add_argument(
        "--lr_scheduler",
        choices=LR_SCHEDULERS,
        default="constant",
        help="learning-rate schedule over the steps, as diffusers' get_scheduler names it (default: constant)",
    )
    p.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=0,
        metavar="N",
        help="steps of linear warm-up to --learning_rate (every schedule but constant; default: 0)",
    )
    p.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="accelerate's mixed precision (default: no)",
    )
    p.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, metavar="N", help="accumulation steps (default: 1)"
    )
    p.add_argument(
        "--checkpointing_steps",
        type=int,
        default=None,
        metavar="N",
        help="save the training state every N steps to OUTPUT_DIR/checkpoints/checkpoint-STEP (default: never)",
    )
    p.add_argument("--checkpoints_total_limit", type=int, default=None, metavar="N", help="keep at most N checkpoints")
    p.add_argument(
        "--resume_from_checkpoint",
        default=None,
        metavar="PATH",
        help="a checkpoint-STEP folder, or 'latest' for the newest in OUTPUT_DIR/checkpoints",
    )
    p.add_argument(
        "--report_to",
        default=None,
        help="an accelerate tracker for the metrics: tensorboard, wandb, ... (default: none)",
    )
    p.add_argument(
        "--logging_dir",
        default=None,
        metavar="DIR",
        help="where --report_to's tracker writes (a relative DIR is under OUTPUT_DIR/checkpoints; default: there)",
    )
    p.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate, early-stop and keep an exponential moving average of the weights (default: on; --no-use_ema "
        "keeps the raw weights)",
    )
    p.add_argument("--ema_decay", type=float, default=0.99, help="decay of the moving average (default: 0.99)")
    p.add_argument(
        "--backbone",
        default="cnn",
        metavar="cnn|DIR|REPO",
        help="the heads' backbone: the built-in CNN (default) or a transformers vision model, as a local folder "
        "(saved with save_pretrained) or a Hub repo id (downloaded unless HF_HUB_OFFLINE is set); needs pip install "
        "'s2m-diffusers[transformers]'",
    )
    p.add_argument(
        "--backbone_revision",
        default=None,
        metavar="REV",
        help="commit, branch or tag of a Hub --backbone (pin a commit sha)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the proposal draws and training (default 0)"
    )
    p.add_argument(
        "--num_inference_steps",
        "--num-inference-steps",
        dest="num_inference_steps",
        type=int,
        default=25,
        metavar="N",
        help="DDIM steps of a diffusion generator, for training and stored as the pipeline's default (default: 25)",
    )
    p.add_argument(
        "--bank_size",
        "--bank-size",
        dest="bank_size",
        type=int,
        default=None,
        metavar="N",
        help=(
            "train on N samples drawn once from the generator instead of fresh ones at every step (default: 4096 "
            "for a diffusion generator, whose samples are expensive; 0: always fresh; a GAN draws fresh ones)"
        ),
    )
    p.add_argument(
        "--screen_heads_samples",
        "--screen-heads-samples",
        dest="screen_heads_samples",
        type=int,
        default=4096,
        metavar="N",
        help=(
            "for a diffusion generator, also distil screen heads on N denoising runs: heads that read the predicted "
            "clean image part-way through the denoising, which `s2m sample --screen auto` uses to stop most "
            "off-target proposals early (default 4096; 0: none)"
        ),
    )
    p.add_argument(
        "--heldout_fraction",
        "--heldout-fraction",
        dest="heldout_fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="share of each attribute's images held out for early stopping and calibration (default 0.2; at least "
        "one image per attribute, so each attribute needs 2 or more)",
    )
    p.add_argument(
        "--num_heldout_samples",
        "--num-heldout-samples",
        dest="num_heldout_samples",
        type=int,
        default=1024,
        metavar="N",
        help="generated samples kept for early stopping and calibration (default: 1024)",
    )
    p.add_argument(
        "--priors",
        default="estimate",
        help="attribute priors pi_c: 'estimate' (default, from the calibrated D_r), 'none', or comma-separated floats",
    )
    p.add_argument(
        "--negation_margin",
        "--negation-margin",
        dest="negation_margin",
        type=_float_or_auto,
        default="auto",
        help="lambda of negated literals stored in the heads (default 'auto': chosen from held-out data)",
    )
    p.add_argument(
        "--presence_margin",
        "--presence-margin",
        dest="presence_margin",
        type=_float_or_auto,
        default="auto",
        help="kappa of required literals stored in the heads (default 'auto': chosen from held-out data)",
    )
    p.add_argument(
        "--dv_strength",
        "--dv-strength",
        dest="dv_strength",
        type=_float_or_auto,
        default="auto",
        help="beta, the strength of logit D_v stored in the heads (default 'auto': the largest keeping a 10%% ESS)",
    )
    p.add_argument(
        "--labelling",
        choices=("independent", "one_label_per_image"),
        default="independent",
        help="how the folders were made (spec §1): 'independent' (default: each attribute's folder samples the images "
        "that hold it; an image may sit in several) or 'one_label_per_image' (each image in exactly one folder)",
    )
    p.add_argument(
        "--default_target",
        "--default-target",
        dest="default_target",
        default=None,
        help="target `s2m sample` uses when given none",
    )
    p.add_argument("--license", default=None, help="license of the weights for the model card, e.g. apache-2.0")
    p.add_argument(
        "--push_to_hub", action="store_true", help="upload the pipeline to the Hub (with a card pinned to the commit)"
    )
    p.add_argument(
        "--hub_model_id",
        default=None,
        metavar="REPO",
        help="the Hub repo of --push_to_hub (default: OUTPUT_DIR's name)",
    )
    p.add_argument(
        "--num_threads",
        "--num-threads",
        dest="num_threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's choice)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def train_heads_command(args: argparse.Namespace) -> int:
    """Run `s2m train-heads`."""
    import torch

    from .distributed import get_state, launched_processes
    from .hub import save_and_push
    from .pipeline_s2m import S2MPipeline
    from .training import train_heads

    # Under `accelerate launch` every process trains (data parallel); the main process writes and reports.
    main_process = launched_processes() == 1 or get_state().is_main_process

    problem = _check_train_heads_arguments(args)
    if problem is not None:
        return _fail(problem, EXIT_USAGE)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    try:
        priors = _parse_priors(args.priors)
    except ValueError as err:
        return _fail(str(err), EXIT_USAGE)
    training_dir = None  # checkpoints and tracker logs, when asked for
    if args.checkpointing_steps is not None or args.resume_from_checkpoint is not None or args.report_to is not None:
        training_dir = os.path.join(args.output_dir, TRAINING_FOLDER)  # kept by the save, never uploaded
    try:
        if main_process:
            check_save_directory(args.output_dir)  # before any training
        kind, components = load_generator_folder(args.generator)
        size, channels = _heads_image_shape(args.resolution, kind, components)
        data = _training_images(args, size, channels)
        if priors is not None and priors != "estimate" and len(priors) != len(data.attribute_names):
            raise ValueError(
                f"--priors gives {len(priors)} values but the data has {len(data.attribute_names)} attributes "
                f"{list(data.attribute_names)}."
            )
        heads, metrics = train_heads(
            data,
            _training_proposal(args, kind, components, size, channels),
            output_dir=training_dir,
            num_steps=args.max_train_steps,
            batch_size=args.train_batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler=args.lr_scheduler,
            lr_warmup_steps=args.lr_warmup_steps,
            ema_decay=args.ema_decay if args.use_ema else None,
            eval_steps=min(100, args.max_train_steps),
            heldout_fraction=args.heldout_fraction,
            num_heldout_samples=args.num_heldout_samples,
            seed=args.seed,
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            checkpointing_steps=args.checkpointing_steps,
            checkpoints_total_limit=args.checkpoints_total_limit,
            resume_from_checkpoint=args.resume_from_checkpoint,
            report_to=args.report_to,
            logging_dir=args.logging_dir,
            priors=priors,
            negation_margin=args.negation_margin,
            presence_margin=args.presence_margin,
            dv_strength=args.dv_strength,
            labelling=args.labelling,
            progress=not args.quiet,
            **_backbone_kwargs(args),
        )
        extra = {"num_inference_steps": args.num_inference_steps} if kind == "ddim" else {}
        if not main_process:
            return EXIT_OK
        pipe = S2MPipeline(heads=heads, **components, default_target=args.default_target, **extra)
        if kind == "ddim" and args.screen_heads_samples:
            from .screen_heads import distil_screen_heads

            screen_heads, metrics["screen_heads"] = distil_screen_heads(
                pipe, num_samples=args.screen_heads_samples, seed=args.seed, progress=not args.quiet
            )
            pipe.register_modules(screen_heads=screen_heads)
        training_data = _training_data(args, kind)
        saved = dict(
            training_data=training_data,
            extra_files={"metrics.json": _training_metrics(training_data, data, metrics)},
            license=args.license,
        )
        if args.push_to_hub:  # the pipeline and metrics.json, as one folder, and its upload under one lock
            repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
            _, commit = save_and_push(pipe, args.output_dir, repo_id, **saved)
            print(f"uploaded to https://huggingface.co/{repo_id} (revision {getattr(commit, 'oid', None)})")
        else:
            save_pipeline(pipe, args.output_dir, **saved)  # the pipeline and metrics.json, as one folder
    except (OSError, ValueError, ImportError) as err:  # ImportError: a missing extra, named in the message
        return _fail(str(err), EXIT_USAGE)
    summary = ", ".join(
        f"{h} accuracy {metrics[f'{h}_accuracy']:.3f}" for h in ("dv", "dr", "df") if f"{h}_accuracy" in metrics
    )
    print(f"wrote the S2M pipeline to {args.output_dir} ({summary}; attributes {list(data.attribute_names)})")
    if "negation_margin" in metrics:
        print(
            f"the sampler reads the heads with negation margin {metrics['negation_margin']:.3g}, presence margin "
            f"{metrics['presence_margin']:.3g} and D_v strength {metrics['dv_strength']:.3g} (chosen from held-out "
            f"data; metrics.json has the details). {metrics['dv_report']}"
        )
    return EXIT_OK


def _check_train_heads_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the numeric arguments of `s2m train-heads`, or `None` (options named as diffusers names
    them, with this command's earlier names in parentheses)."""
    positive = {
        "max_train_steps": "--num-steps",
        "train_batch_size": "--batch-size",
        "num_inference_steps": "--num-inference-steps",
        "num_heldout_samples": "--num-heldout-samples",
        "gradient_accumulation_steps": None,
    }
    for name, alias in positive.items():
        if getattr(args, name) < 1:
            shown = f"--{name}" + (f" ({alias})" if alias else "")
            return f"{shown} must be at least 1, got {getattr(args, name)}."
    for name in ("checkpointing_steps", "checkpoints_total_limit", "num_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            alias = " (--num-threads)" if name == "num_threads" else ""
            return f"--{name}{alias} must be at least 1, got {getattr(args, name)}."
    if args.screen_heads_samples != 0 and args.screen_heads_samples < 10:
        n = args.screen_heads_samples
        return f"--screen_heads_samples (--screen-heads-samples) must be 0 (none) or at least 10, got {n}."
    if args.bank_size is not None and args.bank_size < 0:
        return f"--bank_size (--bank-size) must be 0 or more, got {args.bank_size}."
    if not 0.0 < args.heldout_fraction < 1.0:
        return (
            "--heldout_fraction (--heldout-fraction) must lie strictly between 0 and 1 (0.2 is usual), got "
            f"{args.heldout_fraction}."
        )
    if args.use_ema and not 0.0 < args.ema_decay < 1.0:
        return f"--ema_decay must lie strictly between 0 and 1 (0.99 is usual), got {args.ema_decay}."
    if args.lr_warmup_steps < 0:
        return f"--lr_warmup_steps must be 0 or more, got {args.lr_warmup_steps}."
    if args.lr_warmup_steps > 0 and args.lr_scheduler == "constant":
        return (
            f"--lr_warmup_steps {args.lr_warmup_steps} has no effect with --lr_scheduler constant; use "
            "--lr_scheduler constant_with_warmup (or another schedule) for a warm-up."
        )
    return None


def _parse_priors(text: str) -> list[float] | str | None:
    """`--priors`: `"estimate"`, `"none"` -> `None`, or comma-separated floats."""
    if text in ("estimate", "none"):
        return None if text == "none" else "estimate"
    try:
        return [float(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--priors must be 'estimate', 'none' or comma-separated floats like '0.3,0.5'; got {text!r}."
        ) from None


def _backbone_kwargs(args: argparse.Namespace) -> dict:
    """The heads' config arguments of `--backbone` (the built-in CNN: none)."""
    if args.backbone == "cnn":
        return {}
    return {"transformers_checkpoint": args.backbone, "transformers_revision": args.backbone_revision}


def _training_images(args: argparse.Namespace, size: int, channels: int):
    """The single-positive data of `s2m train-heads`: the attribute folders of `--train_data_dir`, or the
    `--dataset_name` dataset's train split (the whole split held in memory, as the folders are)."""
    from .data import SinglePositiveDataset, load_hf_dataset

    if args.dataset_name is None:
        return SinglePositiveDataset.from_folder(args.train_data_dir, size, channels)
    dataset = load_hf_dataset(args.dataset_name, args.dataset_config_name)
    for flag, column in (("--image_column", args.image_column), ("--label_column", args.label_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"{flag} {column}: the dataset {args.dataset_name!r} has no such column; its columns are "
                f"{dataset.column_names}. Name its image column with --image_column and its label column with "
                "--label_column."
            )
    return SinglePositiveDataset.from_hf_dataset(dataset, size, channels, args.image_column, args.label_column)


def _heads_image_shape(sample_size: int | None, kind: str, components: dict) -> tuple[int, int]:
    """`(size, channels)` of the images the heads see: the generator's, or downscaled to `--sample-size`."""
    size, channels = generator_image_shape(kind, components)
    if sample_size is not None:
        if not 1 <= sample_size <= size:
            raise ValueError(
                f"--resolution (--sample-size) must be between 1 and the generator's image size {size}, got "
                f"{sample_size}."
            )
        size = sample_size
    return size, channels


def _training_proposal(args: argparse.Namespace, kind: str, components: dict, size: int, channels: int):
    """The proposal the heads train on: the generator, or a bank of `--bank-size` samples drawn from it once
    (by default 4096 for a diffusion generator, whose samples are expensive; none for a GAN), with a progress bar
    unless `--quiet`, and under several processes drawn once, their micro-batches spread over the processes."""
    from .proposals import DDIMProposal, GeneratorProposal
    from .training import sample_bank

    if kind == "ddim":
        proposal = DDIMProposal(components["unet"], components["scheduler"], args.num_inference_steps)
        bank_size = 4096 if args.bank_size is None else args.bank_size
    else:
        proposal = GeneratorProposal(components["gan"])
        bank_size = args.bank_size or 0
    if not bank_size:
        return proposal
    return sample_bank(proposal, bank_size, args.seed, size, channels, progress=not args.quiet)


def _training_data(args: argparse.Namespace, kind: str) -> dict:
    """What the card and `metrics.json` say of the training run: the generator (its Hub repo, or its folder's name)
    and the data folder's name, never a local path."""
    from .hub import hub_repo_id

    def name(path: str) -> str:
        return hub_repo_id(path) or os.path.basename(os.path.normpath(path))

    described = {
        "generator": name(args.generator),
        "generator_kind": kind,
        "data": (
            f"{name(args.train_data_dir)}/ (one sub-folder of images per attribute)"
            if args.dataset_name is None
            else f"{name(args.dataset_name)} (a datasets dataset: its train split, columns {args.image_column!r} and "
            f"{args.label_column!r})"
        ),
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": args.lr_warmup_steps,
        "use_ema": args.use_ema,
        "backbone": "cnn" if args.backbone == "cnn" else name(args.backbone),
        "seed": args.seed,
    }
    if args.backbone != "cnn" and args.backbone_revision is not None:
        described["backbone_revision"] = args.backbone_revision
    return described


def _training_metrics(training_data: dict, data, metrics: dict) -> str:
    """`metrics.json` of `s2m train-heads`: the metrics, with the run's description and the data's labels."""
    metrics = {**metrics, **training_data}
    metrics["attribute_names"] = list(data.attribute_names)
    metrics["label_counts"] = list(data.label_counts)
    return json.dumps(jsonable(metrics), indent=2) + "\n"
