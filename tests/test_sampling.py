"""The sampler against a problem whose target is known exactly (s2m_diffusers.testing.toy).

Goodness of fit: Pearson's chi-square over a 4 x 4 grid of the exact target's quantiles, against cell
probabilities from 200,000 exact draws. The returned samples come from independent chains, so the counts
are multinomial when the sampler is right; with N = 2,000 samples a test fails at p < 1e-3, the tolerance the
chi-square law gives for that N. Each scenario has a fixed seed. The tests at the bottom break the maths on
purpose (per-batch acceptance, a flipped negation, a dropped correction) and check that the same test rejects.
"""

import functools
import math

import pytest
import torch

import s2m_diffusers.maths as maths
import s2m_diffusers.sampling as sampling
from s2m_diffusers.densities import StandardNormal
from s2m_diffusers.maths import imh_accept
from s2m_diffusers.sampling import BudgetExhaustedError, S2MSamplingConfig, sample_imh, sample_official, sample_s2m
from s2m_diffusers.testing.toy import ToyProblem, chi_square_cells

TOY = ToyProblem()
PRIOR = StandardNormal((2,))
N = 2000
ALPHA = 1e-3


@functools.cache
def reference(text: str) -> torch.Tensor:
    return TOY.exact_sample(text, 200_000, torch.Generator().manual_seed(1234))


def p_value(text: str, x: torch.Tensor) -> float:
    assert bool(TOY.holds(text, x).all()), "a returned sample is off target"
    return chi_square_cells(x, reference(text))[2]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Unit behaviour


def test_acceptance_is_per_chain_and_handles_zero_weights():
    current = torch.tensor([-math.inf, 0.0, 0.0, -math.inf, 5.0])
    proposed = torch.tensor([-3.0, -math.inf, 100.0, -math.inf, 5.0 + math.log(0.5)])
    acc = torch.stack([imh_accept(current, proposed, gen(s)) for s in range(4000)]).double().mean(0)
    assert acc[0] == 1.0  # an empty chain accepts any finite weight
    assert acc[1] == 0.0  # weight 0 is never accepted
    assert acc[2] == 1.0
    assert acc[3] == 0.0
    assert abs(acc[4] - 0.5) < 4 * math.sqrt(0.25 / 4000)  # min(1, ratio)
    # One uniform per chain: chains with identical inputs do not all move together.
    many = imh_accept(torch.zeros(1000), torch.full((1000,), math.log(0.5)), gen(0))
    assert 400 < int(many.sum()) < 600


def test_official_recipe_costs_201_per_sample():
    res = sample_official(TOY.evaluate_fn("A & ~B"), PRIOR, num_chains=64, num_steps=200, generator=gen(0))
    assert res.stats.proposals == 64 * 201 and res.stats.proposals_per_sample == 201
    assert res.z.shape == (64, 2) and res.on_target.dtype == torch.bool


def test_statistics_add_up_and_seed_reproduces():
    a = sample_s2m(TOY.stage_evaluates("A & B & ~C"), PRIOR, 300, fit_size=128, generator=gen(5))
    b = sample_s2m(TOY.stage_evaluates("A & B & ~C"), PRIOR, 300, fit_size=128, generator=gen(5))
    assert torch.equal(a.z, b.z) and torch.equal(a.x, b.x)
    s = a.stats
    assert s.num_returned == 300 and s.on_target_returned == 300 and s.unique_returned >= 0.8 * 300
    assert math.isclose(s.proposals_per_sample * s.num_returned, s.proposals)
    final_stage = s.proposals - sum(st["proposals"] for st in s.stages)
    chains = int(a.chain.unique().numel())
    assert chains == math.ceil(300 / 8) and final_stage >= chains  # every chain needed at least its entry proposal
    # 3 stages, each fitting both families (a Gaussian mixture and a tilted prior), and 1 + 3 * 2 pilots
    assert sum("stage" in st for st in s.stages) == 3 and sum("pilot" in st for st in s.stages) == 7
    assert 0 < s.acceptance_rate <= 1 and s.mixing["bound"] <= 0.01
    assert torch.allclose(TOY.generate(a.z), a.x)


def test_budget_exhausted_is_clear_or_partial():
    ev = TOY.evaluate_fn("A & B & C")
    message = "ran out after 500 proposals with .* of 100 on-target samples"
    with pytest.raises(BudgetExhaustedError, match=message) as err:
        sample_imh(ev, PRIOR, 100, max_proposals=500, generator=gen(0))
    assert err.value.result.stats.proposals == 500
    assert "refit" in str(err.value)
    part = sample_imh(ev, PRIOR, 100, max_proposals=500, generator=gen(0), allow_partial=True)
    assert part.stats.budget_exhausted and part.stats.proposals == 500
    assert part.z.shape[0] < 100 and bool(part.on_target.all())


