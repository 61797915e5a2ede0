"""The model card of a saved or uploaded S2M pipeline (its ``README.md``): Hub metadata, what the heads read, the
attributes and their training data, the proposal, and loading snippets with a pinned ``revision=``.

[`model_card`] is the one entry point; `s2m_diffusers.hub` writes it into every saved folder and, pinned to the
uploaded commit, into every upload.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

from .utils import hub_repo_id

__all__ = ["model_card"]


def _format_float(value: float) -> str:
    return f"{value:.4g}"


def model_card(
    pipeline,
    repo_id: str | None = None,
    revision: str | None = None,
    training_data: Mapping[str, Any] | str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> str:
    """The README of a saved or pushed S2M pipeline: metadata, attributes, training data, loading snippets.

    Args:
        pipeline ([`~s2m_diffusers.pipeline_s2m.S2MPipeline`]): the pipeline.
        repo_id (`str`, *optional*): the Hub repo (or local folder) the snippets load from.
        revision (`str`, *optional*): the commit the snippets pin. ``trust_remote_code=True`` runs the repo's
            `pipeline.py`; a pinned commit keeps a later push from changing what runs.
        training_data (`Mapping` or `str`, *optional*): a description of the heads' training data (source,
            size, how the single-positive labels were drawn), added to the data summary.
        license (`str`, *optional*): the license of the pipeline's weights (a Hub license id, e.g.
            ``"apache-2.0"``), which include the generator's. Left out when not given.
        base_model (`str`, *optional*): the Hub repo of the generator; by default the one the generator was loaded
            from (its ``_name_or_path``) when that names a Hub repo.
        sampling (`Mapping`, *optional*): call settings for the snippets (e.g. ``{"negation_margin": 30.0}``).

    Returns:
        `str`: the model card, YAML metadata included.
    """
    heads = pipeline.heads
    names = list(heads.config.attribute_names)
    counts = list(heads.config.label_counts) if getattr(heads.config, "label_counts", None) else None
    proposal = pipeline.proposal_description()
    base_model = base_model or proposal.get("base_model") or _generator_hub_id(pipeline)
    settings = _card_settings(sampling)
    default = f"{names[0]} & ~{names[1]}" if len(names) > 1 else names[0]
    example = pipeline.config.default_target or default
    lines = [
        *_card_header(base_model, license, names, example),
        *_card_attributes(heads, names, counts),
        *_card_training_data(names, counts, training_data),
        *_card_proposal(proposal),
        *_card_usage(repo_id or "path/to/this/folder", revision, example, settings),
    ]
    return "\n".join(lines)


# call arguments a card's snippets may pass beside the sampler's settings
_CALL_ARGUMENTS = ("num_inference_steps", "max_proposals", "micro_batch_size", "num_images")


def _card_settings(sampling: Mapping[str, Any] | None) -> dict:
    """The call settings a card's snippets show: those of ``sampling`` that a call still takes (a card saved by an
    earlier version may carry settings that were removed since, such as ``fit_size``: they are left out, with a
    warning, since a snippet passing them would fail)."""
    import dataclasses

    from .sampling import S2MSamplingConfig

    known = {f.name for f in dataclasses.fields(S2MSamplingConfig)} | set(_CALL_ARGUMENTS)
    settings = dict(sampling or {})
    dropped = sorted(k for k in settings if k not in known)
    if dropped:
        warnings.warn(
            f"The model card's sampling settings {dropped} no longer exist; the card's snippets leave them out.",
            UserWarning,
            stacklevel=3,
        )
    return {k: v for k, v in settings.items() if k in known}


def _generator_hub_id(pipeline) -> str | None:
    """The Hub repo the pipeline's generator (GAN, UNet or wrapped pipeline) was loaded from, if any."""
    for name in ("gan", "unet", "proposal_pipeline"):
        config = getattr(getattr(pipeline, name, None), "config", None)
        repo = hub_repo_id(getattr(config, "_name_or_path", None)) if config is not None else None
        if repo is not None:
            return repo
    return None


