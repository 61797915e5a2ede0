"""Saving an S2M pipeline so that diffusers, the Hub and `diffusers-cli` can load it (DESIGN.md, diffusers 0.42.1).

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
them) and names the installed modules again.

[`model_card`] (`s2m_diffusers.cards`, re-exported here) writes the repo's README: the attributes, a summary of the
training data, and loading snippets with a pinned ``revision=``. [`upload_folder`] uploads a saved folder with any
object that has `HfApi`'s ``create_repo``/``upload_folder``/``upload_file`` methods, so that the upload can be tested
offline.

`S2MPipeline`'s loaders are thin: [`resolve_local_config`] (``load_config``), [`snapshot_path`] (``from_pretrained``),
[`save_pipeline`] (``save_pretrained``), [`push_pipeline`] (``push_to_hub``) and [`save_and_push`] (both, under one
lock) hold what they do.
[`load_generator_folder`] loads the pretrained generator (a diffusers pipeline folder or a GAN model folder) that an
S2M pipeline is built around.

A saved folder is whole or absent: [`save_pipeline`] writes it beside its destination, ends with a manifest
(`s2m_manifest.json`: the components, and the size and SHA-256 of every file but `model_index.json`, whose settings
may be edited, and the model card) and swaps it in whole
([`~s2m_diffusers.utils.replace_folder_atomically`]). [`check_pipeline_folder`] refuses, before anything is loaded, a
folder whose files differ from its manifest (components of different saves), a component folder that is missing,
weights in pickle form, and classes that the installed packages do not define; it warns about a folder saved by newer
versions.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from .cards import model_card
from .utils import (
    check_free_space,
    folder_lock,
    hub_repo_id,
    no_space_error,
    replace_folder_atomically,
    weights_bytes,
    write_text_atomically,
)

__all__ = [
    "SHIM_HEADER",
    "shim_module_name",
    "write_remote_code_layout",
    "resolve_remote_code_layout",
    "custom_component_files",
    "model_card",
    "upload_folder",
    "resolve_local_config",
    "snapshot_path",
    "save_pipeline",
    "check_save_directory",
    "write_manifest",
    "check_pipeline_folder",
    "MANIFEST_FILE",
    "push_pipeline",
    "save_and_push",
    "load_generator_folder",
    "generator_image_shape",
    "hub_repo_id",
    "drop_local_paths",
]

SHIM_HEADER = "# s2m-diffusers shim: imports the class from the installed package; it holds no model code.\n"
_SHIM_IMPORT = re.compile(r"^from ([A-Za-z_][\w.]*) import ([A-Za-z_]\w*)", re.MULTILINE)
PIPELINE_FILE = "pipeline"  # -> pipeline.py beside model_index.json
INDEX_FILE = "model_index.json"
MANIFEST_FILE = "s2m_manifest.json"  # written last: the components, and the size and SHA-256 of their files
CARD_FILE = "README.md"  # not hashed: `upload_folder` rewrites it with the pinned revision
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# a training run's state inside the pipeline folder it writes (`s2m train-heads --checkpointing_steps`): kept by a
# save like any file that is not part of the pipeline, and never uploaded
TRAINING_FOLDER = "checkpoints"
# what the pipeline measured once and keeps (`S2MPipeline.write_extra_files`: the dv_strength "auto" values), loaded by
# `from_pretrained`: always the pipeline's,
# replaced by every save and covered by its manifest
FITS_FOLDER = "fits"


# the libraries whose components diffusers loads by itself; `save_pretrained` records any other component under its
# full module path (e.g. ``s2m_diffusers.models.heads``), which gets a shim
_LOADED_BY_DIFFUSERS = ("diffusers", "transformers", "onnxruntime")


def _loadable_library(library: str) -> bool:
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


def _read_shim(path: str) -> tuple[str, str] | None:
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
        if name.startswith("_") or not _is_component_entry(value):
            continue
        library, class_name = value
        if library is None or _loadable_library(library):
            continue
        component_folder = os.path.join(folder, name)
        if not os.path.isdir(component_folder):
            continue  # not saved (diffusers then records [null, null] itself)
        shim = shim_module_name(library)
        write_text_atomically(os.path.join(component_folder, f"{shim}.py"), _shim_source(library, class_name))
        config[name] = [shim, class_name]
    write_text_atomically(index_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def _is_component_entry(value: Any) -> bool:
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
        if _read_shim(os.path.join(folder, f"{class_name[0]}.py")) is not None:
            config["_class_name"] = class_name[1]
    for name, value in config.items():
        if name.startswith("_") or not _is_component_entry(value) or value[0] is None:
            continue
        shim = _read_shim(os.path.join(folder, name, f"{value[0]}.py"))
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


# ------------------------------------------------------------------------------------------------------------------
# Saving and loading an S2M pipeline (the bodies of `S2MPipeline`'s `load_config`, `from_pretrained`,
# `save_pretrained` and `push_to_hub`)


def resolve_local_config(config_out, pretrained_model_name_or_path: str | os.PathLike, pipeline_class: type):
    """Post-process what `ConfigMixin.load_config` returned for a local pipeline folder: read the shims of the
    remote-code layout back to the installed modules (parsed, never executed, see [`resolve_remote_code_layout`])
    and import those of s2m_diffusers, so that `S2MPipeline.from_pretrained` needs no ``trust_remote_code``.

    Args:
        config_out (`dict` or `tuple`): the return value of `load_config` (the config, or a tuple starting with it).
        pretrained_model_name_or_path (`str`): the folder (or a file in it) the config was read from.
        pipeline_class (`type`): the pipeline class that loads it (`S2MPipeline`), whose components and subclasses
            the folder must name.

    Returns:
        `config_out` with the config resolved; unchanged when there is no `model_index.json` beside it.

    Raises:
        ValueError: the folder fails [`check_pipeline_folder`].
    """
    path = os.fspath(pretrained_model_name_or_path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        return config_out
    raw = config_out[0] if isinstance(config_out, tuple) else config_out
    check_pipeline_folder(folder, pipeline_class, raw)
    config = resolve_remote_code_layout(raw, folder)
    for value in config.values():
        # diffusers resolves a component's module from `sys.modules` only; ours may be imported here.
        if _is_component_entry(value) and str(value[0]).startswith("s2m_diffusers."):
            importlib.import_module(value[0])
    return (config, *config_out[1:]) if isinstance(config_out, tuple) else config


def snapshot_path(pretrained_model_name_or_path: str | os.PathLike, kwargs: dict) -> str:
    """The local folder of a saved pipeline: the path itself when it is a folder, else the Hub repo fetched with
    `huggingface_hub.snapshot_download`.

    Args:
        pretrained_model_name_or_path (`str`): a folder or a Hub repo id.
        kwargs (`dict`): the keyword arguments of `from_pretrained`. For a download, ``revision`` is taken out of
            it (popped) and ``cache_dir``, ``token``, ``local_files_only`` and ``proxies`` are read; the rest is left
            for `DiffusionPipeline.from_pretrained`.

    Returns:
        `str`: the folder.
    """
    path = os.fspath(pretrained_model_name_or_path)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            path,
            revision=kwargs.pop("revision", None),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=kwargs.get("local_files_only", False),
            proxies=kwargs.get("proxies"),
        )
    return path


def save_pipeline(
    pipeline,
    save_directory: str | os.PathLike,
    *,
    safe_serialization: bool = True,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
    training_data: Mapping[str, Any] | str | None = None,
    extra_files: Mapping[str, str] | None = None,
    license: str | None = None,
    base_model: str | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> str:
    """Save an S2M pipeline in the layout that loads with `S2MPipeline.from_pretrained`, with
    `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`, with `diffusers-cli run` and from the Hub, with
    a model card (README.md). Weights are safetensors.

    The folder is written whole beside its destination, ends with the manifest ([`write_manifest`]), and replaces
    the destination in one step ([`~s2m_diffusers.utils.replace_folder_atomically`]): a kill at any moment leaves the
    previous pipeline (or no folder) or the new one, never a mix, and the temporaries of a killed save are removed by
    the next one. Of an existing pipeline folder, the entries that are not part of a pipeline (notes, checkpoints)
    are carried over; its components, ``fits/`` and every file its manifest lists are not. Saves into one folder
    take turns ([`~s2m_diffusers.utils.folder_lock`], held from that decision through the final rename): two saves
    at once end as the later one, whole, never a mix of both.

    Args:
        pipeline ([`~s2m_diffusers.pipeline_s2m.S2MPipeline`]): the pipeline. Its ``write_extra_files(folder)``,
            when it has one, writes further files into the folder before the manifest is written (they are covered
            by it).
        save_directory (`str`): the folder: new, empty, or a saved pipeline.
        safe_serialization (`bool`, defaults to `True`): weights are saved as safetensors whatever it says;
            `False` (pickle, in diffusers) warns and saves safetensors anyway, since loading refuses pickle.
        variant (`str`, *optional*), max_shard_size (*optional*): as in `DiffusionPipeline.save_pretrained`.
        training_data (`dict` or `str`, *optional*): a description of the heads' training data for the card.
        extra_files (`Mapping[str, str]`, *optional*): further text files, ``{name: text}``, written with the
            pipeline and covered by its manifest (e.g. ``metrics.json``).
        license (`str`, *optional*), base_model (`str`, *optional*), sampling (`Mapping`, *optional*): the card's
            metadata and the call settings its snippets show; see [`model_card`]. They are recorded in the manifest,
            so that saving a loaded pipeline again keeps them.

    Returns:
        `str`: the folder, as an absolute path.

    Raises:
        ValueError: `save_directory` holds files and is not a saved pipeline.
        OSError: (``ENOSPC``) its file system has less free space than the weights need (before anything is written),
            or filled during the write (the partial write removed); the folder in place is as it was.
    """
    if not safe_serialization:
        warnings.warn(
            "safe_serialization=False: S2M pipelines are saved as safetensors only (loading refuses pickle, which "
            "runs code when it is read), so the weights are written as safetensors anyway. Leave "
            "safe_serialization at its default (True) to silence this warning.",
            UserWarning,
            stacklevel=3,
        )
    destination = os.path.abspath(os.fspath(save_directory))
    _pipeline_entries(destination)  # refused before anything is written
    card = _card_context(pipeline, license, base_model, sampling)
    part_of_old: set[str] = set()

    def write(folder: str) -> None:
        # under the folder's lock: what the folder holds now (another save may have just replaced it) decides which
        # of its entries are the old pipeline's (replaced) and which are the user's (kept)
        part_of_old.update(_pipeline_entries(destination))
        _write_pipeline_folder(pipeline, folder, variant, max_shard_size, training_data, extra_files, card)

    what = f"the {type(pipeline).__name__}"
    check_free_space(destination, weights_bytes(pipeline.components.values()), what)
    try:
        return replace_folder_atomically(write, destination, keep=lambda name: name not in part_of_old)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise no_space_error(destination, what) from err
        raise


def check_save_directory(save_directory: str | os.PathLike) -> None:
    """Raise before any work when a pipeline cannot be saved to `save_directory` (see [`save_pipeline`]): it exists
    and is not a folder, or holds files and is not a saved pipeline.

    Raises:
        ValueError: naming the folder and what to do.
    """
    _pipeline_entries(os.path.abspath(os.fspath(save_directory)))


def _pipeline_entries(folder: str) -> set[str]:
    """The top-level entries of an existing pipeline folder that belong to the pipeline (replaced by a save, not
    carried over): the index, manifest, card and shim, ``fits/``, every component the index names and every entry
    the manifest lists. Raises for an existing folder that holds files but is not a saved pipeline."""
    names = {INDEX_FILE, MANIFEST_FILE, CARD_FILE, f"{PIPELINE_FILE}.py", FITS_FOLDER}
    if not os.path.lexists(folder):
        return names
    if not os.path.isdir(folder):
        raise ValueError(f"save_directory {folder!r} exists and is not a folder. Choose another path.")
    entries = os.listdir(folder)
    if not entries or entries == [TRAINING_FOLDER]:  # new, or holding only the checkpoints of the run that saves
        return names
    try:
        with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as f:
            index = json.load(f)
        if not isinstance(index, dict):
            raise ValueError(f"a JSON {_json_kind(index)}, not an object")
    except (OSError, ValueError) as err:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"save_directory {folder!r} holds files ({shown}) but no saved pipeline (no readable {INDEX_FILE}: "
            f"{err}); a save replaces its folder as a whole. Save into a new or empty folder, or into a saved "
            "pipeline."
        ) from None
    names |= {k for k, v in index.items() if not k.startswith("_") and _is_component_entry(v)}
    names |= {path.split("/")[0] for path in _read_manifest(folder).get("files", {})}
    return names


def _write_pipeline_folder(
    pipeline,
    folder: str,
    variant: str | None,
    max_shard_size: int | str | None,
    training_data: Mapping[str, Any] | str | None,
    extra_files: Mapping[str, str] | None = None,
    card: Mapping[str, Any] | None = None,
) -> None:
    """`DiffusionPipeline.save_pretrained` into `folder` (the local paths diffusers records as ``_name_or_path``
    dropped), then the remote-code layout, the pipeline's extra files, ``extra_files``, the model card and, last, the
    manifest (with the card's metadata)."""
    from diffusers import DiffusionPipeline

    DiffusionPipeline.save_pretrained(
        pipeline, folder, safe_serialization=True, variant=variant, max_shard_size=max_shard_size
    )
    drop_local_paths(folder)
    write_remote_code_layout(folder, type(pipeline).__module__, type(pipeline).__name__)
    write_extra = getattr(pipeline, "write_extra_files", None)
    if callable(write_extra):
        write_extra(folder)
    for name, text in (extra_files or {}).items():
        write_text_atomically(os.path.join(folder, name), text)
    card = dict(card) if card is not None else _card_context(pipeline)
    write_text_atomically(os.path.join(folder, CARD_FILE), model_card(pipeline, training_data=training_data, **card))
    write_manifest(folder, card={k: v for k, v in card.items() if v})


def drop_local_paths(folder: str | os.PathLike) -> list[str]:
    """Remove the ``_name_or_path`` entries that name a local path (the folder a component was loaded from, which
    diffusers and transformers write into its config) from the JSON configs of a saved pipeline; a Hub repo id is
    kept (it is the component's base model). A saved pipeline is shared: where it was trained is nobody's business.

    Returns:
        `list[str]`: the configs rewritten, relative to `folder`.
    """
    folder = os.fspath(folder)
    changed = []
    for rel in _folder_files(folder):
        if not rel.endswith(".json"):
            continue
        path = os.path.join(folder, rel)
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict) or "_name_or_path" not in config:
            continue
        if hub_repo_id(config["_name_or_path"]) is not None:
            continue
        del config["_name_or_path"]
        write_text_atomically(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        changed.append(rel)
    return changed


# ------------------------------------------------------------------------------------------------------------------
# The manifest of a saved pipeline, and the checks before loading one


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_files(folder: str) -> list[str]:
    """Every file under `folder`, relative and '/'-separated, without `__pycache__` folders."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        out += [os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/") for name in files]
    return sorted(out)


def write_manifest(folder: str | os.PathLike, card: Mapping[str, Any] | None = None) -> dict:
    """Write `s2m_manifest.json`: the components `model_index.json` lists, the size and SHA-256 of every other file
    of a saved pipeline folder but the model card, and the versions that wrote it. [`save_pipeline`] writes it last;
    [`check_pipeline_folder`] compares the folder with it before loading, so that files of different saves are never
    loaded together. `model_index.json` is not hashed, so that its settings (``default_target``, ...) may be edited;
    its components must stay those of the manifest.

    Args:
        folder (`str`): the written pipeline folder.
        card (`Mapping`, *optional*): the card's metadata (``license``, ``base_model``, ``sampling``), kept so that a
            later save of the loaded pipeline writes the same card.

    Returns:
        `dict`: the manifest.
    """
    import diffusers

    import s2m_diffusers

    folder = os.fspath(folder)
    with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as f:
        components = _components(json.load(f))
    files = {
        rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": _sha256(os.path.join(folder, rel))}
        for rel in _folder_files(folder)
        if rel not in (MANIFEST_FILE, CARD_FILE, INDEX_FILE)
    }
    manifest = {
        "format": 1,
        "s2m_diffusers_version": s2m_diffusers.__version__,
        "diffusers_version": diffusers.__version__,
        "components": {k: list(v) for k, v in components.items()},
        "files": files,
    }
    if card:
        manifest["card"] = dict(card)
    write_text_atomically(os.path.join(folder, MANIFEST_FILE), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _read_manifest(folder: str) -> dict:
    """The manifest of `folder`; `{}` when there is none. Raises for one that cannot be read."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(
            f"The manifest {path!r} cannot be read ({err}): the folder was altered after it was saved. Save the "
            "pipeline again with S2MPipeline.save_pretrained, or restore the folder."
        ) from None
    return manifest


