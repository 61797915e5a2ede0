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

The second refitted family, [`TiltedNormal`], keeps the prior's shape and reweights it by a classifier of latents:

    q(z) = N(z; 0, I) (c(P z)^gamma + tau) / Z

with ``c`` a small multi-layer perceptron (scikit-learn's ``MLPClassifier``) that predicts from the view ``P z``
whether a latent's sample is on the target, ``gamma`` a flattening exponent and ``tau`` a floor, so that ``p_z / q =
Z / (c^gamma + tau) <= Z / tau``. It is drawn by rejection from the prior (a draw is kept with probability
``(c^gamma + tau) / (1 + tau)``), which costs classifier evaluations only, no generator call. Where the target's
region is not Gaussian-shaped (a GAN's 32-dimensional latent: Digits-7to3) it raises the on-target share without the
weight spread a narrow Gaussian fit brings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["StandardNormal", "LowRankGaussianMixture", "TiltedNormal", "pooled_basis"]


def _standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over all but the first dimension."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))


def _cpu_generator(
    generator: torch.Generator | None, device: torch.device | str | None
) -> tuple[torch.device | str, torch.Generator | None]:
    """The device a density's draws go to (``device``, else the generator's), and the CPU generator that draws them:
    all randomness comes from ``generator``, drawn on CPU in float64 for reproducibility across devices (a generator
    on another device seeds a CPU one)."""
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    g = generator if generator is not None and generator.device.type == "cpu" else None
    if generator is not None and g is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        g = torch.Generator().manual_seed(seed)
    return device, g


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
        basis = _view_basis(latent_shape, rank, view) if view != "pca" else None
        if basis is not None:
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
        device, g = _cpu_generator(generator, device)
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


def _view_basis(latent_shape: Sequence[int], rank: int, view: str = "auto") -> torch.Tensor | None:
    """The rows ``P`` of a fixed view for a latent shape: [`pooled_basis`] for a spatial latent with more than ``rank``
    entries (``view`` ``"auto"`` or ``"pooled"``), `None` (the latent itself) otherwise."""
    shape = tuple(int(s) for s in latent_shape)
    if view == "pooled" or (view == "auto" and len(shape) >= 3 and math.prod(shape) > int(rank)):
        return pooled_basis(shape, int(rank))
    return None


class TiltedNormal:
    """The prior tilted toward a target by a classifier of latents (spec §6):
    ``q(z) = N(z; 0, I) (c(P z)^gamma + tau) / Z``. Build it with [`TiltedNormal.fit`].

    Args:
        latent_shape (`Sequence[int]`): shape of one latent.
        basis (`torch.Tensor` of shape `(k, d)`, *optional*): orthonormal rows ``P`` of the view the classifier reads
            (`None`: the whole latent).
        weights (`Sequence[torch.Tensor]`), biases (`Sequence[torch.Tensor]`): the perceptron's layers (ReLU between
            them, a logistic output).
        gamma (`float`): the exponent of ``c``; below 1 it flattens the tilt, so that on-target latents the classifier
            doubts keep a ratio ``p_z / q`` near the rest's.
        tau (`float`): the floor: ``p_z / q <= Z / tau`` everywhere.
        log_norm (`float`): ``log Z``, ``Z = E_{p_z}[c^gamma + tau]`` (a Monte Carlo estimate; the sampler's
            acceptance ratios do not depend on it).
    """

    def __init__(
        self,
        latent_shape: Sequence[int],
        basis: torch.Tensor | None,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor],
        gamma: float,
        tau: float,
        log_norm: float,
    ):
        if not tau > 0:
            raise ValueError(f"tau must be positive (it bounds p_z / q by Z / tau), got {tau}.")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.dim = math.prod(self.latent_shape)
        self.basis = None if basis is None else basis.double()
        self.rank = self.dim if basis is None else self.basis.shape[0]
        self.weights = [w.double() for w in weights]
        self.biases = [b.double() for b in biases]
        self.gamma, self.tau, self.log_norm = float(gamma), float(tau), float(log_norm)

    @classmethod
    def fit(
        cls,
        latents: torch.Tensor,
        on_target: torch.Tensor,
        rank: int = 32,
        gamma: float = 0.5,
        floor: float = 0.1,
        hidden: Sequence[int] = (64, 64),
        seed: int = 0,
        norm_draws: int = 65536,
        view: str = "auto",
    ) -> TiltedNormal:
        """Train the classifier on latents labelled on or off the target, and set the floor.

        Args:
            latents (`torch.Tensor` of shape `(N, *latent_shape)`): evaluated latents, from any density (the label
                is a function of the latent, so where they were drawn decides where the classifier is accurate, not
                what it estimates).
            on_target (`torch.Tensor` of shape `(N,)`, bool): whether each latent's sample holds the target.
            rank (`int`, defaults to 32): the most coordinates of the pooled view of a spatial latent
                ([`pooled_basis`]); a flat latent is read whole.
            gamma (`float`, defaults to 0.5): the tilt's exponent.
            floor (`float`, defaults to 0.1): ``tau`` as a share of the tilt's mean over the prior
                (``tau = floor * E_{p_z}[c^gamma]``): the share of ``q``'s mass that is the prior's own shape.
            hidden (`Sequence[int]`, defaults to `(64, 64)`): the perceptron's hidden layers.
            seed (`int`, defaults to 0): seed of the perceptron's initialisation and of the Monte Carlo ``Z``.
            norm_draws (`int`, defaults to 65536): prior draws of the view that estimate ``Z``.
            view (`str`, defaults to `"auto"`): as in [`LowRankGaussianMixture.fit`] (``"pca"``: the whole latent).
        """
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits

        on_target = torch.as_tensor(on_target, dtype=torch.bool).flatten().cpu()
        if latents.shape[0] != on_target.numel():
            raise ValueError(f"{latents.shape[0]} latents but {on_target.numel()} labels.")
        n_on = int(on_target.sum())
        if n_on < 2 or n_on > on_target.numel() - 2:
            raise ValueError(
                f"A tilted density needs at least 2 latents on the target and 2 off it, got {n_on} of "
                f"{on_target.numel()} on it."
            )
        latent_shape = latents.shape[1:]
        basis = _view_basis(latent_shape, rank, view)
        flat = latents.reshape(latents.shape[0], -1).double().cpu()
        u = flat if basis is None else flat @ basis.T
        clf = MLPClassifier(tuple(hidden), alpha=1e-3, max_iter=300, random_state=seed)
        with threadpool_limits(limits=1), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(u.numpy(), on_target.numpy())
        weights = [torch.from_numpy(np.asarray(w)) for w in clf.coefs_]
        biases = [torch.from_numpy(np.asarray(b)) for b in clf.intercepts_]
        q = cls(latent_shape, basis, weights, biases, gamma, 1.0, 0.0)
        g = torch.Generator().manual_seed(seed)
        tilt = q.classify(torch.randn((norm_draws, q.rank), generator=g, dtype=torch.float64)).pow(gamma)
        q.tau = max(float(floor) * float(tilt.mean()), 1e-12)
        q.log_norm = math.log(float(tilt.mean()) + q.tau)
        return q

    def classify(self, u: torch.Tensor) -> torch.Tensor:
        """``c(u)`` for view coordinates ``u`` of shape `(n, k)`: the classifier's probability of the target."""
        h = u.double()
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = torch.relu(h @ w + b)
        return torch.sigmoid(h @ self.weights[-1] + self.biases[-1]).squeeze(-1)

    def _view(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(z.shape[0], -1).double().cpu()
        return flat if self.basis is None else flat @ self.basis.T

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw ``n`` latents by rejection from the prior: a draw of the view is kept with probability
        ``(c^gamma + tau) / (1 + tau)`` (at least ``tau / (1 + tau)``), the rest of the latent is standard normal."""
        device, g = _cpu_generator(generator, device)
        kept, found = [], 0
        chunk = max(1024, 4 * n)
        while found < n:
            u = torch.randn((chunk, self.rank), generator=g, dtype=torch.float64)
            keep = torch.rand(chunk, generator=g, dtype=torch.float64) * (1 + self.tau) < self.tilt(u)
            kept.append(u[keep])
            found += int(keep.sum())
        u = torch.cat(kept)[:n]
        if self.basis is None:
            z = u
        else:
            e = torch.randn((n, self.dim), generator=g, dtype=torch.float64)
            z = e - (e @ self.basis.T) @ self.basis + u @ self.basis
        return z.reshape(n, *self.latent_shape).to(device=device, dtype=dtype)

    def tilt(self, u: torch.Tensor) -> torch.Tensor:
        """``c(u)^gamma + tau``."""
        return self.classify(u).pow(self.gamma) + self.tau

    def log_prior_ratio(self, z: torch.Tensor) -> torch.Tensor:
        """``log p_z(z) - log q(z) = log Z - log(c(P z)^gamma + tau)``."""
        out = self.log_norm - self.tilt(self._view(z)).log()
        return out.to(device=z.device, dtype=z.dtype if z.is_floating_point() else None)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return _standard_normal_log_prob(z) - self.log_prior_ratio(z)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The density as tensors (for safetensors); [`from_state_dict`] rebuilds it exactly."""
        out = {
            "latent_shape": torch.tensor(self.latent_shape, dtype=torch.long),
            "gamma_tau_log_norm": torch.tensor([self.gamma, self.tau, self.log_norm], dtype=torch.float64),
        }
        if self.basis is not None:
            out["basis"] = self.basis.contiguous()
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"layer{i}.weight"], out[f"layer{i}.bias"] = w.contiguous(), b.contiguous()
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> TiltedNormal:
        missing = sorted({"latent_shape", "gamma_tau_log_norm", "layer0.weight", "layer0.bias"} - set(tensors))
        if missing:
            raise ValueError(f"A saved tilted density lacks the tensors {missing}; save it with `state_dict()`.")
        n_layers = sum(1 for k in tensors if k.endswith(".weight"))
        gamma, tau, log_norm = tensors["gamma_tau_log_norm"].tolist()
        return cls(
            tensors["latent_shape"].tolist(),
            tensors.get("basis"),
            [tensors[f"layer{i}.weight"] for i in range(n_layers)],
            [tensors[f"layer{i}.bias"] for i in range(n_layers)],
            gamma,
            tau,
            log_norm,
        )

    def __repr__(self) -> str:
        hidden = [w.shape[1] for w in self.weights[:-1]]
        return (
            f"TiltedNormal(latent_shape={self.latent_shape}, view={self.rank}, hidden={hidden}, "
            f"gamma={self.gamma}, tau={self.tau:.3g})"
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
