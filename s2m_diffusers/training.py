"""Training and calibrating the S2M heads with `accelerate` (spec §2, §7).

[`train_heads`] trains, on single-positive data and a proposal:

- ``D_v`` on balanced batches: as many real images (label 1) as fresh proposal samples (label 0);
- ``D_r`` on the real images and their single-positive labels;
- ``D_f`` (class-conditional proposals only) on proposal samples and the class they were generated for.

It keeps a stratified held-out split of the real data and a fixed held-out set of proposal samples, evaluates
every `eval_steps`, keeps the weights with the lowest held-out negative log-likelihood of each head (early
stopping), fits one temperature per head on the held-out data (spec §7), reports accuracy, NLL and expected
calibration error before and after, and estimates the attribute priors from ``D_r`` (spec §3) unless given.

Every random draw of step `k` (batch indices, augmentation, proposal noise, dropout) comes from a generator seeded
by `(seed, k)`, and the optimizer (AdamW) and its learning-rate schedule (`diffusers.optimization.get_scheduler`) are
prepared by accelerate and saved in every checkpoint: a run is reproducible on CPU, and a run resumed from a
checkpoint continues exactly as the uninterrupted run would.

Several processes: [`train_heads`] runs unchanged under ``accelerate launch --num_processes N`` (on a machine without
GPUs ``--multi_gpu`` or ``torchrun``, see `s2m_diffusers.distributed`): data parallel (each process draws its own
``batch_size / N`` real images and proposal samples per step, from a generator seeded by ``(seed, step, process)``;
gradients are averaged), the logged losses are averaged over the processes, the held-out evaluation, calibration
and prior estimate run on every process on the same data and weights (so every process returns the same heads and
metrics), the class counts of a conditional proposal are summed over the processes, and checkpoints, the heads and
`metrics.json` are written once, by the main process. A run's result depends on the number of processes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import SchedulerType, get_scheduler
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .calibration import fit_temperature, head_metrics, nll
from .data import ImageBank, SinglePositiveDataset, prepare_images
from .distributed import gather_objects, gather_rows, get_state
from .models.heads import S2MHeads
from .priors import estimate_priors
from .proposals import ProposalAdapter
from .utils import move_into_place, save_folder_atomically, write_text_atomically

logger = get_logger(__name__)

STATE_FILE = "s2m_training_state.json"
BEST_FILE = "s2m_best_weights.safetensors"
EMA_FILE = "s2m_ema_weights.safetensors"
AUGMENTATIONS = ("shift", "flip", "noise", "blur", "contrast")
LR_SCHEDULERS = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)
# the schedules whose learning rate depends on the number of steps: resuming one with another count is refused
_DECAYING_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial")


# ----- augmentation -----------------------------------------------------------------------------------------
def augment_images(
    images: torch.Tensor, augmentations: Sequence[str], generator: torch.Generator, max_shift: int = 2
) -> torch.Tensor:
    """Random augmentations of a batch `(B, C, H, W)` in [-1, 1], drawn from `generator`.

    Args:
        images (`torch.Tensor`): `(B, C, H, W)` in [-1, 1].
        augmentations (`Sequence[str]`): any of `"shift"` (integer translation by up to `max_shift` pixels,
            edge padding), `"flip"` (horizontal), `"noise"` (Gaussian, std up to 0.1), `"blur"` (3x3 box blur
            mixed in with a random weight), `"contrast"` (random contrast in [0.8, 1.2]); artefacts that
            generators make, so that ``D_r`` meets them in training.
        generator (`torch.Generator`): CPU generator for every draw.
        max_shift (`int`, defaults to 2): largest translation.

    Returns:
        `torch.Tensor`: the augmented batch, same shape, clamped to [-1, 1].
    """
    unknown = [a for a in augmentations if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"Unknown augmentations {unknown}; choose among {list(AUGMENTATIONS)}.")
    b, _, h, w = images.shape
    device = images.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    if "shift" in augmentations and max_shift > 0:
        padded = F.pad(images, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
        images = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if "flip" in augmentations:
        flip = uniform(b) < 0.5
        images = torch.where(flip.view(b, 1, 1, 1), images.flip(-1), images)
    if "blur" in augmentations:
        blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        weight = uniform(b, 1, 1, 1)
        images = images + weight * (blurred - images)
    if "contrast" in augmentations:
        images = images * (0.8 + 0.4 * uniform(b, 1, 1, 1))
    if "noise" in augmentations:
        noise = torch.randn(images.shape, generator=generator).to(device)
        images = images + 0.1 * uniform(b, 1, 1, 1) * noise
    return images.clamp(-1.0, 1.0)


# ----- training -------------------------------------------------------------------------------------------------
def _step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by `(seed, *keys)`: every draw of a step depends on the step alone."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def _draw(proposal: Callable, n: int, generator: torch.Generator, like: SinglePositiveDataset):
    """n proposal samples `(images, class_labels or None)`, checked against the data's format.

    Images larger than the data's (same channels) are downscaled as real images are (`prepare_images`: antialiased
    resize of the shorter side, centre crop), which `S2MPipeline.heads_view` does at sampling time too."""
    out = proposal(n, generator)
    images, labels = out if isinstance(out, (tuple, list)) else (out, None)
    expected = (n, like.in_channels, like.sample_size, like.sample_size)
    larger = (
        isinstance(images, torch.Tensor)
        and images.ndim == 4
        and tuple(images.shape[:2]) == expected[:2]
        and min(images.shape[-2:]) >= like.sample_size
    )
    if larger and tuple(images.shape) != expected:
        images = prepare_images(images.float(), like.sample_size, like.in_channels)
    if not isinstance(images, torch.Tensor) or tuple(images.shape) != expected:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"The proposal returned {shape} for n={n}; expected images {expected} in [-1, 1] (the data's size and "
            "channels; larger images with the same channels are downscaled), or a tuple (images, class_labels) for "
            "a class-conditional proposal."
        )
    if images.abs().max() > 1.5:
        raise ValueError(
            f"The proposal's images reach {float(images.abs().max()):.3g}; they must lie in [-1, 1] (map [0, 1] "
            "images with `2 * x - 1`)."
        )
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu()
        bad = labels[(labels < 0) | (labels >= len(like.attribute_names))]
        if bad.numel():
            raise ValueError(
                f"The conditional proposal returned classes {sorted(set(bad.tolist()))[:10]}; classes index the "
                f"attributes {like.attribute_names} and must lie in [0, {len(like.attribute_names) - 1}]."
            )
    return images.detach().float().cpu(), labels


class _TrainingForward(nn.Module):
    """The training forward pass as one module, so that accelerate/DDP sees a single `forward`."""

    def __init__(self, heads: S2MHeads):
        super().__init__()
        self.heads = heads

    def forward(
        self, real_v: torch.Tensor, real_r: torch.Tensor, fake: torch.Tensor, gradient_penalty: bool = False
    ) -> dict[str, torch.Tensor]:
        aux = self.heads.dv_aux_head is not None
        x_v = torch.cat([real_v, fake]).requires_grad_(gradient_penalty)
        out = self.heads.raw_logits(x_v, heads=["dv", "dv_aux"] if aux else ["dv"])
        if gradient_penalty:  # ||grad_x logit D_v||^2 on real and generated images alike (zero-centred)
            (grad,) = torch.autograd.grad(out["dv"].float().sum(), x_v, create_graph=True)
            out["dv_gradient_norm2"] = grad.float().pow(2).flatten(1).sum(1).mean()
        if aux:
            out["dv_aux"] = out["dv_aux"][: len(real_v)]  # (B, n): real images only, they have labels
        out["dr"] = self.heads.raw_logits(real_r, heads=["dr"])["dr"]
        if self.heads.conditional:
            out["df"] = self.heads.raw_logits(fake, heads=["df"])["df"]
        return out


def _branches(heads: S2MHeads) -> dict[str, list[str]]:
    """State-dict prefixes that belong to each head (for early stopping per head)."""
    if heads.config.shared_backbone:
        return {"all": [""]}
    return {h: [f"backbones.{h}.", f"{h}_head.", f"{h}_aux_head."] for h in heads.head_names}


def _branch_state(heads: S2MHeads, prefixes: list[str]) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().clone()
        for k, v in heads.state_dict().items()
        if any(k.startswith(p) for p in prefixes) and not k.endswith("_temperature")
    }


@dataclass
class _HeldOut:
    """The held-out data of early stopping and calibration: real images and fixed proposal samples."""

    real: SinglePositiveDataset
    fake: torch.Tensor  # (M, C, S, S)
    fake_labels: torch.Tensor | None  # (M,): the classes of a class-conditional proposal's samples


@torch.no_grad()
def _heldout_logits(heads: S2MHeads, real: SinglePositiveDataset, fake: torch.Tensor, batch_size: int = 512) -> dict:
    """Raw logits of every head on the held-out real images and proposal samples (eval mode)."""
    was_training = heads.training
    heads.eval()
    out_real = _batched_raw_logits(heads, real.images, ["dv", "dr"], batch_size)
    out_fake = _batched_raw_logits(heads, fake, ["dv", "df"] if heads.conditional else ["dv"], batch_size)
    heads.train(was_training)
    return {"dv_real": out_real["dv"], "dr": out_real["dr"], "dv_fake": out_fake["dv"], "df": out_fake.get("df")}


def _batched_raw_logits(
    heads: S2MHeads, images: torch.Tensor, names: list[str], batch_size: int
) -> dict[str, torch.Tensor]:
    """`heads.raw_logits` of the heads `names`, `batch_size` images at a time, gathered on the CPU."""
    device = next(heads.parameters()).device
    parts = [
        heads.raw_logits(images[i : i + batch_size].to(device), heads=names) for i in range(0, len(images), batch_size)
    ]
    return {h: torch.cat([p[h] for p in parts]).float().cpu() for h in names}


def _calibration_sets(logits: dict, real_labels: torch.Tensor, fake_labels: torch.Tensor | None) -> dict:
    """(logits, labels, weights) per head; D_v weighs real and generated held-out images equally."""
    n_real, n_fake = len(logits["dv_real"]), len(logits["dv_fake"])
    sets = {
        "dv": (
            torch.cat([logits["dv_real"], logits["dv_fake"]]),
            torch.cat([torch.ones(n_real, dtype=torch.long), torch.zeros(n_fake, dtype=torch.long)]),
            torch.cat([torch.full((n_real,), 0.5 / n_real), torch.full((n_fake,), 0.5 / n_fake)]),
        ),
        "dr": (logits["dr"], real_labels, None),
    }
    if logits["df"] is not None:
        sets["df"] = (logits["df"], fake_labels, None)
    return sets


# The least calibration temperature per head: D_v's logit is never sharpened (`fit_temperature`).
_MIN_TEMPERATURE = {"dv": 1.0}


def _calibrated_nll(sets: dict) -> dict[str, float]:
    out = {}
    for h, (z, y, w) in sets.items():
        out[h] = float(nll(z.double() / fit_temperature(z, y, w, _MIN_TEMPERATURE.get(h, 0.0)), y, w))
    return out


def _checkpoint_folders(output_dir: str) -> list[str]:
    """The names of the `checkpoint-STEP` folders in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def _latest_checkpoint(output_dir: str) -> str | None:
    steps = [int(d.split("-")[1]) for d in _checkpoint_folders(output_dir)]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


