"""The weights a sampler is given: a proposal adapter's images, judged by the heads, through `maths.log_weight`.

`S2MPipeline` builds one [`Weigher`] per call; its ``for_target(target)`` is the ``evaluate(z) -> (x, log_w,
readings)`` callable that `sampling.sample_s2m` receives (spec §4):

    latents z --(proposal adapter, class plan)--> images x in [-1, 1] --(heads)--> D_v, D_r, D_f
        --(maths.log_weight: temper D_r, log r_T with the margins, + beta logit D_v [- log D_f(c|x) + log p_G(c)])
        --> log w

The readings are each attribute's log ratio to the image's strongest, ``log g_c - max_c' log g_c'`` (spec §3: what
the margins compare), on which the diagnostics run and from which any sub-target can be read again.
"""

from __future__ import annotations

import json
import os
import time

import torch

from . import maths
from .data import prepare_images
from .densities import StandardNormal
from .ladder import stages_of
from .proposals import eval_mode, execution_device
from .targets import Target
from .utils import module_device_dtype

__all__ = [
    "Weigher",
    "TargetEvaluate",
    "PHASES",
    "heads_reading",
    "heads_view",
    "check_image_shape",
    "measure_dv_strength",
    "resolve_dv_strength",
    "save_dv_strengths",
    "load_dv_strengths",
]

# The phases of a call, as `callback_on_step_end` numbers them (its `timestep` argument).
PHASES = ("pool", "burn_in", "sampling")
# dv_strength="auto": prior draws of the target, in batches, until this many are on it or this many are drawn.
_DV_PILOT_BATCH, _DV_PILOT_ON_TARGET, _DV_PILOT_MAX = 256, 128, 2048
# The settings the "auto" D_v strength depends on (how the heads are read), beside the target and the proposal.
_READING_SETTINGS = ("negation_margin", "presence_margin", "dr_temperature", "priors", "class_label")


# ----------------------------------------------------------------------------------------------------------------
# How the heads read a proposal's images


def heads_reading(heads_config, config):
    """``config`` with the settings it leaves to the heads filled in from their config (chosen from data when they
    were trained, `s2m_diffusers.training.choose_sampling_settings`): ``negation_margin``, ``presence_margin``
    (else 0) and ``dv_strength`` (else 1, the paper's target)."""
    stored = {
        "negation_margin": getattr(heads_config, "negation_margin", None) or maths.DEFAULT_NEGATION_MARGIN,
        "presence_margin": getattr(heads_config, "presence_margin", None) or 0.0,
        "dv_strength": 1.0 if getattr(heads_config, "dv_strength", None) is None else heads_config.dv_strength,
    }
    return config.replace(**{k: float(v) for k, v in stored.items() if getattr(config, k) is None})


def heads_view(heads_config, images: torch.Tensor) -> torch.Tensor:
    """What the heads see of a proposal's images `(B, C, H, W)` in [-1, 1]: the images themselves at the heads'
    ``sample_size``, else a copy downscaled as real data is (`s2m_diffusers.data.prepare_images`: the shorter side
    resized with antialiased bilinear filtering, then a centre crop), as `train_heads` does."""
    size, channels = int(heads_config.sample_size), int(heads_config.in_channels)
    if tuple(images.shape[1:]) == (channels, size, size):
        return images
    return prepare_images(images, size, channels)


def check_image_shape(heads_config, shape: tuple[int, ...], proposal, generator_name: str) -> None:
    """The heads take the proposal's images as they are, or a downscaled copy when the images are larger; anything
    else is refused, naming both shapes and the fix."""
    hc = heads_config
    expected = (int(hc.in_channels), int(hc.sample_size), int(hc.sample_size))
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[0] != expected[0] or min(shape[1:]) < expected[1]:
        raise ValueError(
            f"The heads were trained for images of shape {expected} (in_channels={hc.in_channels}, "
            f"sample_size={hc.sample_size}), but the proposal ({type(proposal).__name__} of {generator_name}) "
            f"produces images of shape {shape}. The heads can see a downscaled copy of larger images with the same "
            f"channels, never a smaller one. Train heads on the proposal's format (S2MHeads(sample_size="
            f"{min(shape[1:])}, in_channels={shape[0]}) or smaller, with real images brought to it by "
            "`s2m_diffusers.data.prepare_images`), or use the proposal the heads were trained with."
        )