def _card_header(base_model: str | None, license: str | None, names: list[str], example: str) -> list[str]:
    """The YAML metadata, the title and what the sampler does."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=["s2m-diffusers", "s2m", "multi-label", "diffusers", "image-generation"],
        pipeline_tag="unconditional-image-generation",
        base_model=base_model,
    )
    return [
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
    ]


def _card_reading(hc) -> list[str]:
    """How the sampler reads the heads by default: the margins and the strength of ``logit D_v``."""
    kappa = getattr(hc, "presence_margin", None)
    beta = getattr(hc, "dv_strength", None)
    beta = 1.0 if beta is None else float(beta)
    chosen = kappa is not None or getattr(hc, "dv_strength", None) is not None
    target = "the paper's target" if beta == 1.0 else f"p_G^{_format_float(1 - beta)} p_data^{_format_float(beta)}"
    return [
        "How the sampler reads the heads by default"
        + (" (chosen from held-out data when they were trained; each can be overridden per call)" if chosen else "")
        + f": negation margin lambda = {_format_float(float(hc.negation_margin))}, presence margin kappa = "
        f"{_format_float(0.0 if kappa is None else float(kappa))}, strength of logit D_v beta = {_format_float(beta)} "
        f"(the weights target {target} restricted to the combination"
        + (
            "; beta < 1 because D_v's weights over generated images are heavy-tailed: see metrics.json, `dv_report`"
            if beta < 1.0
            else ""
        )
        + ").",
    ]


def _card_attributes(heads, names: list[str], counts: list[int] | None) -> list[str]:
    """One table row per attribute (labels, ``p_data(c)``, prior), then the heads' settings and temperatures."""
    hc = heads.config
    priors = list(hc.priors) if getattr(hc, "priors", None) else None
    total = sum(counts) if counts else None
    lines = [
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
        f"D_f head (class-conditional proposal): {'yes' if getattr(hc, 'conditional', False) else 'no'}; "
        f"input images: {hc.in_channels} x {hc.sample_size} x {hc.sample_size} in [-1, 1].",
        "",
        *_card_reading(hc),
    ]
    temperatures = getattr(heads, "temperatures", None)
    if callable(temperatures):
        temps = ", ".join(f"{k}: {_format_float(v)}" for k, v in temperatures().items())
        lines.append(f"Calibration temperatures: {temps}.")
    return lines


def _card_training_data(
    names: list[str], counts: list[int] | None, training_data: Mapping[str, Any] | str | None
) -> list[str]:
    """The label counts the heads were trained on, and the caller's description of the data."""
    lines = ["", "## Training data", ""]
    if counts:
        lines.append(
            f"The heads were trained on {sum(counts)} single-positive labelled images "
            f"({', '.join(f'{n}: {c}' for n, c in zip(names, counts))}) and on samples of the proposal below."
        )
    else:
        lines.append("The label counts of the training data were not recorded in the heads' config.")
    if isinstance(training_data, str):
        lines += ["", training_data]
    elif training_data:
        lines.append("")
        lines += [f"- {key}: {value}" for key, value in training_data.items()]
    return lines


def _card_proposal(proposal: Mapping[str, Any]) -> list[str]:
    """The generator the samples come from, as `S2MPipeline.proposal_description` gives it."""
    return ["", "## Proposal", "", *(f"- {key}: {value}" for key, value in proposal.items())]


# the settings `s2m sample` takes as options, with their option names
_CLI_SETTINGS = {
    "kernel": "--kernel",
    "num_chains": "--num-chains",
    "negation_margin": "--negation-margin",
    "presence_margin": "--presence-margin",
    "num_inference_steps": "--num-inference-steps",
    "class_label": "--class-label",
}


def _card_usage(repo: str, revision: str | None, example: str, settings: Mapping[str, Any] | None = None) -> list[str]:
    """Loading snippets (diffusers with remote code, the installed package, a shell), pinned to `revision`, calling
    the pipeline with `settings`."""
    import s2m_diffusers

    pin = (
        f'\n    revision="{revision}",  # pinned commit: trust_remote_code runs this repo\'s pipeline.py'
        if revision
        else ""
    )
    pin_cli = f" --revision {revision}" if revision else ""
    pin_plain = f', revision="{revision}"' if revision else ""
    version = s2m_diffusers.__version__
    settings = dict(settings or {})
    call = f'out = pipe("{example}", num_images=4, generator=torch.Generator().manual_seed(0)'
    call += "".join(f", {k}={v!r}" for k, v in settings.items()) + ")"
    pipeline_kwargs = json.dumps({"target": example, "num_images": 4, **settings})
    cli_args = "".join(f" {_CLI_SETTINGS[k]} {v}" for k, v in settings.items() if k in _CLI_SETTINGS and v is not None)
    no_option = [k for k in settings if k not in _CLI_SETTINGS]
    return [
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
        call,
        'out.images[0].save("sample.png")',
        "print(out.stats)",
        "```",
        "",
        "Without remote code, through the installed package:",
        "",
        "```python",
        "import torch",
        "from s2m_diffusers import S2MPipeline",
        "",
        f'pipe = S2MPipeline.from_pretrained("{repo}"{pin_plain})',
        call,
        "```",
        "",
        "From a shell:",
        "",
        "```bash",
        f"diffusers-cli run --model {repo}{pin_cli} --trust-remote-code \\",
        f"    --pipeline-kwargs '{pipeline_kwargs}' --seed 0 --output samples/",
        f's2m sample --pipeline {repo}{pin_cli} --target "{example}" --num-images 4 --seed 0 --output samples/'
        + cli_args,
        "```",
        "",
        *([f"(`s2m sample` has no option for {', '.join(no_option)}: use the Python call.)", ""] if no_option else []),
        "The repository's `.py` files (`pipeline.py`, and one in each custom component's folder) are one-line shims "
        "that import the classes from the installed packages; they hold no model code.",
        "",
    ]
