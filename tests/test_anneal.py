"""The annealed start (`s2m_diffusers.anneal`): its pure functions, and chains that start annealed sampling a target
known exactly."""

import math

import pytest
import torch

from s2m_diffusers import anneal
from s2m_diffusers.densities import StandardNormal
from s2m_diffusers.ladder import ess
from s2m_diffusers.sampling import sample_s2m
from s2m_diffusers.testing.toy import clustered_chi_square

ALPHA = 1e-3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_temperature_is_the_largest_that_keeps_the_ess():
    log_w = torch.randn(200, generator=gen(0), dtype=torch.float64) * 3.0
    log_w[:20] = -math.inf  # off the combination at every temperature
    rest = torch.zeros(200, dtype=torch.float64)
    g = anneal.largest_temperature(log_w, rest, 60.0)
    assert 0 < g < 1
    assert ess(anneal.tempered(log_w, g)) >= 60.0 > ess(anneal.tempered(log_w, g + 1e-3))
    assert anneal.largest_temperature(log_w, rest, 1.0) == 1.0  # the untempered weights already have that ESS
    assert torch.isinf(anneal.tempered(log_w, 0.0)[:20]).all() and (anneal.tempered(log_w, 0.0)[20:] == 0).all()
    # the next temperature raises by the largest step whose reweighting keeps half the particles
    g_next = anneal.next_temperature(log_w[20:], 0.2)
    assert ess(anneal.tempered(log_w[20:], g_next - 0.2)) == pytest.approx(90.0, rel=1e-3)
    assert anneal.next_temperature(torch.zeros(8, dtype=torch.float64), 0.5) == 1.0
    assert anneal.checkpoints(10) == [3, 6] and anneal.checkpoints(5) == []


def test_the_tempered_evaluate_and_a_retempered_state_agree_with_a_direct_computation():
    class Evaluate:
        num_steps = 7

        def __call__(self, z):
            return z, z[:, 0].double(), None

        def value_and_grad(self, z):
            return z, z[:, 0].double(), None, torch.ones_like(z)

        def start(self, z, s):
            return "handle", z[:, 1].double()

        def finish(self, handle, keep):
            return None, torch.tensor([2.0, -math.inf], dtype=torch.float64)

    z = torch.tensor([[1.0, 2.0], [-3.0, 4.0]])
    tempered = anneal.Tempered(Evaluate(), 0.25)
    assert tempered(z)[1].tolist() == [0.25, -0.75] and tempered.num_steps == 7
    assert tempered.value_and_grad(z)[3].tolist() == [[0.25, 0.25], [0.25, 0.25]]
    assert tempered.start(z, 1) == ("handle", pytest.approx(torch.tensor([0.5, 1.0], dtype=torch.float64)))
    assert tempered.finish("handle", None)[1].tolist() == [0.5, -math.inf]

    from s2m_diffusers.chains import ChainState

    log_w = torch.tensor([2.0, -1.0], dtype=torch.float64)
    correction = torch.tensor([0.3, -0.2], dtype=torch.float64)  # log p_z - log q
    state = ChainState(z, z, 0.25 * log_w, 0.25 * log_w + correction, None, torch.ones(2, 2), 0.25 * log_w)
    anneal.retemper(state, 0.25, 1.0, log_floor=0.0)
    assert torch.allclose(state.log_w, log_w) and torch.allclose(state.log_ratio, log_w + correction)
    assert state.log_w_s.tolist() == [2.0, 0.0] and state.grad.tolist() == [[4.0, 4.0], [4.0, 4.0]]


A = torch.tensor([1.0, 0.0], dtype=torch.float64)
GAP = 0.5


def tilted(z):
    """``log w(z) = a . z`` where ``|z_2| > GAP``, else ``-inf``: the target ``N(a, I)`` outside a band, two regions
    whose weights spread over the prior."""
    log_w = z.double() @ A
    return z, torch.where(z[:, 1].abs() > GAP, log_w, torch.full_like(log_w, -math.inf))