# ----- training: what the steps of `train_heads` share ----------------------------------------------------------
@dataclass
class _TrainingState:
    """The state that the steps of [`train_heads`] read and update (and that a checkpoint saves)."""

    accelerator: Accelerator
    model: nn.Module  # the training forward pass around `heads`, prepared by accelerate (e.g. wrapped in DDP)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler  # prepared by accelerate: stepped with the optimizer, saved
    heads: S2MHeads  # the weights the optimizer trains
    averaged: S2MHeads  # the weights evaluated, early-stopped and returned: an EMA of `heads`, or `heads` itself
    heldout: _HeldOut
    branches: dict[str, list[str]]  # the state-dict prefixes of each early-stopped branch
    best: dict[str, dict]  # per branch: the lowest calibrated held-out NLL ("nll"), its "step" and weights ("state")
    fake_class_counts: torch.Tensor  # (n,): classes drawn from a conditional proposal by this process
    step: int = 0  # optimizer steps done
    run_config: dict | None = None  # what a checkpoint records and must match to be resumed (`_run_config`)

    @property
    def ema(self) -> bool:
        return self.averaged is not self.heads


@dataclass(frozen=True)
class _LoopConfig:
    """The training loop's settings: the run's ([`HeadsTrainingConfig`], read through), one process's micro-batch (real
    images, and as many proposal samples, per accumulation micro-step), and where checkpoints go."""

    run: HeadsTrainingConfig
    micro_batch: int
    output_dir: str | os.PathLike | None

    def __getattr__(self, name: str):
        return getattr(self.run, name)

    @property
    def dv_augment(self) -> tuple[str, ...]:
        return tuple(self.run.augment)

    @property
    def dr_augment(self) -> tuple[str, ...]:
        return tuple(self.run.augment if self.run.dr_augment is None else self.run.dr_augment)


