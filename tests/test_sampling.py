"""The sampler against a problem whose target is known exactly (s2m_diffusers.testing.toy).

Goodness of fit: the images of ``RUNS`` independent calls, each of ``N`` images, against cell probabilities from
200,000 exact draws, with the calls' own covariance (Hotelling's statistic over the calls: images of one call are
correlated, calls are not; `toy.clustered_chi_square`). A test fails at p < 1e-3. Each scenario has fixed seeds. The
tests at the bottom break the maths on purpose (a flipped negation, pCN read as a random walk, a dropped correction)
and check that the same test rejects.
"""

import math

import pytest
import torch

import s2m_diffusers.kernels as kernels
import s2m_diffusers.maths as maths
from s2m_diffusers.chains import thinning_for
from s2m_diffusers.densities import StandardNormal
from s2m_diffusers.ladder import systematic_resample
from s2m_diffusers.maths import imh_accept
from s2m_diffusers.sampling import BudgetExhaustedError, S2MSamplingConfig, sample_imh, sample_official, sample_s2m
from s2m_diffusers.testing.toy import ToyProblem, WithGradient, calls_test

TOY = ToyProblem()
PRIOR = StandardNormal((2,))
RUNS, N = 60, 50
ALPHA = 1e-3

pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a call's own diagnostics may warn on 50 images


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def runs_p_value(text: str, evaluate, q=PRIOR, runs: int = RUNS, n: int = N, seed: int = 0, **settings) -> float:
    """The p-value of ``runs`` independent calls of ``n`` images each against the exact target (module docstring)."""
    return calls_test(TOY, text, evaluate, q, runs, n, seed, reference_seed=1234, **settings)[0]


# ----------------------------------------------------------------------------------------------------------
# Unit behaviour


def test_acceptance_is_per_chain_and_handles_zero_weights():
    current = torch.tensor([-math.inf, 0.0, 0.0, -math.inf, 5.0], dtype=torch.float64)
    proposed = torch.tensor([-3.0, -math.inf, 100.0, -math.inf, 5.0 + math.log(0.5)], dtype=torch.float64)
    for accept in (imh_accept, lambda c, p, g: kernels.mh_accept(kernels.log_alpha_pcn(c, p), g)):
        acc = torch.stack([accept(current, proposed, gen(s)) for s in range(4000)]).double().mean(0)
        assert acc[0] == 1.0  # a chain at weight 0 accepts any finite weight
        assert acc[1] == 0.0  # weight 0 is never accepted
        assert acc[2] == 1.0
        assert acc[3] == 0.0
        assert abs(acc[4] - 0.5) < 4 * math.sqrt(0.25 / 4000)  # min(1, ratio)
    # One uniform per chain: chains with identical inputs do not all move together.
    many = kernels.mh_accept(torch.full((1000,), math.log(0.5), dtype=torch.float64), gen(0))
    assert 400 < int(many.sum()) < 600


def test_pcn_leaves_the_prior_invariant_and_keeps_frozen_coordinates():
    z = torch.randn(20_000, 3, generator=gen(0))
    step = torch.rand(20_000, generator=gen(1)).clamp(min=0.05)
    frozen = torch.tensor([False, False, True])
    moved = kernels.pcn_propose(z, step, gen(2), frozen)
    assert torch.equal(moved[:, 2], z[:, 2])
    assert abs(float(moved[:, :2].mean())) < 0.03 and abs(float(moved[:, :2].std()) - 1.0) < 0.02
    assert torch.equal(kernels.pcn_propose(z[:5], torch.ones(5), gen(3))[:, 0].abs() > 0, torch.ones(5, dtype=bool))


def test_mala_is_exact_on_a_gaussian_target():
    """MALA on pi(z) ∝ N(z; 0, I) exp(a^T z): the Gaussian N(a, I); its acceptance ratio against a direct computation
    of the Metropolis-Hastings ratio, and its chains' mean."""
    a = torch.tensor([1.0, -0.5], dtype=torch.float64)
    z = torch.randn(4, 2, generator=gen(0), dtype=torch.float64)
    new = torch.randn(4, 2, generator=gen(1), dtype=torch.float64)
    step = torch.full((4,), 0.7, dtype=torch.float64)
    grad = a.expand(4, 2)
    la = kernels.log_alpha_mala(z, z @ a, grad, new, new @ a, grad, step)
    h = 0.49

    def log_q(to, frm):
        return -((to - frm - 0.5 * h * (a - frm)) ** 2).sum(1) / (2 * h)

    def log_pi(v):
        return -0.5 * (v**2).sum(1) + v @ a

    assert torch.allclose(la, log_pi(new) - log_pi(z) + log_q(z, new) - log_q(new, z))

    def evaluate(zz):
        return zz, zz.double() @ a

    class Linear:
        def __call__(self, zz):
            return evaluate(zz)

        def value_and_grad(self, zz):
            return zz, zz.double() @ a, None, a.expand(zz.shape[0], 2).to(zz)

    result = sample_s2m(Linear(), StandardNormal((2,)), 4000, kernel="mala", generator=gen(4))
    assert torch.allclose(result.x.double().mean(0), a, atol=0.12)


