"""The class of a class-conditional proposal for one call (spec §4): fixed (with the ``D_f`` correction) or drawn from
``p_G(c)`` by one extra latent coordinate (`S2MSamplingConfig.class_label`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .proposals import ProposalAdapter

__all__ = ["ClassPlan", "standard_normal_cdf"]


@dataclass
class ClassPlan:
    """How a class-conditional proposal's class is chosen for one call (`S2MSamplingConfig.class_label`, spec §4).

    ``mode``: ``"none"`` (unconditional proposal), ``"fixed"`` (every sample is generated with class ``index``;
    ``log w`` gets the ``D_f`` correction ``- log D_f(c|x) + log p_G(c)``) or ``"marginal"`` (the class is drawn from
    ``p_G(c)`` by one extra standard-normal latent coordinate ``u``: ``c = F^-1(Phi(u))``; the proposal is then the
    generator's marginal ``p_G(x)``, which ``D_v`` was trained against, and needs no ``D_f``).
    """

    mode: str = "none"
    index: int | None = None
    log_probs: torch.Tensor | None = None  # log p_G(c), (n,)
    names: tuple[str, ...] = ()

    @classmethod
    def choose(cls, target, proposal: ProposalAdapter, heads_config, class_label, proposal_name: str) -> ClassPlan:
        """The plan for ``target`` (a `Target`) with this proposal and heads.

        Args:
            class_label (`int`, `str` or `None`): ``"auto"`` (``target.first_present`` when the heads have ``D_f``,
                else drawn), `None` (drawn), or an attribute name or index (fixed; needs ``D_f``).
            proposal_name (`str`): the generator's class name, for error messages.
        """
        names = tuple(heads_config.attribute_names)
        if not proposal.is_conditional:
            if class_label not in (None, "auto"):
                raise ValueError(
                    f"class_label={class_label!r} was given, but the proposal ({proposal_name}) is unconditional. "
                    "Leave class_label='auto', or use a class-conditional generator."
                )
            return cls()
        if proposal.num_classes != len(names):
            raise ValueError(
                f"The class-conditional proposal has {proposal.num_classes} classes, but the heads know "
                f"{len(names)} attributes {list(names)}. S2M's classes are the attributes: train the generator with "
                "one class per attribute (class i = attribute i), or use an unconditional proposal."
            )
        probs = getattr(heads_config, "proposal_class_probs", None) or [1.0] * len(names)
        probs = torch.tensor(probs, dtype=torch.float64)
        log_probs = (probs / probs.sum()).log()
        has_df = bool(getattr(heads_config, "conditional", False))
        if class_label is None or (class_label == "auto" and (target.first_present is None or not has_df)):
            return cls("marginal", None, log_probs, names)
        index = target.first_present if class_label == "auto" else _class_index(class_label, names)
        if not has_df:
            raise ValueError(
                f"Generating every sample with class {names[index]!r} needs the D_f head to correct for it (spec §4), "
                "and these heads have none (conditional=False). Train heads with a class-conditional proposal "
                "(they then get D_f), or pass class_label=None to draw the class from p_G(c) with the latent."
            )
        return cls("fixed", index, log_probs, names)

    def latent_shape(self, generator_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The sampler's latent shape: the generator's, plus one coordinate when the class is drawn."""
        return (math.prod(generator_shape) + 1,) if self.mode == "marginal" else generator_shape

    def split(self, z: torch.Tensor, generator_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampler latents -> (generator latents, class labels or None)."""
        if self.mode == "none":
            return z, None
        if self.mode == "fixed":
            return z, torch.full((z.shape[0],), self.index, dtype=torch.long)
        flat = z.reshape(z.shape[0], -1)
        cdf = self.log_probs.exp().cumsum(0)[:-1].to(flat.device, torch.float64)  # (n - 1,)
        labels = torch.searchsorted(cdf, standard_normal_cdf(flat[:, -1].double()), right=True)
        return flat[:, :-1].reshape(z.shape[0], *generator_shape), labels.cpu()

    @property
    def log_pg_class(self) -> float | None:
        """``log p_G(c)`` of the fixed class (the ``D_f`` correction), else `None`."""
        return float(self.log_probs[self.index]) if self.mode == "fixed" else None

    def describe(self) -> str | None:
        if self.mode == "fixed":
            return self.names[self.index]
        return "drawn from p_G(c)" if self.mode == "marginal" else None


def _class_index(class_label: int | str, names: tuple[str, ...]) -> int:
    if isinstance(class_label, str):
        if class_label not in names:
            raise ValueError(f"class_label={class_label!r} is not one of the attributes {list(names)}.")
        return names.index(class_label)
    if isinstance(class_label, int) and not isinstance(class_label, bool) and 0 <= class_label < len(names):
        return int(class_label)
    raise ValueError(
        f"class_label must be 'auto', None, an attribute name or 0..{len(names) - 1}; got {class_label!r}."
    )


def standard_normal_cdf(u: torch.Tensor) -> torch.Tensor:
    """``Phi(u)``, the standard normal CDF (used to turn one latent coordinate into a class draw)."""
    return torch.special.ndtr(u)
