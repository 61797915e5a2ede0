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
by `(seed, k)`: a run is reproducible on CPU, and a run resumed from a checkpoint continues exactly as the
uninterrupted run would.

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
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import ImageBankProposal, SinglePositiveDataset, prepare_images
from .distributed import get_state
from .models.heads import S2MHeads
from .priors import estimate_priors

logger = get_logger(__name__)

STATE_FILE = "s2m_training_state.json"
BEST_FILE = "s2m_best_weights.safetensors"
EMA_FILE = "s2m_ema_weights.safetensors"
AUGMENTATIONS = ("shift", "flip", "noise", "blur", "contrast")


# ----- pure functions: augmentation, calibration, metrics -----------------------------------------------------
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


def nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood: binary (logits `(N,)`, labels in {0, 1}) or softmax (logits `(N, K)`)."""
    if logits.ndim == 1:
        losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    else:
        losses = F.cross_entropy(logits, labels, reduction="none")
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum()


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """(N,) binary logits or (N, K) logits -> (N, K) probabilities."""
    if logits.ndim == 1:
        p = torch.sigmoid(logits)
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, num_bins: int = 15
) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    Args:
        logits (`torch.Tensor`): `(N,)` binary logits (labels in {0, 1}) or `(N, K)` class logits.
        labels (`torch.Tensor`): `(N,)` integer labels.
        weights (`torch.Tensor`, *optional*): `(N,)` sample weights (e.g. to balance real and generated).
        num_bins (`int`, defaults to 15): number of bins over [0, 1].

    Returns:
        `float`: ``sum_b w_b |accuracy_b - confidence_b|`` with ``w_b`` the weight share of bin b.
    """
    confidence, predicted = _probs(logits.double()).max(dim=1)
    correct = (predicted == labels).double()
    weights = torch.ones_like(confidence) if weights is None else weights.double()
    bins = (confidence * num_bins).long().clamp(max=num_bins - 1)
    total = weights.sum()
    ece = torch.zeros((), dtype=torch.float64)
    for k in range(num_bins):
        mask = bins == k
        mass = weights[mask].sum()
        if mass > 0:
            gap = ((correct[mask] - confidence[mask]) * weights[mask]).sum() / mass
            ece += mass / total * gap.abs()
    return float(ece)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """The temperature T minimising the held-out NLL of `logits / T` (golden-section search over log T).

    The NLL of `beta * logits` is convex in `beta = 1 / T`, so the search over `log T` in `[-4, 4]` finds the
    minimum.

    Args:
        logits (`torch.Tensor`): `(N,)` binary or `(N, K)` class logits.
        labels (`torch.Tensor`): `(N,)` labels.
        weights (`torch.Tensor`, *optional*): `(N,)` sample weights.

    Returns:
        `float`: the temperature.
    """
    logits, labels = logits.detach().double(), labels.detach()
    weights = None if weights is None else weights.double()

    def loss(log_t: float) -> float:
        return float(nll(logits / math.exp(log_t), labels, weights))

    low, high = -4.0, 4.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return math.exp((low + high) / 2)