@dataclass(frozen=True)
class HeadsTrainingConfig:
    """Every setting of [`train_heads`], each default in one place (pass one as ``config=``, or fields by name).

    - ``num_steps`` (`int`, defaults to 2000): optimizer steps (early stopping picks the best evaluated step per head).
    - ``batch_size`` (`int`, defaults to 64): real images per step (and as many proposal samples), over all processes
      and accumulation micro-steps. A proposal's images larger than the data's (same channels) are downscaled to the
      data's size (as `S2MPipeline.heads_view` does), so heads can be trained on small copies of a large generator's.
    - ``learning_rate`` (`float`, defaults to 1e-3), ``weight_decay`` (`float`, defaults to 1e-4): AdamW.
    - ``lr_scheduler`` (`str`, defaults to `"constant"`): the schedule over ``num_steps``, by its name in
      `diffusers.optimization.get_scheduler` (``"constant"``, ``"constant_with_warmup"``, ``"linear"``,
      ``"cosine"``, ``"cosine_with_restarts"``, ``"polynomial"``); saved in the checkpoints (a decaying one resumes
      only with the same ``num_steps``). ``lr_warmup_steps`` (`int`, defaults to 0): linear warm-up steps.
    - ``ema_decay`` (`float`, *optional*, defaults to 0.99): evaluate, early-stop and return an exponential moving
      average of the weights (smoother, better calibrated ``D_r``); `None`: the raw weights.
    - ``heldout_fraction`` (`float`, defaults to 0.2): share of the real data held out for early stopping and
      calibration (stratified by label); ``num_heldout_samples`` (`int`, defaults to 1024): fixed proposal samples for
      the same purpose; ``eval_steps`` (`int`, defaults to 100): evaluate on them every this many steps and keep, per
      head, the weights with the lowest calibrated held-out NLL.
    - ``augment`` (`Sequence[str]`, defaults to ``("shift",)``): augmentations of the real and generated images of
      ``D_v`` and ``D_f`` (the same for both, so that they do not tell real from generated; [`augment_images`]);
      ``dr_augment`` (`Sequence[str]`, *optional*): those of the real images of ``D_r`` (by default also blur, noise
      and contrast, artefacts that generated images have; `None`: ``augment``).
    - ``dv_gradient_penalty`` (`float`, defaults to 0.0): ``gamma`` of a zero-centred gradient penalty ``gamma / 2
      E ||grad_x logit D_v(x)||^2``, which keeps ``D_v``'s logit moderate where real and generated images separate.
    - ``seed`` (`int`, defaults to 0): seed of the split, the held-out proposal samples and every training step.
    - ``mixed_precision`` (`str`, defaults to `"no"`), ``gradient_accumulation_steps`` (`int`, defaults to 1): passed
      to `accelerate.Accelerator`.
    - ``checkpointing_steps`` (`int`, *optional*): save the training state to ``output_dir/checkpoint-STEP`` every
      this many steps; ``checkpoints_total_limit`` (`int`, *optional*): keep at most this many;
      ``resume_from_checkpoint`` (`str`, *optional*): a ``checkpoint-STEP`` folder, or ``"latest"`` in ``output_dir``.
    - ``priors`` (`Sequence[float]`, `"estimate"` or `None`, defaults to `"estimate"`): attribute priors ``pi_c`` to
      store; ``"estimate"`` estimates them from the calibrated ``D_r`` on the real data (spec §3).
    - ``negation_margin``, ``presence_margin``, ``dv_strength`` (`float` or `"auto"`, defaults to `"auto"`): how the
      sampler reads the heads, stored in their config; ``"auto"`` chooses each from the held-out data
      ([`choose_sampling_settings`]).
    - ``labelling`` (`str`, defaults to `"independent"`): how the data were labelled (spec §1): ``"independent"``
      or ``"one_label_per_image"``.
    - ``report_to`` (`str`, *optional*): an accelerate tracker (``"tensorboard"``, ``"wandb"``, ...);
      ``logging_dir`` (`str`, *optional*): its logs (relative to ``output_dir``; defaults to it).
    - ``progress`` (`bool`, defaults to `True`): a progress bar on the main process.
    """

    num_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-4
    ema_decay: float | None = 0.99
    heldout_fraction: float = 0.2
    num_heldout_samples: int = 1024
    eval_steps: int = 100
    augment: Sequence[str] = ("shift",)
    dv_gradient_penalty: float = 0.0
    dr_augment: Sequence[str] | None = ("shift", "blur", "noise", "contrast")
    seed: int = 0
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | os.PathLike | None = None
    priors: Sequence[float] | str | None = "estimate"
    negation_margin: float | str = "auto"
    presence_margin: float | str = "auto"
    dv_strength: float | str = "auto"
    labelling: str = "independent"
    report_to: str | None = None
    logging_dir: str | os.PathLike | None = None
    progress: bool = True

    @classmethod
    def split(cls, config: HeadsTrainingConfig | dict | None, settings: dict) -> tuple[HeadsTrainingConfig, dict]:
        """``config`` with the fields named in ``settings`` replaced, and the rest of ``settings`` (the config of new
        heads)."""
        names = {f.name for f in dataclasses.fields(cls)}
        base = cls(**config) if isinstance(config, dict) else (config or cls())
        ours = {k: v for k, v in settings.items() if k in names}
        return dataclasses.replace(base, **ours), {k: v for k, v in settings.items() if k not in names}

    def run_settings(self) -> dict:
        """The settings a checkpoint records and a resumed run must share (all but ``num_steps`` and the evaluation,
        checkpoint, logging and resume settings, which may change on resume; a decaying schedule depends on
        ``num_steps`` too)."""
        free = ("num_steps", "eval_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint")
        free += ("priors", "negation_margin", "presence_margin", "dv_strength", "labelling", "report_to")
        free += ("logging_dir", "progress")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in free}
        if self.lr_scheduler in _DECAYING_SCHEDULERS:
            out["lr_num_training_steps"] = self.num_steps
        return out


