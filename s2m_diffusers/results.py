"""What a sampler run returns (spec §5): its images with their statistics, and the one budget error."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SamplerStats", "SampleResult", "BudgetExhaustedError", "budget_error"]


@dataclass
class SamplerStats:
    """What one sampler run did (spec §5). ``proposals`` counts generator calls (one per latent, the entry pool
    included), ``unet_calls`` the denoising steps they ran (0 for a generator without steps), ``cost`` what the budget
    ``max_proposals`` counts (a proposal screened out after ``s`` of its ``K`` steps counts ``s / K``), ``accepted``
    the
    accepted moves after the burn-in. ``chains`` records the run (the pool, the chains, the step sizes, the thinning,
    the acceptance, the screen) and ``diagnostics`` what it can say of its images (R-hat, ESS, the reading check and
    its warnings; `s2m_diffusers.chains.chain_diagnostics`)."""

    proposals: int = 0
    unet_calls: int = 0
    cost: float = 0.0
    accepted: int = 0
    rounds: int = 0
    num_returned: int = 0
    on_target_returned: int = 0
    unique_returned: int = 0
    seconds_evaluate: float = 0.0
    seconds_total: float = 0.0
    budget_exhausted: bool = False
    chains: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        moves = self.chains.get("moves") if self.chains else None
        if moves:
            return self.accepted / moves
        return self.accepted / self.proposals if self.proposals else 0.0

    @property
    def proposals_per_sample(self) -> float:
        return self.proposals / self.num_returned if self.num_returned else math.inf

    @property
    def screen(self) -> dict:
        return (self.chains or {}).get("screen") or {}

    @classmethod
    def merge(cls, parts: Sequence[SamplerStats]) -> SamplerStats:
        """Several runs (one per generator, one per process) as one: counts and seconds summed, ``budget_exhausted``
        if any part ran out; ``chains`` and ``diagnostics`` are the single run's, or ``{"runs": [...]}`` with every
        run's warnings gathered."""
        out = cls()
        for f in dataclasses.fields(cls):
            if f.name == "budget_exhausted":
                out.budget_exhausted = any(p.budget_exhausted for p in parts)
            elif f.name in ("chains", "diagnostics"):
                records = [getattr(p, f.name) for p in parts if getattr(p, f.name)]
                if len(records) == 1:
                    setattr(out, f.name, dict(records[0]))
                elif records:
                    merged = {"runs": records}
                    if f.name == "diagnostics":
                        merged["warnings"] = [w for r in records for w in r.get("warnings", [])]
                    if f.name == "chains":
                        merged["moves"] = sum(r.get("moves") or 0 for r in records)
                        merged["screen"] = next((r["screen"] for r in records if r.get("screen")), {})
                    setattr(out, f.name, merged)
            else:
                setattr(out, f.name, sum(getattr(p, f.name) for p in parts))
        return out


@dataclass
class SampleResult:
    """What a sampler returns: latents, images, log weights, per-image on-target flags and statistics; ``chain``
    numbers the chain each image came from (images of one chain are correlated), ``pool_readings`` the heads'
    readings of the entry pool's draws (for messages about what the pool saw)."""

    z: torch.Tensor
    x: Any
    log_w: torch.Tensor
    on_target: torch.Tensor  # (N,) bool
    stats: SamplerStats
    chain: torch.Tensor | None = None
    readings: torch.Tensor | None = None
    pool_readings: torch.Tensor | None = None

    @classmethod
    def empty(cls, stats: SamplerStats | None = None) -> SampleResult:
        """No sample (a budget spent before any chain returned one); ``x`` is `None`."""
        stats = stats if stats is not None else SamplerStats()
        return cls(torch.zeros(0), None, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), stats)

    @property
    def num_samples(self) -> int:
        return 0 if self.x is None else int(self.z.shape[0])

    @classmethod
    def concat(cls, results: Sequence[SampleResult]) -> SampleResult:
        """Several runs' samples in order, on the CPU, with merged statistics ([`SamplerStats.merge`])."""
        stats = SamplerStats.merge([r.stats for r in results])
        found = [r for r in results if r.num_samples]
        pools = [r.pool_readings for r in results if r.pool_readings is not None]
        if not found:
            empty = cls.empty(stats)
            empty.pool_readings = torch.cat(pools) if pools else None
            return empty
        chains, offset = [], 0
        for r in found:
            ids = r.chain if r.chain is not None else torch.arange(r.num_samples)
            chains.append(ids.cpu() + offset)
            offset += int(ids.max()) + 1 if ids.numel() else 0
        readings = [r.readings for r in found]
        return cls(
            *(torch.cat([getattr(r, name).cpu() for r in found]) for name in ("z", "x", "log_w", "on_target")),
            stats,
            torch.cat(chains),
            torch.cat(readings) if all(v is not None for v in readings) else None,
            torch.cat(pools) if pools else None,
        )


class BudgetExhaustedError(RuntimeError):
    """Raised when the proposal budget ran out before the chains returned every image asked for.

    ``.result`` holds what was obtained (possibly empty), with its statistics.
    """

    def __init__(self, message: str, result: SampleResult, budget: float | None = None):
        super().__init__(message)
        self.result = result
        self.budget = budget


def budget_error(
    result: SampleResult,
    num_requested: int,
    budget: float | None,
    target: str | None = None,
    tries: Sequence[str] | None = None,
    unit: str = "samples",
    seen: str | None = None,
) -> BudgetExhaustedError:
    """The one budget-exhausted error: how far the run got (proposals, the entry pool's draws on the target, the
    images found), what was seen (``seen``: e.g. each literal's share of the pool, from the pipeline), and what to
    try (``tries``, in the words of the interface the user called)."""
    s = result.stats
    n_found = result.num_samples
    pool = (s.chains or {}).get("pool") or {}
    never = not pool.get("on_target") and not n_found
    if tries is None:
        tries = ["a larger max_proposals"]
        if n_found:
            tries.append(f"allow_partial=True to keep the {n_found} {unit} found")
    for_target = f" for target {target!r}" if target else ""
    progress = []
    if pool:
        progress.append(
            f"the entry pool had {pool.get('on_target', 0)} of its {pool.get('proposals', 0)} draws on the target"
        )
    if s.chains.get("num_chains"):
        progress.append(f"{s.chains['num_chains']} chains")
    message = (
        f"The proposal budget of {budget} ran out after {s.proposals} proposals{_screened_cost(s)} with {n_found} of "
        f"{num_requested} {unit}{for_target}" + (f" ({'; '.join(progress)})" if progress else "") + "."
    )
    if seen:
        message += f" {seen}"
    if never:
        message += (
            " No proposal reached the whole target: the generator may not produce this combination, or the heads' "
            "reading may leave it no support (a negation_margin or presence_margin no image meets, heads that do not "
            "recognise it)."
        )
    message += " Try " + "; ".join(tries) + "."
    return BudgetExhaustedError(message, result, budget)


def _screened_cost(stats: SamplerStats) -> str:
    """`` (costing N: some were screened out part-way)`` where the budget's count differs from the proposals'."""
    return (
        f" (costing {stats.cost:.1f}: some were screened out part-way)" if stats.cost < stats.proposals - 0.05 else ""
    )
