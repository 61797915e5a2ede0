"""Screening diffusion proposals on their predicted clean image by delayed acceptance (`S2MSamplingConfig.screen`).

The analytic toy (`s2m_diffusers.testing.toy`) gains a generator with an intermediate view: after ``s`` of its K
"denoising" steps the view is the final sample plus a fixed, latent-determined perturbation of scale
``noise (1 - s / K)``, standing in for a diffusion model's predicted clean image, and the exact heads judge it with the
soft margins (the surrogate is 0 wherever the view is off target). With the screen on, the returned samples pass the
exactness test of `tests/test_exactness.py` (Pearson's chi-square on 16 cells of equal reference probability, per
slot of the chains, Bonferroni over the slots), since delayed acceptance leaves the target unchanged whatever the
surrogate once the sampler floors it.

``max_steps_after_entry`` is raised to 2,000 so that the delayed-acceptance bound itself reaches the tolerance where
it can (with the prior as ``q``; refitted densities can push ``W_bound`` into the thousands, and then the cap holds).
The full matrix runs with ``S2M_SLOW_TESTS=1``.
"""

import math
import os

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from test_pipeline import spread_heads, tiny_unet

from s2m_diffusers.densities import StandardNormal
from s2m_diffusers.maths import da_imh_distances, imh_distance, imh_steps
from s2m_diffusers.models.heads import S2MHeads
from s2m_diffusers.pipeline_s2m import S2MPipeline
from s2m_diffusers.proposals import DDIMProposal, PipelineProposal
from s2m_diffusers.sampling import (
    S2MSamplingConfig,
    SamplerStats,
    _chain_cost,
    _propose,
    calibrate_screen,
    fit_latent,
    sample_s2m,
)
from s2m_diffusers.testing.toy import ToyProblem, chi_square_cells

