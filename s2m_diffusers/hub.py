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

[`model_card`] writes the repo's README: the attributes, a summary of the training data, and loading snippets with
a pinned ``revision=``. [`upload_folder`] uploads a saved folder with any object that has `HfApi`'s
``create_repo``/``upload_folder``/``upload_file`` methods, so that the upload can be tested offline.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from .utils import write_text_atomically

__all__ = [
    "SHIM_HEADER",
    "shim_module_name",
    "write_remote_code_layout",
    "resolve_remote_code_layout",
    "custom_component_files",
    "model_card",
    "upload_folder",
]

SHIM_HEADER = "# s2m-diffusers shim: imports the class from the installed package; it holds no model code.\n"
_SHIM_IMPORT = re.compile(r"^from ([A-Za-z_][\w.]*) import ([A-Za-z_]\w*)", re.MULTILINE)
PIPELINE_FILE = "pipeline"  # -> pipeline.py beside model_index.json


def _loadable_library(library: str) -> bool:
    """Whether diffusers loads components of ``library`` by itself (diffusers, transformers, a diffusers pipeline)."""
    from diffusers import pipelines
    from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

    return library in LOADABLE_CLASSES or hasattr(pipelines, library)


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
# Model card


def _format_float(value: float) -> str:
    return f"{value:.4g}"


def model_card(
    pipeline,
    repo_id: str | None = None,
    revision: str | None = None,
    training_data: Mapping[str, Any] | str | None = None,
) -> str:
    """The README of a saved or pushed S2M pipeline: metadata, attributes, training data, loading snippets.

    Args:
        pipeline ([`~s2m_diffusers.pipeline_s2m.S2MPipeline`]): the pipeline.
        repo_id (`str`, *optional*): the Hub repo (or local folder) the snippets load from.
        revision (`str`, *optional*): the commit the snippets pin. ``trust_remote_code=True`` runs the repo's
            `pipeline.py`; a pinned commit keeps a later push from changing what runs.
        training_data (`Mapping` or `str`, *optional*): a description of the heads' training data (source,
            size, how the single-positive labels were drawn), added to the data summary.

    Returns:
        `str`: the model card, YAML metadata included.
    """
    from huggingface_hub import ModelCardData

    import s2m_diffusers

    heads = pipeline.heads
    hc = heads.config
    names = list(hc.attribute_names)
    counts = list(hc.label_counts) if getattr(hc, "label_counts", None) else None
    priors = list(hc.priors) if getattr(hc, "priors", None) else None
    total = sum(counts) if counts else None
    proposal = pipeline.proposal_description()
    base_model = proposal.get("base_model")

    data = ModelCardData(
        library_name="diffusers",
        license=None,
        tags=["s2m-diffusers", "s2m", "multi-label", "diffusers", "image-generation"],
        pipeline_tag="unconditional-image-generation",
        base_model=base_model,
    )
    repo = repo_id or "path/to/this/folder"
    pin = (
        f'\n    revision="{revision}",  # pinned commit: trust_remote_code runs this repo\'s pipeline.py'
        if revision
        else ""
    )
    pin_cli = f" --revision {revision}" if revision else ""
    pin_plain = f', revision="{revision}"' if revision else ""
    example = pipeline.config.default_target or (f"{names[0]} & ~{names[1]}" if len(names) > 1 else names[0])
    version = s2m_diffusers.__version__

    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# S2M sampler over {len(names)} attributes: {', '.join(names)}",
        "",
        "An [S2M](https://arxiv.org/abs/2206.05764) sampler (*Mining Multi-Label Samples from Single Positive "
        "Labels*, NeurIPS 2022) built with [s2m-diffusers](https://pypi.org/project/s2m-diffusers/): a pretrained "
        "generator as the proposal and classifier heads trained on single-positive labels, which together draw "
        "images that hold any combination of the attributes, e.g. `" + example + "`.",
        "",
        "## Attributes",
        "",
        "| attribute | single-positive labels | p_data(c) | prior pi_c |",
        "|---|---|---|---|",
    ]
    for i, name in enumerate(names):
        count = str(counts[i]) if counts else "unknown"
        share = _format_float(counts[i] / total) if counts and total else "unknown"
        prior = _format_float(priors[i]) if priors else "p_data (not set)"
        lines.append(f"| `{name}` | {count} | {share} | {prior} |")
    lines += [
        "",
        f"Negation margin lambda = {_format_float(float(hc.negation_margin))}; "
        f"D_f head (class-conditional proposal): {'yes' if getattr(hc, 'conditional', False) else 'no'}; "
        f"input images: {hc.in_channels} x {hc.sample_size} x {hc.sample_size} in [-1, 1].",
    ]
    temperatures = getattr(heads, "temperatures", None)
    if callable(temperatures):
        temps = ", ".join(f"{k}: {_format_float(v)}" for k, v in temperatures().items())
        lines.append(f"Calibration temperatures: {temps}.")
    lines += ["", "## Training data", ""]
    if counts:
        lines.append(
            f"The heads were trained on {total} single-positive labelled images "
            f"({', '.join(f'{n}: {c}' for n, c in zip(names, counts))}) and on samples of the proposal below."
        )
    else:
        lines.append("The label counts of the training data were not recorded in the heads' config.")
    if isinstance(training_data, str):
        lines += ["", training_data]
    elif training_data:
        lines.append("")
        lines += [f"- {key}: {value}" for key, value in training_data.items()]
    lines += ["", "## Proposal", ""]
    lines += [f"- {key}: {value}" for key, value in proposal.items()]
    lines += [
        "",
        "## Usage",
        "",
        f"Install the package the pipeline's code comes from (`pip install s2m-diffusers=={version}`), then:",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        "pipe = DiffusionPipeline.from_pretrained(",
        f'    "{repo}",{pin}',
        "    trust_remote_code=True,",
        ")",
        f'out = pipe("{example}", num_images=4, generator=torch.Generator().manual_seed(0))',
        'out.images[0].save("sample.png")',
        "print(out.stats)",
        "```",
        "",
        "Without remote code, through the installed package:",
        "",
        "```python",
        "from s2m_diffusers import S2MPipeline",
        "",
        f'pipe = S2MPipeline.from_pretrained("{repo}"{pin_plain})',
        "```",
        "",
        "From a shell:",
        "",
        "```bash",
        f"diffusers-cli run --model {repo}{pin_cli} --trust-remote-code \\",
        f'    --pipeline-kwargs \'{{"target": "{example}", "num_images": 4}}\' --seed 0 --output samples/',
        f's2m sample --pipeline {repo}{pin_cli} --target "{example}" --num-images 4 --seed 0 --output samples/',
        "```",
        "",
        "The repository's `.py` files (`pipeline.py`, and one in each custom component's folder) are one-line shims "
        "that import the classes from the installed packages; they hold no model code.",
        "",
    ]
    return "\n".join(lines)


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
        ignore_patterns=["README.md"],
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