def test_fits_that_spend_the_whole_budget_raise_the_budget_error_not_a_value_error():
    ev = TOY.evaluate_fn("A")  # half the prior holds A: the one fit finds ~150 latents in its 300 proposals
    # fit_spend="full": the fit may spend the whole budget (by default it leaves the sampling its share)
    kwargs = dict(refit="once", fit_size=256, fit_batch=300, max_proposals=300, fit_spend="full", generator=gen(0))
    with pytest.raises(BudgetExhaustedError, match="budget of 300 ran out.*refitting stages spent the whole budget"):
        sample_s2m([ev], PRIOR, 10, **kwargs)
    part = sample_s2m([ev], PRIOR, 10, allow_partial=True, **kwargs)
    assert part.stats.budget_exhausted and part.z.shape[0] == 0 and part.stats.proposals == 300


def test_a_fit_for_a_few_samples_spends_at_most_what_it_could_save_on_them():
    """`fit_latent(num_samples=n)`: beyond the prior's pilot, the stages and their pilots spend at most
    ``n * (c_prior - 1)`` proposals (no density saves more than that on n samples); without ``num_samples`` every
    stage runs. The limited fit says so (``limited_to``) and serves calls for at most as many samples."""
    evaluates = TOY.stage_evaluates("A & B & C")  # 5% of the prior: the prior costs ~200 proposals per sample
    full = sampling.fit_latent(evaluates, PRIOR, generator=gen(0))
    assert full.limited_to is None and full.serves(None) and full.serves(10**6)
    assert [s["stage"] for s in full.stats.stages if "stage" in s] == [0, 1, 2]
    for n in (1, 4, 16):
        fit = sampling.fit_latent(evaluates, PRIOR, num_samples=n, generator=gen(0))
        prior = fit.stats.stages[0]
        assert prior["pilot"] == "prior"
        limit = n * (prior["predicted_proposals_per_sample"] - 1)
        assert fit.stats.proposals - prior["proposals"] <= limit
        assert fit.stats.proposals < full.stats.proposals and fit.limited_to == n
        assert fit.serves(n) and fit.serves(1) and not fit.serves(n + 1) and not fit.serves(None)
        last = [s for s in fit.stats.stages if "stage" in s][-1]
        assert "spend limit" in last.get("skipped", last.get("stopped", ""))
    # A call for a few samples fits for them.
    few = sample_s2m(evaluates, PRIOR, 4, generator=gen(0), fit_generator=gen(0))
    limited = sampling.fit_latent(evaluates, PRIOR, num_samples=4, generator=gen(0))
    assert few.stats.stages == limited.stats.stages and bool(TOY.holds("A & B & C", few.x).all())
    # fit_spend="full": every stage, whatever the call's size
    assert sample_s2m(evaluates, PRIOR, 4, generator=gen(0), fit_spend="full").stats.stages == full.stats.stages


def test_predicted_cost_without_a_tolerance_takes_the_fixed_steps_however_few_draws_hit():
    """With ``mixing_tolerance=None`` a chain takes exactly ``steps_after_entry`` steps, so the pilot's prediction
    uses them even when too few draws hit the target to estimate a bound (that case predicts the cap otherwise)."""
    few = torch.full((256,), -math.inf, dtype=torch.float64)
    few[:4] = 0.0  # 4 of 256 draws on the target, equal weights
    fixed = S2MSamplingConfig(mixing_tolerance=None, steps_after_entry=3, samples_per_chain=1)
    assert sampling._predicted_cost(few, fixed) == (256 / 4 + 3, 3)
    cost, steps = sampling._predicted_cost(few, S2MSamplingConfig(samples_per_chain=1))
    assert steps == 200 and cost == 256 / 4 + 200


def test_bad_arguments():
    ev = TOY.evaluate_fn("A")
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        sample_imh(ev, PRIOR, 0)
    with pytest.raises(ValueError, match="refit must be"):
        sample_s2m([ev], PRIOR, 10, refit="always")
    with pytest.raises(ValueError, match="fit_families must name one or more of.*'flow'"):
        sample_s2m([ev], PRIOR, 10, fit_families=("gaussian", "flow"))
    with pytest.raises(ValueError, match="fit_spend must be one of.*'all'"):
        sample_s2m([ev], PRIOR, 10, fit_spend="all")