def test_thinning_and_resampling():
    assert thinning_for(0.5) == 5 and thinning_for(1.0) == 1 and thinning_for(0.0) == 20 and thinning_for(0.95) == 1
    assert (1 - 0.3) ** thinning_for(0.3) <= 0.05 < (1 - 0.3) ** (thinning_for(0.3) - 1)
    log_w = torch.tensor([0.0, math.log(3.0), -math.inf, math.log(4.0)], dtype=torch.float64)
    counts = torch.bincount(systematic_resample(log_w, 8, gen(0)), minlength=4)
    assert counts.tolist() == [1, 3, 0, 4]  # exactly n p_i where n p_i is an integer


def test_official_recipe_costs_201_per_sample():
    res = sample_official(TOY.evaluate_fn("A & ~B"), PRIOR, num_chains=64, num_steps=200, generator=gen(0))
    assert res.stats.proposals == 64 * 201 and res.stats.proposals_per_sample == 201
    assert res.z.shape == (64, 2) and res.on_target.dtype == torch.bool


def test_statistics_add_up_and_seed_reproduces():
    a = sample_s2m(TOY.evaluate_fn("A & B & ~C"), PRIOR, 300, generator=gen(5))
    b = sample_s2m(TOY.evaluate_fn("A & B & ~C"), PRIOR, 300, generator=gen(5))
    assert torch.equal(a.z, b.z) and torch.equal(a.x, b.x)
    s = a.stats
    assert s.num_returned == 300 and s.on_target_returned == 300 and s.unique_returned >= 0.9 * 300
    assert math.isclose(s.proposals_per_sample * s.num_returned, s.proposals)
    chains = s.chains
    assert chains["num_chains"] == 76 and chains["samples_per_chain"] == 4  # 75 chains, made even: pairs
    pool = chains["pool"]
    assert pool["proposals"] >= 32 and pool["ess"] >= 2 and pool["on_target"] >= 2
    steps = 10 + 3 * chains["thinning"]  # the burn-in, then 3 more images per chain
    assert s.proposals == pool["proposals"] + 76 * steps and chains["moves"] == 76 * 3 * chains["thinning"]
    assert 0 < s.acceptance_rate <= 1 and 0 < chains["jump_share"] < 0.25
    assert a.chain.bincount().min() == 3 and a.chain.bincount().max() == 4  # 304 images made, the first 300 kept
    assert torch.allclose(TOY.generate(a.z), a.x)
    d = s.diagnostics
    assert d["draws_per_chain"] == 3 * chains["thinning"] + 1 and d["chains"] == 76
    assert set(d["reading_check"]) == {"log_w"} and math.isfinite(d["reading_check"]["log_w"]["z"])
    assert d["rhat_used"] == "nested_rhat" and d["nested_rhat_threshold"] == pytest.approx(math.sqrt(1.51))


def test_budget_exhausted_is_clear_or_partial():
    ev = TOY.evaluate_fn("A & B & C")  # 1% of the prior
    with pytest.raises(BudgetExhaustedError, match="ran out after 40 proposals with 0 of 100 samples") as err:
        sample_s2m(ev, PRIOR, 100, max_proposals=40, generator=gen(0))
    assert "No proposal reached the whole target" in str(err.value) and "pool had 0 of its 40" in str(err.value)
    # a budget that the whole call overruns by a few proposals: it stops during the sampling, with images made
    budget = sample_s2m(ev, PRIOR, 100, generator=gen(0)).stats.proposals - 30
    part = sample_s2m(ev, PRIOR, 100, max_proposals=budget, generator=gen(0), allow_partial=True)
    assert part.stats.budget_exhausted and part.stats.proposals <= budget
    assert 0 < part.num_samples < 100 and bool(part.on_target.all())
    with pytest.raises(BudgetExhaustedError, match=f"with {part.num_samples} of 100 samples"):
        sample_s2m(ev, PRIOR, 100, max_proposals=budget, generator=gen(0))


