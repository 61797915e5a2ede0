"""What the `s2m` subcommands share (`s2m_diffusers.cli`, `cli_sample`, `cli_train_heads`): exit statuses, the error
line, an argparse type, the scheduler names `--help` shows without importing torch, how JSON is written and how a
statistic is shown."""

from __future__ import annotations

import argparse
import sys

from .utils import jsonable, write_json_atomically

EXIT_OK, EXIT_BUDGET, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
# diffusers' `get_scheduler` names (`training.LR_SCHEDULERS`; here so that `--help` imports no torch)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _float_or_auto(value: str) -> float | str:
    """An argparse type: ``"auto"`` or a number."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def _fail(message: str, code: int) -> int:
    print(f"s2m: error: {message}", file=sys.stderr)
    return code


def _write_json(path: str, data: dict) -> None:
    write_json_atomically(path, jsonable(data))


def _shown_number(value) -> str:
    """A statistic for the summary line: 3 significant digits, or ``n/a`` where the run has none (e.g. no
    acceptance rate when no proposal was judged)."""
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"