# ----------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize(
    "text, refit, seed",
    [
        ("A & ~B", "off", 0),  # conjunction with negation, prior proposal
        ("A & B & C", "off", 1),  # rare conjunction (rho = 1 %), prior proposal
        ("A & B & C", "sequential", 2),
        ("B & ~A & ~C", "sequential", 3),  # rho = 3 %
        ("A | B", "once", 4),  # disjunction
        ("~A", "off", 5),  # pure negation: some attribute, but not A
        ("A & (B | C)", "sequential", 6),
    ],
)
def test_samples_follow_the_exact_target(text, refit, seed):
    steps = 30 if refit == "off" else 10
    res = sample_s2m(TOY.stage_evaluates(text), PRIOR, N, refit=refit, steps_after_entry=steps, generator=gen(seed))
    assert p_value(text, res.x) > ALPHA


def test_class_conditional_proposal_with_df_correction():
    res = sample_imh(TOY.evaluate_fn("A & ~B", class_label=0), PRIOR, N, steps_after_entry=20, generator=gen(7))
    assert p_value("A & ~B", res.x) > ALPHA


def test_wrong_priors_do_not_bias_a_conjunction_with_a_large_margin():
    wrong = TOY.priors * torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    ev = TOY.evaluate_fn("A & ~C", negation_margin=10.0, priors=wrong)
    res = sample_imh(ev, PRIOR, N, steps_after_entry=30, generator=gen(8))
    assert p_value("A & ~C", res.x) > ALPHA
    # With the paper's margin of 1, the same wrong priors let images holding C leak in.
    ev = TOY.evaluate_fn("A & ~C", negation_margin=1.0, priors=TOY.priors * torch.tensor([3.0, 1.0, 0.3]))
    leaked = sample_imh(ev, PRIOR, N, steps_after_entry=30, generator=gen(8))
    assert not bool(TOY.holds("A & ~C", leaked.x).all())


def test_wrong_priors_bias_a_disjunction():
    wrong = TOY.priors * torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64)
    res = sample_imh(TOY.evaluate_fn("A | B", priors=wrong), PRIOR, N, steps_after_entry=30, generator=gen(9))
    assert p_value("A | B", res.x) < ALPHA
    right = sample_imh(TOY.evaluate_fn("A | B"), PRIOR, N, steps_after_entry=30, generator=gen(9))
    assert p_value("A | B", right.x) > ALPHA


def test_refitting_costs_far_fewer_proposals_at_the_same_quality():
    """With its defaults (few steps per chain), refitting stays exact to the chi-square test's resolution."""
    text = "A & B & C"
    official = sample_official(TOY.evaluate_fn(text), PRIOR, generator=gen(10))
    ours = sample_s2m(TOY.stage_evaluates(text), PRIOR, N, generator=gen(10))
    assert ours.stats.proposals_per_sample * 10 < official.stats.proposals_per_sample
    assert p_value(text, ours.x) > ALPHA


# ----------------------------------------------------------------------------------------------------------
# The same tests must reject broken maths


def _batch_accept(current, proposed, generator=None):
    """Broken on purpose: one decision for the whole batch, from the mean acceptance ratio."""
    finite = torch.isfinite(proposed) & torch.isfinite(current)
    la = torch.where(finite, proposed - current, torch.zeros_like(proposed)).clamp(max=0).mean()
    u = torch.rand((), generator=generator)
    accept = bool(torch.log(u) < la)
    empty = ~torch.isfinite(current) & torch.isfinite(proposed)
    return torch.isfinite(proposed) & (empty | accept)


def _log_add(log_a, log_b):
    """Broken on purpose: the negation's sign flipped, g_a + lambda g_b."""
    return torch.logaddexp(log_a, log_b)


def test_broken_per_batch_acceptance_is_rejected(monkeypatch):
    monkeypatch.setattr(sampling, "imh_accept", _batch_accept)
    res = sample_imh(TOY.evaluate_fn("A & ~B"), PRIOR, N, steps_after_entry=30, generator=gen(0))
    assert p_value("A & ~B", res.x) < ALPHA


def test_broken_negation_sign_is_rejected(monkeypatch):
    monkeypatch.setattr(maths, "_log_sub", _log_add)
    res = sample_imh(TOY.evaluate_fn("A & ~B"), PRIOR, N, steps_after_entry=30, generator=gen(0))
    with pytest.raises(AssertionError, match="off target"):
        p_value("A & ~B", res.x)