def _shown(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_pipeline_folder(folder: str | os.PathLike, pipeline_class: type, config: Any = None) -> None:
    """Refuse a saved S2M pipeline folder that cannot be loaded as one pipeline, before anything is loaded, in this
    order (the first problem found is the one named):

    - a `model_index.json` that is not a JSON object, or a setting of it of the wrong type ([`check_index`]);
    - a component that `model_index.json` lists whose folder is missing;
    - weights in pickle form (``.bin``, ``.pt``, ...) in a folder without safetensors weights: pickle runs code
      when it is read;
    - files that differ from the manifest or are missing (named: e.g. the one-line ``.py`` shims, which some
      download filters drop), or that lie in a component folder or ``fits/`` without being listed in it: parts of
      different saves, or a damaged folder;
    - a pipeline class or a component class that the installed packages do not define, or that the index names
      otherwise than the folder's shim (a shim that is missing is named as such);
    - components in the index other than those the manifest records.

    It warns about a folder without a manifest (saved by diffusers' own `save_pretrained` or an older
    s2m-diffusers: its parts cannot be checked) and about one saved by a newer diffusers or s2m-diffusers.

    Args:
        folder (`str`): the pipeline folder.
        pipeline_class (`type`): the class that loads it (`S2MPipeline`): its components, and the class (or a
            subclass) the folder must name.
        config (`Mapping`, *optional*): its `model_index.json` content, as read; read from the folder by default.

    Raises:
        ValueError: naming the file, the setting or the files that are wrong, and what to do.
    """
    folder = os.fspath(folder)
    if config is None:
        with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as f:
            config = json.load(f)
    check_index(config, os.path.join(folder, INDEX_FILE), pipeline_class)
    components = _components(config)
    _check_component_folders(folder, components)
    _check_no_pickle(folder, components)
    manifest = _read_manifest(folder)
    if manifest:
        _check_manifest_files(folder, manifest, config)
    _check_classes(folder, config, components, pipeline_class)
    if manifest:
        _check_manifest_components(folder, manifest, components)
    else:
        warnings.warn(
            f"{folder!r} has no {MANIFEST_FILE}: it was saved by diffusers' own save_pretrained or an s2m-diffusers "
            "older than 0.1, so whether its components belong together cannot be checked. Save it again with "
            "S2MPipeline.save_pretrained to add one.",
            UserWarning,
            stacklevel=3,
        )
    _warn_newer_versions(folder, config, manifest)


def _json_kind(value: Any) -> str:
    """How JSON names the type of a parsed value, for messages: ``"list"``, ``"string"``, ``"number"``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", tuple: "list", dict: "object"}.get(type(value), type(value).__name__)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# the settings `S2MPipeline` records in `model_index.json`: what each must be, and an example
_INDEX_SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_inference_steps": (_positive_int, "a positive integer, e.g. 25"),
    "latent_shape": (
        lambda v: v is None or (isinstance(v, list) and len(v) > 0 and all(_positive_int(s) for s in v)),
        "null or a list of positive integers, e.g. [4, 64, 64]",
    ),
    "proposal_kwargs": (lambda v: v is None or isinstance(v, dict), 'null or an object, e.g. {"prompt": "a photo"}'),
    "default_target": (lambda v: v is None or isinstance(v, str), 'null or a string, e.g. "a & ~b"'),
}


def check_index(config: Any, path: str, pipeline_class: type) -> None:
    """Refuse a `model_index.json` that is not a JSON object, a setting of `S2MPipeline` of the wrong type
    (``num_inference_steps`` a positive integer; ``latent_shape`` null or a list of positive integers;
    ``proposal_kwargs`` null or an object; ``default_target`` null or a string), and a component entry (``heads``,
    ``gan``, ``unet``, ...) that is not ``[library, class]`` (strings, or both null for a component not saved).

    Args:
        config: the parsed content of the file.
        path (`str`): the file, named in the message.
        pipeline_class (`type`): the class that loads it, whose ``_optional_components`` are the component keys.

    Raises:
        ValueError: naming the file, the key, the value and the fix.
    """
    restore = "restore the file from the saved pipeline, or save the pipeline again with S2MPipeline.save_pretrained"
    if not isinstance(config, Mapping):
        shown = json.dumps(config)[:80] if isinstance(config, (list, str, int, float, bool, type(None))) else config
        raise ValueError(
            f"{path} holds a JSON {_json_kind(config)} ({shown}), not an object: a pipeline's index is an object such "
            'as {"_class_name": ["pipeline", "S2MPipeline"], "heads": [...], "num_inference_steps": 25}. The file '
            f"was edited or replaced; {restore}."
        )
    for key, (valid, expected) in _INDEX_SETTINGS.items():
        if key in config and not valid(config[key]):
            raise ValueError(
                f"{path}: the setting {key!r} is {json.dumps(config[key])} (a {_json_kind(config[key])}); it must be "
                f"{expected}. Correct it in the file (or delete the line for the default), or {restore}."
            )
    for key in getattr(pipeline_class, "_optional_components", []):
        if key in config and not _is_component_entry(config[key]):
            raise ValueError(
                f"{path}: the component {key!r} is {json.dumps(config[key])}; a component entry is "
                f'["library", "ClassName"] (e.g. ["s2m_diffusers_models_heads", "S2MHeads"]), or [null, null] for '
                f"one that was not saved. Correct it in the file, or {restore}."
            )


def _components(config: Mapping[str, Any]) -> dict[str, list]:
    """The saved components of a `model_index.json`: ``{name: [library, class]}`` (optional ones left out)."""
    return {
        k: list(v) for k, v in config.items() if not k.startswith("_") and _is_component_entry(v) and v[0] is not None
    }


def _check_component_folders(folder: str, components: Mapping[str, Any]) -> None:
    missing = [name for name in components if not os.path.isdir(os.path.join(folder, name))]
    if missing:
        listed = ", ".join(f"{name} ({components[name][1]})" for name in missing)
        folders = ", ".join(f"{name}/" for name in missing)
        raise ValueError(
            f"The saved pipeline {folder!r} is incomplete: its {INDEX_FILE} lists the component(s) {listed}, but "
            f"the folder(s) {folders} are missing. A save was interrupted or the folder was copied in part: copy "
            "the whole folder again, or save the pipeline again with S2MPipeline.save_pretrained."
        )


def _check_no_pickle(folder: str, components: Mapping[str, Any]) -> None:
    for name in components:
        for root, dirs, files in os.walk(os.path.join(folder, name)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
            if not pickled or any(f.endswith(".safetensors") for f in files):
                continue
            sub = os.path.relpath(root, folder).replace(os.sep, "/")
            raise ValueError(
                f"{sub}/ of {folder!r} holds weights in pickle form ({', '.join(pickled)}) and no safetensors file. "
                "S2M pipelines read weights as safetensors only: unpickling a file runs code from it. If you trust "
                f"the file, convert it once: load it with `from_pretrained('{os.path.join(folder, sub)}', "
                f"use_safetensors=False)` on its class, save it with `save_pretrained` to the same folder, and "
                f"delete {', '.join(pickled)} (or save the whole pipeline again with S2MPipeline.save_pretrained)."
            )


def _installed_class(module: str, class_name: str):
    """The class `module.class_name` when `module` is installed and may be imported here (s2m_diffusers, diffusers,
    transformers, or a module already imported), else `None`."""
    root = module.split(".")[0]
    try:
        mod = sys.modules.get(module) or (
            importlib.import_module(module) if root in ("s2m_diffusers", "diffusers", "transformers") else None
        )
        if mod is None and "." not in module:  # a diffusers pipeline, saved under its pipelines module's name
            from diffusers import pipelines

            mod = getattr(pipelines, module, None)
    except ImportError:
        return None
    cls = getattr(mod, class_name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _check_classes(folder: str, config: Mapping[str, Any], components: Mapping[str, Any], pipeline_class) -> None:
    """The pipeline class and each component's class are defined by the installed packages, as the index names
    them (a shim of this folder imports the class the index names), the pipeline's being ``pipeline_class`` or a
    subclass of it."""
    index = os.path.join(folder, INDEX_FILE)
    name = config.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2 and isinstance(name[0], str):
        _check_shim_present(folder, f"{name[0]}.py", "pipeline", name[1])
        shim = _read_shim(os.path.join(folder, f"{name[0]}.py"))
        cls = _installed_class(*shim) if shim is not None and shim[1] == name[1] else None
    else:
        cls = _installed_class("s2m_diffusers", name) if isinstance(name, str) else None
    if cls is None or not issubclass(cls, pipeline_class):
        name = name[1] if isinstance(name, (list, tuple)) and len(name) == 2 else name
        raise ValueError(
            f"{index} names the pipeline class {name!r}, which is not S2MPipeline (or a subclass of it) in the "
            "installed packages: the folder is not an S2M pipeline, or its index was edited. S2MPipeline loads "
            "folders written by S2MPipeline.save_pretrained; other diffusers pipelines load with "
            "DiffusionPipeline.from_pretrained."
        )
    for key, (library, class_name) in components.items():
        shim = _read_shim(os.path.join(folder, key, f"{library}.py"))
        if shim is not None and shim[1] != class_name:
            raise ValueError(
                f"{index} names the {key} class {class_name!r}, but {key}/{library}.py imports {shim[1]!r}: the "
                "index was edited or comes from another save. Save the pipeline again with "
                "S2MPipeline.save_pretrained, or restore the folder."
            )
        module = shim[0] if shim is not None else library
        if _installed_class(module, class_name) is None:
            if "." not in library and not _loadable_library(library):  # a shim's name: its file must be there
                _check_shim_present(folder, f"{key}/{library}.py", key, class_name)
            raise ValueError(
                f"{index} names the {key} class {module}.{class_name}, which the installed packages do not define: "
                "neither s2m_diffusers, diffusers nor transformers has it, nor a module imported before loading. "
                f"Install (and, for your own module, import) what defines it, in a version that has {class_name}, "
                "or restore the folder; S2M pipelines never run code that ships with a folder."
            )


def _check_shim_present(folder: str, rel: str, role: str, class_name: Any) -> None:
    """Name a shim that the index points to and the folder lacks (a folder copied without its ``.py`` files)."""
    if not os.path.isfile(os.path.join(folder, *rel.split("/"))):
        raise ValueError(
            f"{os.path.join(folder, INDEX_FILE)} names the {role} class {class_name!r} through {rel}, which is "
            f"missing from {folder!r}: the folder was copied without its .py files (one-line shims that name the "
            "installed classes; they hold no model code, and some download filters drop them). Copy or download the "
            "whole folder again (every file), or save the pipeline again with S2MPipeline.save_pretrained."
        )


def _check_manifest_components(folder: str, manifest: Mapping[str, Any], components: Mapping[str, Any]) -> None:
    saved = manifest.get("components")
    if isinstance(saved, dict) and saved != dict(components):
        differ = sorted(k for k in set(saved) | set(components) if saved.get(k) != components.get(k))
        described = "; ".join(f"{k}: {components.get(k)} in {INDEX_FILE}, {saved.get(k)} when saved" for k in differ)
        raise ValueError(
            f"{INDEX_FILE} of {folder!r} lists other components than were saved with the folder ({described}): "
            "the index comes from another save or was edited. Save the pipeline again with "
            "S2MPipeline.save_pretrained, or restore the whole folder."
        )


def _covered_folders(config: Mapping[str, Any], manifest: Mapping[str, Any]) -> set[str]:
    """The top-level folders whose every file must be one the manifest lists: the components the index names (saved
    or not), those the manifest records, ``fits/`` (loaded with the pipeline), and every folder of a listed file."""
    names = {k for k, v in config.items() if not k.startswith("_") and _is_component_entry(v)} | {FITS_FOLDER}
    if isinstance(manifest.get("components"), dict):
        names |= set(manifest["components"])
    return names | {rel.split("/")[0] for rel in manifest["files"] if "/" in rel}


def _check_manifest_files(folder: str, manifest: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    listed = manifest["files"]
    missing, changed = [], []
    for rel, entry in sorted(listed.items()):
        path = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(path):
            missing.append(rel)
        elif os.path.getsize(path) != entry.get("size") or _sha256(path) != entry.get("sha256"):
            changed.append(rel)
    covered = _covered_folders(config, manifest)
    unlisted = [
        rel
        for rel in _folder_files(folder)
        if "/" in rel and rel.split("/")[0] in covered and rel not in listed and "/." not in f"/{rel}"
    ]
    if not (missing or changed or unlisted):
        return
    if missing and not (changed or unlisted):
        shims = [rel for rel in missing if rel.endswith(".py")]
        why = (
            " The .py files are one-line shims that name the installed classes (they hold no model code); a "
            "download or copy that keeps only some file types drops them."
            if shims
            else ""
        )
        raise ValueError(
            f"The saved pipeline {folder!r} is incomplete: its manifest ({MANIFEST_FILE}) lists files that are "
            f"missing: {_shown(missing)}.{why} Copy or download the whole folder again (every file), or save the "
            "pipeline again with S2MPipeline.save_pretrained."
        )
    problems = []
    if changed:
        problems.append(f"differ from the files saved with it: {_shown(changed)}")
    if missing:
        problems.append(f"are missing: {_shown(missing)}")
    if unlisted:
        problems.append(f"were not saved with it: {_shown(unlisted)}")
    raise ValueError(
        f"The saved pipeline {folder!r} does not match its manifest ({MANIFEST_FILE}): files "
        + "; files ".join(problems)
        + ". Its parts come from different saves (two saves into one folder at once by an older version, an "
        "interrupted save, or files copied in by hand) and do not belong together. Save the pipeline again with "
        "S2MPipeline.save_pretrained, or restore the whole folder."
    )


def _warn_newer_versions(folder: str, config: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    import diffusers
    from packaging.version import InvalidVersion, Version

    import s2m_diffusers

    saved = {
        "diffusers": (config.get("_diffusers_version"), diffusers.__version__),
        "s2m-diffusers": (manifest.get("s2m_diffusers_version"), s2m_diffusers.__version__),
    }
    for package, (version, installed) in saved.items():
        if version is None:
            continue
        try:
            newer = Version(str(version)) > Version(installed)
        except InvalidVersion:
            newer = True
        if newer:
            warnings.warn(
                f"{folder!r} was saved with {package} {version}, newer than the installed {installed}: settings "
                f"this version does not know are ignored, and the pipeline may behave otherwise than where it was "
                f"saved. Upgrade {package} (pip install -U {package}) to load it as saved.",
                UserWarning,
                stacklevel=4,
            )


def push_pipeline(
    pipeline,
    repo_id: str,
    *,
    folder: str | os.PathLike | None = None,
    training_data: Mapping[str, Any] | str | None = None,
    safe_serialization: bool = True,
    variant: str | None = None,
    api=None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
    base_model: str | None = None,
    sampling: Mapping[str, Any] | None = None,
):
    """Upload an S2M pipeline in the layout of [`save_pipeline`], with a model card whose loading snippets pin
    ``revision=`` to the uploaded commit (see [`upload_folder`]).

    Args:
        pipeline ([`~s2m_diffusers.pipeline_s2m.S2MPipeline`]): the pipeline.
        repo_id (`str`): ``"user/name"``.
        folder (`str`, *optional*): a folder the pipeline was just saved into (`save_pretrained(...,
            push_to_hub=True)`), uploaded as it is, under its lock ([`~s2m_diffusers.utils.folder_lock`]: a save
            into it waits for the upload); by default the pipeline is saved into a temporary folder with
            ``pipeline.save_pretrained(tmp, safe_serialization=..., variant=...)`` first.
        training_data (`dict` or `str`, *optional*): a description of the heads' training data for the card.
        safe_serialization (`bool`, defaults to `True`), variant (`str`, *optional*): as in [`save_pipeline`].
        api, token, private, commit_message, create_pr: as in [`upload_folder`].
        license (`str`, *optional*), base_model (`str`, *optional*), sampling (`Mapping`, *optional*): as in
            [`model_card`]. Without a ``license``, that of the base model's Hub card is used when it can be read.

    Returns:
        `CommitInfo` of the commit holding the code and weights; its ``oid`` is the revision the card pins.
    """
    context = _card_context(pipeline, license, base_model, sampling)
    if context["license"] is None and context["base_model"] is not None:
        context["license"] = _hub_license(api, context["base_model"], token)
    card = functools.partial(_pinned_card, pipeline, training_data, context)
    upload = functools.partial(
        upload_folder,
        repo_id=repo_id,
        card=card,
        api=api,
        token=token,
        private=private,
        commit_message=commit_message,
        create_pr=create_pr,
    )
    if folder is not None:  # under the folder's lock: no save replaces it while it is read and its card rewritten
        with folder_lock(folder):
            return upload(folder)
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "pipeline")
        pipeline.save_pretrained(saved, safe_serialization=safe_serialization, variant=variant)
        return upload(saved)


def save_and_push(pipeline, save_directory: str | os.PathLike, repo_id: str | None = None, **kwargs) -> tuple:
    """[`save_pipeline`] then [`push_pipeline`] of the saved folder, under the folder's lock from the save through the
    upload, so that what is uploaded is this save. ``repo_id`` defaults to the folder's name; ``kwargs``: those of
    [`save_pipeline`] (``safe_serialization``, ``variant``, ``max_shard_size``, ``extra_files``) and of
    [`push_pipeline`] (``api``, ``token``, ...); ``training_data``, ``license``, ``base_model`` and ``sampling`` go to
    both.

    Returns:
        `tuple`: the folder (absolute path) and the upload's `CommitInfo`.
    """
    both = {k: kwargs.pop(k) for k in ("training_data", "license", "base_model", "sampling") if k in kwargs}
    save = {
        k: kwargs.pop(k) for k in ("safe_serialization", "variant", "max_shard_size", "extra_files") if k in kwargs
    }
    with folder_lock(save_directory):
        folder = save_pipeline(pipeline, save_directory, **save, **both)
        commit = push_pipeline(pipeline, repo_id or os.path.basename(folder), folder=folder, **both, **kwargs)
    return folder, commit


def _pinned_card(pipeline, training_data, context: Mapping[str, Any], repo_id: str, revision: str | None) -> str:
    """`card(repo_id, revision)` for [`upload_folder`]."""
    return model_card(pipeline, repo_id, revision, training_data, **context)


def _hub_license(api, repo_id: str, token: str | None) -> str | None:
    """The license in the Hub card of `repo_id`, or `None` when it cannot be read (offline, no card, no license)."""
    try:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        card_data = api.model_info(repo_id).card_data
        license = card_data.get("license") if card_data is not None else None
    except Exception:  # any failure to read it leaves the card without a license, never the upload
        return None
    return license if isinstance(license, str) else None


# ------------------------------------------------------------------------------------------------------------------
# Generator folders: the pretrained generator a pipeline is built around


def _resolve_class(name: str):
    """A `ModelMixin` class named in a config's `_class_name`: from s2m_diffusers first, then diffusers."""
    for module in ("s2m_diffusers.models.gan", "s2m_diffusers.models", "s2m_diffusers", "diffusers"):
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return None


def load_generator_folder(path: str) -> tuple[str, dict]:
    """Load a generator saved with `save_pretrained` as `S2MPipeline` components.

    Args:
        path (`str`): a diffusers pipeline folder with `model_index.json` naming a `unet` and a `scheduler` (e.g. a
            `DDPMPipeline`; sampled as DDIM), or a model folder with `config.json` whose `_class_name` is a GAN
            generator class of s2m_diffusers or diffusers (e.g. `DCGANGenerator`); or the Hub repo of one
            (``"user/name"``), downloaded with `huggingface_hub.snapshot_download`, and then recorded as the
            components' ``_name_or_path`` (the model card's ``base_model``).

    Returns:
        `tuple[str, dict]`: the kind (`"ddim"` or `"gan"`) and the components (`unet`, `scheduler` or `gan`), in
        eval mode.

    Raises:
        ValueError: the folder is neither, names a class that cannot be found, or the repo cannot be downloaded.
    """
    repo_id = None if os.path.isdir(path) else hub_repo_id(path)
    if repo_id is not None:
        kind, components = load_generator_folder(_download_generator(repo_id))
        for component in components.values():
            component.register_to_config(_name_or_path=repo_id)
        return kind, components
    if not os.path.isdir(path):
        raise ValueError(
            f"--generator {path!r} is neither a folder nor a Hub repo id ('user/name'). Save a generator there with "
            "`save_pretrained`."
        )
    index_file, config_file = os.path.join(path, "model_index.json"), os.path.join(path, "config.json")
    if os.path.isfile(index_file):
        return "ddim", _load_unet_and_scheduler(path, index_file)
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            class_name = json.load(f).get("_class_name")
        cls = _resolve_class(class_name) if class_name else None
        if cls is None:
            raise ValueError(
                f"The config in {path!r} names the class {class_name!r}, which is neither in s2m_diffusers nor in "
                "diffusers. Save the generator from a ModelMixin class (e.g. s2m_diffusers.models.gan.DCGANGenerator)."
            )
        return "gan", {"gan": cls.from_pretrained(path).eval()}
    raise ValueError(
        f"--generator {path!r} holds neither model_index.json (a diffusers pipeline such as DDPMPipeline) nor "
        "config.json (a generator model such as DCGANGenerator). Save one with `save_pretrained(PATH)`."
    )


def _download_generator(repo_id: str) -> str:
    """The local snapshot of a generator's Hub repo (its configs and safetensors weights only)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as err:  # offline, unknown repo, no access: one message that says so
        raise ValueError(
            f"--generator {repo_id!r} looks like a Hub repo id but could not be downloaded ({type(err).__name__}: "
            f"{err}). Check the name and your connection (and HF_HUB_OFFLINE), or pass a local folder."
        ) from None


def _load_unet_and_scheduler(path: str, index_file: str) -> dict:
    """The `unet` (in eval mode) and `scheduler` of a saved unconditional diffusers pipeline."""
    import diffusers

    with open(index_file, encoding="utf-8") as f:
        index = json.load(f)
    if not (isinstance(index.get("unet"), list) and isinstance(index.get("scheduler"), list)):
        raise ValueError(
            f"The pipeline in {path!r} ({index.get('_class_name')}) has no `unet` and `scheduler` components; "
            "only unconditional pixel-space diffusion pipelines (e.g. DDPMPipeline, DDIMPipeline) or GAN "
            "generator folders are supported by `s2m train-heads`."
        )
    components = {}
    for key in ("unet", "scheduler"):
        library, class_name = index[key][:2]
        cls = getattr(diffusers, class_name, None) if library == "diffusers" else None
        if cls is None:
            raise ValueError(f"Cannot load the {key} class {library}.{class_name} named in {index_file!r}.")
        components[key] = cls.from_pretrained(path, subfolder=key)
    components["unet"].eval()
    return components


def generator_image_shape(kind: str, components: dict) -> tuple[int, int]:
    """`(sample_size, channels)` of the images of a generator loaded by [`load_generator_folder`]."""
    if kind == "ddim":
        config = components["unet"].config
        size, channels = config.sample_size, config.in_channels
    else:
        config = getattr(components["gan"], "config", None)
        size, channels = getattr(config, "sample_size", None), getattr(config, "out_channels", None)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"The generator makes {size[0]}x{size[1]} images; the heads need square images.")
        size = size[0]
    if size is None or channels is None:
        raise ValueError(
            "Cannot tell the generator's image size: its config needs `sample_size` and `out_channels` (GAN) or "
            "`sample_size` and `in_channels` (UNet)."
        )
    return int(size), int(channels)


# ------------------------------------------------------------------------------------------------------------------
# Model card (the card itself: `s2m_diffusers.cards`)


def _card_context(
    pipeline,
    license: str | None = None,
    base_model: str | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> dict:
    """The card's ``license``, ``base_model`` and ``sampling``: those given, else those recorded in the manifest of
    the folder the pipeline was loaded from (`name_or_path`), so that saving a loaded pipeline keeps its card."""
    saved = {}
    folder = getattr(pipeline, "name_or_path", None)
    if isinstance(folder, str) and os.path.isfile(os.path.join(folder, MANIFEST_FILE)):
        with contextlib.suppress(ValueError):
            saved = _read_manifest(folder).get("card") or {}
    return {
        "license": license or saved.get("license"),
        "base_model": base_model or saved.get("base_model"),
        "sampling": dict(sampling) if sampling is not None else saved.get("sampling"),
    }


# ------------------------------------------------------------------------------------------------------------------
# Upload


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    card: Callable[[str, str | None], str],
    api=None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
):
    """Upload a saved S2M pipeline folder, then its model card pinned to the commit that holds the code.

    Two commits: the first uploads the layout (weights, configs, shims); the second the README whose snippets pin
    ``revision=`` to the first commit's hash. The README cannot name the commit it is part of, and pinning the code
    commit is what matters: it fixes the `pipeline.py` that ``trust_remote_code=True`` runs.

    Args:
        folder (`str`): a folder written by `S2MPipeline.save_pretrained`.
        repo_id (`str`): ``"user/name"``.
        card (`Callable[[str, str], str]`): ``card(repo_id, revision) -> README text``.
        api (*optional*): an object with `huggingface_hub.HfApi`'s ``create_repo``, ``upload_folder`` and
            ``upload_file``; a new ``HfApi(token=token)`` by default.
        token, private, commit_message, create_pr: as in `HfApi.upload_folder`.

    Returns:
        `CommitInfo` of the code commit (``.oid`` is the pinned revision).
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    folder = os.fspath(folder)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload S2M pipeline",
        create_pr=create_pr,
        ignore_patterns=["README.md", f"{TRAINING_FOLDER}/*"],
    )
    revision = getattr(commit, "oid", None)
    readme = os.path.join(folder, "README.md")
    write_text_atomically(readme, card(repo_id, revision))
    pr_revision = getattr(commit, "pr_revision", None) if create_pr else None
    api.upload_file(
        path_or_fileobj=readme,
        path_in_repo="README.md",
        repo_id=repo_id,
        commit_message=f"Model card pinned to {revision}" if revision else "Model card",
        revision=pr_revision,  # with create_pr, the card joins the code's pull request
    )
    return commit
