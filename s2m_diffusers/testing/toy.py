"""An analytic S2M problem whose every density is known in closed form, for exactness tests and benchmarks.

- Latent ``z ~ N(0, I_2)``; generator ``x = G(z) = A sinh(z) + b`` (smooth, invertible), so
  ``p_G(x) = N(asinh(u)) / (|det A| prod_i sqrt(1 + u_i^2))`` with ``u = A^{-1} (x - b)``. The offset ``b``
  makes some combinations rare under the proposal (``A & B & C``: 1 %, ``B & ~A & ~C``: 3 %).
- The population ``p(x) = N(x; 0, sigma^2 I)``. Three attributes, by region:
  ``A: x_1 > 0``, ``B: x_2 > 0``, ``C: x_1 + x_2 < t``. With ``t > 0`` every point holds at least one of
  them (``~A & ~B`` implies ``C``), so the universe of spec §1 is the whole plane and the assumption holds:
  each ``x`` has one definite attribute set ``S(x)``.
- Single-positive data: label ``c`` with share ``p_data(c)``, image ``x ~ p(x | y_c = 1)``. The attribute
  priors ``pi_c = p(y_c = 1)`` are Gaussian probabilities.
- Exact heads (spec §2): ``D_r(c|x) ∝ 1[c in S(x)] p_data(c) / pi_c``;
  ``logit D_v = log p_data(x) - log p_G(x)`` with ``p_data(x) = p(x) sum_{c in S(x)} p_data(c) / pi_c``;
  for the class-conditional generator ``G(z, c) = A sinh(z) + mu_c``, ``D_f(c|x) ∝ p_G(x|c) p_G(c)``.
- The exact target ``p_T(x) = p(x) 1[S(x) satisfies T] / pi_T`` is sampled i.i.d. by rejection from ``p``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..ladder import stages_of
from ..maths import log_weight
from ..targets import Target, parse_target

__all__ = [
    "ToyProblem",
    "ToyScreenedEvaluate",
    "WithGradient",
    "energy_distance",
    "mean_distance",
    "clustered_chi_square",
    "calls_test",
]


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


class ToyProblem:
    """The analytic problem. All tensors are float64 on the CPU.

    Args:
        sigma (`float`, defaults to 1.0): scale of the population ``p``.
        threshold (`float`, defaults to 0.5): ``t`` in attribute ``C: x_1 + x_2 < t``.
        label_shares (`Sequence[float]`): ``p_data(c)`` for A, B, C.
        mixing (`Sequence[Sequence[float]]`): the generator's matrix ``A``.
        offset (`Sequence[float]`): the generator's offset ``b``.
        class_means (`Sequence[Sequence[float]]`): ``mu_c`` of the class-conditional generator.
        labelling (`str`, defaults to `"independent"`): how the single-positive data are labelled (spec §1):
            ``"independent"`` (``x ~ p(x | y_c = 1)`` for a label ``c`` of share ``p_data(c)``) or
            ``"one_label_per_image"`` (``x ~ p(x)``, ``c`` uniform on ``S(x)``: then ``p_data(x) = p(x)`` and
            ``D_r(c|x) = 1[c in S(x)] / |S(x)|``). The target is the same under both.
    """

    attribute_names = ("A", "B", "C")

    def __init__(
        self,
        sigma: float = 1.0,
        threshold: float = 0.5,
        label_shares: Sequence[float] = (0.5, 0.3, 0.2),
        mixing: Sequence[Sequence[float]] = ((1.0, 0.35), (-0.2, 0.9)),
        offset: Sequence[float] = (-0.5, -0.5),
        class_means: Sequence[Sequence[float]] = ((1.0, -0.5), (-0.5, 1.0), (-0.7, -0.7)),
        labelling: str = "independent",
    ):
        self.labelling = labelling
        self.sigma = sigma
        self.threshold = threshold
        self.A = torch.tensor(mixing, dtype=torch.float64)
        self.A_inv = torch.linalg.inv(self.A)
        self.log_det_A = float(torch.linalg.slogdet(self.A)[1])
        self.offset = torch.tensor(offset, dtype=torch.float64)
        self.p_data = torch.tensor(label_shares, dtype=torch.float64)
        self.p_data = self.p_data / self.p_data.sum()
        self.priors = torch.tensor(
            [0.5, 0.5, _normal_cdf(threshold / (sigma * math.sqrt(2.0)))], dtype=torch.float64
        )  # pi_c = p(y_c = 1)
        self.class_means = torch.tensor(class_means, dtype=torch.float64)
        self.class_probs = torch.full((3,), 1.0 / 3.0, dtype=torch.float64)  # p_G(c)

    # --- the world ------------------------------------------------------------------------------------------
    def attributes(self, x: torch.Tensor) -> torch.Tensor:
        """``S(x)`` as booleans (B, 3)."""
        return torch.stack([x[:, 0] > 0, x[:, 1] > 0, x[:, 0] + x[:, 1] < self.threshold], 1)

    def log_p(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x.pow(2).sum(1) / self.sigma**2) - 2 * math.log(self.sigma) - math.log(2 * math.pi)

    def log_p_data_x(self, x: torch.Tensor) -> torch.Tensor:
        if self.labelling == "one_label_per_image":
            return self.log_p(x)
        s = self.attributes(x).double()
        return self.log_p(x) + torch.log((s * (self.p_data / self.priors)).sum(1))

    # --- the generator --------------------------------------------------------------------------------------
    def generate(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.sinh(z.double()) @ self.A.T
        return x + (self.offset if class_labels is None else self.class_means[class_labels])

    def _log_p_sinh(self, x: torch.Tensor) -> torch.Tensor:
        """``log`` density of ``A sinh(z)``, ``z ~ N(0, I)``."""
        u = x @ self.A_inv.T
        z = torch.asinh(u)
        log_pz = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi)
        return log_pz - self.log_det_A - 0.5 * torch.log1p(u.pow(2)).sum(1)

    def log_p_g0(self, x: torch.Tensor) -> torch.Tensor:
        """``log p_G(x)`` of the unconditional generator."""
        return self._log_p_sinh(x - self.offset)

    def log_p_g_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """``log p_G(x | c)`` for every class (B, 3)."""
        return torch.stack([self._log_p_sinh(x - m) for m in self.class_means], 1)

    # --- exact heads ----------------------------------------------------------------------------------------
    def dr_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log D_r(c|x)`` (B, 3)."""
        s = self.attributes(x)
        # independent: D_r(c|x) ∝ 1[c in S(x)] p_data(c) / pi_c; one label per image: uniform on S(x)
        uniform = self.labelling == "one_label_per_image"
        log_share = torch.zeros(3, dtype=x.dtype) if uniform else torch.log(self.p_data / self.priors)
        return torch.log_softmax(torch.where(s, log_share, -math.inf), 1)

    def dv_logit(self, x: torch.Tensor, conditional: bool = False) -> torch.Tensor:
        """Exact ``logit D_v(x) = log p_data(x) - log p_G(x)`` (for the conditional generator, its marginal)."""
        if conditional:
            log_pg = torch.logsumexp(self.log_p_g_conditional(x) + torch.log(self.class_probs), 1)
        else:
            log_pg = self.log_p_g0(x)
        return self.log_p_data_x(x) - log_pg

    def df_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log D_f(c|x)`` of the class-conditional generator (B, 3)."""
        return torch.log_softmax(self.log_p_g_conditional(x) + torch.log(self.class_probs), 1)

    # --- what the sampler is given ---------------------------------------------------------------------------
    def target(self, text: str) -> Target:
        return parse_target(text, self.attribute_names)

    def evaluate_fn(
        self,
        target: Target | str,
        negation_margin: float = 1.0,
        priors: torch.Tensor | None = None,
        class_label: int | str | None = None,
    ):
        """``z -> (x, log_w)`` with exact heads: the function the sampler receives.

        Args:
            target: the target.
            negation_margin: ``lambda``.
            priors: the priors the sampler believes (``None``: the true ones).
            class_label: sample from the class-conditional generator with this class, with the ``D_f`` term; or
                ``"drawn"``: the class is drawn from ``p_G(c)`` by a third latent coordinate ``u``
                (``c = F^-1(Phi(u))``, as `s2m_diffusers.class_plan.ClassPlan` does), so the proposal is the
                generator's marginal and needs no ``D_f``; the latents then have 3 coordinates.
        """
        target = self.target(target) if isinstance(target, str) else target
        log_priors = torch.log(self.priors if priors is None else torch.as_tensor(priors, dtype=torch.float64))
        log_p_data = torch.log(self.p_data)
        settings = dict(negation_margin=negation_margin, labelling=self.labelling)

        stages = stages_of(target)

        def weigh(z: torch.Tensor, targets: list[Target]) -> tuple[torch.Tensor, torch.Tensor]:
            """Images and the ``log w`` of each of ``targets`` `(B, len(targets))`."""
            extra = {}
            if class_label is None:
                x = self.generate(z)
                dv = self.dv_logit(x)
            elif class_label == "drawn":
                u = torch.special.ndtr(z[:, 2].double())  # Phi(u)
                labels = torch.searchsorted(self.class_probs.cumsum(0)[:-1], u, right=True)
                x = self.generate(z[:, :2], labels)
                dv = self.dv_logit(x, conditional=True)
            else:
                x = self.generate(z, torch.full((z.shape[0],), class_label, dtype=torch.long))
                dv = self.dv_logit(x, conditional=True)
                extra = dict(
                    df_log_prob=self.df_log_probs(x)[:, class_label],
                    log_pg_class=math.log(self.class_probs[class_label]),
                )
            dr = self.dr_log_probs(x)
            columns = [log_weight(t, dr, dv, log_p_data, log_priors, **settings, **extra) for t in targets]
            return x, torch.stack(columns, 1)

        def evaluate(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, log_w = weigh(z, [target])
            return x, log_w[:, 0]

        def refinements(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
            """Every stage's ``log w`` (the last the target's), as the pipeline's evaluate offers (`ladder`)."""
            x, log_w = weigh(z, stages)
            return x, log_w, None

        evaluate.refinements, evaluate.num_stages = refinements, len(stages)
        if class_label == "drawn":  # local moves keep the class coordinate, as the pipeline's do (`chains`)
            evaluate.frozen = torch.tensor([False, False, True])
        return evaluate

    # --- a generator with an intermediate view, for screening (delayed acceptance) ----------------------------------
    def view_noise(self, z: torch.Tensor) -> torch.Tensor:
        """A fixed, deterministic "noise" ``eta(z)`` (B, 2) of unit scale: what separates the intermediate view from
        the final sample. It must be a function of the latent, as a diffusion model's predicted clean image is."""
        z = z.double()
        return math.sqrt(2.0) * torch.stack(
            [torch.sin(5.3 * z[:, 0] + 3.1 * z[:, 1] + 0.7), torch.sin(-2.9 * z[:, 0] + 6.7 * z[:, 1] + 1.9)], 1
        )

    def view(self, z: torch.Tensor, step: int, num_steps: int, noise: float = 0.6) -> torch.Tensor:
        """The intermediate view after ``step`` of ``num_steps`` steps, standing in for a diffusion model's predicted
        clean image: ``G(z) + noise (1 - step / num_steps) eta(z)``; the final sample at ``step = num_steps``."""
        return self.generate(z) + noise * (1.0 - step / num_steps) * self.view_noise(z)

    def screened_evaluate_fn(
        self,
        target: Target | str,
        num_steps: int = 10,
        noise: float = 0.6,
        negation_margin: float = 1.0,
        restarts: bool = False,
    ) -> ToyScreenedEvaluate:
        """``evaluate_fn`` of the unconditional generator, with the screen's interface (`s2m_diffusers.screen`): a
        "denoising" run of ``num_steps`` steps whose intermediate views the same exact heads judge, with the negation
        margin 1 and no floor (the surrogate is 0 wherever the view is off target: the sampler's floor must make up
        for it). With ``restarts`` a screened proposal is finished by rerunning it whole (``num_steps`` more steps), as
        a wrapped diffusers pipeline is (`proposals.PipelineProposal`)."""
        target = self.target(target) if isinstance(target, str) else target
        return ToyScreenedEvaluate(self, target, num_steps, noise, negation_margin, restarts)

    def holds(self, target: Target | str, x: torch.Tensor) -> torch.Tensor:
        """Whether each ``x`` satisfies the target (B,) bool."""
        target = self.target(target) if isinstance(target, str) else target
        return target.holds_batch(self.attributes(x))

    def exact_sample(self, target: Target | str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` i.i.d. draws of the exact target ``p_T`` (rejection from ``p``)."""
        out, got = [], 0
        while got < n:
            x = self.sigma * torch.randn((max(4 * n, 4096), 2), generator=generator, dtype=torch.float64)
            keep = x[self.holds(target, x)]
            out.append(keep)
            got += keep.shape[0]
        return torch.cat(out)[:n]

    def proposal_share(self, target: Target | str, n: int = 200_000, seed: int = 12345) -> float:
        """``rho``: the share of the prior proposal's samples that satisfy the target (Monte Carlo)."""
        g = torch.Generator().manual_seed(seed)
        x = self.generate(torch.randn((n, 2), generator=g, dtype=torch.float64))
        return float(self.holds(target, x).double().mean())


class WithGradient:
    """An evaluate function with ``value_and_grad`` by autograd through the toy's closed forms (``kernel="mala"``);
    ``frozen`` is passed through."""

    def __init__(self, evaluate):
        self.evaluate = evaluate
        self.frozen = getattr(evaluate, "frozen", None)

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.evaluate(z)

    def value_and_grad(self, z: torch.Tensor):
        with torch.enable_grad():
            leaf = z.detach().double().requires_grad_(True)
            x, log_w = self.evaluate(leaf)
            on = torch.isfinite(log_w)
            grad = torch.autograd.grad(log_w[on].sum(), leaf)[0] if bool(on.any()) else torch.zeros_like(leaf)
        return x.detach(), log_w.detach(), None, grad.nan_to_num(0.0).to(z.dtype)


class ToyScreenedEvaluate:
    """``z -> (x, log w)`` of the toy's unconditional generator with ``num_steps`` "denoising" steps: ``start`` (the
    first steps and the surrogate) and ``finish`` (the rest, or all of them again with ``screen_restarts``), as
    `s2m_diffusers.screen` screens them. ``calls`` counts the steps run, per latent."""

    def __init__(
        self,
        toy: ToyProblem,
        target: Target,
        num_steps: int,
        noise: float,
        negation_margin: float,
        restarts: bool = False,
    ):
        self.toy, self.target, self.num_steps, self.noise = toy, target, num_steps, noise
        self.screen_restarts = restarts
        self.settings = dict(negation_margin=negation_margin, labelling=toy.labelling)
        self.calls = 0

    def log_w(self, x: torch.Tensor, negation_margin: float | None = None) -> torch.Tensor:
        toy = self.toy
        settings = self.settings if negation_margin is None else {**self.settings, "negation_margin": negation_margin}
        return log_weight(
            self.target, toy.dr_log_probs(x), toy.dv_logit(x), torch.log(toy.p_data), torch.log(toy.priors), **settings
        )

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += z.shape[0] * self.num_steps
        x = self.toy.generate(z)
        return x, self.log_w(x)

    def start(self, z: torch.Tensor, step: int) -> tuple[tuple[torch.Tensor, int], torch.Tensor]:
        self.calls += z.shape[0] * step
        return (z, step), self.log_w(self.toy.view(z, step, self.num_steps, self.noise), 1.0)

    def finish(self, handle: tuple[torch.Tensor, int], keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, step = handle
        z = z[keep]
        self.calls += z.shape[0] * (self.num_steps if self.screen_restarts else self.num_steps - step)
        x = self.toy.generate(z)
        return x, self.log_w(x)


# --------------------------------------------------------------------------------------------------------------
# Two-sample statistics


def mean_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    """``E|A - B|`` over all pairs (diagonal included), in chunks to bound memory."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    total = sum(float(torch.cdist(a[i : i + chunk], b).sum()) for i in range(0, a.shape[0], chunk))
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor, yy: float | None = None) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` between two samples, as a V-statistic.

    The V-statistic (diagonal pairs included) is the squared MMD of the distance kernel: it is positive, and
    for an exact sample of size ``n`` its expectation is a floor of order ``1/n``. Repeated points in ``x``
    (chains that returned the same state) raise it, as they should. Pass ``yy = mean_distance(y, y)`` to
    reuse the reference's own term across calls.
    """
    yy = mean_distance(y, y) if yy is None else yy
    return 2 * mean_distance(x, y) - mean_distance(x, x) - yy


def _cells(samples: torch.Tensor, reference: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's cell of a ``bins x bins`` grid on the reference's per-axis quantiles, and the reference's cell
    probabilities."""
    q = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    edges = [torch.quantile(reference[:, d], q) for d in range(2)]

    def cell(a: torch.Tensor) -> torch.Tensor:
        i = torch.bucketize(a[:, 0].contiguous(), edges[0])
        j = torch.bucketize(a[:, 1].contiguous(), edges[1])
        return i * bins + j

    ref = torch.bincount(cell(reference), minlength=bins * bins).double()
    return cell(samples), ref / ref.sum()


def clustered_chi_square(
    samples: torch.Tensor, clusters: torch.Tensor, reference: torch.Tensor, bins: int = 4
) -> tuple[float, int, float]:
    """A chi-square test of ``samples`` against cell probabilities estimated from a large exact ``reference``, for
    samples that are correlated within ``clusters`` (the images of one chain, or of chains started together) and
    independent across them: the Wald statistic ``(p_hat - p)^T V^-1 (p_hat - p)`` with the cluster-robust covariance
    ``V`` of the cell shares (a ratio estimator over clusters), on all cells but one. Under the null it is
    chi-square with ``cells - 1`` degrees of freedom as the number of clusters grows; for independent samples (one per
    cluster) it is close to Pearson's statistic. Returns ``(statistic, degrees of freedom, p-value)``."""
    from ..utils import optional_dependency

    with optional_dependency("scipy", "toy.clustered_chi_square (a test helper)"):
        pass

    cell, p0 = _cells(samples, reference, bins)
    # Cells expected to hold fewer than 5 samples are pooled into one, as the chi-square approximation needs.
    small = p0 * samples.shape[0] < 5
    onehot = torch.nn.functional.one_hot(cell, bins * bins).double()
    if bool(small.any()):
        onehot = torch.cat([onehot[:, ~small], onehot[:, small].sum(1, keepdim=True)], 1)
        p0 = torch.cat([p0[~small], p0[small].sum()[None]])
    keep = p0 > 0
    if bool((onehot[:, ~keep].sum(0) > 0).any()):  # a sample where the exact target has no mass
        return math.inf, int(keep.sum()) - 1, 0.0
    onehot = onehot[:, keep]  # (n, J)
    j = int(keep.sum())
    ids = torch.unique(clusters.cpu(), return_inverse=True)[1]
    k = int(ids.max()) + 1
    counts = torch.zeros(k, j, dtype=torch.float64).index_add_(0, ids, onehot)  # (K, J)
    sizes = counts.sum(1, keepdim=True)  # (K, 1)
    total = float(sizes.sum())
    p_hat = counts.sum(0) / total
    resid = counts - sizes * p_hat  # (K, J)
    cov = resid.T @ resid / total**2 * k / (k - 1)
    diff = (p_hat - p0[keep])[:-1]
    stat = float(diff @ torch.linalg.pinv(cov[:-1, :-1], hermitian=True) @ diff)
    dof = j - 1
    if k <= dof + 1:
        return stat, dof, math.nan
    # Hotelling's small-sample correction: T^2 (K - d) / (d (K - 1)) ~ F(d, K - d) for K clusters.
    from scipy.stats import f

    return stat, dof, float(f.sf(stat * (k - dof) / (dof * (k - 1)), dof, k - dof))


def calls_test(
    toy: ToyProblem, target: str, evaluate, q, runs: int, n: int, seed: int = 0, reference_seed: int = 1, **settings
) -> tuple[float, list]:
    """``runs`` independent calls of `sampling.sample_s2m` for ``n`` images each (seeds ``10000 * seed + r``), tested
    against the exact target with the calls as clusters ([`clustered_chi_square`]): images of one call are correlated,
    calls are not. Checks that every image is on the target. Returns the p-value and the calls' results."""
    from ..sampling import sample_s2m

    xs, calls, results = [], [], []
    for r in range(runs):
        result = sample_s2m(evaluate, q, n, generator=torch.Generator().manual_seed(10_000 * seed + r), **settings)
        assert bool(toy.holds(target, result.x).all()), "a returned sample is off target"
        xs.append(result.x)
        calls.append(torch.full((result.num_samples,), r))
        results.append(result)
    reference = toy.exact_sample(target, 400_000, torch.Generator().manual_seed(reference_seed))
    return clustered_chi_square(torch.cat(xs), torch.cat(calls), reference)[2], results
