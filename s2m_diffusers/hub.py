"""Saving, checking, sharing and loading an S2M pipeline folder so that diffusers, the Hub and `diffusers-cli` can
load it (DESIGN.md, diffusers 0.42.1).

`S2MPipeline`'s loaders are thin: [`resolve_local_config`] (``load_config``), [`snapshot_path`] (``from_pretrained``),
[`save_pipeline`] (``save_pretrained``), [`push_pipeline`] (``push_to_hub``) and [`save_and_push`] (both, under one
lock) hold what they do. Two modules hold the folder's parts:

- `s2m_diffusers.remote_code`: the layout a saved folder is rewritten into ([`write_remote_code_layout`]: one-line
  shims that import the classes from the installed package), so that ``DiffusionPipeline.from_pretrained(...,
  trust_remote_code=True)`` and the Hub load it, and its reading back without running remote code
  ([`resolve_remote_code_layout`]);
- `s2m_diffusers.folder_checks`: the manifest a save ends with ([`write_manifest`]) and the checks before a folder is
  loaded ([`check_pipeline_folder`]).

A saved folder is whole or absent: [`save_pipeline`] writes it beside its destination, ends with the manifest and swaps
it in whole ([`~s2m_diffusers.utils.replace_folder_atomically`]).

[`model_card`] (`s2m_diffusers.cards`, re-exported here) writes the repo's README: the attributes, a summary of the
training data, and loading snippets with a pinned ``revision=``. [`upload_folder`] uploads a saved folder with any
object that has `HfApi`'s ``create_repo``/``upload_folder``/``upload_file`` methods, so that the upload can be tested
offline. [`load_generator_folder`] loads the pretrained generator (a diffusers pipeline folder or a GAN model folder)
that an S2M pipeline is built around.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from .cards import model_card
from .folder_checks import (
    CARD_FILE,
    FITS_FOLDER,
    INDEX_FILE,
    MANIFEST_FILE,
    check_pipeline_folder,
    folder_files,
    json_kind,
    read_manifest,
    write_manifest,
)
from .remote_code import (
    PIPELINE_FILE,
    SHIM_HEADER,
    custom_component_files,
    is_component_entry,
    resolve_remote_code_layout,
    shim_module_name,
    write_remote_code_layout,
)
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

# a training run's state inside the pipeline folder it writes (`s2m train-heads --checkpointing_steps`): kept by a
# save like any file that is not part of the pipeline, and never uploaded
TRAINING_FOLDER = "checkpoints"

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
        if is_component_entry(value) and str(value[0]).startswith("s2m_diffusers."):
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
            raise ValueError(f"a JSON {json_kind(index)}, not an object")
    except (OSError, ValueError) as err:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"save_directory {folder!r} holds files ({shown}) but no saved pipeline (no readable {INDEX_FILE}: "
            f"{err}); a save replaces its folder as a whole. Save into a new or empty folder, or into a saved "
            "pipeline."
        ) from None
    names |= {k for k, v in index.items() if not k.startswith("_") and is_component_entry(v)}
    names |= {path.split("/")[0] for path in read_manifest(folder).get("files", {})}
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
    for rel in folder_files(folder):
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
            saved = read_manifest(folder).get("card") or {}
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
