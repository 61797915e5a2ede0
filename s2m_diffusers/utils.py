"""Small helpers shared by the library and the example scripts.

- [`write_text_atomically`] (and [`write_json_atomically`] on top of it): **the** atomic file writer.
- [`save_folder_atomically`] (and [`move_into_place`], [`save_pretrained_atomically`] on top of it): **the** atomic
  folder writer: a folder is written beside its destination, then moved into place by renames.
- [`module_device_dtype`]: where a module's weights live.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "jsonable",
    "module_device_dtype",
    "move_into_place",
    "save_folder_atomically",
    "save_pretrained_atomically",
    "staging_folder",
    "write_json_atomically",
    "write_text_atomically",
]

INDEX_FILE = "model_index.json"  # moved last: a pipeline folder's index never points at entries not yet in place


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


# ----- files ----------------------------------------------------------------------------------------------------
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


# ----- folders --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def staging_folder(destination: str | os.PathLike) -> Iterator[str]:
    """A fresh, empty folder beside `destination` (same file system, so that moving it is a rename), removed with
    whatever is left in it when the block ends."""
    destination = os.path.abspath(os.fspath(destination))
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.tmp-", dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(source: str | os.PathLike, destination: str | os.PathLike, replace: bool = False) -> None:
    """Move a freshly written folder `source` to `destination`.

    Args:
        source (`str`): the written folder; it is gone afterwards.
        destination (`str`): where it goes.
        replace (`bool`, defaults to `False`): `True`: `destination` becomes exactly `source` (an existing folder
            there is removed first). `False`: one rename when `destination` is new or empty, else entry by entry,
            replacing entries of the same name and leaving the others, with `model_index.json` last.
    """
    source, destination = os.fspath(source), os.fspath(destination)
    if replace:
        if os.path.exists(destination):
            shutil.rmtree(destination)
        os.replace(source, destination)
        return
    if not os.path.exists(destination) or (os.path.isdir(destination) and not os.listdir(destination)):
        if os.path.isdir(destination):
            os.rmdir(destination)
        os.replace(source, destination)
        return
    if not os.path.isdir(destination):
        raise ValueError(f"save_directory {destination!r} exists and is not a folder.")
    entries = sorted(os.listdir(source), key=lambda name: name == INDEX_FILE)
    for name in entries:
        src, dst = os.path.join(source, name), os.path.join(destination, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=destination)
            os.replace(dst, os.path.join(old, name))
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)


def _make_readable(folder: str) -> None:
    """Folders 0o755 and files 0o644 (`tempfile.mkdtemp` makes a folder only its owner can read)."""
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def save_folder_atomically(write: Callable[[str], Any], destination: str | os.PathLike, replace: bool = False) -> str:
    """Write a folder with `write(tmp)` into a staging folder beside `destination`, make it readable by all, then
    [`move_into_place`]: a crash mid-write leaves `destination` as it was, never half written.

    Args:
        write (`Callable[[str], Any]`): writes the folder's content into the folder it is given, e.g.
            `model.save_pretrained`.
        destination (`str`): the folder.
        replace (`bool`, defaults to `False`): see [`move_into_place`]; `False` keeps entries of an existing
            `destination` that `write` does not write (e.g. checkpoints beside saved weights).

    Returns:
        `str`: `destination` as an absolute path.
    """
    destination = os.path.abspath(os.fspath(destination))
    with staging_folder(destination) as tmp:
        write(tmp)
        _make_readable(tmp)
        move_into_place(tmp, destination, replace=replace)
    return destination


def save_pretrained_atomically(obj, output_dir: str | os.PathLike) -> None:
    """`obj.save_pretrained` into a temporary folder beside `output_dir`, then swap it in (files readable by all).

    A crash mid-save leaves the previous `output_dir` intact, never a half-written one.
    """
    save_folder_atomically(obj.save_pretrained, output_dir, replace=True)


# ----- modules --------------------------------------------------------------------------------------------------
def module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """`(device, dtype)` of a module's weights: a diffusers `ModelMixin`'s own `.device` and `.dtype`, else those of
    its first parameter, else `(cpu, float32)` for a module without parameters.

    Args:
        module (`torch.nn.Module`): the module.

    Returns:
        `tuple[torch.device, torch.dtype]`.
    """
    import torch  # noqa: F811  (here, not above: `s2m --help` imports this module and need not load torch)
    from diffusers import ModelMixin

    if isinstance(module, ModelMixin):
        return module.device, module.dtype
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32