def train_heads(
    data: SinglePositiveDataset,
    proposal: Callable | str | os.PathLike,
    *,
    heads: S2MHeads | None = None,
    output_dir: str | os.PathLike | None = None,
    config: HeadsTrainingConfig | dict | None = None,
    **settings,
) -> tuple[S2MHeads, dict]:
    """Train and calibrate the S2M heads on single-positive data and a proposal (module docstring).

    Args:
        data ([`~s2m_diffusers.data.SinglePositiveDataset`]): real images in the proposal's format and their
            single-positive labels.
        proposal (`Callable` or path): `proposal(n, generator)` returning images `(n, C, S, S)` in [-1, 1], or
            `(images, class_labels)` for a class-conditional proposal (then ``D_f`` is trained too); or a folder of
            pre-generated samples (or an [`~s2m_diffusers.data.ImageBank`]), of which `heldout_fraction` is
            kept apart for calibration.
        heads ([`~s2m_diffusers.models.heads.S2MHeads`], *optional*): heads to train; by default new ones are
            built from the data's attribute names, size and channels and the settings that are not training's.
        output_dir (`str`, *optional*): where the trained heads (`save_pretrained`), `metrics.json` and the
            checkpoints `checkpoint-STEP` go.
        config ([`HeadsTrainingConfig`] or `dict`, *optional*): the training settings (every one documented there).
        settings: single fields of [`HeadsTrainingConfig`] by name (e.g. ``num_steps=500``); any other name configures
            new [`S2MHeads`] (e.g. ``cnn_channels``, ``transformers_config``, ``shared_backbone``).

    Returns:
        `tuple[S2MHeads, dict]`: the trained, calibrated heads (on the CPU) and the metrics: for each head `h` in
        `dv`, `dr`, `df`: `h_accuracy`, `h_nll_before`, `h_nll_after`, `h_ece_before`, `h_ece_after`,
        `h_temperature`, `h_best_step`, on the held-out data (``D_v``'s temperature is never below 1:
        `dv_temperature_fitted` is what calibration asked for); `priors`, `priors_report`, `train_time_s`, `steps`;
        and those of [`choose_sampling_settings`]: `negation_margin`, `presence_margin`, `dv_strength`,
        `dv_degenerate`, `dv_report`, `dv_ess_share`, `generated_support`, `margins_report`.

    Examples:

    ```py
    >>> import torch
    >>> from s2m_diffusers.data import SinglePositiveDataset
    >>> from s2m_diffusers.training import train_heads
    >>> images = torch.rand(64, 1, 8, 8) * 2 - 1
    >>> data = SinglePositiveDataset(images, torch.arange(64) % 2, ["a", "b"])
    >>> proposal = lambda n, generator: torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1
    >>> heads, metrics = train_heads(data, proposal, num_steps=2, batch_size=8, eval_steps=1, progress=False,
    ...                              cnn_channels=[8], num_heldout_samples=16)
    >>> sorted(k for k in metrics if k.startswith("dv_"))[:3]
    ['dv_accuracy', 'dv_best_step', 'dv_ece_after']
    ```
    """
    start_time = time.perf_counter()
    config, heads_kwargs = HeadsTrainingConfig.split(config, settings)
    _check_run(config, output_dir)
    accelerator, micro_batch = _make_accelerator(config, output_dir)
    # Data: a stratified held-out split of the real images and a fixed held-out set of proposal samples.
    train, proposal, heldout = _prepare_data(
        data, proposal, config.heldout_fraction, config.num_heldout_samples, config.seed
    )
    heads = _build_heads(heads, data, heldout.fake_labels is not None, config.seed, heads_kwargs)
    heads.register_to_config(labelling=_check_labelling(config.labelling))
    # The model, optimizer and schedule prepared by accelerate, the state the steps share, a checkpoint resumed.
    state = _start_training(accelerator, heads, heldout, config, output_dir)
    # Training, with held-out evaluation (early stopping) every `eval_steps` and checkpoints.
    _train_loop(state, train, proposal, _LoopConfig(config, micro_batch, output_dir))
    if state.step == 0 or state.best[next(iter(state.best))]["nll"] == math.inf:
        _evaluate(state)
    # Early stopping and calibration; then what the sampler needs besides the weights.
    heads, metrics = _finish_training(state, data, heldout, config)
    metrics["train_time_s"] = time.perf_counter() - start_time
    _report_and_save(state, heads, metrics, output_dir, config.report_to)
    return heads, metrics


def _check_run(config: HeadsTrainingConfig, output_dir) -> None:
    """Settings that cannot work together, refused before anything runs."""
    if config.resume_from_checkpoint == "latest" and output_dir is None:
        raise ValueError("`resume_from_checkpoint='latest'` needs `output_dir`, where the checkpoints are.")
    if config.checkpointing_steps is not None and output_dir is None:
        raise ValueError("`checkpointing_steps` needs `output_dir` to save checkpoints into.")
    _check_lr_scheduler(config.lr_scheduler, config.lr_warmup_steps)


def _start_training(accelerator, heads: S2MHeads, heldout, config: HeadsTrainingConfig, output_dir) -> _TrainingState:
    """AdamW and its learning-rate schedule prepared by accelerate with the heads, the trackers, the state at step 0
    (or at a resumed checkpoint's), and the run configuration a checkpoint records."""
    trainable = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    # accelerate steps a prepared schedule once per process at each optimizer step: count the steps the same way
    schedule = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.num_steps * accelerator.num_processes,
    )
    model, optimizer, schedule = accelerator.prepare(_TrainingForward(heads), optimizer, schedule)
    if config.report_to is not None:
        accelerator.init_trackers("s2m_heads")
    state = _start_state(accelerator, model, optimizer, schedule, heads, heldout, config.ema_decay)
    state.run_config = _run_config(heads, accelerator, **config.run_settings())
    if config.resume_from_checkpoint is not None:
        _resume(state, config.resume_from_checkpoint, output_dir)
    return state


def _finish_training(state: _TrainingState, data, heldout, config: HeadsTrainingConfig) -> tuple[S2MHeads, dict]:
    """The best weights per head, calibrated; the class shares of a conditional proposal, the priors, and how the
    sampler reads the heads, chosen from the held-out data."""
    heads, metrics = _calibrate(state)
    if heads.conditional:
        _store_proposal_class_probs(state, heads)
    metrics.update(_store_priors(heads, data, config.priors))
    metrics.update(
        choose_sampling_settings(
            heads,
            heldout.real.images,
            heldout.real.labels,
            heldout.fake,
            config.negation_margin,
            config.presence_margin,
            config.dv_strength,
            metrics.get("dv_temperature_fitted"),
        )
    )
    return heads, metrics


# ----- the steps of `train_heads` -------------------------------------------------------------------------------
def _make_accelerator(config: HeadsTrainingConfig, output_dir: str | os.PathLike | None) -> tuple[Accelerator, int]:
    """The `Accelerator`, and the micro-batch of one process and accumulation step."""
    get_state()  # several CPU processes where there is no accelerator (a plain Accelerator() would see one)
    batch_size, accumulation, logging_dir = config.batch_size, config.gradient_accumulation_steps, config.logging_dir
    project_dir = None if output_dir is None else os.fspath(output_dir)
    if logging_dir is not None and project_dir is not None:
        logging_dir = os.path.join(project_dir, os.fspath(logging_dir))  # an absolute logging_dir stays as it is
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with=config.report_to,
        project_config=ProjectConfiguration(
            project_dir=project_dir, logging_dir=None if logging_dir is None else os.fspath(logging_dir)
        ),
    )
    micro_batch = batch_size // (accelerator.num_processes * accumulation)
    if micro_batch < 1:
        raise ValueError(
            f"batch_size={batch_size} is smaller than processes x accumulation steps "
            f"({accelerator.num_processes} x {accumulation})."
        )
    return accelerator, micro_batch