ALPHA = 1e-3
FAR = (-0.8, -0.8)
SLOW = os.environ.get("S2M_SLOW_TESTS") == "1"
DEFAULT_CASES = {("A & B", "off", 5, False), ("A & ~B", "sequential", 3, False), ("A & ~B", "sequential", 3, True)}
CASES = [
    (target, refit, step, restarts)
    for target in ("A & B", "A & ~B", "~A", "B & ~A & ~C")
    for refit in ("off", "sequential")
    for step in (3, 5)
    for restarts in (False, True)
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def slot_p_values(toy: ToyProblem, target: str, result) -> list[float]:
    """The chi-square p-value of the ``j``-th samples of all chains, for each ``j`` (as `test_exactness` does)."""
    reference = toy.exact_sample(target, 200_000, gen(1))
    slots = torch.zeros(result.num_samples, dtype=torch.long)
    for chain in result.chain.unique():
        idx = (result.chain == chain).nonzero().flatten()
        slots[idx] = torch.arange(idx.numel())
    return [chi_square_cells(result.x[slots == j], reference)[2] for j in range(int(slots.max()) + 1)]


def _cases():
    for case in CASES:
        marks = [] if SLOW or case in DEFAULT_CASES else [pytest.mark.skip(reason="S2M_SLOW_TESTS=1 runs it")]
        restarts = "-restarts" if case[3] else ""
        yield pytest.param(*case, marks=marks, id=f"{case[0]}-{case[1]}-screen{case[2]}{restarts}")


@pytest.mark.parametrize("target, refit, step, restarts", list(_cases()))
def test_screened_sampler_is_exact(target, refit, step, restarts):
    """With ``restarts`` a proposal that passes the screen is rerun whole (a wrapped pipeline): the same chain, more
    steps counted."""
    toy = ToyProblem(offset=FAR)
    evaluates = toy.stage_evaluates(target, screened=True, restarts=restarts)
    n = 20_000 if SLOW else 8_000
    result = sample_s2m(
        evaluates, StandardNormal((2,)), n, generator=gen(7), refit=refit, screen=step, max_steps_after_entry=2000
    )
    assert result.num_samples == n and bool(toy.holds(target, result.x).all())
    screen, mixing = result.stats.screen, result.stats.mixing
    assert screen["step"] == step and screen["screened_out_share"] > 0  # it screened
    # the delayed-acceptance bound itself was reached, or T is at its cap (refitted densities: W_bound in the 1,000s)
    assert mixing["bound"] <= 0.01 or mixing["steps_after_entry"] == 2000, mixing
    p_values = slot_p_values(toy, target, result)
    assert min(p_values) > ALPHA / len(p_values), (p_values, screen, mixing)
    # every step the toy ran is counted: s per proposal, K - s (restarts: K) more per proposal that passed the screen
    assert result.stats.unet_calls == sum(e.calls for e in evaluates)
    assert screen["restarts"] is restarts


def test_a_faithful_surrogate_is_chosen_and_saves_calls_at_the_same_exactness():
    """A view without perturbation (the surrogate is the true weight up to its margins): "auto" screens at the first
    step, and the samples are as exact as without the screen, for a fraction of the steps."""
    toy = ToyProblem(offset=FAR)
    runs = {}
    for screen in (None, "auto"):
        evaluates = toy.stage_evaluates("A & B", screened=True, noise=0.0)
        runs[screen] = sample_s2m(evaluates, StandardNormal((2,)), 4_000, generator=gen(3), refit="off", screen=screen)
    auto = runs["auto"].stats
    assert auto.screen["step"] == 1 and auto.screen["chosen"] == "auto" and auto.screen["predicted_cost"] < 0.5
    assert auto.unet_calls < 0.5 * runs[None].stats.unet_calls
    p_values = slot_p_values(toy, "A & B", runs["auto"])
    assert min(p_values) > ALPHA / len(p_values)
    assert auto.screen["agreement"] > 0.99  # the surrogate ranks the pilot's on-target draws as the true weight does


def test_auto_is_a_no_op_without_steps_and_a_given_step_is_checked():
    toy = ToyProblem(offset=FAR)
    plain = toy.stage_evaluates("A & B")  # no steps (a GAN): "auto" samples as without
    a = sample_s2m(plain, StandardNormal((2,)), 200, generator=gen(0), refit="off", screen="auto")
    b = sample_s2m(plain, StandardNormal((2,)), 200, generator=gen(0), refit="off")
    assert torch.equal(a.x, b.x) and a.stats.screen == {} and a.stats.unet_calls == 0
    with pytest.raises(ValueError, match="cannot be stopped after a denoising step"):
        sample_s2m(plain, StandardNormal((2,)), 10, generator=gen(0), refit="off", screen=3)
    screened = toy.stage_evaluates("A & B", screened=True)
    with pytest.raises(ValueError, match="must be below the proposal's 10 denoising steps"):
        sample_s2m(screened, StandardNormal((2,)), 10, generator=gen(0), refit="off", screen=10)
    with pytest.raises(ValueError, match="screen must be None"):
        S2MSamplingConfig(screen=0)
    assert S2MSamplingConfig(screen="off").screen is None


def test_fit_pilot_carries_the_surrogate_and_saved_fits_keep_it(tmp_path):
    from s2m_diffusers.sampling import load_fits, save_fits

    toy = ToyProblem(offset=FAR)
    evaluates = toy.stage_evaluates("A & B", screened=True)
    fit = fit_latent(evaluates, StandardNormal((2,)), refit="once", screen="auto", fit_size=64, generator=gen(0))
    assert fit.pilot_log_surrogates.shape == (fit.pilot_log_ratios.numel(), len(fit.pilot_screen_steps))
    save_fits({"k": fit}, tmp_path)
    back = load_fits(tmp_path)["k"]
    assert torch.equal(back.pilot_log_surrogates, fit.pilot_log_surrogates)
    assert back.pilot_screen_steps == fit.pilot_screen_steps


# ---------------------------------------------------------------------------------------------------------------
# The real tiny DDIM proposal


def test_ddim_start_then_finish_is_generate():
    proposal = DDIMProposal(tiny_unet(), DDPMScheduler(num_train_timesteps=100), 4, micro_batch_size=3)
    z = proposal.p_z().sample(5, gen(0))
    states, views = proposal.start(z, None, 2)
    assert states.shape == views.shape == (5, 1, 8, 8) and float(views.abs().max()) <= 1.0
    keep = torch.tensor([0, 3, 4])
    assert torch.allclose(proposal.finish(states[keep], None, 2), proposal.generate(z)[keep], atol=1e-5)
    images, seen = proposal.generate_views(z, None, [1, 3])
    assert torch.allclose(images, proposal.generate(z), atol=1e-6) and set(seen) == {1, 3}
    with pytest.raises(ValueError, match="1..3"):
        proposal.start(z, None, 4)


def tiny_pipeline() -> S2MPipeline:
    """A 4-step DDIM proposal around a tiny untrained UNet, with untrained heads made selective on its images."""
    unet = tiny_unet()
    torch.manual_seed(1)
    heads = S2MHeads(["A", "B", "C"], sample_size=8, in_channels=1, cnn_channels=(4, 8))
    pipe = S2MPipeline(heads=heads, unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100), num_inference_steps=4)
    pipe.set_progress_bar_config(disable=True)
    proposal = pipe.get_proposal()
    spread_heads(heads, proposal.generate(proposal.p_z().sample(128, gen(1))), scale=6.0)
    return pipe


