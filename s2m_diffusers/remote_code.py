"""The layout of a saved S2M pipeline that diffusers, the Hub and `diffusers-cli` load (DESIGN.md, diffusers 0.42.1).

`DiffusionPipeline.save_pretrained` records a component defined outside diffusers and transformers under its full
module path, e.g. ``"heads": ["s2m_diffusers.models.heads", "S2MHeads"]``. diffusers 0.42.1 loads such a component
only when that module is already imported, and a Hub repo in that layout does not load at all: at download time
diffusers checks that every component's module is a file of the repo (``heads/s2m_diffusers.models.heads.py``).

[`write_remote_code_layout`] turns a saved folder into a layout that loads everywhere:

- ``model_index.json`` names the pipeline ``["pipeline", "S2MPipeline"]`` and each third-party component
  ``["<shim>", "ClassName"]``;
- ``pipeline.py`` beside it and ``<component>/<shim>.py`` in each such component's folder are one-line *shims*
  that import the class from the installed package (``from s2m_diffusers.models.heads import S2MHeads``). They hold
  no model code, so the code that runs is that of the installed, pinned `s2m-diffusers`.

``DiffusionPipeline.from_pretrained(dir_or_repo, trust_remote_code=True)`` and ``diffusers-cli run --model ...
--trust-remote-code`` load that layout in a process that imported only diffusers. `S2MPipeline.from_pretrained`
loads it without remote code: [`resolve_remote_code_layout`] reads the shims back (it parses them, never runs
them) and names the installed modules again. `s2m_diffusers.hub` saves, checks and uploads such folders.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .utils import write_text_atomically

__all__ = [
    "SHIM_HEADER",
    "PIPELINE_FILE",
    "shim_module_name",
    "read_shim",
    "is_component_entry",
    "loadable_library",
    "write_remote_code_layout",
    "resolve_remote_code_layout",
    "custom_component_files",
]

SHIM_HEADER = "# s2m-diffusers shim: imports the class from the installed package; it holds no model code.\n"
_SHIM_IMPORT = re.compile(r"^from ([A-Za-z_][\w.]*) import ([A-Za-z_]\w*)", re.MULTILINE)
PIPELINE_FILE = "pipeline"  # -> pipeline.py beside model_index.json

# the libraries whose components diffusers loads by itself; `save_pretrained` records any other component under its
# full module path (e.g. ``s2m_diffusers.models.heads``), which gets a shim
_LOADED_BY_DIFFUSERS = ("diffusers", "transformers", "onnxruntime")


def loadable_library(library: str) -> bool:
    """Whether diffusers loads components of ``library`` by itself (diffusers, transformers, a diffusers pipeline)."""
    from diffusers import pipelines

    return library.split(".")[0] in _LOADED_BY_DIFFUSERS or hasattr(pipelines, library)


def shim_module_name(module: str) -> str:
    """The shim's module name for a component class defined in ``module``: ``s2m_diffusers.models.heads`` ->
    ``s2m_diffusers_models_heads``. Distinct modules get distinct names (diffusers copies every local shim into one
    folder of its module cache)."""
    return re.sub(r"\W", "_", module)


def _shim_source(module: str, class_name: str) -> str:
    return f"{SHIM_HEADER}from {module} import {class_name}  # noqa: F401\n"


def read_shim(path: str) -> tuple[str, str] | None:
    """``(module, class_name)`` of a shim written by this module, or `None` for any other file. Never executes it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    if not text.startswith(SHIM_HEADER):
        return None
    match = _SHIM_IMPORT.search(text)
    return (match.group(1), match.group(2)) if match else None


def write_remote_code_layout(folder: str | os.PathLike, pipeline_module: str, pipeline_class: str) -> dict:
    """Rewrite a folder saved by `DiffusionPipeline.save_pretrained` into the layout that loads with
    ``trust_remote_code=True`` and from the Hub.

    Args:
        folder (`str`): the saved pipeline folder (holding `model_index.json`).
        pipeline_module (`str`), pipeline_class (`str`): where the pipeline class lives in the installed package,
            e.g. ``"s2m_diffusers.pipeline_s2m"``, ``"S2MPipeline"``.

    Returns:
        `dict`: the new `model_index.json` content.
    """
    folder = os.fspath(folder)
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        config = json.load(f)
    config["_class_name"] = [PIPELINE_FILE, pipeline_class]
    write_text_atomically(os.path.join(folder, f"{PIPELINE_FILE}.py"), _shim_source(pipeline_module, pipeline_class))
    for name, value in list(config.items()):
        if name.startswith("_") or not is_component_entry(value):
            continue
        library, class_name = value
        if library is None or loadable_library(library):
            continue
        component_folder = os.path.join(folder, name)
        if not os.path.isdir(component_folder):
            continue  # not saved (diffusers then records [null, null] itself)
        shim = shim_module_name(library)
        write_text_atomically(os.path.join(component_folder, f"{shim}.py"), _shim_source(library, class_name))
        config[name] = [shim, class_name]
    write_text_atomically(index_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def is_component_entry(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and (value[0] is None or isinstance(value[0], str))
        and (value[1] is None or isinstance(value[1], str))
    )


def resolve_remote_code_layout(config: dict, folder: str | os.PathLike) -> dict:
    """Undo [`write_remote_code_layout`] on a loaded `model_index.json` dict, so that the pipeline class and its
    components resolve to the installed package without running remote code.

    Only shims written by this module are read (parsed, not executed); any other entry is returned unchanged.

    Args:
        config (`dict`): the `model_index.json` content.
        folder (`str`): the folder it was read from.

    Returns:
        `dict`: a new dict with ``_class_name`` a plain class name and the components' installed module paths.
    """
    folder = os.fspath(folder)
    config = dict(config)
    class_name = config.get("_class_name")
    if isinstance(class_name, (list, tuple)) and len(class_name) == 2 and isinstance(class_name[0], str):
        if read_shim(os.path.join(folder, f"{class_name[0]}.py")) is not None:
            config["_class_name"] = class_name[1]
    for name, value in config.items():
        if name.startswith("_") or not is_component_entry(value) or value[0] is None:
            continue
        shim = read_shim(os.path.join(folder, name, f"{value[0]}.py"))
        if shim is not None:
            config[name] = [shim[0], shim[1]]
    return config


def custom_component_files(folder: str | os.PathLike) -> list[str]:
    """Every file of a saved folder, relative and '/'-separated, as the Hub lists a repo's files."""
    folder = os.fspath(folder)
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(out)
