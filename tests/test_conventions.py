"""diffusers' pipeline conventions on S2MPipeline (issue 16, item 2): layerwise casting and group offloading of every
model, `save_pretrained(safe_serialization=False)`, and the callback contract (only the requested tensors, the
returned dict, `interrupt`, `num_timesteps`). Tiny models: seconds."""

import math
import os

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.hooks import apply_layerwise_casting
from test_pipeline import (
    FAST,
    NAMES,
    ExactHeads,
    QuadrantGenerator,
    gan_pipeline,
    quadrant_attributes,
    seeded,
    tiny_unet,
)
from torch import nn

from s2m_diffusers.models.heads import S2MHeads
from s2m_diffusers.pipeline_s2m import S2MPipeline
from s2m_diffusers.proposals import GeneratorProposal
from s2m_diffusers.utils import module_device_dtype

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a few images: the diagnostics may warn
CASTING = {"storage_dtype": torch.float8_e4m3fn, "compute_dtype": torch.bfloat16}


def ddim_pipeline() -> S2MPipeline:
    torch.manual_seed(1)
    heads = S2MHeads(NAMES, sample_size=8, in_channels=1, cnn_channels=(4, 8), label_counts=[10, 20, 30])
    scheduler = DDIMScheduler(num_train_timesteps=100)
    pipe = S2MPipeline(heads=heads, unet=tiny_unet(), scheduler=scheduler, num_inference_steps=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def exact_pipeline() -> S2MPipeline:
    """Exact heads on a generator whose images hold one attribute set each (`test_pipeline.quadrant_attributes`)."""
    pipe = S2MPipeline(heads=ExactHeads(), gan=QuadrantGenerator())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, target="A", num_images=4, **kwargs):
    return pipe(target, num_images=num_images, generator=seeded(), output_type="pt", **{**FAST, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# Layerwise casting and group offloading


@pytest.mark.parametrize("make", [gan_pipeline, ddim_pipeline], ids=["gan", "ddim"])
def test_layerwise_casting_of_the_proposal_and_the_heads(make):
    pipe = make()
    reference = sample(pipe)
    for model in (pipe.gan, pipe.unet, pipe.heads):
        if model is not None:
            model.enable_layerwise_casting(**CASTING)
            assert model.dtype == torch.bfloat16 and module_device_dtype(model)[1] == torch.bfloat16
    stored = {p.dtype for p in pipe.heads.parameters()}
    assert torch.float8_e4m3fn in stored  # stored in float8, computed in bfloat16
    out = sample(pipe)
    assert out.images.shape == reference.images.shape and torch.isfinite(out.images).all()
    assert out.on_target.all()


def test_layerwise_casting_of_a_plain_torch_module_uses_its_compute_dtype():
    """A generator that is not a diffusers ModelMixin: the dtype comes from the casting hook, not its first weight."""
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8))).eval()
    apply_layerwise_casting(generator, skip_modules_classes=(), **CASTING)
    assert next(generator.parameters()).dtype == torch.float8_e4m3fn
    assert module_device_dtype(generator) == (torch.device("cpu"), torch.bfloat16)
    proposal = GeneratorProposal(generator, latent_shape=(4,))
    images = proposal.generate(torch.randn(3, 4, generator=seeded()), None)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_gives_the_same_images(offload_type):
    reference = sample(gan_pipeline())
    pipe = gan_pipeline()
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    for model in (pipe.gan, pipe.heads):
        model.enable_group_offload(torch.device("cpu"), offload_type=offload_type, **kwargs)
    assert module_device_dtype(pipe.gan) == (torch.device("cpu"), torch.float32)
    out = sample(pipe)
    assert torch.equal(out.latents, reference.latents) and torch.allclose(out.images, reference.images)


# ---------------------------------------------------------------------------------------------------------------
# save_pretrained(safe_serialization=False)