def _prepare_data(
    data: SinglePositiveDataset,
    proposal: Callable | str | os.PathLike,
    heldout_fraction: float,
    num_heldout_samples: int,
    seed: int,
) -> tuple[SinglePositiveDataset, Callable, _HeldOut]:
    """`(train, proposal, heldout)`: the real training split, the proposal to train on (a bank of pre-generated
    samples less its held-out share) and the held-out data."""
    train, heldout = data.split(heldout_fraction, seed=seed)
    if isinstance(proposal, (str, os.PathLike)):
        proposal = ImageBank.from_folder(proposal, data.sample_size, data.in_channels)
    if isinstance(proposal, ImageBank):
        proposal, heldout_proposal = proposal.split(heldout_fraction, seed=seed)
    else:
        heldout_proposal = proposal
    fake, fake_labels = _draw(heldout_proposal, num_heldout_samples, _step_generator(seed, 1), data)
    return train, proposal, _HeldOut(real=heldout, fake=fake, fake_labels=fake_labels)


def _check_lr_scheduler(lr_scheduler: str, lr_warmup_steps: int) -> None:
    if lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {list(LR_SCHEDULERS)}, got {lr_scheduler!r}.")
    if lr_warmup_steps < 0:
        raise ValueError(f"lr_warmup_steps must be 0 or more, got {lr_warmup_steps}.")
    if lr_warmup_steps > 0 and lr_scheduler == "constant":
        raise ValueError(
            f"lr_warmup_steps={lr_warmup_steps} has no effect with lr_scheduler='constant'; use "
            "'constant_with_warmup' (or another schedule) for a warm-up."
        )


def _check_labelling(labelling: str) -> str:
    from .maths import LABELLINGS

    if labelling not in LABELLINGS:
        raise ValueError(
            f"labelling must be one of {list(LABELLINGS)}, got {labelling!r}: 'independent' when each attribute's "
            "folder samples the images that hold it, 'one_label_per_image' when each image sits in exactly one folder."
        )
    return labelling


def _build_heads(
    heads: S2MHeads | None,
    data: SinglePositiveDataset,
    conditional: bool,
    seed: int,
    heads_kwargs: dict,
) -> S2MHeads:
    """New heads for the data (initial weights from `seed`), or the given ones checked against the data; with the
    data's label counts in their config."""
    if heads is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights too depend on `seed` alone
            heads = S2MHeads(
                attribute_names=data.attribute_names,
                sample_size=data.sample_size,
                in_channels=data.in_channels,
                conditional=conditional,
                **heads_kwargs,
            )
    elif heads_kwargs:
        raise ValueError(f"Pass either `heads` or heads config arguments, not both (got {sorted(heads_kwargs)}).")
    if heads.attribute_names != data.attribute_names:
        raise ValueError(
            f"The heads' attributes {heads.attribute_names} differ from the data's {data.attribute_names}."
        )
    if (heads.config.sample_size, heads.config.in_channels) != (data.sample_size, data.in_channels):
        raise ValueError(
            f"The heads take {heads.config.in_channels}x{heads.config.sample_size}^2 images, the data is "
            f"{data.in_channels}x{data.sample_size}^2."
        )
    if heads.conditional != conditional:
        raise ValueError(
            f"The heads have conditional={heads.conditional} but the proposal is "
            f"{'class-conditional' if conditional else 'unconditional'}; build heads with conditional={conditional}."
        )
    heads.register_to_config(label_counts=data.label_counts)
    return heads


def _start_state(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    heads: S2MHeads,
    heldout: _HeldOut,
    ema_decay: float | None,
) -> _TrainingState:
    """The state at step 0: the averaged copy (with `ema_decay`) and, per branch, its initial weights as the best."""
    branches = _branches(heads)
    averaged = copy.deepcopy(heads).requires_grad_(False) if ema_decay is not None else heads
    best = {
        name: {"nll": math.inf, "step": 0, "state": _branch_state(averaged, prefixes)}
        for name, prefixes in branches.items()
    }
    return _TrainingState(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        heads=heads,
        averaged=averaged,
        heldout=heldout,
        branches=branches,
        best=best,
        fake_class_counts=torch.zeros(heads.num_attributes, dtype=torch.long),
    )


def _resume(state: _TrainingState, resume_from_checkpoint: str | os.PathLike, output_dir) -> None:
    """Load a checkpoint written by [`_save_checkpoint`] into `state` (and the accelerator's objects)."""
    path = (
        _latest_checkpoint(os.fspath(output_dir))
        if resume_from_checkpoint == "latest"
        else os.fspath(resume_from_checkpoint)
    )
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(
            f"No checkpoint to resume from at {resume_from_checkpoint!r} (output_dir={output_dir})."
        )
    with open(os.path.join(path, STATE_FILE)) as f:
        saved = json.load(f)
    _check_run_config(path, saved.get("config"), state.run_config)  # before any weight is read
    state.accelerator.load_state(path)
    state.step = saved["step"]
    # the saved counts are summed over the processes: the main process takes them up, the others start at 0
    state.fake_class_counts = torch.tensor(saved["fake_class_counts"]) * int(state.accelerator.is_main_process)
    if state.ema:
        state.averaged.load_state_dict(load_file(os.path.join(path, EMA_FILE)))
    tensors = load_file(os.path.join(path, BEST_FILE))
    for name, best in state.best.items():
        best["nll"], best["step"] = saved["best"][name]["nll"], saved["best"][name]["step"]
        prefix = f"{name}/"
        best["state"] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# heads config fields that training does not read (set after it, or read by the sampler only)
_UNCHECKED_HEADS_FIELDS = ("priors", "proposal_class_probs", "negation_margin", "presence_margin", "dv_strength")


def _run_config(heads: S2MHeads, accelerator: Accelerator, **settings) -> dict:
    """What a checkpoint records of its run, and what a resumed run must share with it: the heads' config (the
    attributes, the backbone, the data's label counts) and the training settings that shape the state (all but
    `num_steps` and the evaluation and checkpoint cadence, which may change on resume), as JSON values."""
    heads_config = {
        k: v
        for k, v in dict(heads.config).items()
        if not k.startswith("_") and k not in _UNCHECKED_HEADS_FIELDS and "temperature" not in k
    }
    settings["num_processes"] = accelerator.num_processes
    return json.loads(json.dumps({"heads": heads_config, "training": settings}, default=list))


