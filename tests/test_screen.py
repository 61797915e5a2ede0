"""Screening diffusion proposals on their predicted clean image by delayed acceptance (`S2MSamplingConfig.screen`).

The analytic toy (`s2m_diffusers.testing.toy`) gains a generator with an intermediate view: after ``s`` of its K
"denoising" steps the view is the final sample plus a fixed, latent-determined perturbation of scale
``noise (1 - s / K)``, standing in for a diffusion model's predicted clean image, and the exact heads judge it with the
soft margins (the surrogate is 0 wherever the view is off target). With the screen on (the chains' local moves and
jumps screened, the entry pool screened by Poisson sampling), the images pass the exactness test of
`tests/test_exactness.py` (independent calls, Hotelling's statistic), since delayed acceptance leaves the target
unchanged whatever the surrogate once the sampler floors it. The full matrix is marked slow.
"""

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from test_pipeline import spread_heads, tiny_unet

from s2m_diffusers.densities import StandardNormal
from s2m_diffusers.models.heads import S2MHeads
from s2m_diffusers.pipeline_s2m import S2MPipeline
from s2m_diffusers.proposals import DDIMProposal, PipelineProposal
from s2m_diffusers.sampling import S2MSamplingConfig, sample_s2m
from s2m_diffusers.testing.toy import ToyProblem, calls_test

ALPHA = 1e-3
FAR = (-0.8, -0.8)
RUNS, N = 60, 50
DEFAULT_CASES = {("A & B", 3, False), ("A & ~B", 3, True)}
CASES = [
    (target, step, restarts)
    for target in ("A & B", "A & ~B", "~A", "B & ~A & ~C")
    for step in (3, 5)
    for restarts in (False, True)
]

pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a call's own diagnostics may warn on 50 images


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cases():
    for case in CASES:
        marks = [] if case in DEFAULT_CASES else [pytest.mark.slow]
        restarts = "-restarts" if case[2] else ""
        yield pytest.param(*case, marks=marks, id=f"{case[0]}-screen{case[1]}{restarts}")


@pytest.mark.parametrize("target, step, restarts", list(_cases()))
def test_screened_sampler_is_exact(target, step, restarts):
    """With ``restarts`` a proposal that passes the screen is rerun whole (a wrapped pipeline): the same chain, more
    steps counted."""
    toy = ToyProblem(offset=FAR)
    evaluate = toy.screened_evaluate_fn(target, restarts=restarts)
    p, results = calls_test(toy, target, evaluate, StandardNormal((2,)), RUNS, N, screen=step)
    screen = results[0].stats.screen
    assert screen["step"] == step and screen["screened_out_share"] > 0 and screen["restarts"] is restarts
    assert screen["pool_finished"] < screen["pool_drawn"]  # the pool was screened too
    assert p > ALPHA, (p, screen)
    # every step the toy ran is counted: s per proposal, K - s (restarts: K) more per proposal that passed the screen
    assert sum(r.stats.unet_calls for r in results) == evaluate.calls


@pytest.mark.slow  # the default run keeps test_screened_sampler_is_exact
def test_a_faithful_surrogate_saves_calls_at_the_same_exactness():
    """A view without perturbation (the surrogate is the true weight up to its margins): "auto" screens after one
    step of ten and keeps screening, and the images are as exact as without the screen, for fewer steps."""
    toy = ToyProblem(offset=FAR)
    calls = {}
    for screen in (None, "auto"):
        evaluate = toy.screened_evaluate_fn("A & B", noise=0.0)
        p, results = calls_test(toy, "A & B", evaluate, StandardNormal((2,)), RUNS, N, screen=screen)
        assert p > ALPHA, screen
        calls[screen] = evaluate.calls
    screen = results[0].stats.screen
    assert screen["step"] == 1 and screen["chosen"] == "auto" and screen["active_after_burn_in"]
    assert calls["auto"] < 0.8 * calls[None]


def test_auto_is_a_no_op_without_steps_and_a_given_step_is_checked():
    toy = ToyProblem(offset=FAR)
    plain = toy.evaluate_fn("A & B")  # no steps (a GAN): "auto" samples as without
    a = sample_s2m(plain, StandardNormal((2,)), 200, generator=gen(0), screen="auto")
    b = sample_s2m(plain, StandardNormal((2,)), 200, generator=gen(0), screen=None)
    assert torch.equal(a.x, b.x) and a.stats.screen == {} and a.stats.unet_calls == 0
    with pytest.raises(ValueError, match="cannot be stopped after a denoising step"):
        sample_s2m(plain, StandardNormal((2,)), 10, generator=gen(0), screen=3)
    screened = toy.screened_evaluate_fn("A & B")
    with pytest.raises(ValueError, match="must be below the proposal's 10 denoising steps"):
        sample_s2m(screened, StandardNormal((2,)), 10, generator=gen(0), screen=10)
    with pytest.raises(ValueError, match="screen must be None"):
        S2MSamplingConfig(screen=0)
    assert S2MSamplingConfig(screen="off").screen is None


