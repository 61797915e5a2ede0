"""Exactness of the sampler at its default settings, against a problem whose target is known exactly.

The analytic toy (`s2m_diffusers.testing.toy`): a nonlinear generator ``x = A sinh(z) + b`` whose density is known in
closed form, a population far from it, exact heads, and i.i.d. draws of every target by rejection.

Samples of one call are correlated: images of one chain, chains started from one pool point, chains started from one
pool. Independent calls are not. So each case makes ``RUNS`` independent calls of ``N`` images with `sample_s2m` at
the defaults (no setting passed), and tests the cell shares of all their images (16 cells of equal reference
probability) against the exact target's with the covariance of the calls' own shares: Hotelling's statistic with the
calls as clusters (`toy.calls_test`), whose tolerance follows from the number of calls. A biased sampler
fails it as the calls grow; a correlated but exact one does not.

The full matrix (6 targets x 2 proposals x 2 labelling models) is marked slow (``python -m pytest -m slow``); the
default run keeps a cover of it.
"""

import pytest
import torch

from s2m_diffusers.densities import StandardNormal
from s2m_diffusers.testing.toy import ToyProblem, calls_test

RUNS, N = 150, 100
ALPHA = 1e-3
# AND, AND-NOT, OR, pure NOT, the rarest AND-NOT (2.4% of the proposals), a rare AND whose weights have a heavy tail
TARGETS = ["A & B", "A & ~B", "A | C", "~A", "B & ~A & ~C", "A & B & C"]
PROPOSALS = ["prior", "drawn_class"]
LABELLINGS = ["independent", "one_label_per_image"]
FAR = (-0.8, -0.8)  # the generator's offset: sup p_T / p_G is about 59 for `B & ~A & ~C`
NEAR = (-0.5, -0.5)  # `A & B & C` here holds 1% of the proposals with sup p_T / p_G about 110
DEFAULT_CASES = {  # every target, proposal and labelling model at least once
    ("A & ~B", "drawn_class", "one_label_per_image"),
    ("~A", "prior", "independent"),
    ("A & B & C", "prior", "independent"),
}


def _cases():
    for target in TARGETS:
        for proposal in PROPOSALS:
            for labelling in LABELLINGS:
                case = (target, proposal, labelling)
                marks = [] if case in DEFAULT_CASES else [pytest.mark.slow]
                yield pytest.param(*case, marks=marks, id=f"{target}-{proposal}-{labelling}")


@pytest.mark.filterwarnings("ignore:S2M sampling")  # each call's own diagnostics may warn on 100 images
@pytest.mark.parametrize("target, proposal, labelling", list(_cases()))
def test_default_sampler_is_exact(target, proposal, labelling):
    toy = ToyProblem(offset=NEAR if target == "A & B & C" else FAR, labelling=labelling)
    drawn = proposal == "drawn_class"
    evaluate = toy.evaluate_fn(target, class_label="drawn" if drawn else None)
    p, results = calls_test(toy, target, evaluate, StandardNormal((3,) if drawn else (2,)), RUNS, N)
    assert p > ALPHA, (p, sum(r.stats.proposals for r in results) / (RUNS * N))


def test_the_heavy_tailed_case_has_a_heavy_tail():
    """The rare AND's density ratio to the proposal, ``p_T / p_G = w / E_G[w]``, reaches about 100."""
    toy = ToyProblem(offset=NEAR)
    z = torch.randn(1_000_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, log_w = toy.evaluate_fn("A & B & C")(z)
    on = torch.isfinite(log_w)
    w = torch.where(on, torch.exp(log_w - log_w[on].max()), torch.zeros_like(log_w))
    assert float(w.max() / w.mean()) > 80
    assert float(on.double().mean()) < 0.02


@pytest.mark.slow  # the statistic's power; the default run keeps test_sampling's broken-sampler tests
def test_the_test_catches_a_biased_sampler():
    """The same statistic rejects calls whose chains target the wrong density: the weights tilted by ``exp(x_1)``,
    which moves the target's mass by a few percent of its cells (calls of the same size as the cases')."""
    toy = ToyProblem(offset=FAR)
    target = "A & ~B"
    exact = toy.evaluate_fn(target)

    def tilted(z):
        x, log_w = exact(z)
        return x, log_w + 0.3 * x[:, 0]

    assert calls_test(toy, target, tilted, StandardNormal((2,)), RUNS, N)[0] < ALPHA


def test_one_label_data_read_as_independent_is_biased_and_read_right_is_not():
    """Spec §1: under one label per image, the independent model's formula gives wrong shares for targets that leave
    an attribute free; the heads' labelling setting fixes it (`maths.log_g`)."""
    import math

    from s2m_diffusers.maths import log_weight

    toy = ToyProblem(labelling="one_label_per_image")
    target = toy.target("A & ~B")  # leaves C free
    z = torch.randn(400_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = toy.generate(z)
    dr, dv = toy.dr_log_probs(x), toy.dv_logit(x)
    shares = {}
    for labelling in ("independent", "one_label_per_image"):
        w = log_weight(target, dr, dv, torch.log(toy.p_data), torch.log(toy.priors), labelling=labelling).exp()
        with_c = toy.attributes(x)[:, 2]
        shares[labelling] = float(w[with_c].sum() / w.sum())
    exact = toy.exact_sample(target, 200_000, torch.Generator().manual_seed(1))
    truth = float(toy.attributes(exact)[:, 2].double().mean())
    assert math.isclose(shares["one_label_per_image"], truth, abs_tol=0.01)
    assert abs(shares["independent"] - truth) > 0.05


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:S2M sampling")
@pytest.mark.parametrize("target", ["B & ~A & ~C", "A & B & C"])
@pytest.mark.parametrize("proposal", PROPOSALS)
def test_chains_started_by_the_ladder_are_exact(target, proposal):
    """``entry="ladder"``: the chains start from particles that climbed the target's stages (`ladder`), equally
    weighted but only approximately distributed as the target; the chains after the burn-in are exact all the same."""
    toy = ToyProblem(offset=NEAR if target == "A & B & C" else FAR)
    drawn = proposal == "drawn_class"
    evaluate = toy.evaluate_fn(target, class_label="drawn" if drawn else None)
    q = StandardNormal((3,) if drawn else (2,))
    p, results = calls_test(toy, target, evaluate, q, RUNS, N, entry="ladder")
    climbed = sum("climbed" in r.stats.chains["pool"] for r in results)
    assert climbed >= 0.9 * RUNS  # the rest: a stage kept no particle, and the call drew the pool on
    assert p > ALPHA, (p, climbed)
