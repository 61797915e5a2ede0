"""Small helpers shared by the library and the example scripts."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

__all__ = ["jsonable", "save_pretrained_atomically", "write_json_atomically", "write_text_atomically"]


def jsonable(value):
    """`value` as strict JSON: non-finite floats become `None`, tuples lists, tensors and arrays lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    return value


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: never a half-written file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomically(path: str | os.PathLike, data) -> None:
    """`data` as indented JSON (and a final newline), written with `write_text_atomically`."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


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