def _check_run_config(path: str, saved: dict | None, current: dict | None) -> None:
    """Refuse to resume from a checkpoint of another configuration, naming each field that differs."""
    if saved is None or current is None:
        logger.warning(f"{path} records no configuration (an older checkpoint): it is resumed unchecked.")
        return
    differ = [
        f"{part}.{k}: {saved[part].get(k)!r} in the checkpoint, {current[part].get(k)!r} now"
        for part in ("heads", "training")
        for k in sorted(set(saved.get(part, {})) | set(current.get(part, {})))
        if saved.get(part, {}).get(k) != current[part].get(k)
    ]
    if differ:
        raise ValueError(
            f"Cannot resume from {path}: it was written by a run with another configuration, and resuming would "
            f"mix the two. Differing: {'; '.join(differ)}. Resume with the checkpoint's settings and data, or start "
            "a new run (in another output folder, or without resuming)."
        )


def _train_loop(state: _TrainingState, train: SinglePositiveDataset, proposal: Callable, config: _LoopConfig) -> None:
    """Optimizer steps from `state.step` to `config.num_steps`: losses logged (averaged over the processes), the
    held-out evaluation every `eval_steps` (and at the end), a checkpoint every `checkpointing_steps`."""
    accelerator = state.accelerator
    bar = tqdm(
        total=config.num_steps,
        initial=state.step,
        disable=not (config.progress and accelerator.is_local_main_process),
        desc="heads",
    )
    # Each step seeds the global RNG (dropout) from `(seed, step)`; the caller's RNG state is restored after.
    with torch.random.fork_rng(devices=[]):
        state.model.train()
        while state.step < config.num_steps:
            for micro in range(config.gradient_accumulation_steps):
                losses = _micro_step(state, train, proposal, config, micro)
                if config.ema_decay is not None and accelerator.sync_gradients:
                    _update_ema(state.averaged, state.heads, config.ema_decay)
            state.step += 1
            bar.update(1)
            mean_losses = torch.stack([v.detach().float() for v in losses.values()])
            if accelerator.num_processes > 1:
                mean_losses = accelerator.reduce(mean_losses, reduction="mean")  # over the processes
            logs = {f"loss_{h}": float(v) for h, v in zip(losses, mean_losses)}
            logs["lr"] = state.lr_scheduler.get_last_lr()[0]
            if state.step % config.eval_steps == 0 or state.step == config.num_steps:
                logs.update({f"heldout_nll_{h}": v for h, v in _evaluate(state).items()})
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
            if config.report_to is not None:
                accelerator.log(logs, step=state.step)
            if config.checkpointing_steps is not None and state.step % config.checkpointing_steps == 0:
                _save_checkpoint(state, config.output_dir, config.checkpoints_total_limit)
    bar.close()


def _micro_step(
    state: _TrainingState, train: SinglePositiveDataset, proposal: Callable, config: _LoopConfig, micro: int
) -> dict[str, torch.Tensor]:
    """One forward and backward pass on fresh real images and proposal samples (the optimizer steps once the
    accumulation is complete); every draw comes from a generator seeded by `(seed, step, micro, process)`."""
    accelerator, n = state.accelerator, config.micro_batch
    g = _step_generator(config.seed, 0, state.step, micro, accelerator.process_index)
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))  # dropout and other global draws
    index = torch.randint(len(train), (n,), generator=g)
    real, labels = train.images[index], train.labels[index]
    fake, fake_labels = _draw(proposal, n, g, train)
    real_v, fake = augment_images(real, config.dv_augment, g), augment_images(fake, config.dv_augment, g)
    real_r = real_v if config.dr_augment == config.dv_augment else augment_images(real, config.dr_augment, g)
    device = accelerator.device
    with accelerator.accumulate(state.model), accelerator.autocast():
        penalty = config.dv_gradient_penalty > 0
        out = state.model(real_v.to(device), real_r.to(device), fake.to(device), penalty)  # raw logits per head
        dv_target = torch.cat([torch.ones(n), torch.zeros(n)]).to(device)
        losses = {
            "dv": F.binary_cross_entropy_with_logits(out["dv"].float(), dv_target),
            "dr": F.cross_entropy(out["dr"].float(), labels.to(device)),
        }
        if penalty:
            losses["dv_gp"] = 0.5 * config.dv_gradient_penalty * out["dv_gradient_norm2"]
        if "dv_aux" in out:
            losses["dv_aux"] = F.cross_entropy(out["dv_aux"].float(), labels.to(device))
        if state.heads.conditional:
            losses["df"] = F.cross_entropy(out["df"].float(), fake_labels.to(device))
            state.fake_class_counts += torch.bincount(fake_labels, minlength=state.heads.num_attributes)
        loss = sum(losses.values())
        accelerator.backward(loss)
        state.optimizer.step()
        state.lr_scheduler.step()  # only when the optimizer stepped (the accumulation is complete)
        state.optimizer.zero_grad()
    return losses


@torch.no_grad()
def _update_ema(averaged: S2MHeads, heads: S2MHeads, decay: float) -> None:
    """`averaged <- decay * averaged + (1 - decay) * heads` for the parameters; buffers are copied."""
    for average, current in zip(averaged.parameters(), heads.parameters()):
        average.lerp_(current.detach(), 1.0 - decay)
    for average, current in zip(averaged.buffers(), heads.buffers()):
        average.copy_(current)  # e.g. normalisation statistics of a transformers backbone


def _evaluate(state: _TrainingState) -> dict[str, float]:
    """The calibrated held-out NLL of each head at `state.step`; keeps the weights of each branch that improved."""
    heldout = state.heldout
    logits = _heldout_logits(state.averaged, heldout.real, heldout.fake)
    scores = _calibrated_nll(_calibration_sets(logits, heldout.real.labels, heldout.fake_labels))
    for name, prefixes in state.branches.items():
        score = sum(scores.values()) if name == "all" else scores[name]
        if score < state.best[name]["nll"]:
            state.best[name].update(nll=score, step=state.step, state=_branch_state(state.averaged, prefixes))
    return scores


def _total_class_counts(state: _TrainingState) -> torch.Tensor:
    """The conditional proposal's class counts, summed over the processes (every process calls this)."""
    accelerator = state.accelerator
    if accelerator.num_processes == 1:
        return state.fake_class_counts
    return accelerator.reduce(state.fake_class_counts.to(accelerator.device), reduction="sum").cpu()


def _save_checkpoint(state: _TrainingState, output_dir, checkpoints_total_limit: int | None) -> None:
    """`output_dir/checkpoint-STEP`: the accelerator's state (every process's), the best and averaged weights and
    `STATE_FILE`; written into `checkpoint-STEP.tmp`, then renamed. Keeps the newest `checkpoints_total_limit`."""
    accelerator = state.accelerator
    final = os.path.join(os.fspath(output_dir), f"checkpoint-{state.step}")
    tmp = final + ".tmp"
    counts = _total_class_counts(state)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # every process writes its random state into tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(
            {f"{n}/{k}": v.contiguous() for n, b in state.best.items() for k, v in b["state"].items()},
            os.path.join(tmp, BEST_FILE),
        )
        if state.ema:
            save_file({k: v.contiguous() for k, v in state.averaged.state_dict().items()}, os.path.join(tmp, EMA_FILE))
        saved = {
            "step": state.step,
            "fake_class_counts": counts.tolist(),
            "best": {n: {"nll": b["nll"], "step": b["step"]} for n, b in state.best.items()},
            "config": state.run_config,
        }
        write_text_atomically(os.path.join(tmp, STATE_FILE), json.dumps(saved))
        move_into_place(tmp, final, replace=True)
        if checkpoints_total_limit is not None:
            old = _checkpoint_folders(os.fspath(output_dir))
            for d in old[: max(0, len(old) - checkpoints_total_limit)]:
                shutil.rmtree(os.path.join(output_dir, d))
    accelerator.wait_for_everyone()