def test_screened_pipeline_returns_on_target_images_and_counts_unet_calls():
    pipe = tiny_pipeline()
    unet, proposal = pipe.unet, pipe.get_proposal()
    calls = []
    hook = unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        settings = dict(refit="off", pilot_size=64, mixing_tolerance=None, steps_after_entry=20, samples_per_chain=4)
        out = pipe(
            "A & B", num_images=8, generator=gen(0), output_type="pt", screen=2, negation_margin=1.0, **settings
        )
    finally:
        hook.remove()
    stats = out.stats
    assert out.images.shape == (8, 1, 8, 8) and bool(out.on_target.all())
    assert stats["screen"]["step"] == 2 and stats["screen"]["num_steps"] == 4
    assert 0 < stats["screen"]["screened_out_share"] < 1
    assert stats["unet_calls"] == sum(calls) < 4 * stats["proposals"]  # screened-out proposals stopped after 2 steps
    assert stats["unet_calls_per_image"] == pytest.approx(sum(calls) / 8)
    # the returned images are what the UNet makes of their latents, to the end
    assert torch.allclose(out.images * 2 - 1, proposal.generate(out.latents), atol=1e-5)
    # the fit depends on the screen (its draws are screened, its candidates weighed by the screened cost): a call with
    # other screen settings fits anew, one with the same reuses the fit
    fit = dict(refit="off", pilot_size=16, negation_margin=1.0)  # with a tolerance: the prior's pilot is drawn
    pipe.fits.clear()
    for screen, min_finish in ((2, 0.2), (2, 0.2), (2, 0.5), (None, 0.2)):
        pipe.fit("A & B", screen=screen, screen_min_finish=min_finish, **fit)
    assert len(pipe.fits) == 3


# ---------------------------------------------------------------------------------------------------------------
# A wrapped diffusers pipeline (`PipelineProposal`): watched through its step callback, stopped, rerun whole


def _unet_counter(unet, calls: list):
    """A forward hook that records each UNet call's batch size."""
    return unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))


