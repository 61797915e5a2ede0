"""The `s2m` command.

Each subcommand is one parser function (``_<name>_parser``) and one function that runs it (``<name>``), registered in
``COMMANDS``; `s2m sample` is in `s2m_diffusers.cli_sample`, `s2m train-heads` in `s2m_diffusers.cli_train_heads`,
`s2m evaluate` and `s2m demo` here. The run functions import what they need (torch, diffusers) themselves.

    s2m sample --pipeline DIR --target "a & ~b" --num-images 16 --output samples/ --seed 0
    accelerate launch --num_processes 2 -m s2m_diffusers.cli sample ...   # several processes (GPUs)
    s2m train-heads --generator GEN_DIR --data-dir DATA_DIR --output DIR
    s2m evaluate --images samples/ --target "a & ~b" --evaluator EVAL_DIR
    s2m demo
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence

from .cli_common import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, _fail, _shown_number, _write_json
from .cli_sample import _sample_parser, sample
from .cli_train_heads import _train_heads_parser, train_heads_command

__all__ = ["main", "build_parser"]

# ------------------------------------------------------------------------------------------------------------------
# s2m evaluate


def _evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="score a folder of images against a target with an attribute evaluator",
        description=(
            "Score a folder of images (e.g. written by `s2m sample`) against a target with an attribute evaluator "
            "(an AttributeEvaluator saved with save_pretrained, or a transformers image-classification model folder "
            "with --label_attributes mapping its labels to attribute sets): the share of images it judges on target "
            "(the summed probability of the classes whose attribute set satisfies the target above --threshold), "
            "and with --reference the Frechet distance between the evaluator's features of the images and of "
            "reference images. Prints the result and writes it as JSON."
        ),
        epilog=(
            "examples:\n"
            '  s2m evaluate --images samples/ --target "A & B & ~C" \\\n'
            "      --evaluator s2m_diffusers/demo/pretrained/digits7to3/evaluator\n"
            '  s2m evaluate --images samples/ --target "A & ~B" --evaluator my-evaluator --reference real/ab/\n'
            '  s2m evaluate --images samples/ --target "smiling & ~male" --evaluator my-vit-classifier \\\n'
            """      --label_attributes '{"smiling_man": ["smiling", "male"], "smiling_woman": ["smiling"], """
            """"neutral_man": ["male"], "neutral_woman": []}'\n"""
            "Exit status: 0 done, 2 invalid input."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images to score")
    p.add_argument("--target", required=True, help="the target, e.g. 'a & ~b', over the evaluator's attributes")
    p.add_argument(
        "--evaluator",
        required=True,
        metavar="PATH",
        help="AttributeEvaluator folder (save_pretrained), or a transformers image-classification model folder "
        "(with its preprocessor_config.json, if any; needs --label_attributes and "
        "pip install 's2m-diffusers[transformers]')",
    )
    p.add_argument(
        "--label_attributes",
        "--label-attributes",
        dest="label_attributes",
        default=None,
        metavar="JSON",
        help="for a transformers classifier: the attribute set of each of its labels, as JSON or a JSON file, e.g. "
        '\'{"smiling_man": ["smiling", "male"], "neutral_woman": []}\' (every label mapped; [] for none)',
    )
    p.add_argument("--reference", default=None, metavar="DIR", help="folder of reference images for the distance")
    p.add_argument(
        "--threshold", type=float, default=0.5, help="probability above which an image is on target (default 0.5)"
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="PATH",
        help="JSON file for the result, or a folder to write evaluation.json into (default: DIR.evaluation.json, "
        "beside the images: the folder of an `s2m sample` run is left as that run wrote it)",
    )
    return p