def exact_sample(n: int, generator) -> torch.Tensor:
    z = torch.randn(4 * n, 2, generator=generator, dtype=torch.float64) + A
    return z[z[:, 1].abs() > GAP][:n]


@pytest.mark.filterwarnings("ignore:S2M sampling")  # each call's own diagnostics may warn on 64 images
def test_annealed_chains_sample_a_target_known_exactly():
    """80 calls of 64 images at the defaults, a quarter of which start annealed (the pool's weights too uneven for its
    on-target draws); the calls' images against the exact target (clustered chi-square, `toy.calls_test`'s
    statistic). With ``a = (1.5, 0)`` nearly every call anneals, and the defaults are slightly biased with or without
    annealing (the mean of ``z_1`` 1.32-1.39 against 1.5, p 3e-4 to 0.02 over three seeds): chains of a 10-step
    burn-in do not forget starts that far from the target. Their target is right: ``burn_in=30`` gives 1.45-1.46
    (p 0.15-0.97), ``burn_in=100`` 1.52 (p 0.80); pCN moves a chain towards a shifted mean by about ``b^2 / 2`` of the
    distance per step."""
    prior = StandardNormal((2,))
    xs, calls, started = [], [], []
    for r in range(80):
        result = sample_s2m(tilted, prior, 64, generator=gen(100 + r))
        xs.append(result.x)
        calls.append(torch.full((result.num_samples,), r))
        temperatures = result.stats.chains["temperatures"]
        started.append(temperatures[0])
        assert temperatures[-1] == 1.0 and temperatures == sorted(temperatures)
    p = clustered_chi_square(torch.cat(xs).double(), torch.cat(calls), exact_sample(400_000, gen(1)))[2]
    assert sum(g < 1.0 for g in started) >= 0.2 * len(started) and p > ALPHA, (started, p)


class ScreenedTilted:
    """`tilted` with the screen's interface (`s2m_diffusers.screen`): 10 "denoising" steps, a surrogate that reads a
    noisy view of the latent after ``step`` of them (its band's edge blurred, so that it is off where the weight is
    not and the sampler's floor must make up for it)."""

    num_steps = 10

    def __init__(self):
        self.calls = 0
        self.noise = torch.Generator().manual_seed(7)

    def __call__(self, z):
        self.calls += z.shape[0] * self.num_steps
        return tilted(z)

    def start(self, z, step):
        self.calls += z.shape[0] * step
        view = z + 0.3 * torch.randn(z.shape, generator=self.noise, dtype=z.dtype)
        return z, tilted(view)[1]

    def finish(self, handle, keep):
        z = handle[keep]
        self.calls += z.shape[0] * (self.num_steps - 3)
        return tilted(z)


@pytest.mark.filterwarnings("ignore:S2M sampling")
def test_annealed_chains_with_a_screen_sample_a_target_known_exactly():
    """The annealed start through a screened proposal (the surrogate and its floor raised to the temperature with the
    weight, `anneal.Tempered.start` and `retemper`): 80 calls of 64 images screened after 3 of 10 steps, at least a
    tenth of them annealed (13 here: the screened pool's weights are its ratios over the chance to be finished),
    against the exact target."""
    prior = StandardNormal((2,))
    evaluate = ScreenedTilted()
    xs, calls, started = [], [], []
    for r in range(80):
        result = sample_s2m(evaluate, prior, 64, generator=gen(300 + r), screen=3)
        xs.append(result.x)
        calls.append(torch.full((result.num_samples,), r))
        started.append(result.stats.chains["temperatures"][0])
    assert result.stats.screen["screened_out_share"] > 0 and result.stats.screen["step"] == 3
    p = clustered_chi_square(torch.cat(xs).double(), torch.cat(calls), exact_sample(400_000, gen(1)))[2]
    assert sum(g < 1.0 for g in started) >= 0.1 * len(started) and p > ALPHA, (started, p)