def test_a_wrapped_pipeline_is_stopped_after_a_step_and_rerun_whole(tmp_path):
    from test_proposals import tiny_sd_pipeline

    sd = tiny_sd_pipeline(tmp_path)
    proposal = PipelineProposal(sd, pipeline_kwargs={"prompt": "a cat"}, num_inference_steps=4, micro_batch_size=3)
    assert proposal.screen_unavailable is None and proposal.screen_restarts
    z = proposal.p_z().sample(5, gen(0))
    calls = []
    hook = _unet_counter(sd.unet, calls)
    try:
        images = proposal.generate(z)
        per_latent = sum(calls) / (4 * 5)  # UNet batch rows per latent and step (2 with classifier-free guidance)
        x, views = proposal.generate_views(z, None, [1, 2])
        calls.clear()
        states, view = proposal.start(z, None, 1)
        assert sum(calls) == per_latent * 5  # stopped after one step
        calls.clear()
        keep = torch.tensor([0, 3])
        finished, later = proposal.finish(states[keep], None, 1, [2])
        assert sum(calls) == per_latent * 2 * 4  # rerun whole
    finally:
        hook.remove()
    assert torch.equal(x, images) and torch.allclose(finished, images[keep], atol=1e-5)
    assert view.shape == images.shape and torch.allclose(view, views[1], atol=1e-5)
    assert torch.allclose(later[2], views[2][keep], atol=1e-5)
    # the predicted clean latents after the last step, decoded by the adapter, are the pipeline's own images
    assert not torch.allclose(views[1], images, atol=1e-2)
    assert "step" not in vars(sd.scheduler)  # the scheduler is left as it was
    with pytest.raises(ValueError, match="1..3"):
        proposal.start(z, None, 4)
    # a multistep solver gives no predicted clean image part-way: refused with the reason, and a given step says it
    sd.scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    solver = PipelineProposal(sd, pipeline_kwargs={"prompt": "a cat"}, num_inference_steps=4)
    assert "DPMSolverMultistepScheduler" in solver.screen_unavailable
    assert "pred_original_sample" in solver.screen_unavailable


def test_a_pixel_unet_wrapped_as_a_pipeline_screens_as_its_ddim_proposal():
    """The benchmarks' wrapped path (`testing.pipelines.LatentsDDIMPipeline`): the same images and views as the UNet
    as a `DDIMProposal`, only rerun whole after the screen."""
    from diffusers import DDIMScheduler

    from s2m_diffusers.testing.pipelines import LatentsDDIMPipeline

    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=100)
    ddim = DDIMProposal(unet, scheduler, 4, micro_batch_size=3)
    wrapped = PipelineProposal(LatentsDDIMPipeline(unet, DDIMScheduler.from_config(scheduler.config)), None, None, 4)
    assert wrapped.latent_shape == ddim.latent_shape and wrapped.screen_unavailable is None
    z = ddim.p_z().sample(5, gen(0))
    assert torch.allclose(wrapped.generate(z), ddim.generate(z), atol=1e-5)
    assert torch.allclose(wrapped.start(z, None, 2)[1], ddim.start(z, None, 2)[1], atol=1e-5)


def test_a_screened_wrapped_pipeline_returns_its_own_images_and_counts_its_unet_calls(tmp_path):
    from test_proposals import tiny_sd_pipeline

    sd = tiny_sd_pipeline(tmp_path)
    torch.manual_seed(1)
    heads = S2MHeads(["A", "B", "C"], sample_size=16, in_channels=1, cnn_channels=(4, 8))
    pipe = S2MPipeline.from_pipe(sd, heads=heads, proposal_kwargs={"prompt": "a cat"}, num_inference_steps=4)
    pipe.set_progress_bar_config(disable=True)
    proposal = pipe.get_proposal()
    spread_heads(heads, proposal.generate(proposal.p_z().sample(64, gen(1))), scale=6.0)
    settings = dict(refit="off", pilot_size=32, mixing_tolerance=None, steps_after_entry=10, samples_per_chain=4)
    settings.update(screen=2, negation_margin=1.0)
    pipe("A & B", num_images=2, generator=gen(0), **{**settings, "screen": None})
    assert not any(pipe._screen_checks.values())  # no screen asked for: the pipeline is not checked for one
    pipe("A & B", num_images=2, generator=gen(0), **settings)  # the pipeline's checks run once
    assert list(pipe._screen_checks.values()) == [{(4, "DDIMScheduler"): None}]
    calls = []
    hook = _unet_counter(sd.unet, calls)
    try:
        out = pipe("A & B", num_images=8, generator=gen(0), output_type="pt", **settings)
    finally:
        hook.remove()
    stats, per_latent = out.stats, 2  # classifier-free guidance: two UNet rows per latent
    assert stats["proposal"] == "pipeline" and bool(out.on_target.all())
    assert stats["screen"]["step"] == 2 and stats["screen"]["restarts"] is True
    assert 0 < stats["screen"]["screened_out_share"] < 1
    screened, finished = stats["screen"]["proposals"], stats["screen"]["finished"]
    # the unscreened calibration pilot's 4 steps each, 2 per screened proposal, and 4 more for each one rerun whole
    expected = 4 * (stats["proposals"] - screened) + 2 * screened + 4 * finished
    assert stats["unet_calls"] == sum(calls) / per_latent == expected
    # the returned images are the pipeline's own for their latents
    reference = sd(
        prompt="a cat", num_images_per_prompt=8, latents=out.latents, output_type="pt", num_inference_steps=4
    )
    assert torch.allclose(out.images, reference.images, atol=1e-4)
    # a scheduler without a predicted clean sample: a given step is refused with the reason, "auto" says why it did not
    sd.scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    with pytest.raises(ValueError, match="screen=2 was asked for, but its scheduler DPMSolverMultistepScheduler"):
        pipe("A & B", num_images=2, generator=gen(0), **settings)
    out = pipe("A & B", num_images=2, generator=gen(0), **{**settings, "screen": "auto"})
    assert out.stats["screen"]["step"] is None and "pred_original_sample" in out.stats["screen"]["reason"]


