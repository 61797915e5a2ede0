"""The pipeline's callbacks and progress bars: the sampler's progress callback, the ``callback_on_step_end`` contract
of `S2MPipeline.__call__`, and a silent bar for processes other than the main one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .weights import Weigher


class _ProgressCallback:
    """The sampler's callback: a refitting stage advances ``weigher.phase`` (``phase`` of ``callback_on_step_end``) and
    the fitting bar, with the stage's on-target share; a sampling round moves the images bar to the images finished,
    and returns ``stop()`` (`True` stops the sampler's run: [`S2MPipeline.interrupt`])."""

    def __init__(self, bar, offset: int = 0, weigher: Weigher | None = None, stop: Callable[[], bool] | None = None):
        self.bar, self.offset, self.weigher, self.stop = bar, offset, weigher, stop

    def __call__(self, round_: int, info: dict) -> bool:
        if "stage" in info:
            if self.weigher is not None:
                self.weigher.phase += 1
            self.bar.update(1)
            self.bar.set_postfix(on_target=f"{info['on_target_share']:.3g}")
        elif "done" in info:
            self.bar.n = self.offset + info["done"]
            self.bar.refresh()
        return bool(self.stop is not None and self.stop())


class _Interrupted(Exception):
    """`S2MPipeline.interrupt` set during refitting: raised out of the round, caught by `S2MPipeline.__call__`."""


class _StepEndCallback:
    """``callback_on_step_end`` as the weigher calls it, ``(pipe, round, phase, tensors) -> log_w``, holding the
    contract of [`S2MPipeline.__call__`]: the user's callback sees only the tensors it asked for; of its returned
    dict only ``"log_w"`` is used, in the final sampling; returned ``"latents"`` or ``"images"`` that differ from those
    given are refused; an interrupt during refitting ends the call (single process only: with several, the others
    would wait for the main process's fit)."""

    def __init__(self, callback: Callable | None, inputs: list[str], num_fit_stages: int, interrupt_fit: bool):
        self.callback, self.inputs = callback, list(inputs)
        self.num_fit_stages, self.interrupt_fit = num_fit_stages, interrupt_fit

    def __call__(self, pipe, round_: int, phase: int, tensors: dict) -> torch.Tensor:
        log_w = tensors["log_w"]
        returned = None
        if self.callback is not None:
            returned = self.callback(pipe, round_, phase, {k: tensors[k] for k in self.inputs})
        final = phase >= self.num_fit_stages
        if not final and self.interrupt_fit and pipe.interrupt:
            raise _Interrupted
        if returned is None:
            return log_w
        if not isinstance(returned, dict):
            raise TypeError(
                f"callback_on_step_end must return a dict (e.g. its callback_kwargs) or None, got {type(returned)}."
            )
        for name in ("latents", "images"):
            if name in returned and not _same_tensor(returned[name], tensors[name]):
                raise ValueError(
                    f"callback_on_step_end returned changed {name!r}; only 'log_w' can be changed. The sampler "
                    "accepts latents drawn from its own proposal density (the acceptance divides by that density), "
                    "and its images are the generator's output for them: change the weights instead (return "
                    "{'log_w': new_log_w}, -inf to veto an image)."
                )
        new = returned.get("log_w")
        if new is None or not final:
            return log_w
        new = torch.as_tensor(new)
        if new.shape != log_w.shape:
            raise ValueError(
                f"callback_on_step_end returned 'log_w' of shape {tuple(new.shape)}; the round has {log_w.shape[0]} "
                f"proposals, so it must have shape {tuple(log_w.shape)} (one log weight per proposal, -inf off "
                "target)."
            )
        return new.to(device=log_w.device, dtype=log_w.dtype)


def _same_tensor(value, original) -> bool:
    """Whether a value a callback returned is the tensor it was given (or equal to it)."""
    if value is original:
        return True
    return (
        isinstance(value, torch.Tensor)
        and isinstance(original, torch.Tensor)
        and value.shape == original.shape
        and torch.equal(value.to(original.device, original.dtype), original)
    )


class _SilentBar(contextlib.nullcontext):
    """A progress bar that shows nothing (processes other than the main one)."""

    def __init__(self):
        super().__init__(self)
        self.n = 0

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def refresh(self) -> None:
        pass