def test_broken_missing_proposal_correction_is_rejected(monkeypatch):
    from s2m_diffusers.densities import LowRankGaussianMixture

    monkeypatch.setattr(LowRankGaussianMixture, "log_prior_ratio", lambda self, z: torch.zeros(z.shape[0]))
    res = sample_s2m(
        TOY.stage_evaluates("B & ~A & ~C"), PRIOR, N, steps_after_entry=10, fit_families="gaussian", generator=gen(3)
    )
    assert p_value("B & ~A & ~C", res.x) < ALPHA


def test_tilted_fits_are_exact_and_their_correction_matters(monkeypatch):
    """Refitting with the classifier-tilted prior only: the rare conjunction's samples pass the exactness test, and
    with the tilt's correction ``p_z / q`` inverted the same run is rejected."""
    from s2m_diffusers.densities import TiltedNormal

    text = "A & B & C"  # rho = 1 %

    def run():
        return sample_s2m(TOY.stage_evaluates(text), PRIOR, N, fit_families=("tilted",), generator=gen(8))

    res = run()
    assert res.stats.fit.endswith("tilted") and isinstance(res.q, TiltedNormal), res.stats.fit
    assert p_value(text, res.x) > ALPHA
    pilots = [st for st in res.stats.stages if "pilot" in st]
    assert min(p["predicted_proposals_per_sample"] for p in pilots[1:]) < pilots[0]["predicted_proposals_per_sample"]
    # The tilt is nearly flat on the target (its point), so dropping the correction biases little; flipping it does.
    right = TiltedNormal.log_prior_ratio
    monkeypatch.setattr(TiltedNormal, "log_prior_ratio", lambda self, z: -right(self, z))
    assert p_value(text, run().x) < ALPHA


def test_broken_missing_df_correction_is_rejected():
    ev = TOY.evaluate_fn("A & ~B", class_label=0)

    def without_df(z):
        x, lw = ev(z)
        return x, lw + TOY.df_log_probs(x)[:, 0]  # undo the - log D_f(c|x) term

    res = sample_imh(without_df, PRIOR, N, steps_after_entry=20, generator=gen(7))
    assert p_value("A & ~B", res.x) < ALPHA


def test_adaptive_steps_from_the_estimated_bound_reach_the_target():
    """With the prior as proposal, 5 fixed steps are visibly biased on `A & ~B`; the step count from the estimated
    bound (mixing_tolerance 0.01, the default: the exact distance is what it bounds, so a looser tolerance is a bias
    that 2,000 samples can see) is not."""
    fixed = sample_imh(
        TOY.evaluate_fn("A & ~B"),
        PRIOR,
        N,
        steps_after_entry=5,
        mixing_tolerance=None,
        samples_per_chain=1,
        generator=gen(12),
    )
    assert p_value("A & ~B", fixed.x) < ALPHA
    adaptive = sample_imh(
        TOY.evaluate_fn("A & ~B"),
        PRIOR,
        N,
        steps_after_entry=5,
        mixing_tolerance=0.01,
        samples_per_chain=1,
        generator=gen(12),
    )
    assert p_value("A & ~B", adaptive.x) > ALPHA
    assert adaptive.stats.proposals > fixed.stats.proposals
    with pytest.raises(ValueError, match="mixing_tolerance must be in"):
        sample_imh(TOY.evaluate_fn("A"), PRIOR, 10, mixing_tolerance=1.5)