# ---------------------------------------------------------------------------------------------------------------
# The screened chain's exact distance (`maths.da_imh_distances`), from which its T comes


def _atoms(seed: int, n: int = 60):
    g = gen(seed)
    log_r = torch.randn(n, generator=g) * 1.5
    log_r[torch.rand(n, generator=g) < 0.6] = -math.inf
    noise = torch.randn(n, generator=g)
    log_s = torch.where(torch.isfinite(log_r), 0.5 * log_r + 0.5 * noise, noise)  # positive off the target too
    return log_r, log_s


def test_delayed_acceptance_distance_reduces_to_smith_tierney_for_a_flat_or_exact_surrogate():
    log_r, _ = _atoms(0, 400)
    exact = torch.tensor(imh_distance(log_r, list(range(31))), dtype=torch.float64)
    flat = da_imh_distances(log_r, torch.zeros(400), 30, log_bar=-math.inf)
    same = da_imh_distances(log_r, torch.where(torch.isfinite(log_r), log_r, -5.0), 30, log_bar=-math.inf)
    assert torch.allclose(flat, exact, atol=1e-7) and torch.allclose(same, exact, atol=1e-7)
    with pytest.raises(ValueError, match="positive wherever"):
        da_imh_distances(log_r, torch.full((400,), -math.inf), 3)


def test_delayed_acceptance_distance_is_that_of_the_simulated_chain():
    """100,000 screened chains on the empirical atoms, entered and moved as `sample_imh`'s `_Screen` moves them (stage
    one against the bar before entry, then against the state; stage two on ``r / s``): the law of their states T steps
    after entry is at the computed distance from the target (Monte-Carlo error of the TV estimate ~0.005)."""
    log_r, log_s = _atoms(0)
    n, steps, chains = log_r.numel(), 6, 100_000
    bar = float(torch.logsumexp(log_s, 0) - math.log(n))
    on, rho, g = torch.isfinite(log_r), log_r - log_s, gen(1)
    state, age, found = torch.full((chains,), -1), torch.zeros(chains, dtype=torch.long), []
    for _ in range(300):
        j = torch.randint(0, n, (chains,), generator=g)
        entered = state >= 0
        cur_s = torch.where(entered, log_s[state.clamp(min=0)], torch.tensor(bar, dtype=log_s.dtype))
        cur_rho = torch.where(entered, rho[state.clamp(min=0)], torch.tensor(-math.inf))
        stage1 = torch.rand(chains, generator=g) < torch.clamp(log_s[j] - cur_s, max=0).exp()
        stage2 = torch.rand(chains, generator=g) < torch.clamp(rho[j] - cur_rho, max=0).nan_to_num(nan=0.0).exp()
        moved = stage1 & stage2 & on[j]
        state = torch.where(moved, j, state)
        age = torch.where(entered, age + 1, age)
        due = entered & (age == steps)
        found.append(state[due])
    law = torch.bincount(torch.cat(found), minlength=n).double()
    law = law / law.sum()
    simulated = 0.5 * float((law - torch.softmax(log_r, 0)).abs().sum())
    computed = float(da_imh_distances(log_r, log_s, steps)[steps])
    assert abs(simulated - computed) < 0.01, (simulated, computed)