class Weigher:
    """``evaluate(z) -> (x, log w, readings)`` of one call's target: the proposal's generator, the heads, and
    `maths.log_weight`, ``micro_batch_size`` latents at a time; it also keeps the call's seconds, rounds and phase.

    Each micro-batch's images leave the execution device once the heads have seen them (to the CPU), so that it
    holds one micro-batch of generated images at a time.
    """

    def __init__(self, pipe, target, proposal, plan, config, micro_batch_size, callback=None, inputs=("latents",)):
        hc, n = pipe.heads.config, len(pipe.heads.config.attribute_names)
        self.pipe, self.proposal, self.plan, self.micro_batch_size = pipe, proposal, plan, micro_batch_size
        self.callback, self.inputs = callback, list(inputs)
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

    def for_target(self, target: Target) -> TargetEvaluate:
        """The ``evaluate(z) -> (x, log w, readings)`` callable of a target (with the screen's methods where the
        proposal can stop after a denoising step, and ``value_and_grad`` where it can be differentiated)."""
        return TargetEvaluate(self, target)

    def log_rest_and_dv(self, target: Target, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log w`` split as ``log_rest + dv_strength * logit D_v``: (``log_rest``, ``logit D_v``), float64, for
        choosing ``dv_strength`` (`maths.dv_strength`)."""
        rests, dvs = [], []
        for chunk in z.split(self.micro_batch_size):
            _, out, df = self._judge(chunk)
            rests.append(self._log_weight(target, out, df, 0.0).cpu())
            dvs.append(out.dv_logit.double().cpu())
        return torch.cat(rests), torch.cat(dvs)

    def _judge(self, z: torch.Tensor, grad: bool = False):
        """One micro-batch through the generator and the heads, timed and checked: (images, heads' output, ``log
        D_f(c|x)`` of the fixed class or `None`); with ``grad`` the graph from ``z`` is kept."""
        latents, labels = self.plan.split(z, self.proposal.latent_shape)
        t0 = time.perf_counter()
        x = self.proposal.generate_with_grad(latents, labels) if grad else self.proposal.generate(latents, labels)
        _sync(x.device)
        self.seconds_generator += time.perf_counter() - t0
        return self._read(x)

    def _read(self, x: torch.Tensor, check_shape: bool = True, heads=None):
        """Images `(b, C, H, W)` through the heads (or the given ones: screen heads), timed and checked: (images,
        heads' output, ``log D_f(c|x)``)."""
        t1 = time.perf_counter()
        _check_finite(x.detach(), f"The generator {self.generator_name} returned images with", "images")
        if check_shape and not self.checked_shape:
            check_image_shape(self.pipe.heads.config, tuple(x.shape[1:]), self.proposal, self.generator_name)
            self.checked_shape = True
        heads = self.pipe.heads if heads is None else heads
        out = heads(heads_view(self.pipe.heads.config, x.to(self.heads_device)).to(dtype=self.heads_dtype))
        _sync(self.heads_device)
        self.seconds_heads += time.perf_counter() - t1
        df = out.df_log_probs[:, self.plan.index] if self.plan.mode == "fixed" else None
        heads = [("D_v", "dv_logit", out.dv_logit), ("D_r", "dr_log_probs", out.dr_log_probs)]
        for head, field, value in heads + ([("D_f", "df_log_probs", out.df_log_probs)] if df is not None else []):
            _check_finite(
                value.detach(), f"The heads' {head} ({type(self.pipe.heads).__name__}.{field}) returned", "heads"
            )
        return x, out, df

    def _log_weight(self, target: Target, out, df, dv_strength: float, soft: bool = False) -> torch.Tensor:
        """``log w``; with ``soft``, the screen's surrogate: margins softened to the paper's formula (negation margin
        1, presence margin 0), so that it is 0 less often where the final image is on target (the sampler floors
        it)."""
        return maths.log_weight(
            target,
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

    def readings(self, out) -> torch.Tensor:
        """Each attribute's log ratio to the image's strongest `(b, n)`, float64 on the CPU (spec §3)."""
        dr = maths.temper_dr(out.dr_log_probs.detach().double(), self.dr_temperature)
        lg = maths.log_g(
            dr,
            self.log_p_data.to(dr.device),
            None if self.log_priors is None else self.log_priors.to(dr.device),
            self.labelling,
        )
        return (lg - lg.amax(1, keepdim=True)).cpu()

    def pool_report(self, target: Target, readings: torch.Tensor | None) -> str | None:
        """What the entry pool saw, for a budget error: the share of its draws on each refinement of the target (one
        more literal at a time, `Target.stages`) and on the whole, with these margins; and, where none reached the
        whole target, the share that would without them (the margins then make it unreachable)."""
        if readings is None or not readings.shape[0]:
            return None
        n = readings.shape[0]

        def share(stage: Target, lam: float, kappa: float) -> float:
            lr = maths.log_r(stage, readings, self.log_p_data, None, lam, kappa, "one_label_per_image")
            return float(torch.isfinite(lr).double().mean())

        margins = (self.negation_margin, self.presence_margin)
        parts = [f"{share(stage, *margins):.3g} on {str(stage)!r}" for stage in target.stages()]
        text = f"Of the entry pool's {n} draws, the shares on the target's literals and on the whole were: "
        text += ", ".join(parts) + "."
        if share(target, *margins) == 0:
            loose = share(target, 1.0, 0.0)
            text += (
                f" None reached the whole target with negation_margin={margins[0]:.3g} and presence_margin="
                f"{margins[1]:.3g}; "
                + (
                    f"without the margins (negation_margin=1, presence_margin=0) {loose:.3g} would: the margins make "
                    "it unreachable for these heads, so pass smaller ones."
                    if loose > 0
                    else "none would even without the margins: the heads give this combination no support here."
                )
            )
        return text

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
            "rounds": self.rounds,  # every batch of proposals, the pool's included
            "max_proposals": budget,
            "seconds_generator": self.seconds_generator,
            "seconds_heads": self.seconds_heads,
            "seconds_sampler": sampler,  # the rest: the chains' own bookkeeping
            "seconds_wall": seconds_wall,
        }


class TargetEvaluate:
    """``evaluate(z) -> (x, log w, readings)`` of a call's target (`sampling.sample_s2m`'s callable), with what the
    sampler may use of the proposal:

    - ``num_steps``: K, the UNet calls of one image (`None` for a GAN);
    - ``frozen``: the latent coordinate that local moves keep (the drawn class of a class-conditional proposal);
    - ``value_and_grad(z)``: also the gradient of ``log w`` by ``z`` (a differentiable GAN: ``kernel="mala"``);
    - ``start(z, s) -> (handle, log w_s)`` and ``finish(handle, keep) -> (x, log w, readings)``: the screen
      (`s2m_diffusers.screen`) where the proposal can stop after a denoising step (``screen_unavailable`` is `None`:
      `proposals.DDIMProposal`, and `proposals.PipelineProposal` where its step callback allows), the surrogate
      being the heads' (or the screen heads') reading of the predicted clean image with the soft margins;
    - ``set_phase(name)``: the chains tell it the phase (``"pool"``, ``"burn_in"``, ``"sampling"``).
    """

    def __init__(self, weigher: Weigher, target: Target):
        self.weigher, self.target = weigher, target
        proposal = weigher.proposal
        self.num_steps = getattr(proposal, "num_steps", None)
        self.screen_restarts = bool(getattr(proposal, "screen_restarts", False))  # finishing reruns a proposal whole
        self.stages = stages_of(target)
        self.num_stages = len(self.stages)
        self.frozen = None
        if weigher.plan.mode == "marginal":  # the last coordinate draws the class
            shape = weigher.plan.latent_shape(proposal.latent_shape)
            self.frozen = torch.zeros(shape, dtype=torch.bool)
            self.frozen[-1] = True

    @property
    def screen_unavailable(self) -> str | None:
        """Why the proposal cannot be screened (`None`: it can); read only where a call screens (a wrapped pipeline
        runs a check on its first reading: `proposals.PipelineProposal.check_screen`)."""
        return getattr(self.weigher.proposal, "screen_unavailable", "this proposal cannot be screened.")

    def set_phase(self, name: str) -> None:
        self.weigher.phase = PHASES.index(name)

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, lw, readings = self._weigh(z, [self.target])
        return x, lw[:, 0], readings

    def refinements(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As the call, with every stage's ``log w`` `(B, L)` in place of the target's (its last column), from one
        pass of the generator and the heads (`s2m_diffusers.ladder`)."""
        return self._weigh(z, self.stages)

    def _weigh(self, z: torch.Tensor, targets: list[Target]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, the ``log w`` of each of ``targets`` `(B, len(targets))` (the last one's read by ``on_round``: it is
        the call's target) and readings, from one pass of the generator and the heads per micro-batch."""
        w = self.weigher
        images, weights, readings = [], [], []
        for chunk in z.split(w.micro_batch_size):
            x, out, df = w._judge(chunk)
            images.append(x.cpu())
            weights.append(torch.stack([w._log_weight(t, out, df, w.dv_strength) for t in targets], 1))
            readings.append(w.readings(out))
        x, lw = torch.cat(images), torch.cat(weights)
        lw[:, -1] = w.on_round(z, x, lw[:, -1])
        return x, lw, torch.cat(readings)

    def value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As the call, and ``grad log w`` by ``z`` `(B, ...)` (zero where ``log w = -inf``: off the target)."""
        w = self.weigher
        images, weights, readings, grads = [], [], [], []
        for chunk in z.split(w.micro_batch_size):
            with torch.enable_grad():
                leaf = chunk.detach().requires_grad_(True)
                x, out, df = w._judge(leaf, grad=True)
                lw = w._log_weight(self.target, out, df, w.dv_strength)
                on = torch.isfinite(lw)
                grad = torch.zeros_like(leaf)
                if bool(on.any()) and lw.requires_grad:  # heads read by thresholds give no gradient: zero
                    grad = torch.autograd.grad(lw[on].sum(), leaf)[0]
            images.append(x.detach().cpu())
            weights.append(lw.detach())
            readings.append(w.readings(out))
            grads.append(grad.nan_to_num(0.0).detach())
        x, lw = torch.cat(images), torch.cat(weights)
        return x, w.on_round(z, x, lw), torch.cat(readings), torch.cat(grads)

    def _surrogate(self, view: torch.Tensor, step: int) -> torch.Tensor:
        """The surrogate ``log w_s`` of the predicted clean images ``view`` after ``step`` steps: the screen heads'
        reading where they were trained for that timestep (`s2m_diffusers.screen_heads`), else the heads'; with the
        soft margins either way."""
        w = self.weigher
        _, out, df = w._read(view, check_shape=False, heads=self._screen_heads_at(step))
        return w._log_weight(self.target, out, df, w.dv_strength, soft=True)

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

    def start(self, z: torch.Tensor, step: int) -> tuple[tuple, torch.Tensor]:
        w = self.weigher
        latents, labels = w.plan.split(z, w.proposal.latent_shape)
        states, views = self._timed(lambda: w.proposal.start(latents, labels, step))
        return (z, states, labels, step), self._surrogate(views, step)

    def finish(self, handle: tuple, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rest of the run for the latents ``keep`` of ``handle``: ``(x, log w, readings)``."""
        w = self.weigher
        z, states, labels, step = handle
        labels = None if labels is None else labels[keep.to(labels.device)]
        x = self._timed(lambda: w.proposal.finish(states[keep.to(states.device)], labels, step))
        _, out, df = w._read(x)
        log_w = w._log_weight(self.target, out, df, w.dv_strength)
        x = x.cpu()
        return x, w.on_round(z[keep.to(z.device)], x, log_w), w.readings(out)


def measure_dv_strength(weigher: Weigher, target: Target, seed: int = 0) -> tuple[float, int]:
    """``dv_strength="auto"``: `maths.dv_strength` of the target's weights (read with ``beta = 1``) over prior draws,
    256 at a time, until 128 are on the target or 2,048 are drawn. Returns beta and the proposals drawn."""
    p_z = StandardNormal(weigher.plan.latent_shape(weigher.proposal.latent_shape))
    generator, rests, dvs, drawn = torch.Generator().manual_seed(seed), [], [], 0
    while drawn < _DV_PILOT_MAX and sum(int(torch.isfinite(r).sum()) for r in rests) < _DV_PILOT_ON_TARGET:
        rest, dv = weigher.log_rest_and_dv(target, p_z.sample(_DV_PILOT_BATCH, generator))
        rests.append(rest)
        dvs.append(dv)
        drawn += _DV_PILOT_BATCH
    return maths.dv_strength(torch.cat(dvs), torch.cat(rests)), drawn


def resolve_dv_strength(pipe, target: Target, config, plan, proposal, micro_batch_size: int, steps: int | None):
    """``config`` with ``dv_strength="auto"`` replaced by its measured value (`measure_dv_strength`, once per target,
    proposal setting and reading: cached in ``pipe.auto_dv_strengths``, which the pipeline saves), and the proposals
    measuring it drew now (0 when it was cached or not asked for)."""
    if config.dv_strength != "auto":
        return config, 0
    fields = {name: getattr(config, name) for name in _READING_SETTINGS}
    steps = steps or pipe.config.num_inference_steps if pipe.proposal_kind != "gan" else None
    key = json.dumps({"target": str(target), "class": plan.describe(), "steps": steps, **fields}, sort_keys=True)
    measured = 0
    if key not in pipe.auto_dv_strengths:  # measure beta with the weights of beta = 1, then weigh with it
        pilot = Weigher(pipe, target, proposal, plan, config.replace(dv_strength=1.0), micro_batch_size)
        with eval_mode(pipe.heads):
            pipe.auto_dv_strengths[key], measured = measure_dv_strength(pilot, target)
    return config.replace(dv_strength=pipe.auto_dv_strengths[key]), measured


DV_STRENGTHS_FILE = os.path.join("fits", "dv_strength.json")  # in a saved pipeline's folder


def save_dv_strengths(strengths: dict[str, float], folder: str) -> None:
    """Write the ``dv_strength`` values ``"auto"`` measured into a pipeline folder being saved (none: no file)."""
    if strengths:
        os.makedirs(os.path.join(folder, os.path.dirname(DV_STRENGTHS_FILE)), exist_ok=True)
        with open(os.path.join(folder, DV_STRENGTHS_FILE), "w", encoding="utf-8") as f:
            json.dump(strengths, f, indent=1)


def load_dv_strengths(folder: str) -> dict[str, float]:
    """The ``dv_strength`` values a saved pipeline folder holds (none: empty)."""
    path = os.path.join(folder, DV_STRENGTHS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {str(k): float(v) for k, v in json.load(f).items()}


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