def evaluate(args: argparse.Namespace) -> int:
    """Run `s2m evaluate`."""
    from .data import load_image_folder
    from .evaluation import (
        check_sample_folder,
        evaluator_features,
        folder_image_size,
        formula_accuracy,
        frechet_distance,
        load_evaluator,
        load_sample_folder,
    )

    if not os.path.isdir(args.images):
        return _fail(f"--images {args.images!r} does not exist or is not a folder of images.", EXIT_USAGE)
    try:
        check_sample_folder(args.images)
    except ValueError as err:
        return _fail(f"--images: {err}", EXIT_USAGE)
    try:
        label_attributes = None if args.label_attributes is None else _read_label_attributes(args.label_attributes)
        try:
            evaluator = load_evaluator(args.evaluator, label_attributes)
        except ValueError as err:
            return _fail(re.sub(r"\blabel_attributes\b", "--label_attributes", f"--evaluator: {err}"), EXIT_USAGE)
        size, channels = evaluator.config.sample_size, evaluator.config.in_channels
        if size is None:  # a classifier with an image processor reads the images at their own size
            size = folder_image_size(args.images)
        images = load_sample_folder(args.images, size, channels)
        accuracy = formula_accuracy(evaluator, images, args.target, args.threshold)
        result = {
            "images": args.images,
            "num_images": int(len(images)),
            "target": args.target,
            "evaluator": args.evaluator,
            "threshold": args.threshold,
            "accuracy": accuracy,
        }
        if label_attributes is not None:  # a transformers classifier: how its labels were read
            result["label_attributes"] = dict(zip(evaluator.config.labels, evaluator.config.class_attributes))
        if args.reference is not None:
            if evaluator.config.sample_size is None:
                size = folder_image_size(args.reference)
            reference = load_image_folder(args.reference, size, channels)
            result["reference"] = args.reference
            result["num_reference"] = int(len(reference))
            result["frechet_distance"] = frechet_distance(
                evaluator_features(evaluator, images), evaluator_features(evaluator, reference)
            )
    except (OSError, ValueError, ImportError) as err:  # ImportError: a missing extra, named in the message
        return _fail(str(err), EXIT_USAGE)
    output = _evaluation_path(args.output, args.images)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    _write_json(output, result)
    line = f"accuracy {accuracy:.4f} on {result['num_images']} images for {args.target!r}"
    if "frechet_distance" in result:
        line += f", Frechet distance {result['frechet_distance']:.4g} to {result['num_reference']} reference images"
    print(f"{line} (written to {output})")
    return EXIT_OK


def _read_label_attributes(text: str) -> dict:
    """`--label_attributes`: JSON text, or the path of a JSON file, mapping each label to a list of attributes."""
    source = "--label_attributes"
    if os.path.isfile(text):
        source += f" file {text!r}"
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        mapping = json.loads(text)
    except ValueError as err:
        raise ValueError(
            f"{source} is neither a JSON file nor JSON text ({err}); give the attribute set of each label, e.g. "
            '\'{"smiling_man": ["smiling", "male"], "neutral_woman": []}\'.'
        ) from None
    if not isinstance(mapping, dict):
        raise ValueError(
            f"{source} must be a JSON object mapping each label to a list of attributes, e.g. "
            f'{{"smiling_man": ["smiling", "male"]}}; got {type(mapping).__name__}.'
        )
    return mapping


def _evaluation_path(output: str | None, images: str) -> str:
    """Where `s2m evaluate` writes: `--output` (a file, or a folder: its evaluation.json), else a file beside the
    images folder, ``DIR.evaluation.json``."""
    if output is None:
        return os.path.normpath(images) + ".evaluation.json"
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        return os.path.join(output, "evaluation.json")
    return output


# ------------------------------------------------------------------------------------------------------------------
# s2m demo