# ---------------------------------------------------------------------------------------------------------------
# Screening the fit's draws, and a budget that counts a proposal screened out after s of K steps as s / K


def test_weighted_smith_tierney_distance_is_that_of_the_draws_repeated():
    log_r, _ = _atoms(3, 80)
    counts = torch.randint(1, 4, (80,), generator=gen(4))
    steps = [0, 1, 5, 20, 60]
    weighted = imh_distance(log_r, steps, counts.double())
    assert weighted == pytest.approx(imh_distance(log_r.repeat_interleave(counts), steps), abs=1e-12)
    assert imh_steps(log_r, 0.05, weights=counts.double()) == imh_steps(log_r.repeat_interleave(counts), 0.05)


def test_screened_fit_draws_weighted_are_unbiased_and_a_completed_pilot_is_the_unscreened_one():
    toy = ToyProblem(offset=FAR)
    evaluate = toy.stage_evaluates("A & B", screened=True)[-1]
    q = StandardNormal((2,))
    truth = float(torch.isfinite(evaluate(q.sample(200_000, generator=gen(99)))[1]).double().mean())
    stats, shares = SamplerStats(), []
    for seed in range(200):  # Horvitz-Thompson: the weighted on-target share estimates the true one without bias
        drawn = _propose(evaluate, q, 256, gen(seed), stats, screen=(5, 0.2))
        shares.append(float(drawn.log_weight[torch.isfinite(drawn.log_ratio)].exp().sum()) / 256)
        assert float(drawn.log_weight.max()) <= math.log(1 / 0.2) + 1e-9  # the weights stay below 1 / min_finish
    shares = torch.tensor(shares, dtype=torch.float64)
    assert abs(float(shares.mean()) - truth) < 4 * float(shares.std()) / math.sqrt(200)
    assert stats.proposals == 200 * 256 and stats.cost < 0.8 * stats.proposals  # screened out: 5 of 10 steps each
    assert stats.cost == pytest.approx(stats.unet_calls / 10)
    # finishing the screened-out draws gives the unscreened pilot: the same latents, weights and surrogates, in order
    drawn = _propose(evaluate, q, 64, gen(1), SamplerStats(), views=[5, 7], screen=(5, 0.2))
    assert drawn.z.shape[0] < 64
    whole = drawn.pending(SamplerStats())
    z = q.sample(64, generator=gen(1))
    _, log_w, log_w_s = evaluate.views(z, [5, 7])
    assert torch.equal(whole.z, z) and whole.log_weight is None
    assert torch.equal(whole.log_w, log_w.double()) and torch.equal(whole.log_ratio_s, log_w_s.double())


def test_the_fit_screens_its_draws_and_finishes_the_chosen_pilot():
    toy = ToyProblem(offset=FAR)
    evaluates = toy.stage_evaluates("A & B", screened=True)
    fit = fit_latent(evaluates, StandardNormal((2,)), refit="once", screen="auto", fit_size=64, generator=gen(0))
    stage = next(s for s in fit.stats.stages if "stage" in s and "on_target" in s)
    assert stage["screen_step"] == 1 and stage["cost"] < stage["proposals"] and stage["on_target"] >= 64
    chosen = next(s for s in fit.stats.stages if s.get("pilot") == fit.chosen)
    assert chosen["finished"] == chosen["proposals"] == fit.pilot_log_ratios.numel()  # whole: it seeds the bound
    others = [s for s in fit.stats.stages if "pilot" in s and s["pilot"] != fit.chosen]
    assert others and all(s["finished"] < s["proposals"] for s in others)
    assert fit.stats.cost == pytest.approx(sum(e.calls for e in evaluates) / 10)
    assert (
        sum(s.get("unet_calls", 0) for s in fit.stats.stages)
        == fit.stats.unet_calls
        == sum(e.calls for e in evaluates)
    )
    # screen_min_finish=1 finishes every fit draw: no screening of the fit
    whole = fit_latent(
        evaluates, StandardNormal((2,)), refit="once", screen_min_finish=1.0, fit_size=64, generator=gen(0)
    )
    assert whole.stats.cost == whole.stats.proposals and not any("screen_step" in s for s in whole.stats.stages)


