"""Latent densities (spec §6): the latent prior ``p_z`` and the refitted proposal densities ``q``.

A latent ``z`` is all the randomness of one generated sample (a GAN's latent, a diffusion model's initial
noise under a deterministic sampler). Its prior is ``p_z = N(0, I)``. Refitting replaces the proposal by

    q(z) = (1 - eps) * m_k(P z) N(P_perp z; 0, I) + eps * N(z; 0, I)

where ``P`` holds the top-``k`` principal directions of accepted latents (rows orthonormal), ``m_k`` is a
Gaussian mixture on those ``k`` coordinates fitted with scikit-learn's ``GaussianMixture``, and ``eps`` is the
defensive share of the prior. Then ``p_z / q <= 1 / eps`` everywhere and

    log p_z(z) - log q(z) = -log((1 - eps) * m_k(P z) / N_k(P z) + eps)

depends on ``k`` coordinates only, which keeps importance weights stable for latents of thousands of
dimensions. Each density offers ``sample(n, generator)``, ``log_prob(z)`` and ``log_prior_ratio(z)`` (``log p_z
- log q``, the only quantity the sampler needs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["StandardNormal", "LowRankGaussianMixture", "pooled_basis"]


def _standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over all but the first dimension."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))


class StandardNormal:
    """The latent prior ``p_z = N(0, I)`` over latents of shape ``latent_shape``.

    Args:
        latent_shape (`Sequence[int]`): the shape of one latent, e.g. ``(128,)`` or ``(4, 64, 64)``.
    """

    def __init__(self, latent_shape: Sequence[int]):
        self.latent_shape = tuple(int(s) for s in latent_shape)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw ``n`` latents, shape ``(n, *latent_shape)``, on the generator's device unless ``device`` is given."""
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        return torch.randn((n, *self.latent_shape), generator=generator, device=device, dtype=dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return _standard_normal_log_prob(z)

    def log_prior_ratio(self, z: torch.Tensor) -> torch.Tensor:
        """``log p_z(z) - log q(z)``: zero for the prior itself."""
        return torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)

    def __repr__(self) -> str:
        return f"StandardNormal(latent_shape={self.latent_shape})"


