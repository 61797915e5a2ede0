"""Small helpers shared by the library and the example scripts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

__all__ = ["save_pretrained_atomically", "write_json_atomically"]


def write_json_atomically(path: str | os.PathLike, data) -> None:
    """Write `data` as indented JSON to a temporary file beside `path`, then rename it over `path`."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_pretrained_atomically(obj, output_dir: str | os.PathLike) -> None:
    """`obj.save_pretrained` into a temporary folder beside `output_dir`, then swap it in (files readable by all).

    A crash mid-save leaves the previous `output_dir` intact, never a half-written one.
    """
    output_dir = os.fspath(output_dir)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".staging-")
    obj.save_pretrained(staging)
    for root, _, files in os.walk(staging):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.replace(staging, output_dir)