@pytest.mark.parametrize("restarts", [False, True])
def test_the_budget_counts_a_screened_out_proposal_as_its_share_of_the_steps(restarts):
    toy = ToyProblem(offset=FAR)
    evaluates = toy.stage_evaluates("A & B", screened=True, restarts=restarts)
    result = sample_s2m(
        evaluates,
        StandardNormal((2,)),
        10_000,
        generator=gen(0),
        refit="off",
        screen=3,
        max_proposals=3000,
        allow_partial=True,
    )
    s = result.stats
    assert s.budget_exhausted and result.num_samples < 10_000
    assert s.unet_calls == sum(e.calls for e in evaluates) and s.cost == pytest.approx(s.unet_calls / 10)
    # more proposals than the budget: those screened out cost 3 / 10 (those rerun whole, restarts, 13 / 10)
    assert 2990 < s.cost <= 3000 < s.proposals
    with pytest.raises(ValueError, match="screen_min_finish"):
        S2MSamplingConfig(screen_min_finish=0.0)


def test_a_screened_pilot_predicts_the_chains_cost_as_its_draws_repeated_would():
    """`calibrate_screen` on a screened pilot (finished draws weighted by their inverse finishing probability, as the
    fit measures its candidates): a chain's predicted UNet calls, screened or not, equal those of the draws repeated
    as often as their weights say."""
    log_r, log_s = _atoms(5, 80)
    counts = torch.randint(1, 4, (80,), generator=gen(6))
    config = S2MSamplingConfig()
    for surrogate, step in ((None, 0), (torch.clamp(log_s, min=-1.0), 3)):
        weighted = _chain_cost(log_r, surrogate, step, 10, config, counts.double().log())
        rep = None if surrogate is None else surrogate.repeat_interleave(counts)
        repeated = _chain_cost(log_r.repeat_interleave(counts), rep, step, 10, config)
        assert weighted[1] == repeated[1] and weighted[0] == pytest.approx(repeated[0], rel=1e-9)
    unweighted = calibrate_screen(log_r, log_s[:, None], [3], 10, config)
    assert calibrate_screen(log_r, log_s[:, None], [3], 10, config, torch.zeros(80)) == unweighted


def test_a_screened_fit_counts_its_candidates_and_its_spend_in_screened_cost():
    """Where the sampler screens, the fit predicts each candidate's cost per sample as the budget counts it (its
    proposals times the share the screen leaves), chooses by that, and spends at most ``n * (c - 1)`` of it beyond
    the prior's pilot, ``c`` the prior's screened cost per sample: a cheap screened prior leaves a fit less to buy."""
    toy = ToyProblem(offset=FAR)
    evaluates = toy.stage_evaluates("A & B & ~C", screened=True)
    fit = fit_latent(evaluates, StandardNormal((2,)), num_samples=32, screen="auto", generator=gen(0))
    pilots = [s for s in fit.stats.stages if "pilot" in s]
    for pilot in pilots:
        share = pilot["screen_predicted_share"]
        assert 0 < share <= 1
        assert pilot["predicted_cost_per_sample"] == pytest.approx(pilot["predicted_proposals_per_sample"] * share)
    assert pilots[0]["screen_predicted_share"] < 0.9  # the screen saves on this target: the prior is cheaper
    best = min(pilots, key=lambda s: s["predicted_cost_per_sample"])
    assert fit.chosen == best["pilot"]
    limit = 32 * (pilots[0]["predicted_cost_per_sample"] - 1)
    completed = sum(s.get("completed_cost", 0) for s in fit.stats.stages)
    assert fit.stats.cost - pilots[0]["cost"] - completed <= limit
    unscreened = fit_latent(evaluates, StandardNormal((2,)), num_samples=32, screen=None, generator=gen(0))
    assert fit.stats.cost < unscreened.stats.cost
