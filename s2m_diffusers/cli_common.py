"""What the `s2m` subcommands share (`s2m_diffusers.cli`, `s2m_diffusers.cli_train_heads`): exit statuses, the error
line, an argparse type, and the scheduler names `--help` shows without importing torch."""

from __future__ import annotations

import argparse
import sys

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