def head_metrics(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, weights: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracy, NLL and ECE of one head before (T = 1) and after calibration (T = `temperature`)."""
    predicted = logits > 0 if logits.ndim == 1 else logits.argmax(dim=1)
    correct = (predicted.long() == labels).double()
    w = torch.ones_like(correct) if weights is None else weights.double()
    return {
        "accuracy": float((correct * w).sum() / w.sum()),
        "nll_before": float(nll(logits.double(), labels, weights)),
        "nll_after": float(nll(logits.double() / temperature, labels, weights)),
        "ece_before": expected_calibration_error(logits, labels, weights),
        "ece_after": expected_calibration_error(logits / temperature, labels, weights),
        "temperature": temperature,
    }


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

    def forward(self, real_v: torch.Tensor, real_r: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        aux = self.heads.dv_aux_head is not None
        out = self.heads.raw_logits(torch.cat([real_v, fake]), heads=["dv", "dv_aux"] if aux else ["dv"])
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


@torch.no_grad()
def _heldout_logits(heads: S2MHeads, real: SinglePositiveDataset, fake: torch.Tensor, batch_size: int = 512) -> dict:
    """Raw logits of every head on the held-out real images and proposal samples (eval mode)."""
    was_training = heads.training
    heads.eval()
    device = next(heads.parameters()).device

    def run(images: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        parts = [
            heads.raw_logits(images[i : i + batch_size].to(device), heads=names)
            for i in range(0, len(images), batch_size)
        ]
        return {h: torch.cat([p[h] for p in parts]).float().cpu() for h in names}

    out_real = run(real.images, ["dv", "dr"])
    out_fake = run(fake, ["dv", "df"] if heads.conditional else ["dv"])
    heads.train(was_training)
    return {"dv_real": out_real["dv"], "dr": out_real["dr"], "dv_fake": out_fake["dv"], "df": out_fake.get("df")}


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


def _calibrated_nll(sets: dict) -> dict[str, float]:
    out = {}
    for h, (z, y, w) in sets.items():
        out[h] = float(nll(z.double() / fit_temperature(z, y, w), y, w))
    return out


def _latest_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(d.split("-")[1])
        for d in os.listdir(output_dir)
        if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
    ]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def train_heads(
    data: SinglePositiveDataset,
    proposal: Callable | str | os.PathLike,
    *,
    heads: S2MHeads | None = None,
    output_dir: str | os.PathLike | None = None,
    num_steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    ema_decay: float | None = 0.99,
    heldout_fraction: float = 0.2,
    num_heldout_samples: int = 1024,
    eval_steps: int = 100,
    augment: Sequence[str] = ("shift",),
    dr_augment: Sequence[str] | None = ("shift", "blur", "noise", "contrast"),
    seed: int = 0,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    checkpointing_steps: int | None = None,
    checkpoints_total_limit: int | None = None,
    resume_from_checkpoint: str | os.PathLike | None = None,
    priors: Sequence[float] | str | None = "estimate",
    negation_margin: float = 10.0,
    report_to: str | None = None,
    progress: bool = True,
    **heads_kwargs,
) -> tuple[S2MHeads, dict]:
    """Train and calibrate the S2M heads on single-positive data and a proposal.

    Args:
        data ([`~s2m_diffusers.data.SinglePositiveDataset`]): real images in the proposal's format and their
            single-positive labels.
        proposal (`Callable` or path): `proposal(n, generator)` returning images `(n, C, S, S)` in [-1, 1], or
            `(images, class_labels)` for a class-conditional proposal (then ``D_f`` is trained too); or a folder of
            pre-generated samples (or an [`~s2m_diffusers.data.ImageBankProposal`]), of which `heldout_fraction` is
            kept apart for calibration.
        heads ([`~s2m_diffusers.models.heads.S2MHeads`], *optional*): heads to train; by default new ones are
            built from the data's attribute names, size and channels and `heads_kwargs`.
        output_dir (`str`, *optional*): where the trained heads (`save_pretrained`), `metrics.json` and the
            checkpoints `checkpoint-STEP` go.
        num_steps (`int`, defaults to 2000): optimizer steps (early stopping picks the best evaluated step per head).
        batch_size (`int`, defaults to 64): real images per step (and as many proposal samples), over all
            processes and accumulation micro-steps. A proposal's images larger than the data's (same channels) are
            downscaled to the data's size (see [`S2MPipeline.heads_view`]), so heads can be trained on small copies
            of a large generator's images.
        learning_rate (`float`, defaults to 1e-3), weight_decay (`float`, defaults to 1e-4): AdamW.
        ema_decay (`float`, *optional*, defaults to 0.99): evaluate, early-stop and return an exponential moving
            average of the weights (smoother, better calibrated ``D_r``: measured on Digits-7to3); `None`: the raw
            weights.
        heldout_fraction (`float`, defaults to 0.2): share of the real data held out for early stopping and
            calibration (stratified by label).
        num_heldout_samples (`int`, defaults to 1024): fixed proposal samples for the same purpose.
        eval_steps (`int`, defaults to 100): evaluate on the held-out data every this many steps and keep, per head,
            the weights with the lowest calibrated held-out NLL (early stopping).
        augment (`Sequence[str]`, defaults to `("shift",)`): augmentations of the real and generated images of
            ``D_v`` and ``D_f`` (see [`augment_images`]); the same for both, so that they do not tell real from
            generated.
        dr_augment (`Sequence[str]`, *optional*): augmentations of the real images of ``D_r``; the default adds
            blur, noise and contrast changes, artefacts that generated images have. `None`: same as `augment`.
        seed (`int`, defaults to 0): seed of the split, the held-out proposal samples and every training step.
        mixed_precision (`str`, defaults to `"no"`), gradient_accumulation_steps (`int`, defaults to 1): passed to
            `accelerate.Accelerator`.
        checkpointing_steps (`int`, *optional*): save the training state to `output_dir/checkpoint-STEP` every
            this many steps (needs `output_dir`).
        checkpoints_total_limit (`int`, *optional*): keep at most this many checkpoints.
        resume_from_checkpoint (`str`, *optional*): a `checkpoint-STEP` folder, or `"latest"` for the newest one in
            `output_dir`; training continues from its step.
        priors (`Sequence[float]`, `"estimate"` or `None`, defaults to `"estimate"`): attribute priors ``pi_c``
            to store; `"estimate"` estimates them from the calibrated ``D_r`` on the real data (spec §3).
        negation_margin (`float`, defaults to 10.0): the margin of negated literals stored in the heads.
        report_to (`str`, *optional*): an accelerate tracker (`"tensorboard"`, `"wandb"`, ...) for the metrics.
        progress (`bool`, defaults to `True`): show a progress bar on the main process.
        heads_kwargs: config of new [`S2MHeads`] (e.g. `cnn_channels`, `transformers_config`, `shared_backbone`).

    Returns:
        `tuple[S2MHeads, dict]`: the trained, calibrated heads (on the CPU) and the metrics: for each head `h` in
        `dv`, `dr`, `df`: `h_accuracy`, `h_nll_before`, `h_nll_after`, `h_ece_before`, `h_ece_after`,
        `h_temperature`, `h_best_step`, on the held-out data; `priors`, `priors_report`, `train_time_s`, `steps`.

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
    if resume_from_checkpoint is not None and output_dir is None and resume_from_checkpoint == "latest":
        raise ValueError("`resume_from_checkpoint='latest'` needs `output_dir`, where the checkpoints are.")
    if checkpointing_steps is not None and output_dir is None:
        raise ValueError("`checkpointing_steps` needs `output_dir` to save checkpoints into.")
    get_state()  # several CPU processes where there is no accelerator (a plain Accelerator() would see one)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=report_to,
        project_dir=None if output_dir is None else os.fspath(output_dir),
    )
    micro_batch = batch_size // (accelerator.num_processes * gradient_accumulation_steps)
    if micro_batch < 1:
        raise ValueError(
            f"batch_size={batch_size} is smaller than processes x accumulation steps "
            f"({accelerator.num_processes} x {gradient_accumulation_steps})."
        )

    # Data: a stratified held-out split of the real images and a fixed held-out set of proposal samples.
    train, heldout = data.split(heldout_fraction, seed=seed)
    if isinstance(proposal, (str, os.PathLike)):
        proposal = ImageBankProposal.from_folder(proposal, data.sample_size, data.in_channels)
    if isinstance(proposal, ImageBankProposal):
        proposal, heldout_proposal = proposal.split(heldout_fraction, seed=seed)
    else:
        heldout_proposal = proposal
    heldout_fake, heldout_fake_labels = _draw(heldout_proposal, num_heldout_samples, _step_generator(seed, 1), data)
    conditional = heldout_fake_labels is not None

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
    heads.register_to_config(label_counts=data.label_counts, negation_margin=float(negation_margin))

    wrapper = _TrainingForward(heads)
    optimizer = torch.optim.AdamW(
        [p for p in heads.parameters() if p.requires_grad], lr=learning_rate, weight_decay=weight_decay
    )
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    if report_to is not None:
        accelerator.init_trackers("s2m_heads")

    branches = _branches(heads)
    # The weights that are evaluated, early-stopped and returned: an exponential moving average, or the raw ones.
    averaged = copy.deepcopy(heads).requires_grad_(False) if ema_decay is not None else heads
    best = {
        name: {"nll": math.inf, "step": 0, "state": _branch_state(averaged, prefixes)}
        for name, prefixes in branches.items()
    }
    fake_class_counts = torch.zeros(heads.num_attributes, dtype=torch.long)
    step = 0

    if resume_from_checkpoint is not None:
        path = (
            _latest_checkpoint(os.fspath(output_dir))
            if resume_from_checkpoint == "latest"
            else os.fspath(resume_from_checkpoint)
        )
        if path is None or not os.path.isdir(path):
            raise FileNotFoundError(
                f"No checkpoint to resume from at {resume_from_checkpoint!r} (output_dir={output_dir})."
            )
        accelerator.load_state(path)
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        step = state["step"]
        # the saved counts are summed over the processes: the main process takes them up, the others start at 0
        fake_class_counts = torch.tensor(state["fake_class_counts"]) * int(accelerator.is_main_process)
        if ema_decay is not None:
            averaged.load_state_dict(load_file(os.path.join(path, EMA_FILE)))
        tensors = load_file(os.path.join(path, BEST_FILE))
        for name in best:
            best[name]["nll"], best[name]["step"] = state["best"][name]["nll"], state["best"][name]["step"]
            prefix = f"{name}/"
            best[name]["state"] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    def evaluate(at_step: int) -> dict[str, float]:
        logits = _heldout_logits(averaged, heldout, heldout_fake)
        scores = _calibrated_nll(_calibration_sets(logits, heldout.labels, heldout_fake_labels))
        for name, prefixes in branches.items():
            score = sum(scores.values()) if name == "all" else scores[name]
            if score < best[name]["nll"]:
                best[name].update(nll=score, step=at_step, state=_branch_state(averaged, prefixes))
        return scores

    def total_class_counts() -> torch.Tensor:
        """The conditional proposal's class counts, summed over the processes (every process calls this)."""
        if accelerator.num_processes == 1:
            return fake_class_counts
        return accelerator.reduce(fake_class_counts.to(accelerator.device), reduction="sum").cpu()

    def save_checkpoint(at_step: int) -> None:
        final = os.path.join(os.fspath(output_dir), f"checkpoint-{at_step}")
        tmp = final + ".tmp"
        counts = total_class_counts()
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)  # every process writes its random state into tmp
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_file(
                {f"{n}/{k}": v.contiguous() for n, b in best.items() for k, v in b["state"].items()},
                os.path.join(tmp, BEST_FILE),
            )
            if ema_decay is not None:
                save_file({k: v.contiguous() for k, v in averaged.state_dict().items()}, os.path.join(tmp, EMA_FILE))
            state = {
                "step": at_step,
                "fake_class_counts": counts.tolist(),
                "best": {n: {"nll": b["nll"], "step": b["step"]} for n, b in best.items()},
            }
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if checkpoints_total_limit is not None:
                old = sorted(
                    (d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-")[1].isdigit()),
                    key=lambda d: int(d.split("-")[1]),
                )
                for d in old[: max(0, len(old) - checkpoints_total_limit)]:
                    shutil.rmtree(os.path.join(output_dir, d))
        accelerator.wait_for_everyone()

    dv_augment, dr_augment = tuple(augment), tuple(augment if dr_augment is None else dr_augment)
    bar = tqdm(
        total=num_steps, initial=step, disable=not (progress and accelerator.is_local_main_process), desc="heads"
    )
    # Each step seeds the global RNG (dropout) from `(seed, step)`; the caller's RNG state is restored after.
    with torch.random.fork_rng(devices=[]):
        wrapper.train()
        while step < num_steps:
            for micro in range(gradient_accumulation_steps):
                g = _step_generator(seed, 0, step, micro, accelerator.process_index)
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))  # dropout and other global draws
                index = torch.randint(len(train), (micro_batch,), generator=g)
                real, labels = train.images[index], train.labels[index]
                fake, fake_labels = _draw(proposal, micro_batch, g, data)
                real_v, fake = augment_images(real, dv_augment, g), augment_images(fake, dv_augment, g)
                real_r = real_v if dr_augment == dv_augment else augment_images(real, dr_augment, g)
                device = accelerator.device
                with accelerator.accumulate(wrapper), accelerator.autocast():
                    out = wrapper(real_v.to(device), real_r.to(device), fake.to(device))
                    dv_target = torch.cat([torch.ones(micro_batch), torch.zeros(micro_batch)]).to(device)
                    losses = {
                        "dv": F.binary_cross_entropy_with_logits(out["dv"].float(), dv_target),
                        "dr": F.cross_entropy(out["dr"].float(), labels.to(device)),
                    }
                    if "dv_aux" in out:
                        losses["dv_aux"] = F.cross_entropy(out["dv_aux"].float(), labels.to(device))
                    if conditional:
                        losses["df"] = F.cross_entropy(out["df"].float(), fake_labels.to(device))
                        fake_class_counts += torch.bincount(fake_labels, minlength=heads.num_attributes)
                    loss = sum(losses.values())
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                if ema_decay is not None and accelerator.sync_gradients:
                    with torch.no_grad():
                        for average, current in zip(averaged.parameters(), heads.parameters()):
                            average.lerp_(current.detach(), 1.0 - ema_decay)
                        for average, current in zip(averaged.buffers(), heads.buffers()):
                            average.copy_(current)  # e.g. normalisation statistics of a transformers backbone
            step += 1
            bar.update(1)
            mean_losses = torch.stack([v.detach().float() for v in losses.values()])
            if accelerator.num_processes > 1:
                mean_losses = accelerator.reduce(mean_losses, reduction="mean")  # over the processes
            logs = {f"loss_{h}": float(v) for h, v in zip(losses, mean_losses)}
            if step % eval_steps == 0 or step == num_steps:
                logs.update({f"heldout_nll_{h}": v for h, v in evaluate(step).items()})
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
            if report_to is not None:
                accelerator.log(logs, step=step)
            if checkpointing_steps is not None and step % checkpointing_steps == 0:
                save_checkpoint(step)
    bar.close()
    if step == 0 or best[next(iter(best))]["nll"] == math.inf:
        evaluate(step)

    # Early stopping: the best weights of each head; then calibration on the held-out data.
    heads = averaged.cpu()
    for b in best.values():
        heads.load_state_dict(b["state"], strict=False)
    logits = _heldout_logits(heads, heldout, heldout_fake)
    sets = _calibration_sets(logits, heldout.labels, heldout_fake_labels)
    metrics: dict = {"steps": step}
    temperatures = {}
    for h, (z, y, w) in sets.items():
        temperatures[h] = fit_temperature(z, y, w)
        metrics.update({f"{h}_{k}": v for k, v in head_metrics(z, y, temperatures[h], w).items()})
        metrics[f"{h}_best_step"] = best["all" if "all" in best else h]["step"]
    heads.set_temperatures(**temperatures)
    heads.requires_grad_(True)  # the averaged copy was frozen; hand back trainable heads
    if heads.config.freeze_backbone:
        heads.backbones.requires_grad_(False)
    heads.eval()

    if conditional:
        counts = total_class_counts().double() + torch.bincount(heldout_fake_labels, minlength=heads.num_attributes)
        heads.register_to_config(proposal_class_probs=(counts / counts.sum()).tolist())
    if isinstance(priors, str):
        if priors != "estimate":
            raise ValueError(f"`priors` must be a list of floats, 'estimate' or None; got {priors!r}.")
        with torch.no_grad():
            dr_log_probs = torch.cat([heads(data.images[i : i + 512]).dr_log_probs for i in range(0, len(data), 512)])
        estimate, report = estimate_priors(dr_log_probs, data.label_counts)
        metrics["priors_report"] = report
        priors = estimate
    heads.register_to_config(priors=None if priors is None else [float(p) for p in priors])
    metrics["priors"] = heads.priors
    metrics["train_time_s"] = time.perf_counter() - start_time
    summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    logger.info(f"Trained S2M heads for {step} steps: {summary}", main_process_only=True)
    if report_to is not None:
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        accelerator.end_training()

    if output_dir is not None and accelerator.is_main_process:
        save_heads(heads, os.fspath(output_dir))
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    accelerator.wait_for_everyone()
    return heads, metrics


def save_heads(heads: S2MHeads, output_dir: str) -> None:
    """`heads.save_pretrained(output_dir)` atomically: written to a temporary folder, then moved file by file."""
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, ".heads.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    heads.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)