def _demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="sample all 7 Digits-7to3 combinations with the shipped GAN and DDPM (offline, under a minute on a CPU)",
        description=(
            "Run S2M sampling on Digits-7to3 (scikit-learn's digits 0-6 turned into the 7 non-empty combinations "
            "of attributes A, B, C) with the shipped weights: a DCGAN and a DDPM (sampled as DDIM), each with "
            "its trained heads. Samples every combination with each generator, scores the images with the shipped "
            "evaluator, and writes grid.png (one labelled row per combination, one column block per generator), "
            "report.md and report.json (per generator and combination: accuracy, proposals per image, acceptance "
            "rate, seconds). Runs offline in under a minute on 2 CPU cores."
        ),
        epilog=(
            "examples:\n"
            "  s2m demo\n"
            "  s2m demo --output demo/ --num-images 16 --seed 1\n"
            "  s2m demo --retrain          # retrain both heads first (a few minutes more)\n"
            "\n"
            "--retrain retrains the heads only (with s2m_diffusers.demo.train_demo_heads, as in\n"
            "examples/train_demo_heads.py); the generators and the evaluator stay the shipped ones, as retraining\n"
            "them takes much longer (examples/train_gan.py, examples/train_ddpm.py, examples/train_evaluator.py)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", default="s2m-demo", metavar="DIR", help="folder for the results (default: s2m-demo)")
    p.add_argument("--num-images", type=int, default=16, metavar="N", help="images per combination (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--retrain",
        action="store_true",
        help="retrain the heads of both generators first (heads only, into DIR/heads_*; generators stay shipped)",
    )
    p.add_argument(
        "--retrain-steps", type=int, default=1000, metavar="N", help="training steps per heads with --retrain"
    )
    p.add_argument(
        "--generators", nargs="+", choices=("gan", "ddpm"), default=["gan", "ddpm"], help="which generators (both)"
    )
    p.add_argument(
        "--num-threads",
        type=int,
        default=1,
        metavar="N",
        help="torch CPU threads (default: 1; the models are tiny, and more threads on a busy CPU slow them down)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def demo(args: argparse.Namespace) -> int:
    """Run `s2m demo`."""
    import torch

    from .demo import run_demo

    if args.num_images < 1:
        return _fail(f"--num-images must be at least 1, got {args.num_images}.", EXIT_USAGE)
    if args.retrain_steps < 1:
        return _fail(f"--retrain-steps must be at least 1, got {args.retrain_steps}.", EXIT_USAGE)
    if args.num_threads < 1:
        return _fail(f"--num-threads must be at least 1, got {args.num_threads}.", EXIT_USAGE)
    torch.set_num_threads(args.num_threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        report = run_demo(
            args.output,
            num_images=args.num_images,
            seed=args.seed,
            retrain=args.retrain,
            generators=args.generators,
            retrain_steps=args.retrain_steps,
            progress=not args.quiet,
        )
    except (OSError, ValueError) as err:
        return _fail(str(err), EXIT_USAGE)
    print(f"{'generator':<10} {'target':<14} {'accuracy':>8} {'prop/img':>9} {'accept':>7} {'seconds':>8}")
    for r in report["rows"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(
            f"{r['generator']:<10} {r['target']:<14} {acc:>8} {r['proposals_per_image']:>9.1f} "
            f"{_shown_number(r['acceptance_rate']):>7} {r['seconds']:>8.1f}"
        )
    for g, s in report["summary"].items():
        acc = "-" if s["mean_accuracy"] is None else f"{s['mean_accuracy']:.3f}"
        print(
            f"{g}: mean accuracy {acc}, {s['mean_proposals_per_image']:.1f} proposals per image, {s['seconds']:.1f} s"
        )
    paths = report["paths"]
    print(f"wall time {report['wall_seconds']:.1f} s")
    print(f"grid:   {paths['grid']}\nreport: {paths['markdown']}\njson:   {paths['json']}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------------------
# Registry and entry point

# (parser function, run function) per subcommand; add a subcommand by writing the two and listing them here.
COMMANDS: list[tuple[Callable, Callable[[argparse.Namespace], int]]] = [
    (_sample_parser, sample),
    (_train_heads_parser, train_heads_command),
    (_evaluate_parser, evaluate),
    (_demo_parser, demo),
]


def build_parser() -> argparse.ArgumentParser:
    """The `s2m` argument parser with every subcommand of ``COMMANDS``."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="s2m",
        description=(
            "S2M sampling for diffusers: images that hold any combination of attributes, from a pretrained "
            "generator and heads trained on single-positive labels."
        ),
        epilog="Run `s2m COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"s2m-diffusers {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_parser, run in COMMANDS:
        add_parser(subparsers).set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `s2m` console script; returns the exit status.

    Errors end with a one-line message and a non-zero status, never a traceback: the commands report what they
    expect (invalid input: 2, budget: 1), and anything else is reported as an unexpected error (3) with its type and
    message; set ``S2M_TRACEBACK=1`` to see where it arose. Warnings are printed as ``s2m: warning: ...``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    with _warnings_as_messages():
        try:
            code = args.func(args)
        except KeyboardInterrupt:
            code = _fail("interrupted; nothing was left half-written.", 130)
        except Exception as err:
            if os.environ.get("S2M_TRACEBACK"):
                raise
            code = _fail(
                f"{type(err).__name__}: {err} (an unexpected error: set S2M_TRACEBACK=1 to see where it arose, and "
                "please report it)",
                EXIT_INTERNAL,
            )
    _end_processes()
    return code


@contextlib.contextmanager
def _warnings_as_messages() -> Iterator[None]:
    """Print warnings as ``s2m: warning: MESSAGE``, without the file and line of the code that warned."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"s2m: warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _end_processes() -> None:
    """Under `accelerate launch`: wait for every process, then close the process group (a process that exits while
    the others still use it can abort them)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