class LowRankGaussianMixture:
    """A Gaussian mixture on a ``k``-dimensional principal subspace, standard normal on the rest, with a
    defensive share ``eps`` of the prior (spec §6). Build it with [`LowRankGaussianMixture.fit`].

    Args:
        latent_shape (`Sequence[int]`): shape of one latent.
        basis (`torch.Tensor` of shape `(k, d)`): orthonormal rows ``P``; ``k == d`` fits the full space.
        weights (`torch.Tensor` of shape `(K,)`), means (`(K, k)`), covariances (`(K, k, k)`): the mixture.
        defensive (`float`): ``eps``, the share of proposals drawn from the prior.
    """

    def __init__(
        self,
        latent_shape: Sequence[int],
        basis: torch.Tensor,
        weights: torch.Tensor,
        means: torch.Tensor,
        covariances: torch.Tensor,
        defensive: float = 0.1,
    ):
        if not 0.0 < defensive <= 1.0:
            raise ValueError(
                f"defensive must be in (0, 1]: it is the prior's share in the proposal and keeps p_z / q "
                f"bounded by 1 / defensive. Got {defensive}."
            )
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.basis = basis.double()  # (k, d)
        self.defensive = float(defensive)
        self.weights, self.means, self.covariances = weights.double(), means.double(), covariances.double()
        self.mixture = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(probs=weights.double()),
            torch.distributions.MultivariateNormal(means.double(), covariance_matrix=covariances.double()),
        )
        self.rank = self.basis.shape[0]
        self.dim = self.basis.shape[1]

    @classmethod
    def fit(
        cls,
        latents: torch.Tensor,
        rank: int = 32,
        n_components: int | Sequence[int] = (1, 2, 4, 8),
        defensive: float = 0.1,
        seed: int = 0,
        reg_covar: float = 1e-4,
        covariance_scale: float = 1.0,
        view: str = "auto",
    ) -> LowRankGaussianMixture:
        """Fit to accepted latents.

        Args:
            latents (`torch.Tensor` of shape `(N, *latent_shape)`): latents of accepted, on-target states.
            rank (`int`, defaults to 32): ``k``, the number of principal directions (capped at the latent size
                and at ``N - 1``). The subspace is spanned by the top singular vectors of the uncentred latents,
                so it also holds their mean.
            n_components (`int` or `Sequence[int]`, defaults to `(1, 2, 4, 8)`): mixture sizes; with several,
                the one with the lowest BIC is kept (capped so that each component has enough points).
            defensive (`float`, defaults to 0.1): ``eps``.
            seed (`int`, defaults to 0): seed of scikit-learn's k-means initialisation.
            reg_covar (`float`): added to the covariances' diagonals (scikit-learn's argument).
            covariance_scale (`float`, defaults to 1.0): multiplies the fitted covariances. A proposal wider than
                the fit lowers the acceptance rate a little but bounds ``pi / q`` far better where the fit is
                too narrow, which is what the independent sampler's convergence depends on (spec §5).
            view (`str`, defaults to `"auto"`): the subspace ``P``. ``"pca"``: the top ``rank`` singular directions of
                the latents. ``"pooled"``: a fixed view of a spatial latent `(C, H, W)`, the block averages of each
                channel on a ``g x g`` grid ([`pooled_basis`], at most ``rank`` coordinates): the noise's
                low-frequency content, which carries a diffusion sample's global layout. It needs no estimate from the
                latents, so a few effective latents fit it, where ``rank`` principal directions of a 256- to
                16,384-dimensional noise estimated from them are noise themselves. ``"auto"``: ``"pooled"`` for
                latents of 3 or more dimensions with more than ``rank`` entries, else ``"pca"``.
        """
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        if latents.ndim < 2 or latents.shape[0] < 2:
            raise ValueError(
                f"Refitting needs at least 2 accepted latents, got {latents.shape[0] if latents.ndim else 0}. "
                f"Draw more proposals before refitting (a larger budget or more chains)."
            )
        latent_shape = latents.shape[1:]
        flat = latents.reshape(latents.shape[0], -1).double().cpu()  # (N, d)
        n, d = flat.shape
        k = max(1, min(int(rank), d, n - 1))
        if view not in ("auto", "pca", "pooled"):
            raise ValueError(f"view must be 'auto', 'pca' or 'pooled', got {view!r}.")
        if view == "pooled" or (view == "auto" and len(latent_shape) >= 3 and d > int(rank)):
            basis = pooled_basis(latent_shape, int(rank))
            k = basis.shape[0]
        elif k == d:
            basis = torch.eye(d, dtype=torch.float64)
        else:
            # Top-k right singular vectors of the uncentred latents: the directions in which they differ from
            # N(0, I) the most (their mean included).
            _, _, vh = torch.linalg.svd(flat, full_matrices=False)
            basis = vh[:k]
        coords = (flat @ basis.T).numpy()  # (N, k)

        candidates = [n_components] if isinstance(n_components, int) else list(n_components)
        # Each component needs comfortably more points than its covariance has parameters.
        max_k = max(1, n // max(10, k * (k + 3) // 2))
        candidates = sorted({max(1, min(c, max_k)) for c in candidates})
        best, best_bic = None, math.inf
        for c in candidates:
            gm = GaussianMixture(c, covariance_type="full", reg_covar=reg_covar, random_state=seed, n_init=1)
            # The matrices are at most rank x rank: BLAS threads only add contention (seen: 100x slower fits on
            # a loaded 2-core machine).
            with threadpool_limits(limits=1):
                gm.fit(coords)
            bic = gm.bic(coords) if len(candidates) > 1 else 0.0
            if bic < best_bic:
                best, best_bic = gm, bic
        return cls(
            latent_shape,
            basis,
            torch.from_numpy(np.asarray(best.weights_)),
            torch.from_numpy(np.asarray(best.means_)),
            torch.from_numpy(np.asarray(best.covariances_)) * covariance_scale,
            defensive=defensive,
        )

    @property
    def n_components(self) -> int:
        return self.mixture.mixture_distribution.probs.shape[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The density as tensors (for safetensors): basis, mixture weights, means, covariances, defensive share and
        latent shape. [`from_state_dict`] rebuilds it exactly."""
        return {
            "basis": self.basis.contiguous(),
            "weights": self.weights.contiguous(),
            "means": self.means.contiguous(),
            "covariances": self.covariances.contiguous(),
            "defensive": torch.tensor([self.defensive], dtype=torch.float64),
            "latent_shape": torch.tensor(self.latent_shape, dtype=torch.long),
        }

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> LowRankGaussianMixture:
        missing = sorted({"basis", "weights", "means", "covariances", "defensive", "latent_shape"} - set(tensors))
        if missing:
            raise ValueError(f"A saved latent density lacks the tensors {missing}; save it with `state_dict()`.")
        return cls(
            tensors["latent_shape"].tolist(),
            tensors["basis"],
            tensors["weights"],
            tensors["means"],
            tensors["covariances"],
            defensive=float(tensors["defensive"][0]),
        )

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw ``n`` latents: from the prior with probability ``eps``, else ``P^T u + (I - P^T P) e``."""
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        # All randomness comes from `generator`, drawn on CPU in float64 for reproducibility across devices.
        g = generator if generator is not None and generator.device.type == "cpu" else None
        if generator is not None and g is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
            g = torch.Generator().manual_seed(seed)
        e = torch.randn((n, self.dim), generator=g, dtype=torch.float64)  # (n, d)
        from_prior = torch.rand(n, generator=g, dtype=torch.float64) < self.defensive
        probs = self.mixture.mixture_distribution.probs
        comp = torch.multinomial(probs, n, replacement=True, generator=g)  # (n,)
        scale_tril = self.mixture.component_distribution.scale_tril[comp]  # (n, k, k)
        u = self.mixture.component_distribution.loc[comp] + (
            scale_tril @ torch.randn((n, self.rank, 1), generator=g, dtype=torch.float64)
        ).squeeze(-1)  # (n, k)
        z = e - (e @ self.basis.T) @ self.basis + u @ self.basis  # (n, d)
        z = torch.where(from_prior[:, None], e, z)
        return z.reshape(n, *self.latent_shape).to(device=device, dtype=dtype)

    def log_prior_ratio(self, z: torch.Tensor) -> torch.Tensor:
        """``log p_z(z) - log q(z)``, exact and computed on the ``k`` principal coordinates only."""
        u = z.reshape(z.shape[0], -1).double().cpu() @ self.basis.T  # (n, k)
        log_m = self.mixture.log_prob(u)
        log_nk = -0.5 * (u.pow(2).sum(1) + self.rank * math.log(2 * math.pi))
        stacked = torch.stack(
            [math.log1p(-self.defensive) + log_m - log_nk, torch.full_like(log_m, math.log(self.defensive))]
        )
        if self.defensive == 1.0:
            stacked = stacked[1:]
        return (-torch.logsumexp(stacked, 0)).to(device=z.device, dtype=z.dtype if z.is_floating_point() else None)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return _standard_normal_log_prob(z) - self.log_prior_ratio(z)

    def __repr__(self) -> str:
        return (
            f"LowRankGaussianMixture(latent_shape={self.latent_shape}, rank={self.rank}, "
            f"n_components={self.n_components}, defensive={self.defensive})"
        )


def pooled_basis(latent_shape: Sequence[int], max_dims: int) -> torch.Tensor:
    """Orthonormal rows that average a spatial latent `(C, H, W)` over the blocks of a ``g x g`` grid per channel,
    with ``g`` the largest grid that keeps ``C * g * g <= max_dims`` (at least 1): the latent's low-frequency view.

    Row ``(c, i, j)`` is ``1 / sqrt(|B_ij|)`` on the entries of channel ``c`` in block ``B_ij`` (rows ``floor(h g /
    H) = i``, columns ``floor(w g / W) = j``) and 0 elsewhere; the blocks are disjoint, so the rows are orthonormal.
    Leading dimensions beyond the last three are treated as channels.

    Returns:
        `torch.Tensor` of shape `(C * g * g, C * H * W)`, float64.
    """
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) < 3:
        raise ValueError(f"A pooled view needs a spatial latent (C, H, W), got shape {shape}.")
    channels, height, width = math.prod(shape[:-2]), shape[-2], shape[-1]
    g = max(1, min(height, width, math.isqrt(max(1, max_dims // channels))))
    rows = (torch.arange(height) * g // height)[:, None] * g + (torch.arange(width) * g // width)[None, :]  # (H, W)
    block = torch.nn.functional.one_hot(rows.flatten(), g * g).T.double()  # (g*g, H*W)
    block = block / block.sum(1, keepdim=True).sqrt()
    return torch.block_diag(*([block] * channels))  # (C*g*g, C*H*W)
