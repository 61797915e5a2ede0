"""The weights a sampler is given: a proposal adapter's images, judged by the heads, through `maths.log_weight`.

`S2MPipeline` builds one [`Weigher`] per call; its ``for_stage(stage)`` is the ``evaluate(z) -> (x, log_w)`` callable
that `sampling.sample_s2m` receives for each refitting stage of the target (spec §4):

    latents z --(proposal adapter, class plan)--> images x in [-1, 1] --(heads)--> D_v, D_r, D_f
        --(maths.log_weight: temper D_r, log r_T with the margins, + logit D_v [- log D_f(c|x) + log p_G(c)])--> log w
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from . import maths
from .proposals import execution_device
from .targets import Target
from .utils import module_device_dtype

__all__ = ["Weigher", "StageEvaluate"]


class Weigher:
    """``evaluate(z) -> (x, log w)`` for each stage of one call's target: the proposal's generator, the heads, and
    `maths.log_weight`, ``micro_batch_size`` latents at a time; it also keeps the call's seconds and rounds.

    Each micro-batch's images leave the execution device once the heads have seen them (to the CPU), so that it
    holds one micro-batch of generated images at a time; the images of the refitting stages, which only their latents
    and weights serve, are not kept at all (``x`` is then `None`) unless a callback asks for them. ``phase`` is ``k``
    during the ``k``-th refitting stage and the number of refitting stages during the final sampling.
    """

    def __init__(self, pipe, target, proposal, plan, config, micro_batch_size, num_fit_stages, callback, inputs):
        hc, n = pipe.heads.config, len(pipe.heads.config.attribute_names)
        self.pipe, self.proposal, self.plan, self.micro_batch_size = pipe, proposal, plan, micro_batch_size
        self.num_fit_stages, self.callback, self.inputs = num_fit_stages, callback, inputs
        self.log_p_data = maths.log_p_data(getattr(hc, "label_counts", None), n)
        self.log_priors = maths.log_priors(
            config.priors if config.priors is not None else getattr(hc, "priors", None), n
        )
        margin = config.negation_margin
        self.negation_margin = float(
            margin if margin is not None else getattr(hc, "negation_margin", maths.DEFAULT_NEGATION_MARGIN)
        )
        self.presence_margin = float(config.presence_margin)
        self.labelling = getattr(hc, "labelling", "independent")
        self.dv_strength = float(config.dv_strength)  # resolved by the pipeline: never "auto" here
        t = config.dr_temperature
        self.dr_temperature = maths.auto_dr_temperature(target) if t == "auto" else float(t if t is not None else 1.0)
        self.heads_device, self.heads_dtype = execution_device(pipe.heads), module_device_dtype(pipe.heads)[1]
        self.screen_heads = getattr(pipe, "screen_heads", None)  # heads distilled for the screen, if any
        self.generator_name = pipe.proposal_description()["class"]  # for error messages, named once per call
        self.seconds_generator = self.seconds_heads = 0.0
        self.rounds, self.phase, self.checked_shape = 0, 0, False

    def for_stage(self, stage: Target) -> StageEvaluate:
        """The ``evaluate(z) -> (x, log w)`` callable of one stage of the target (with the screen's methods when the
        proposal can be stopped and resumed at a denoising step: see [`StageEvaluate`])."""
        return StageEvaluate(self, stage)

    def weigh(self, stage: Target, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `(b, C, H, W)` in [-1, 1] and ``log w`` `(b,)` of one micro-batch of latents."""
        x, out, df = self._judge(z)
        return x, self._log_weight(stage, out, df, self.dv_strength)

    def log_rest_and_dv(self, stage: Target, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log w`` split as ``log_rest + dv_strength * logit D_v``: (``log_rest``, ``logit D_v``), float64, for
        choosing ``dv_strength`` (`maths.dv_strength`)."""
        rests, dvs = [], []
        for chunk in z.split(self.micro_batch_size):
            _, out, df = self._judge(chunk)
            rests.append(self._log_weight(stage, out, df, 0.0).cpu())
            dvs.append(out.dv_logit.double().cpu())
        return torch.cat(rests), torch.cat(dvs)

    def _judge(self, z: torch.Tensor):
        """One micro-batch through the generator and the heads, timed and checked: (images, heads' output, ``log
        D_f(c|x)`` of the fixed class or `None`)."""
        latents, labels = self.plan.split(z, self.proposal.latent_shape)
        t0 = time.perf_counter()
        x = self.proposal.generate(latents, labels)
        _sync(x.device)
        self.seconds_generator += time.perf_counter() - t0
        return self._read(x)

    def _read(self, x: torch.Tensor, check_shape: bool = True, heads=None):
        """Images `(b, C, H, W)` through the heads (or the given ones: screen heads), timed and checked: (images,
        heads' output, ``log D_f(c|x)``)."""
        t1 = time.perf_counter()
        _check_finite(x, f"The generator {self.generator_name} returned images with", "images")
        if check_shape and not self.checked_shape:
            self.pipe.check_image_shape(tuple(x.shape[1:]), self.proposal)
            self.checked_shape = True
        heads = self.pipe.heads if heads is None else heads
        out = heads(self.pipe.heads_view(x.to(self.heads_device)).to(dtype=self.heads_dtype))
        _sync(self.heads_device)
        self.seconds_heads += time.perf_counter() - t1
        df = out.df_log_probs[:, self.plan.index] if self.plan.mode == "fixed" else None
        heads = [("D_v", "dv_logit", out.dv_logit), ("D_r", "dr_log_probs", out.dr_log_probs)]
        for head, field, value in heads + ([("D_f", "df_log_probs", out.df_log_probs)] if df is not None else []):
            _check_finite(value, f"The heads' {head} ({type(self.pipe.heads).__name__}.{field}) returned", "heads")
        return x, out, df

    def _log_weight(
        self, stage: Target, out, df: torch.Tensor | None, dv_strength: float, soft: bool = False
    ) -> torch.Tensor:
        """``log w``; with ``soft``, the screen's surrogate: margins softened to the paper's formula (negation margin
        1, presence margin 0), so that it is 0 less often where the final image is on target (the sampler
        floors it)."""
        return maths.log_weight(
            stage,
            out.dr_log_probs,
            out.dv_logit,
            self.log_p_data,
            self.log_priors,
            1.0 if soft else self.negation_margin,
            0.0 if soft else self.presence_margin,
            self.dr_temperature,
            df,
            self.plan.log_pg_class,
            self.labelling,
            dv_strength,
        )

    def on_round(self, z: torch.Tensor, x: torch.Tensor | None, log_w: torch.Tensor) -> torch.Tensor:
        """The round's ``log_w``, as ``callback(pipe, round, phase, tensors) -> log_w`` returns it (the pipeline's
        `callback_on_step_end` contract: what it is shown and what it may change, is the pipeline's)."""
        if self.callback is not None:
            log_w = self.callback(self.pipe, self.rounds, self.phase, {"latents": z, "images": x, "log_w": log_w})
        self.rounds += 1
        return log_w

    def timings(self, seconds_wall: float, budget: int) -> dict:
        sampler = max(0.0, seconds_wall - self.seconds_generator - self.seconds_heads)
        return {
            "rounds": self.rounds,  # every batch of proposals, refitting stages included
            "max_proposals": budget,
            "seconds_generator": self.seconds_generator,
            "seconds_heads": self.seconds_heads,
            "seconds_sampler": sampler,  # the rest: sampling, refitting, bookkeeping
            "seconds_wall": seconds_wall,
        }


class StageEvaluate:
    """``evaluate(z) -> (x, log w)`` of one stage of a call's target (`sampling.sample_imh`'s callable), and the
    screen's methods, for a proposal that can stop after a denoising step (``screen_unavailable`` is `None`:
    `proposals.DDIMProposal`, and `proposals.PipelineProposal` where its step callback allows):
    ``start(z, s) -> (handle, log w_s)`` runs the first ``s`` of the K steps and weighs the predicted clean image
    with the soft margins (the surrogate), ``finish(handle, keep) -> (x, log w)`` runs the rest for the latents
    ``keep`` of that handle (reruns them whole where ``screen_restarts``), and ``views(z, steps)`` runs whole images
    with the surrogate at each of ``steps`` (the calibration pilot). ``num_steps`` is K (the UNet calls of one
    image), `None` for a GAN."""

    def __init__(self, weigher: Weigher, stage: Target):
        self.weigher, self.stage = weigher, stage
        proposal = weigher.proposal
        self.num_steps = getattr(proposal, "num_steps", None)
        self.screen_restarts = bool(getattr(proposal, "screen_restarts", False))  # finishing reruns a proposal whole

    @property
    def screen_unavailable(self) -> str | None:
        """Why the proposal cannot be screened (`None`: it can); read only where a call screens (a wrapped pipeline
        runs a check on its first reading: `proposals.PipelineProposal.check_screen`)."""
        return getattr(self.weigher.proposal, "screen_unavailable", "this proposal cannot be screened.")

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        w = self.weigher
        keep = "images" in w.inputs or w.phase >= w.num_fit_stages
        images, weights = [], []
        for chunk in z.split(w.micro_batch_size):
            x, lw = w.weigh(self.stage, chunk)
            images.append(x.cpu() if keep else None)
            weights.append(lw)
        x, lw = (torch.cat(images) if keep else None), torch.cat(weights)
        lw = w.on_round(z, x, lw)
        return x, lw

    def _surrogate(self, view: torch.Tensor, step: int) -> torch.Tensor:
        """The surrogate ``log w_s`` of the predicted clean images ``view`` after ``step`` steps: the screen heads'
        reading where they were trained for that timestep (`s2m_diffusers.screen_heads`), else the heads'; with the
        soft margins either way."""
        w = self.weigher
        _, out, df = w._read(view, check_shape=False, heads=self._screen_heads_at(step))
        return w._log_weight(self.stage, out, df, w.dv_strength, soft=True)

    def surrogate_name(self, step: int) -> str:
        """What reads the predicted clean images after ``step`` steps: ``"screen_heads"`` or ``"heads"``."""
        return "heads" if self._screen_heads_at(step) is None else "screen_heads"

    def _screen_heads_at(self, step: int):
        """The pipeline's screen heads when the view after ``step`` steps lies within the timesteps they were
        distilled at, else `None` (the heads)."""
        heads = self.weigher.screen_heads
        if heads is None:
            return None
        trained = list(getattr(heads.config, "screen_timesteps", None) or [])
        t = self.weigher.proposal.view_timestep(step)
        return heads if trained and min(trained) <= t <= max(trained) else None

    def _timed(self, run):
        t0 = time.perf_counter()
        out = run()
        self.weigher.seconds_generator += time.perf_counter() - t0
        return out

    def views(self, z: torch.Tensor, steps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.weigher
        latents, labels = w.plan.split(z, w.proposal.latent_shape)
        x, views = self._timed(lambda: w.proposal.generate_views(latents, labels, steps))
        _, out, df = w._read(x)
        log_w = w._log_weight(self.stage, out, df, w.dv_strength)
        log_w_s = torch.stack([self._surrogate(views[s], s) for s in steps], 1)  # (n, S)
        x = x.cpu()
        return x, w.on_round(z, x, log_w), log_w_s

    def start(self, z: torch.Tensor, step: int) -> tuple[tuple, torch.Tensor]:
        w = self.weigher
        latents, labels = w.plan.split(z, w.proposal.latent_shape)
        states, views = self._timed(lambda: w.proposal.start(latents, labels, step))
        return (z, states, labels, step), self._surrogate(views, step)

    def finish(self, handle: tuple, keep: torch.Tensor, views: Sequence[int] | None = None) -> tuple:
        """The rest of the run for the latents ``keep`` of ``handle``: ``(x, log w)``, and with ``views`` (steps
        after the handle's) the surrogate ``log w_s`` `(n, S)` at each of them too."""
        w = self.weigher
        z, states, labels, step = handle
        labels = None if labels is None else labels[keep.to(labels.device)]
        later = list(views or ())
        x, seen = self._timed(lambda: w.proposal.finish(states[keep.to(states.device)], labels, step, later))
        _, out, df = w._read(x)
        log_w = w._log_weight(self.stage, out, df, w.dv_strength)
        x = x.cpu()
        log_w = w.on_round(z[keep.to(z.device)], x, log_w)
        if views is None:
            return x, log_w
        log_w_s = [self._surrogate(seen[s], s) for s in later]
        return x, log_w, torch.stack(log_w_s, 1) if log_w_s else log_w.new_zeros(log_w.shape[0], 0)


def _sync(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock times land on the part that ran them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_finite(values: torch.Tensor, what: str, component: str) -> None:
    """Raise at once when a micro-batch's images or head outputs hold NaN or infinite values, naming the component
    (the sampler would otherwise read them as off target and spend the whole budget)."""
    bad = ~torch.isfinite(values).reshape(values.shape[0], -1).all(1)  # (b,)
    if not bool(bad.any()):
        return
    if component == "images":
        fix = (
            "finite latents: its weights are damaged or it overflows. Load its weights again, run it in float32 "
            "(float16 overflows easily), or check its forward on a few latents."
        )
    else:
        fix = (
            "finite images in [-1, 1]: the heads' weights are damaged or overflow. Load or train the heads again "
            "(`s2m train-heads`), and run them in float32 (float16 overflows easily)."
        )
    raise ValueError(f"{what} NaN or infinite values for {int(bad.sum())} of {values.shape[0]} {fix}")
