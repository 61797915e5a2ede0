"""The pipeline's callbacks and progress bars: the sampler's progress callback, the ``callback_on_step_end`` contract
of `S2MPipeline.__call__`, and a silent bar for processes other than the main one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


class _ProgressCallback:
    """The sampler's callback: moves the images bar to the images finished (shown per phase: the entry pool, the
    burn-in, the sampling), and returns ``stop()`` (`True` stops the sampler's run: [`S2MPipeline.interrupt`])."""

    def __init__(self, bar, offset: int = 0, stop: Callable[[], bool] | None = None):
        self.bar, self.offset, self.stop = bar, offset, stop

    def __call__(self, round_: int, info: dict) -> bool:
        self.bar.n = self.offset + info.get("done", 0)
        self.bar.set_postfix(phase=info.get("phase", ""), refresh=False)
        self.bar.refresh()
        return bool(self.stop is not None and self.stop())


class _StepEndCallback:
    """``callback_on_step_end`` as the weigher calls it, ``(pipe, round, phase, tensors) -> log_w``, holding the
    contract of [`S2MPipeline.__call__`]: the user's callback sees only the tensors it asked for; of its returned
    dict only ``"log_w"`` is used; returned ``"latents"`` or ``"images"`` that differ from those given are refused."""

    def __init__(self, callback: Callable | None, inputs: list[str]):
        self.callback, self.inputs = callback, list(inputs)

    def __call__(self, pipe, round_: int, phase: int, tensors: dict) -> torch.Tensor:
        log_w = tensors["log_w"]
        if self.callback is None:
            return log_w
        returned = self.callback(pipe, round_, phase, {k: tensors[k] for k in self.inputs})
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
                    "accepts latents drawn from its own proposals (the acceptance depends on how they were drawn), "
                    "and its images are the generator's output for them: change the weights instead (return "
                    "{'log_w': new_log_w}, -inf to veto an image)."
                )
        new = returned.get("log_w")
        if new is None:
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
