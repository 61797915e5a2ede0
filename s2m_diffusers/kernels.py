"""Metropolis-Hastings kernels in the generator's noise space (spec §4, §5b), as short pure functions over tensors.

Every chain targets the latent density ``pi(z) ∝ N(z; 0, I) w(G(z))``, whose push-forward through the generator is
the heads' target ``p_T`` (spec §4). A kernel is a proposal and its log acceptance ratio; the chain driver
(`s2m_diffusers.chains`) mixes them per chain and accepts with [`mh_accept`]. ``C`` chains run side by side: every
function takes batches with the chain dimension first and per-chain step sizes of shape ``(C,)``.

- **independent** (the paper's kernel): ``z' ~ q``, ``log alpha = log r(z') - log r(z)`` with the importance ratio
  ``log r = log w + log p_z - log q`` ([`log_alpha_independent`]). Its cost is set by how uneven ``r`` is over ``q``.
- **pCN** (preconditioned Crank-Nicolson; Cotter, Roberts, Stuart and White 2013): ``z' = sqrt(1 - b^2) z + b xi``,
  ``xi ~ N(0, I)``. The move is reversible with respect to ``N(0, I)``, so only the weight enters:
  ``log alpha = log w(z') - log w(z)`` ([`pcn_propose`]). ``b = 1`` is an independent draw from the prior.
- **MALA** (Metropolis-adjusted Langevin; Roberts and Tweedie 1996) for differentiable generators and heads:
  ``z' = z + (h / 2) grad log pi(z) + sqrt(h) xi``, corrected by the ratio of the two Gaussian proposal densities
  ([`mala_propose`], [`log_alpha_mala`]).

A coordinate that a local move must keep (the drawn class of a class-conditional proposal, spec §5b) is marked in a
boolean ``frozen`` mask of the latent's shape: local moves leave it as it is, independent draws redraw it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "mh_accept",
    "pcn_propose",
    "log_alpha_pcn",
    "log_alpha_independent",
    "mala_propose",
    "log_alpha_mala",
]


def _per_chain(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A `(C,)` tensor shaped to broadcast over latents `(C, ...)`."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _keep(new: torch.Tensor, old: torch.Tensor, frozen: torch.Tensor | None) -> torch.Tensor:
    """``new`` with the ``frozen`` coordinates taken from ``old``."""
    return new if frozen is None else torch.where(frozen.to(new.device), old, new)


def _finite_or(log_alpha: torch.Tensor, current: torch.Tensor, proposed: torch.Tensor) -> torch.Tensor:
    """``log_alpha`` with the conventions of a chain on ``-inf`` weights: a proposal of weight 0 is never accepted;
    a current state of weight 0 (never after the entry, which starts on the target) accepts any finite one."""
    log_alpha = torch.where(torch.isfinite(current), log_alpha, torch.zeros_like(log_alpha))
    log_alpha = log_alpha.nan_to_num(nan=-math.inf)
    return torch.where(torch.isfinite(proposed), log_alpha, torch.full_like(log_alpha, -math.inf))


def mh_accept(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Accept each chain's proposal with probability ``min(1, exp(log_alpha))``: one uniform per chain.

    Returns:
        `torch.Tensor` of shape `(C,)`, bool.
    """
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(log_alpha.shape, generator=generator, device=device, dtype=torch.float64)
    return torch.log(u).to(log_alpha.device) < log_alpha


def pcn_propose(
    z: torch.Tensor, step: torch.Tensor, generator: torch.Generator | None = None, frozen: torch.Tensor | None = None
) -> torch.Tensor:
    """The pCN proposal ``z' = sqrt(1 - b^2) z + b xi`` for latents ``z`` `(C, ...)` and step sizes ``b`` `(C,)` in
    (0, 1]; ``frozen`` coordinates are kept."""
    b = _per_chain(step.clamp(0.0, 1.0), z)
    xi = torch.randn(z.shape, generator=generator, device=generator.device if generator is not None else "cpu")
    new = torch.sqrt(1.0 - b * b) * z + b * xi.to(z.device, z.dtype)
    return _keep(new, z, frozen)


def log_alpha_pcn(log_w: torch.Tensor, new_log_w: torch.Tensor) -> torch.Tensor:
    """``log w(z') - log w(z)``: pCN is reversible with respect to the prior, so the weights alone decide."""
    return _finite_or(new_log_w - log_w, log_w, new_log_w)


def log_alpha_independent(log_ratio: torch.Tensor, new_log_ratio: torch.Tensor) -> torch.Tensor:
    """Independent MH from ``q`` (spec §4): ``log r(z') - log r(z)``, ``log r = log w + log p_z - log q``."""
    return _finite_or(new_log_ratio - log_ratio, log_ratio, new_log_ratio)


def _log_pi(z: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I) + log w`` up to a constant `(C,)`."""
    return -0.5 * z.reshape(z.shape[0], -1).double().pow(2).sum(1).to(log_w.device) + log_w


def _drift(z: torch.Tensor, grad_log_w: torch.Tensor, h: torch.Tensor, frozen: torch.Tensor | None) -> torch.Tensor:
    """The Langevin mean ``z + (h / 2) grad log pi(z)``, ``grad log pi = -z + grad log w``, frozen coordinates kept."""
    mean = z + 0.5 * _per_chain(h, z) * (grad_log_w.to(z) - z)
    return _keep(mean, z, frozen)


def mala_propose(
    z: torch.Tensor,
    grad_log_w: torch.Tensor,
    step: torch.Tensor,
    generator: torch.Generator | None = None,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MALA proposal ``z' = z + (h / 2) grad log pi(z) + sqrt(h) xi`` with ``h = b^2`` for step sizes ``b``
    `(C,)` (the same scale as pCN's: the noise has standard deviation ``b``)."""
    h = step.double().pow(2)
    xi = torch.randn(z.shape, generator=generator, device=generator.device if generator is not None else "cpu")
    return _keep(_drift(z, grad_log_w, h, frozen) + _per_chain(h.sqrt(), z) * xi.to(z.device, z.dtype), z, frozen)


def log_alpha_mala(
    z: torch.Tensor,
    log_w: torch.Tensor,
    grad_log_w: torch.Tensor,
    new_z: torch.Tensor,
    new_log_w: torch.Tensor,
    new_grad_log_w: torch.Tensor,
    step: torch.Tensor,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log pi(z') - log pi(z) + log N(z; m(z'), h) - log N(z'; m(z), h)``, ``m`` the Langevin mean of
    [`mala_propose`] (frozen coordinates cancel: they are equal in ``z`` and ``z'``)."""
    h = step.double().pow(2).to(log_w.device)

    def log_q(to: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:  # log N(to; mean, h I) up to a shared constant
        diff = (to - mean).reshape(to.shape[0], -1).double().pow(2).sum(1).to(h.device)
        return -diff / (2 * h)

    forward = log_q(new_z, _drift(z, grad_log_w, h, frozen))
    backward = log_q(z, _drift(new_z, new_grad_log_w.nan_to_num(0.0), h, frozen))
    log_w, new_log_w = log_w.double().to(h.device), new_log_w.double().to(h.device)
    log_alpha = _log_pi(new_z, new_log_w) - _log_pi(z, log_w) + backward - forward
    return _finite_or(log_alpha, log_w, new_log_w)