def _exact_imh_distance(q: torch.Tensor, w: torch.Tensor, steps: list[int]) -> list[float]:
    """Total variation distance to pi ∝ q w after n independence-sampler steps from q restricted to {w > 0}, on a
    finite state space, by powers of the transition matrix."""
    pi = q * w / (q * w).sum()
    accept = torch.where(w[:, None] > 0, (w[None, :] / w[:, None]).clamp(max=1.0), torch.ones(len(q), len(q)).double())
    kernel = q[None, :] * accept
    kernel.fill_diagonal_(0.0)
    kernel += torch.diag(1 - kernel.sum(1))
    start = torch.where(w > 0, q, 0.0) / q[w > 0].sum()
    return [0.5 * float((start @ torch.linalg.matrix_power(kernel, n) - pi).abs().sum()) for n in steps]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imh_distance_is_the_independence_samplers_exact_distance(seed):
    """`maths.imh_distance` (Smith and Tierney's transition, from an empirical distribution of ratios) against the
    exact distance of a finite chain whose proposal puts the same masses on the same ratios (ties included), and
    `imh_steps` the fewest steps under a tolerance; both far below the uniform bound (1 - 1/W)^n."""
    g = gen(seed)
    q = torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    q = (q * 20_000 / q.sum()).round()  # counts: the empirical distribution is exactly q / sum(q)
    w = torch.rand(30, generator=g, dtype=torch.float64) ** (3 + seed) * 10
    w[: 10 + 5 * seed] = 0.0  # off target
    w[-3:] = w[-4]  # ties
    log_ratios = torch.repeat_interleave(torch.where(w > 0, w.log(), -math.inf), q.long())
    steps = [0, 1, 3, 10, 30, 100]
    exact = _exact_imh_distance(q / q.sum(), w, steps)
    assert maths.imh_distance(log_ratios, steps) == pytest.approx(exact, abs=1e-6)
    t = maths.imh_steps(log_ratios, 0.01, 0, 1000)
    before, at = _exact_imh_distance(q / q.sum(), w, [t - 1, t])
    assert before > 0.01 >= at
    # A draw whose ratio underflows (1e-347 of the largest) is a tie at the smallest level, not a NaN.
    tiny = torch.cat([log_ratios, log_ratios.new_tensor([float(log_ratios[torch.isfinite(log_ratios)].max()) - 800])])
    assert maths.imh_distance(tiny, steps) == pytest.approx(exact, abs=1e-3)
    big_w = float((w / (q * w).sum() * q.sum()).max())
    assert at < (1 - 1 / big_w) ** t


def test_fit_exponent_keeps_the_asked_effective_sample_size():
    from s2m_diffusers.maths import fit_exponent

    gen = torch.Generator().manual_seed(0)
    heavy = torch.randn(400, generator=gen, dtype=torch.float64) * 6.0  # log-normal ratios, very heavy-tailed
    heavy[::7] = -math.inf  # off-target proposals do not count
    finite = heavy[torch.isfinite(heavy)]

    def ess(beta):
        p = torch.softmax(beta * finite, 0)
        return float(1 / p.pow(2).sum())

    assert ess(1.0) < 10  # untempered, a handful of latents would carry the fit
    beta = fit_exponent(heavy, 0.25 * len(finite))
    assert 0 < beta < 1 and ess(beta) >= 0.25 * len(finite) - 1e-6
    assert ess(min(1.0, beta + 1e-3)) < 0.25 * len(finite)  # the largest such beta, up to the bisection
    assert fit_exponent(torch.zeros(50, dtype=torch.float64), 25) == 1.0  # flat weights need no tempering
    with pytest.raises(ValueError, match="No finite weight"):
        fit_exponent(torch.full((3,), -math.inf), 1.0)


# ----------------------------------------------------------------------------------------------------------
# Settings


def test_sampling_config_has_one_default_per_setting_and_names_unknown_ones():
    config = S2MSamplingConfig()
    assert (config.refit, config.mixing_tolerance, config.steps_after_entry) == ("sequential", 0.01, 1)
    assert (config.fit_size, config.samples_per_chain, config.pilot_size, config.presence_margin) == (
        256,
        8,
        256,
        None,
    )
    assert config.negation_margin is None and config.class_label == "auto"  # None: the heads' own margin
    # None overrides keep the value (optional settings pass through), except class_label, where None draws the class
    resolved = S2MSamplingConfig.resolve({"fit_size": 64}, fit_size=None, refit="off", class_label=None)
    assert (resolved.fit_size, resolved.refit, resolved.class_label) == (64, "off", None)
    assert (
        resolved.num_fit_stages(3) == 0
        and config.num_fit_stages(3) == 3
        and config.replace(refit="once").num_fit_stages(3) == 1
    )
    with pytest.raises(TypeError, match=r"Unknown sampling setting\(s\) \['fit_sise'\].*'fit_size'"):
        config.replace(fit_sise=3)
    for bad in ({"refit": "always"}, {"presence_margin": 2.0}, {"negation_margin": 0.5}, {"dr_temperature": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            S2MSamplingConfig(**bad)


def test_sample_s2m_takes_a_config_or_its_fields():
    evaluates = TOY.stage_evaluates("A & ~B")
    a = sample_s2m(evaluates, PRIOR, 20, S2MSamplingConfig(fit_size=64, steps_after_entry=2), generator=gen(3))
    b = sample_s2m(evaluates, PRIOR, 20, fit_size=64, steps_after_entry=2, generator=gen(3))
    assert torch.equal(a.z, b.z) and a.stats.proposals == b.stats.proposals