def test_a_callback_can_stop_the_run():
    seen = []

    def stop(round_, info):
        seen.append(info["phase"])
        return info["phase"] == "sampling" and info["done"] >= 20

    res = sample_s2m(TOY.evaluate_fn("A"), PRIOR, 100, generator=gen(0), callback=stop)
    assert seen[0] == "pool" and "burn_in" in seen and seen[-1] == "sampling"
    assert 20 <= res.num_samples < 100 and not res.stats.budget_exhausted


def test_bad_arguments_and_settings_of_earlier_versions():
    ev = TOY.evaluate_fn("A")
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        sample_imh(ev, PRIOR, 0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        sample_s2m(ev, PRIOR, 10, kernel="hmc")
    with pytest.raises(TypeError, match="'refit' no longer exists: latent refitting was removed"):
        sample_s2m(ev, PRIOR, 10, refit="off")
    with pytest.raises(TypeError, match="'mixing_tolerance' no longer exists.*diagnostics"):
        S2MSamplingConfig().replace(mixing_tolerance=0.01)
    with pytest.raises(TypeError, match=r"Unknown sampling setting\(s\) \['pool_sise'\].*'pool_size'"):
        S2MSamplingConfig().replace(pool_sise=3)
    for bad in ({"jump_rate": 2.0}, {"presence_margin": 2.0}, {"negation_margin": 0.5}, {"burn_in": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            S2MSamplingConfig(**bad)
    with pytest.raises(ValueError, match="kernel='mala' needs an evaluate function with value_and_grad"):
        sample_s2m(ev, PRIOR, 10, kernel="mala")


def test_sample_s2m_takes_a_config_or_its_fields():
    ev = TOY.evaluate_fn("A & ~B")
    a = sample_s2m(ev, PRIOR, 20, S2MSamplingConfig(burn_in=4, thinning=2), generator=gen(3))
    b = sample_s2m(ev, PRIOR, 20, burn_in=4, thinning=2, generator=gen(3))
    assert torch.equal(a.z, b.z) and a.stats.proposals == b.stats.proposals
    assert a.stats.chains["thinning"] == 2
    resolved = S2MSamplingConfig.resolve({"pool_size": 32}, pool_size=None, class_label=None, thinning=None)
    assert (resolved.pool_size, resolved.class_label, resolved.thinning) == (32, None, None)


# ----------------------------------------------------------------------------------------------------------
# Exactness (a few cases here; tests/test_exactness.py holds the matrix at the defaults)


@pytest.mark.parametrize(
    "text, settings",
    [
        ("A & ~B", {}),  # conjunction with negation, pCN
        ("A | B", {"kernel": "independent"}),  # disjunction, the paper's kernel from the pool
        pytest.param("A & (B | C)", {"kernel": "mala"}, marks=pytest.mark.slow),
        pytest.param("B & ~A & ~C", {"jump_rate": 0.5}, marks=pytest.mark.slow),  # rho = 3 %, many jumps
        ("B & ~A & ~C", {"entry": "ladder"}),  # the chains start from particles that climbed the stages
        pytest.param("A & (B | C)", {"entry": "ladder"}, marks=pytest.mark.slow),  # a stage that is an OR
    ],
)
def test_samples_follow_the_exact_target(text, settings):
    evaluate = TOY.evaluate_fn(text)
    if settings.get("kernel") == "mala":
        evaluate = WithGradient(evaluate)
    assert runs_p_value(text, evaluate, **settings) > ALPHA


def test_the_ladder_climbs_only_where_it_pays_and_says_so():
    """`entry="auto"` draws the pool where the target is common and climbs its stages where few draws reach it; the
    record says how; a target of one stage, or `entry="pool"`, never climbs."""
    from s2m_diffusers import ladder

    # the pool climbs once it has drawn twice the fewest calls of a climb: 3 stages x 6 moves x 32 particles
    assert ladder.ladder_cost(32, 3) == 576
    assert ladder.climb_pays(2 * 576, 32, 3) and not ladder.climb_pays(2 * 576 - 1, 32, 3)
    assert not ladder.climb_pays(10**9, 32, 1)  # one stage: nothing to climb

    rare, common = "A & B & C", "A & ~B"
    far = ToyProblem(offset=(-1.2, -1.2))  # `A & B & C` holds 0.3% of the prior
    small = {"pool_size": 8}  # 8 particles (2 starts x 4), a climb's fewest calls 3 x 6 x 8 = 144
    climbed = sample_s2m(far.evaluate_fn(rare), PRIOR, 16, generator=gen(0), **small)
    assert far.holds(rare, climbed.x).all()
    pool = climbed.stats.chains["pool"]
    record = pool["climbed"]
    assert all(stage["ess"] > 0 for stage in record["stages"]) and len(record["stages"]) == 3
    assert record["particles"] == 8 and record["drawn"] == 2 * 144  # climbed after 36 batches of 8
    rounds = sum(stage["rounds"] for stage in record["stages"])
    assert record["drawn"] + 6 * 8 * rounds < pool["proposals"] <= record["drawn"] + 6 * 8 * rounds + 8
    assert pool["ess"] == min(stage["ess"] for stage in record["stages"])

    def climbs(toy, target, n, **settings):
        return (
            "climbed"
            in sample_s2m(toy.evaluate_fn(target), PRIOR, n, generator=gen(0), **settings).stats.chains["pool"]
        )

    assert (
        not climbs(far, rare, 16, entry="pool")
        and not climbs(TOY, common, 16)
        and climbs(TOY, common, 16, entry="ladder")
    )
    assert not climbs(TOY, "A", 16, entry="ladder")  # one stage: nothing to climb
    with pytest.raises(ValueError, match="entry must be one of"):
        S2MSamplingConfig(entry="climb")


def test_the_pool_stops_at_the_chains_cost_once_each_start_has_an_on_target_draw():
    """A pool whose ESS would never stop it stops once it has drawn what the chains will cost (16 images: 4 chains x
    (10 burn-in + 3 x 5 thinning) = 100 steps, in batches of 8: 104 draws) and holds an on-target draw per starting
    point (2); a rare target draws on until it has two."""
    from s2m_diffusers.chains import chains_cost

    config = S2MSamplingConfig(pool_size=8, pool_ess=1000, entry="pool")
    assert chains_cost(config, 4, 4) == 100
    common = sample_s2m(TOY.evaluate_fn("A & ~B"), PRIOR, 16, generator=gen(0), config=config).stats.chains["pool"]
    assert common["proposals"] == 104 and common["on_target"] >= 2
    far = ToyProblem(offset=(-1.2, -1.2))  # `A & B & C` holds 0.3% of the prior
    rare = sample_s2m(far.evaluate_fn("A & B & C"), PRIOR, 16, generator=gen(0), config=config).stats.chains["pool"]
    assert rare["on_target"] == 2 and rare["proposals"] > 104


def test_the_pool_holds_an_on_target_draw_per_starting_point():
    """However uneven the heads' weight on them (an ESS of ``pool_ess`` = 1 reached by the first on-target draw), the
    pool draws on until it holds an on-target draw per starting point: 16 images start 4 chains from 2 points, 64
    images 16 chains from 8; a rare target draws on until it has them."""
    config = S2MSamplingConfig(pool_size=8, pool_ess=1, entry="pool")
    far = ToyProblem(offset=(-1.2, -1.2))  # `A & B & C` holds 0.3% of the prior
    for n, starts in ((16, 2), (64, 8)):
        rare = sample_s2m(far.evaluate_fn("A & B & C"), PRIOR, n, generator=gen(0), config=config).stats.chains
        assert rare["pool"]["on_target"] == starts and rare["pool"]["proposals"] > 8 * starts


def test_class_conditional_proposal_with_df_correction():
    assert runs_p_value("A & ~B", TOY.evaluate_fn("A & ~B", class_label=0)) > ALPHA


class ShiftedNormal:
    """A latent density other than the prior, for the entry pool and the jumps: N(mu, s^2 I)."""

    def __init__(self, mu, scale):
        self.mu, self.scale = torch.tensor(mu, dtype=torch.float32), scale

    def sample(self, n, generator=None):
        return self.mu + self.scale * torch.randn(n, 2, generator=generator)

    def log_prior_ratio(self, z):
        z = z.double()
        log_p = -0.5 * z.pow(2).sum(1)
        log_q = -0.5 * ((z - self.mu.double()) / self.scale).pow(2).sum(1) - 2 * math.log(self.scale)
        return log_p - log_q


@pytest.mark.slow  # no default path draws from a q other than the prior
def test_a_density_other_than_the_prior_is_corrected_for():
    """The pool and the jumps drawn from q = N(mu, s^2 I): exact with the correction ``p_z / q``, rejected without."""
    q = ShiftedNormal([0.8, 0.8], 0.6)
    text = "A & B"
    assert runs_p_value(text, TOY.evaluate_fn(text), q=q, jump_rate=0.5) > ALPHA

    class Uncorrected(ShiftedNormal):
        def log_prior_ratio(self, z):
            return torch.zeros(z.shape[0], dtype=torch.float64)

    assert runs_p_value(text, TOY.evaluate_fn(text), q=Uncorrected([0.8, 0.8], 0.6), jump_rate=0.5) < ALPHA


@pytest.mark.slow  # the default run keeps test_wrong_priors_bias_a_disjunction
def test_wrong_priors_do_not_bias_a_conjunction_with_a_large_margin():
    wrong = TOY.priors * torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    # 120 calls: at 60, seed 0's calls gave p = 0.003 before the annealed start and 2e-4 after, seeds 1-4 0.04-0.75
    # (0.13 and 0.44 at 120); at 120 seed 0 gives 0.07
    ev = TOY.evaluate_fn("A & ~C", negation_margin=10.0, priors=wrong)
    assert runs_p_value("A & ~C", ev, runs=2 * RUNS) > ALPHA
    # With the paper's margin of 1, the same wrong priors let images holding C leak in.
    ev = TOY.evaluate_fn("A & ~C", negation_margin=1.0, priors=TOY.priors * torch.tensor([3.0, 1.0, 0.3]))
    leaked = sample_s2m(ev, PRIOR, 400, generator=gen(8))
    assert not bool(TOY.holds("A & ~C", leaked.x).all())


def test_wrong_priors_bias_a_disjunction():
    wrong = TOY.priors * torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64)
    assert runs_p_value("A | B", TOY.evaluate_fn("A | B", priors=wrong)) < ALPHA


# ----------------------------------------------------------------------------------------------------------
# The same tests must reject broken maths


def test_broken_negation_sign_is_rejected(monkeypatch):
    monkeypatch.setattr(maths, "_log_sub", lambda log_a, log_b: torch.logaddexp(log_a, log_b))  # g_a + lambda g_b
    with pytest.raises(AssertionError, match="off target"):
        runs_p_value("A & ~B", TOY.evaluate_fn("A & ~B"), runs=2)


def test_broken_pcn_read_as_a_random_walk_is_rejected(monkeypatch):
    """pCN's move is reversible for the prior: adding the prior's ratio to its acceptance (as for a random walk)
    counts the prior twice."""
    import s2m_diffusers.chains as chains

    original = chains._log_alpha

    def with_prior_twice(state, new, jump, kernel, step, frozen):
        prior = -0.5 * (new.z.double().pow(2).sum(1) - state.z.double().pow(2).sum(1))
        return original(state, new, jump, kernel, step, frozen) + torch.where(jump, 0.0, prior)

    monkeypatch.setattr(chains, "_log_alpha", with_prior_twice)
    assert runs_p_value("A & ~B", TOY.evaluate_fn("A & ~B")) < ALPHA


def test_broken_step_sizes_chosen_by_the_state_are_rejected(monkeypatch):
    """The chains share one step size (`chains.adapt`) because a step that depends on where a chain is biases it:
    small steps for the chains of low weight (a chain in a poor region lingers there) are caught by the exactness
    test (p 5e-6; the same two step sizes drawn at random, whatever the state: p 0.59)."""
    import s2m_diffusers.chains as chains

    original = chains.step_chains

    def by_state(evaluate, q, state, step, config, generator, stats, screen, frozen):
        low = state.log_w < state.log_w.median()
        step = torch.where(low.to(step.device), 0.05 * torch.ones_like(step), torch.ones_like(step))
        return original(evaluate, q, state, step, config, generator, stats, screen, frozen)

    monkeypatch.setattr(chains, "step_chains", by_state)
    assert runs_p_value("A & ~B", TOY.evaluate_fn("A & ~B")) < ALPHA


def test_broken_missing_df_correction_is_rejected():
    ev = TOY.evaluate_fn("A & ~B", class_label=0)

    def without_df(z):
        x, lw = ev(z)
        return x, lw + TOY.df_log_probs(x)[:, 0]  # undo the - log D_f(c|x) term

    assert runs_p_value("A & ~B", without_df) < ALPHA