def _calibrate(state: _TrainingState) -> tuple[S2MHeads, dict]:
    """Early stopping (the best weights of each branch), then one temperature per head fitted on the held-out data.

    Returns the heads (on the CPU, trainable, in eval mode) and the metrics `steps` and, per head `h`, those of
    [`head_metrics`] and `h_best_step`."""
    heads = state.averaged.cpu()
    for b in state.best.values():
        heads.load_state_dict(b["state"], strict=False)
    heldout = state.heldout
    logits = _heldout_logits(heads, heldout.real, heldout.fake)
    sets = _calibration_sets(logits, heldout.real.labels, heldout.fake_labels)
    metrics: dict = {"steps": state.step}
    temperatures = {}
    for h, (z, y, w) in sets.items():
        temperatures[h] = fit_temperature(z, y, w, _MIN_TEMPERATURE.get(h, 0.0))
        if h in _MIN_TEMPERATURE:
            metrics[f"{h}_temperature_fitted"] = fit_temperature(z, y, w)
        metrics.update({f"{h}_{k}": v for k, v in head_metrics(z, y, temperatures[h], w).items()})
        metrics[f"{h}_best_step"] = state.best["all" if "all" in state.best else h]["step"]
    heads.set_temperatures(**temperatures)
    heads.requires_grad_(True)  # the averaged copy was frozen; hand back trainable heads
    if heads.config.freeze_backbone:
        heads.backbones.requires_grad_(False)
    heads.eval()
    return heads, metrics


def _store_proposal_class_probs(state: _TrainingState, heads: S2MHeads) -> None:
    """``p_G(c)`` of a conditional proposal: its class shares over training and held-out draws, in the config."""
    counts = _total_class_counts(state).double()
    counts = counts + torch.bincount(state.heldout.fake_labels, minlength=heads.num_attributes)
    heads.register_to_config(proposal_class_probs=(counts / counts.sum()).tolist())


def _store_priors(heads: S2MHeads, data: SinglePositiveDataset, priors: Sequence[float] | str | None) -> dict:
    """Store the priors in the heads' config, estimated from the calibrated ``D_r`` on the real data (spec §3) when
    `priors == "estimate"`; returns the metrics `priors_report` (when estimated) and `priors`."""
    metrics = {}
    if isinstance(priors, str):
        if priors != "estimate":
            raise ValueError(f"`priors` must be a list of floats, 'estimate' or None; got {priors!r}.")
        with torch.no_grad():
            dr_log_probs = torch.cat([heads(data.images[i : i + 512]).dr_log_probs for i in range(0, len(data), 512)])
        priors, metrics["priors_report"] = estimate_priors(dr_log_probs, data.label_counts)
    heads.register_to_config(priors=None if priors is None else [float(p) for p in priors])
    metrics["priors"] = heads.priors
    return metrics


