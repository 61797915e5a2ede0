"""Heads for the screen: S2M heads distilled onto a diffusion proposal's predicted clean images (issue 14, item 3).

The screen (`S2MSamplingConfig.screen`; delayed acceptance in `sampling.sample_imh`) judges a proposal after ``s`` of
its ``K`` denoising steps on the scheduler's predicted clean image (``pred_original_sample``). Heads trained on clean
images read those early, blurry predictions poorly: on the shipped Digits DDPM their surrogate's rank correlation
with the final weight is 0.2-0.3 after one of 10 steps. [`distil_screen_heads`] trains a copy of the heads to say,
from the predicted clean image after ``s`` steps, what the heads will say of the finished image: ``D_v``'s
probability and ``D_r``'s (and ``D_f``'s) class probabilities, by cross-entropy against the heads' soft outputs on
the final images (knowledge distillation, [`distillation_loss`]). Its minimiser is the heads' expected reading of
the final image given the prediction: the best guess at step ``s`` of what the second stage will see.

The screen stays exact whatever these heads say (the second stage corrects with the true weight, and the surrogate
is floored so that it is positive wherever the true weight is); better screen heads only screen out more of the
proposals the final weight would reject, and so save more UNet calls. The sampler uses them for a view whose
timestep lies within the timesteps they were trained on (``screen_timesteps`` in their config), and the heads
themselves elsewhere.

    pipe.register_modules(screen_heads=distil_screen_heads(pipe)[0])   # then pipe(..., screen="auto")

`s2m train-heads` distils them for a diffusion generator after training the heads (``--screen_heads_samples``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from .models.heads import S2MHeads, S2MHeadsOutput

__all__ = ["SCREEN_TRAIN_SHARES", "distil_screen_heads", "distillation_loss", "screen_train_steps"]

# The screen steps the heads are distilled at, as shares of the K denoising steps: the early steps, where a screen
# saves most (after a share s of the steps, a proposal screened out costs s of a full one).
SCREEN_TRAIN_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)


def screen_train_steps(num_steps: int, shares=SCREEN_TRAIN_SHARES) -> list[int]:
    """The screen steps (``1 .. K - 1``) at the given shares of ``K = num_steps`` denoising steps, without repeats."""
    if num_steps < 2:
        raise ValueError(f"A screen needs at least 2 denoising steps, got num_steps={num_steps}.")
    return sorted({min(num_steps - 1, max(1, round(share * num_steps))) for share in shares})


def distillation_loss(student: S2MHeadsOutput, teacher: S2MHeadsOutput) -> torch.Tensor:
    """Cross-entropy of the student's heads against the teacher's soft outputs, summed over the heads, averaged over
    the batch: ``BCE(D_v)`` plus the cross-entropy of ``D_r`` (and ``D_f``) against the teacher's class
    probabilities. It is minimal (at the teacher's entropy) where the student's outputs equal the teacher's."""
    loss = F.binary_cross_entropy_with_logits(student.dv_logit.float(), torch.sigmoid(teacher.dv_logit.float()))
    loss = loss - (teacher.dr_log_probs.float().exp() * student.dr_log_probs.float()).sum(1).mean()
    if teacher.df_log_probs is not None and student.df_log_probs is not None:
        loss = loss - (teacher.df_log_probs.float().exp() * student.df_log_probs.float()).sum(1).mean()
    return loss


@torch.no_grad()
def _trajectories(pipe, proposal, num_samples: int, steps: list[int], generator, progress: bool):
    """``num_samples`` denoising runs: the heads' view of the predicted clean image after each of ``steps`` `(S, N, C,
    H, W)` (CPU) and the heads' outputs on the final images (the teacher's, CPU)."""
    latents = proposal.p_z().sample(num_samples, generator=generator)
    labels = proposal.draw_class_labels(num_samples, generator)
    views, teacher = [], []
    heads = pipe.heads
    device = next(heads.parameters()).device
    bar = tqdm(total=num_samples, desc="distilling screen heads: drawing", unit="image", disable=not progress)
    with bar:
        for first in range(0, num_samples, proposal.micro_batch_size):
            rows = slice(first, first + proposal.micro_batch_size)
            x, seen = proposal.generate_views(latents[rows], None if labels is None else labels[rows], steps)
            out = heads(pipe.heads_view(x.float()).to(device))
            teacher.append(_rows(out, slice(None), "cpu"))
            views.append(torch.stack([pipe.heads_view(seen[s].float()).cpu() for s in steps]))
            bar.update(x.shape[0])
    fields = zip(*((t.dv_logit, t.dr_log_probs, t.df_log_probs) for t in teacher))
    return torch.cat(views, 1), S2MHeadsOutput(*(None if f[0] is None else torch.cat(f) for f in fields))


def _mean_loss(model: S2MHeads, views: torch.Tensor, teacher: S2MHeadsOutput, batch_size: int) -> float:
    """The distillation loss of ``model`` reading ``views`` `(N, C, H, W)` against ``teacher``, over all rows."""
    device, total = next(model.parameters()).device, 0.0
    with torch.no_grad():
        for first in range(0, views.shape[0], batch_size):
            rows = slice(first, first + batch_size)
            out = model(views[rows].to(device))
            total += float(distillation_loss(out, _rows(teacher, rows, device))) * views[rows].shape[0]
    return total / views.shape[0]


def _rows(out: S2MHeadsOutput, rows, device) -> S2MHeadsOutput:
    return S2MHeadsOutput(
        *(None if t is None else t[rows].to(device) for t in (out.dv_logit, out.dr_log_probs, out.df_log_probs))
    )


def distil_screen_heads(
    pipe,
    num_samples: int = 4096,
    steps: list[int] | None = None,
    num_inference_steps: int | None = None,
    num_epochs: int = 8,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> tuple[S2MHeads, dict]:
    """Heads for the screen of ``pipe``'s diffusion proposal: a copy of ``pipe.heads`` trained (AdamW, prepared by
    `accelerate`) to read the predicted clean image after each of ``steps`` as the heads read the final image.

    ``num_samples`` denoising runs are drawn once (``num_samples`` proposals' UNet calls); a random
    ``heldout_fraction`` of them is kept aside, and the weights with the lowest held-out loss over the epochs are
    returned, with the held-out loss of the heads themselves and of the screen heads at each step in the metrics
    (the screen heads should be lower at every step: they were trained to read these images).

    Args:
        pipe ([`S2MPipeline`]): with ``heads`` and a UNet + scheduler proposal (a GAN has no steps to screen after;
            a wrapped pipeline's screen reads its views with the heads: screen heads are not distilled for it).
        num_samples (`int`, defaults to 4096): denoising runs to distil on.
        steps (`list[int]`, *optional*): the screen steps (of ``num_inference_steps``); default
            [`screen_train_steps`], the early shares ``SCREEN_TRAIN_SHARES`` of the steps.
        num_inference_steps (`int`, *optional*): ``K``; default the pipeline's.
        num_epochs (`int`, defaults to 8), batch_size (`int`, defaults to 128), learning_rate (`float`, defaults
            to 1e-3): the optimisation.
        heldout_fraction (`float`, defaults to 0.2): share of the runs kept for choosing the epoch and reporting.
        seed (`int`, defaults to 0): the latents, the split and the batch order.
        progress (`bool`, defaults to `True`): progress bars.

    Returns:
        `tuple[S2MHeads, dict]`: the screen heads (``screen_steps``, ``screen_num_steps`` and ``screen_timesteps``
        set in their config) and the metrics (``heldout_loss_heads`` and ``heldout_loss_screen_heads`` per step, the
        epoch kept).
    """
    if pipe.heads is None:
        raise ValueError("distil_screen_heads needs a pipeline with trained heads (`S2MPipeline(heads=...)`).")
    if pipe.proposal_kind != "ddim":
        raise ValueError(
            f"Screen heads are for a UNet + scheduler proposal; this pipeline's proposal is a {pipe.proposal_kind!r} "
            "(a GAN has no denoising steps to screen after; a wrapped pipeline is screened with the heads themselves)."
        )
    for name, value, low in (
        ("num_samples", num_samples, 10),
        ("num_epochs", num_epochs, 1),
        ("batch_size", batch_size, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}.")
    proposal = pipe.get_proposal(micro_batch_size=256, num_inference_steps=num_inference_steps)
    k = proposal.num_steps
    steps = screen_train_steps(k) if steps is None else sorted({int(s) for s in steps})
    if not steps or steps[0] < 1 or steps[-1] >= k:
        raise ValueError(f"Screen steps must lie in 1..{k - 1} (of the {k} denoising steps), got {steps}.")
    generator = torch.Generator().manual_seed(seed)
    views, teacher = _trajectories(pipe, proposal, num_samples, steps, generator, progress)
    order = torch.randperm(num_samples, generator=generator)
    n_held = max(1, int(round(heldout_fraction * num_samples)))
    held, train = order[:n_held], order[n_held:]

    student = copy.deepcopy(pipe.heads).float().requires_grad_(True)  # all of it, the backbones too
    student.register_to_config(
        screen_steps=steps,
        screen_num_steps=k,
        screen_timesteps=[proposal.view_timestep(s) for s in steps],
    )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=1e-4)
    student, optimizer = accelerator.prepare(student, optimizer)
    train_views = views[:, train].flatten(0, 1)  # (S * N_train, C, H, W): every step's view of every run
    train_teacher = _rows(teacher, train.repeat(len(steps)), "cpu")
    held_views = [views[i, held] for i in range(len(steps))]
    held_teacher = _rows(teacher, held, "cpu")

    def held_losses(model) -> list[float]:
        return [_mean_loss(model, v, held_teacher, 512) for v in held_views]

    model = accelerator.unwrap_model(student)
    model.eval()
    before = held_losses(pipe.heads)
    losses = held_losses(model)
    best = (math.fsum(losses), 0, copy.deepcopy(model.state_dict()), losses)
    total = train_views.shape[0]
    bar = tqdm(total=num_epochs, desc="distilling screen heads: training", unit="epoch", disable=not progress)
    with bar:
        for epoch in range(1, num_epochs + 1):
            student.train()
            order = _epoch_order(total, seed, epoch)
            for first in range(0, total, batch_size):
                rows = order[first : first + batch_size]
                out = student(train_views[rows].to(accelerator.device))
                loss = distillation_loss(out, _rows(train_teacher, rows, accelerator.device))
                optimizer.zero_grad()
                accelerator.backward(loss)
                optimizer.step()
            model = accelerator.unwrap_model(student)
            model.eval()
            losses = held_losses(model)
            score = math.fsum(losses)
            if score < best[0]:
                best = (score, epoch, copy.deepcopy(model.state_dict()), losses)
            bar.update(1)
            bar.set_postfix(heldout_loss=f"{score / len(steps):.4f}")
    model = accelerator.unwrap_model(student)
    model.load_state_dict(best[2])
    model.eval().requires_grad_(False)
    metrics = {
        "screen_steps": steps,
        "screen_num_steps": k,
        "num_samples": num_samples,
        "epoch_kept": best[1],
        "heldout_loss_heads": dict(zip(map(str, steps), before)),
        "heldout_loss_screen_heads": dict(zip(map(str, steps), best[3])),
    }
    return model.to(next(pipe.heads.parameters()).device), metrics


def _epoch_order(total: int, seed: int, epoch: int) -> torch.Tensor:
    """The batch order of one epoch: a permutation seeded by ``(seed, epoch)``, the same on every run."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