@pytest.mark.parametrize("restarts", [False, True])
def test_the_budget_counts_a_screened_out_proposal_as_its_share_of_the_steps(restarts):
    toy = ToyProblem(offset=FAR)
    evaluate = toy.screened_evaluate_fn("A & B", restarts=restarts)
    result = sample_s2m(
        evaluate, StandardNormal((2,)), 1000, generator=gen(0), screen=3, max_proposals=3000, allow_partial=True
    )
    s = result.stats
    assert s.budget_exhausted and result.num_samples < 1000
    assert s.unet_calls == evaluate.calls and s.cost == pytest.approx(s.unet_calls / 10)
    # those screened out cost 3 / 10 (those rerun whole, restarts, 13 / 10): without restarts, more proposals than the
    # budget; a round of the 250 chains runs only where the budget holds it whole at the most it can cost
    assert 3000 - 250 * 1.3 < s.cost <= 3000
    assert 3000 < s.proposals if not restarts else s.proposals != pytest.approx(s.cost)
    with pytest.raises(ValueError, match="screen_min_finish"):
        S2MSamplingConfig(screen_min_finish=0.0)


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


def test_the_diagnostics_see_every_state_of_a_screened_chain(monkeypatch):
    """A screened move writes the chains' states in place: the readings the diagnostics see are each step's, not the
    last step's repeated (each chain's readings change where its log w does)."""
    import s2m_diffusers.chains as chains

    seen = {}

    def spy(traces, *args, **kwargs):
        seen.update(traces)
        return diagnose(traces, *args, **kwargs)

    diagnose = chains.chain_diagnostics
    monkeypatch.setattr("s2m_diffusers.sampling.chain_diagnostics", spy)
    tiny_pipeline()("A & B", num_images=16, generator=gen(0), output_type="pt", screen=2, negation_margin=1.0)
    log_w, readings = seen["log_w"], seen["readings"]
    moved = (log_w[:, 1:] != log_w[:, :-1]).any(dim=1)
    changed = (readings[:, 1:] != readings[:, :-1]).any(dim=2).any(dim=1)
    assert bool(moved.any()) and torch.equal(moved, changed)


def test_screened_pipeline_returns_on_target_images_and_counts_unet_calls():
    pipe = tiny_pipeline()
    unet, proposal = pipe.unet, pipe.get_proposal()
    calls = []
    hook = unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        settings = dict(pool_size=32, burn_in=6)
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
    # 2 steps per proposal (pool and chains), 2 more for each one finished
    screen = stats["screen"]
    assert sum(calls) == 2 * stats["proposals"] + 2 * (screen["pool_finished"] + screen["passed"])
    assert stats["unet_calls_per_image"] == pytest.approx(sum(calls) / 8)
    # the returned images are what the UNet makes of their latents, to the end
    assert torch.allclose(out.images * 2 - 1, proposal.generate(out.latents), atol=1e-5)


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
    settings = dict(pool_size=16, burn_in=4, screen=2, negation_margin=1.0)
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
    finished = stats["screen"]["pool_finished"] + stats["screen"]["passed"]
    # 2 steps per proposal (the pool's and the chains'), and 4 more for each one rerun whole
    expected = 2 * stats["proposals"] + 4 * finished
    assert stats["unet_calls"] == sum(calls) / per_latent == expected
    # the returned images are the pipeline's own for their latents
    reference = sd(
        prompt="a cat", num_images_per_prompt=8, latents=out.latents, output_type="pt", num_inference_steps=4
    )
    assert torch.allclose(out.images, reference.images, atol=1e-4)
    # "auto" does not screen a pipeline that reruns what passes, and says why, without checking the pipeline again
    checks = dict(pipe._screen_checks)
    out = pipe("A & B", num_images=2, generator=gen(0), **{**settings, "screen": "auto"})
    assert out.stats["screen"]["step"] is None and "reruns a latent" in out.stats["screen"]["reason"]
    assert pipe._screen_checks == checks
    # a scheduler without a predicted clean sample: a given step is refused with the reason
    sd.scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    with pytest.raises(ValueError, match="screen=2 was asked for, but its scheduler DPMSolverMultistepScheduler"):
        pipe("A & B", num_images=2, generator=gen(0), **settings)