@torch.no_grad()
def choose_sampling_settings(
    heads: S2MHeads,
    real_images: torch.Tensor,
    real_labels: torch.Tensor,
    generated_images: torch.Tensor,
    negation_margin: float | str = "auto",
    presence_margin: float | str = "auto",
    dv_strength: float | str = "auto",
    dv_temperature_fitted: float | None = None,
    batch_size: int = 512,
) -> dict:
    """Choose how the sampler reads trained heads, from held-out data, and store it in their config (spec §3).

    [`train_heads`] calls this last, on its held-out real images and generated samples; call it yourself to give
    heads trained elsewhere (or before these settings existed) their margins and ``D_v`` strength
    (`s2m_diffusers.calibration`):

    - ``negation_margin`` ``lambda``: one over the boundary between the attributes generated images hold and those
      they lack, as ``D_r`` sees them (a two-component mixture over the attributes' ratios to the strongest), then as
      strict as it can be while every combination the generated images support keeps half its support;
    - ``presence_margin`` ``kappa``: the ratio that 95% of the attributes real images are labelled with reach;
    - ``dv_strength`` ``beta``: the largest strength of ``logit D_v`` whose weights keep an effective sample size of
      10% over the generated images.

    Args:
        heads ([`~s2m_diffusers.models.heads.S2MHeads`]): trained, calibrated heads (priors already stored).
        real_images (`torch.Tensor`): `(N, C, S, S)` held-out real images in [-1, 1].
        real_labels (`torch.Tensor`): `(N,)` their single-positive labels.
        generated_images (`torch.Tensor`): `(M, C, S, S)` held-out proposal samples in [-1, 1].
        negation_margin, presence_margin, dv_strength (`float` or `"auto"`, defaults to `"auto"`): a number stores
            that value instead of choosing it.
        dv_temperature_fitted (`float`, *optional*): the temperature calibration fitted to ``D_v`` before it was kept
            at 1 or more (a value below 1 marks a degenerate ``D_v``).
        batch_size (`int`, defaults to 512): images per forward pass.

    Returns:
        `dict`: the metrics `negation_margin`, `presence_margin`, `dv_strength`, `margins_report`,
        `dv_degenerate`, `dv_report`, `dv_ess_share` (effective sample size share of the generated images' weights
        ``exp(beta logit D_v)`` at the chosen strength), `generated_support` (share of generated images each
        combination keeps a positive weight on under the margins).
    """
    from . import calibration

    was_training = heads.training
    heads.eval()
    device = next(heads.parameters()).device

    def outputs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [heads(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
        return torch.cat([p.dv_logit.cpu() for p in parts]), torch.cat([p.dr_log_probs.cpu() for p in parts])

    dv_real, dr_real = outputs(real_images)
    dv_fake, dr_fake = outputs(generated_images)
    heads.train(was_training)

    def ratios(dr: torch.Tensor) -> torch.Tensor:
        return calibration.log_attribute_ratios(dr, heads.log_p_data(), heads.log_priors(), heads.config.labelling)

    metrics: dict = {}
    fake_ratios = ratios(dr_fake)
    lam, kappa, report = calibration.choose_margins(
        fake_ratios, ratios(dr_real), real_labels, attribute_names=heads.attribute_names
    )
    lam = lam if negation_margin == "auto" else float(negation_margin)
    kappa = kappa if presence_margin == "auto" else float(presence_margin)
    beta = calibration.choose_dv_strength(dv_fake) if dv_strength == "auto" else float(dv_strength)
    accuracy = float(((dv_real > 0).double().mean() + (dv_fake <= 0).double().mean()) / 2)
    degenerate, sentence = calibration.dv_report(
        dv_fake, 1.0 if dv_temperature_fitted is None else dv_temperature_fitted, accuracy, beta
    )
    heads.register_to_config(negation_margin=lam, presence_margin=kappa, dv_strength=beta)
    metrics.update(
        negation_margin=lam,
        presence_margin=kappa,
        dv_strength=beta,
        margins_report=report,
        dv_degenerate=degenerate,
        dv_report=sentence,
        dv_ess_share=calibration.ess_share(beta * dv_fake.double()),
        generated_support=calibration.support_shares(fake_ratios, heads.attribute_names, lam, kappa),
    )
    if degenerate:
        logging.getLogger(__name__).warning(sentence)
    return metrics


def _report_and_save(state: _TrainingState, heads: S2MHeads, metrics: dict, output_dir, report_to: str | None) -> None:
    """Log the metrics (and end the trackers); the main process writes the heads and `metrics.json`."""
    accelerator = state.accelerator
    summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    logger.info(f"Trained S2M heads for {state.step} steps: {summary}", main_process_only=True)
    if report_to is not None:
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=state.step)
        accelerator.end_training()
    if output_dir is not None and accelerator.is_main_process:
        save_heads(heads, os.fspath(output_dir))
        write_text_atomically(os.path.join(output_dir, "metrics.json"), json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()


def sample_bank(
    proposal: Callable,
    size: int,
    seed: int = 0,
    sample_size: int | None = None,
    in_channels: int | None = None,
    progress: bool = True,
) -> ImageBank:
    """``size`` samples of a generator, drawn once: the image bank ``D_v`` trains against when every sample is
    expensive (a diffusion model: one sample costs a whole denoising run), instead of fresh samples every step.

    The bank is drawn once however many processes run. For a generator adapter (a
    [`~s2m_diffusers.proposals.ProposalAdapter`] such as `DDIMProposal`), every process draws the same latents (and
    classes) from the seed, generates its own micro-batches of them (micro-batch ``j`` on process ``j mod N``) and
    receives the others': the images are those of one process, which draws them all, in the same order, in ``1/N`` of
    the time. Any other callable is run by the main process alone and its bank sent to the others.

    Args:
        proposal (`Callable`): ``proposal(n, generator) -> images`` in [-1, 1] (or ``(images, class_labels)``), e.g. a
            `DDIMProposal`.
        size (`int`): samples in the bank.
        seed (`int`, defaults to 0): the bank is drawn with ``torch.Generator().manual_seed(seed + 12345)``, as
            ``proposal(size, generator)`` would draw it: the same images for the same seed, with or without the
            progress bar, on any number of processes (up to the floating-point rounding of different devices).
        sample_size (`int`, *optional*), in_channels (`int`, *optional*): bring the samples to the heads' format
            (`prepare_images`) when they are larger.
        progress (`bool`, defaults to `True`): a progress bar over the bank's images, on the main process.

    Returns:
        [`~s2m_diffusers.data.ImageBank`]: the same on every process.

    Examples:

    ```py
    >>> import torch
    >>> from s2m_diffusers.models.gan import DCGANGenerator
    >>> from s2m_diffusers.proposals import GeneratorProposal
    >>> from s2m_diffusers.training import sample_bank
    >>> gan = DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=8)
    >>> bank = sample_bank(GeneratorProposal(gan), 16, seed=0, progress=False)
    >>> bank.images.shape
    torch.Size([16, 1, 8, 8])
    ```
    """
    state = get_state()
    generator = torch.Generator().manual_seed(seed + 12345)

    def heads_format(images: torch.Tensor) -> torch.Tensor:
        if sample_size is not None and images.shape[-1] != sample_size:
            return prepare_images(images, sample_size, in_channels)
        return images

    bar = tqdm(
        total=size,
        desc="drawing the sample bank",
        unit="image",
        disable=not (progress and state.is_local_main_process),
    )
    with torch.no_grad(), bar:
        if isinstance(proposal, ProposalAdapter):
            images, labels = _draw_adapter_bank(proposal, size, generator, state, heads_format, bar)
        else:
            images, labels = _draw_callable_bank(proposal, size, generator, state, heads_format, bar)
    return ImageBank(images, labels)


def _draw_adapter_bank(proposal, size: int, generator, state, heads_format, bar) -> tuple:
    """`sample_bank` for a generator adapter: the latents and classes of ``proposal(size, generator)``, their images
    made one micro-batch at a time, spread over the processes and gathered in order."""
    latents = proposal.p_z().sample(size, generator=generator)  # (N, *latent_shape): the stream of proposal(size, g)
    labels = proposal.draw_class_labels(size, generator)  # (N,) or None
    step, processes = proposal.micro_batch_size, state.num_processes
    starts = list(range(0, size, step))  # the micro-batches `generate` would make
    parts = []
    for first in range(0, len(starts), processes):  # one round: micro-batch first + p on process p
        mine = first + state.process_index
        images = None
        if mine < len(starts):
            rows = slice(starts[mine], starts[mine] + step)
            chunk_labels = None if labels is None else labels[rows]
            images = heads_format(proposal.generate(latents[rows], chunk_labels, output_device="cpu").float())
        if processes > 1:
            if first + processes > len(starts):  # some process has no micro-batch: it sends no rows of the same shape
                shape = next(s for s in gather_objects(None if images is None else images.shape[1:], state) if s)
                images = torch.zeros((0, *shape)) if images is None else images
            images = gather_rows(images, state)  # (rows of this round, C, S, S) in micro-batch order
        parts.append(images)
        bar.update(len(images))
    return torch.cat(parts), labels


def _draw_callable_bank(proposal: Callable, size: int, generator, state, heads_format, bar) -> tuple:
    """`sample_bank` for any other callable: drawn by the main process in one call, sent to the others."""
    drawn = None
    if state.is_main_process:
        drawn = proposal(size, generator)
        images, labels = drawn if isinstance(drawn, tuple) else (drawn, None)
        drawn = (heads_format(images), labels)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        drawn = broadcast_object_list([drawn], from_process=0)[0]
    bar.update(size)
    return drawn


def save_heads(heads: S2MHeads, output_dir: str) -> None:
    """`heads.save_pretrained(output_dir)` atomically: written to a temporary folder beside it, then moved into place
    file by file (other files of `output_dir`, such as checkpoints, are kept)."""
    save_folder_atomically(heads.save_pretrained, output_dir)