def test_safe_serialization_false_saves_safetensors_with_a_warning(tmp_path):
    pipe = gan_pipeline()
    with pytest.warns(UserWarning, match="written as safetensors anyway"):
        pipe.save_pretrained(tmp_path / "s2m", safe_serialization=False)
    files = [os.path.join(root, f) for root, _, names in os.walk(tmp_path / "s2m") for f in names]
    assert any(f.endswith(".safetensors") for f in files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    loaded = S2MPipeline.from_pretrained(tmp_path / "s2m")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(sample(loaded).latents, sample(pipe).latents)


# ---------------------------------------------------------------------------------------------------------------
# Callbacks: only the requested tensors, the returned dict, interrupt, num_timesteps


@pytest.mark.parametrize(
    "requested", [None, ["latents"], ["log_w"], ["images", "log_w"], ["latents", "images", "log_w"]]
)
def test_callback_kwargs_hold_exactly_the_requested_tensors(requested):
    pipe = gan_pipeline()
    seen, phases = set(), []

    def callback(p, step, timestep, callback_kwargs):
        seen.update(callback_kwargs)
        phases.append(timestep)
        assert all(isinstance(v, torch.Tensor) for v in callback_kwargs.values())
        return callback_kwargs  # diffusers' habit: unchanged tensors are accepted

    sample(pipe, "A & ~B", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=requested)
    assert seen == set(requested or ["latents"])
    assert pipe.num_timesteps == 3  # the entry pool, the burn-in, the sampling
    assert set(phases) == set(range(pipe.num_timesteps)) and phases == sorted(phases)


def test_returned_log_w_is_used_in_every_phase():
    """Vetoing (log w = -inf) the images that hold B turns the target "A" into "A & ~B": in the entry pool (the chains
    start from its draws on the target), the burn-in and the sampling alike."""
    pipe = exact_pipeline()
    plain = sample(pipe, "A", num_images=16)
    assert quadrant_attributes(plain.images * 2 - 1)[:, 1].any()  # without the veto, some images hold B
    phases = []

    def veto_b(p, step, timestep, kw):
        phases.append(timestep)
        holds_b = quadrant_attributes(kw["images"])[:, 1].to(kw["log_w"].device)
        return {"log_w": torch.where(holds_b, -math.inf, kw["log_w"])}

    out = sample(
        pipe, "A", num_images=16, callback_on_step_end=veto_b, callback_on_step_end_tensor_inputs=["images", "log_w"]
    )
    present = quadrant_attributes(out.images * 2 - 1)
    assert len(out.images) == 16 and present[:, 0].all() and not present[:, 1].any()
    assert set(phases) == {0, 1, 2}
    pool, vetoed_pool = plain.stats["chains"]["pool"], out.stats["chains"]["pool"]
    assert vetoed_pool["on_target"] < pool["on_target"]  # the pool saw the veto too


def test_changed_latents_or_images_are_refused_with_the_reason():
    pipe = gan_pipeline()

    def zero_latents(p, step, timestep, kw):
        kw["latents"] = torch.zeros_like(kw["latents"])
        return kw

    with pytest.raises(ValueError, match="only 'log_w' can be changed"):
        sample(pipe, callback_on_step_end=zero_latents)
    with pytest.raises(ValueError, match="must have shape"):
        sample(pipe, callback_on_step_end=lambda p, s, t, kw: {"log_w": torch.zeros(1)})
    out = sample(pipe, callback_on_step_end=lambda p, s, t, kw: None)  # None: nothing changed
    assert len(out.images) == 4 and out.stats["interrupted"] is False


def test_interrupt_in_the_sampling_returns_the_images_finished():
    pipe = exact_pipeline()
    settings = {"presence_margin": 0.5}  # exact: -inf off the target
    rounds = []

    def stop_after_five(p, step, timestep, kw):
        if timestep == p.num_timesteps - 1:
            rounds.append(step)
            if len(rounds) == 5:
                p.interrupt = True
        return kw

    out = sample(pipe, "A", num_images=40, num_chains=4, callback_on_step_end=stop_after_five, **settings)
    assert len(rounds) == 5  # no round after the interrupt
    assert 0 < len(out.images) < 40 and out.on_target.all() and out.stats["interrupted"] is True
    assert len(out.images) % 4 == 0  # every chain returns its image at the same steps
    assert quadrant_attributes(out.images * 2 - 1)[:, 0].all()
    again = sample(pipe, "A", num_images=40, num_chains=4, **settings)  # the next call starts uninterrupted
    assert len(again.images) == 40 and again.stats["interrupted"] is False


@pytest.mark.parametrize("phase", [0, 1], ids=["pool", "burn_in"])
def test_interrupt_before_the_sampling_returns_no_image(phase):
    pipe = exact_pipeline()

    def stop(p, step, timestep, kw):
        if timestep == phase:
            p._interrupt = True  # diffusers' spelling works too
        return kw

    out = sample(pipe, "A & ~B", num_images=3, callback_on_step_end=stop)
    assert len(out.images) == 0 and out.stats["interrupted"] is True and out.stats["num_images"] == 0
    again = sample(pipe, "A & ~B", num_images=3)
    assert len(again.images) == 3 and again.stats["interrupted"] is False
