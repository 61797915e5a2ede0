"""The manifest of a saved S2M pipeline, and the checks before one is loaded.

A saved folder ends with a manifest (`s2m_manifest.json`: the components, and the size and SHA-256 of every file
but `model_index.json`, whose settings may be edited, and the model card), written last by
[`~s2m_diffusers.hub.save_pipeline`] ([`write_manifest`]). [`check_pipeline_folder`] refuses, before anything is
loaded, a folder whose files differ from its manifest (components of different saves), a component folder that is
missing, weights in pickle form, and classes that the installed packages do not define; it warns about a folder saved
by newer versions.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from .remote_code import is_component_entry, loadable_library, read_shim
from .utils import write_text_atomically

__all__ = [
    "INDEX_FILE",
    "MANIFEST_FILE",
    "CARD_FILE",
    "PICKLE_SUFFIXES",
    "FITS_FOLDER",
    "write_manifest",
    "read_manifest",
    "folder_files",
    "json_kind",
    "check_pipeline_folder",
    "check_index",
]

INDEX_FILE = "model_index.json"
MANIFEST_FILE = "s2m_manifest.json"  # written last: the components, and the size and SHA-256 of their files
CARD_FILE = "README.md"  # not hashed: `upload_folder` rewrites it with the pinned revision
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# what the pipeline measured once and keeps (`S2MPipeline.write_extra_files`: the dv_strength "auto" values), loaded by
# `from_pretrained`: always the pipeline's, replaced by every save and covered by its manifest
FITS_FOLDER = "fits"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: str) -> list[str]:
    """Every file under `folder`, relative and '/'-separated, without `__pycache__` folders."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        out += [os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/") for name in files]
    return sorted(out)


def write_manifest(folder: str | os.PathLike, card: Mapping[str, Any] | None = None) -> dict:
    """Write `s2m_manifest.json`: the components `model_index.json` lists, the size and SHA-256 of every other file
    of a saved pipeline folder but the model card, and the versions that wrote it.
    [`~s2m_diffusers.hub.save_pipeline`] writes it last;
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
        for rel in folder_files(folder)
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


def read_manifest(folder: str) -> dict:
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
    manifest = read_manifest(folder)
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


def json_kind(value: Any) -> str:
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
            f"{path} holds a JSON {json_kind(config)} ({shown}), not an object: a pipeline's index is an object such "
            'as {"_class_name": ["pipeline", "S2MPipeline"], "heads": [...], "num_inference_steps": 25}. The file '
            f"was edited or replaced; {restore}."
        )
    for key, (valid, expected) in _INDEX_SETTINGS.items():
        if key in config and not valid(config[key]):
            raise ValueError(
                f"{path}: the setting {key!r} is {json.dumps(config[key])} (a {json_kind(config[key])}); it must be "
                f"{expected}. Correct it in the file (or delete the line for the default), or {restore}."
            )
    for key in getattr(pipeline_class, "_optional_components", []):
        if key in config and not is_component_entry(config[key]):
            raise ValueError(
                f"{path}: the component {key!r} is {json.dumps(config[key])}; a component entry is "
                f'["library", "ClassName"] (e.g. ["s2m_diffusers_models_heads", "S2MHeads"]), or [null, null] for '
                f"one that was not saved. Correct it in the file, or {restore}."
            )


def _components(config: Mapping[str, Any]) -> dict[str, list]:
    """The saved components of a `model_index.json`: ``{name: [library, class]}`` (optional ones left out)."""
    return {
        k: list(v) for k, v in config.items() if not k.startswith("_") and is_component_entry(v) and v[0] is not None
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
        shim = read_shim(os.path.join(folder, f"{name[0]}.py"))
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
        shim = read_shim(os.path.join(folder, key, f"{library}.py"))
        if shim is not None and shim[1] != class_name:
            raise ValueError(
                f"{index} names the {key} class {class_name!r}, but {key}/{library}.py imports {shim[1]!r}: the "
                "index was edited or comes from another save. Save the pipeline again with "
                "S2MPipeline.save_pretrained, or restore the folder."
            )
        module = shim[0] if shim is not None else library
        if _installed_class(module, class_name) is None:
            if "." not in library and not loadable_library(library):  # a shim's name: its file must be there
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
    names = {k for k, v in config.items() if not k.startswith("_") and is_component_entry(v)} | {FITS_FOLDER}
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
        for rel in folder_files(folder)
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
