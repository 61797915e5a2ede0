"""S2MPipeline end to end on tiny models built from configs: every proposal kind, outputs, statistics, errors,
reproducibility, from_pipe, and save / load (in this process and in a fresh one)."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from s2m_diffusers.data import prepare_images
from s2m_diffusers.models.gan import DCGANGenerator
from s2m_diffusers.models.heads import S2MHeads, S2MHeadsOutput
from s2m_diffusers.pipeline_s2m import S2MPipeline, S2MPipelineOutput
from s2m_diffusers.proposals import GeneratorProposal, execution_device
from s2m_diffusers.sampling import BudgetExhaustedError
from s2m_diffusers.targets import TargetError

torch.set_num_threads(1)
NAMES = ["A", "B", "C"]
# A small entry pool and a short burn-in: these tests are about the pipeline, not the chains' statistics.
FAST = {"pool_size": 16, "burn_in": 2}
pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a few images: the diagnostics may warn


def spread_heads(heads: S2MHeads, images: torch.Tensor, scale: float = 3.0) -> S2MHeads:
    """Make untrained heads selective: centre and scale D_r's logits on these images, so that every attribute wins
    on a share of them (an untrained D_r is nearly constant)."""
    with torch.no_grad():
        logits = heads.dr_head(heads.backbones["dr"](images))
        std = logits.std(0).clamp_min(1e-8)
        heads.dr_head.weight.mul_(scale / std[:, None])
        heads.dr_head.bias.copy_(-logits.mean(0) * scale / std)
    return heads.eval()


def dcgan(num_classes=None) -> DCGANGenerator:
    torch.manual_seed(0)
    return DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=4, num_classes=num_classes).eval()


def gan_pipeline(conditional=False, **config) -> S2MPipeline:
    gan = dcgan(num_classes=3 if conditional else None)
    torch.manual_seed(1)
    heads = S2MHeads(
        NAMES, sample_size=8, in_channels=1, cnn_channels=(4, 8), label_counts=[10, 20, 30], conditional=conditional
    )
    proposal = GeneratorProposal(gan)
    labels = torch.arange(256) % 3 if conditional else None
    spread_heads(heads, proposal.generate(proposal.p_z().sample(256, torch.Generator().manual_seed(1)), labels))
    pipe = S2MPipeline(heads=heads, gan=gan, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    )


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# An analytic world: a generator whose images are a smooth map of the latent, and exact heads for three attributes
# read off the image (A: left half bright, B: top half bright, C: not both). Every image holds one attribute set.


class QuadrantGenerator(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, latent_dim: int = 4, sample_size: int = 8, out_channels: int = 1):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, latents):
        q = torch.tanh(self.scale * latents.view(-1, 1, 2, 2))  # (B, 1, 2, 2)
        return q.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # (B, 1, 8, 8)


def quadrant_attributes(images: torch.Tensor) -> torch.Tensor:
    left = images[..., :, :4].mean((1, 2, 3)) > 0
    top = images[..., :4, :].mean((1, 2, 3)) > 0
    return torch.stack([left, top, ~(left & top)], 1)


class ExactHeads(ModelMixin, ConfigMixin):
    """Heads with the S2MHeads contract whose D_r is exact for `quadrant_attributes` (gamma_c = 1)."""

    @register_to_config
    def __init__(
        self,
        attribute_names=("A", "B", "C"),
        sample_size: int = 8,
        in_channels: int = 1,
        label_counts=None,
        priors=None,
        negation_margin: float = 10.0,
        conditional: bool = False,
        proposal_class_probs=None,
    ):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        present = quadrant_attributes(images)
        dr = torch.log_softmax(torch.where(present, 0.0, -40.0), 1)
        return S2MHeadsOutput(dv_logit=torch.zeros(images.shape[0]), dr_log_probs=dr, df_log_probs=None)


def test_tempered_dr_keeps_exact_heads_on_target_and_bad_temperatures_are_refused():
    pipe = S2MPipeline(heads=ExactHeads(), gan=QuadrantGenerator())
    pipe.set_progress_bar_config(disable=True)
    for temperature in ("auto", 0.5):
        out = pipe("A & B", num_images=8, generator=seeded(), output_type="pt", dr_temperature=temperature, **FAST)
        present = quadrant_attributes(out.images * 2 - 1)
        assert (present[:, 0] & present[:, 1]).all(), temperature
    for bad in (0, -1.0, "sharp", True):
        with pytest.raises(ValueError, match="dr_temperature"):
            pipe("A & B", num_images=1, generator=seeded(), dr_temperature=bad, **FAST)


# ---------------------------------------------------------------------------------------------------------------
# Every proposal kind, end to end


@pytest.mark.parametrize("kernel", ["pcn", "mala", "independent"])
def test_gan_end_to_end_and_the_statistics_add_up(kernel):
    pipe = gan_pipeline()
    kwargs = dict(kernel=kernel, negation_margin=1.0, **FAST)
    out = pipe("A & ~B", num_images=5, generator=seeded(), **kwargs)
    assert isinstance(out, S2MPipelineOutput)
    assert len(out.images) == 5 and out.latents.shape == (5, 8) and out.on_target.all()
    s = out.stats
    assert s["proposals_per_image"] * s["num_images"] == pytest.approx(s["proposals"], rel=1e-12)
    assert s["num_images"] == 5 and s["on_target_images"] == 5 and s["kernel"] == kernel
    assert 0 < s["acceptance_rate"] <= 1 and s["accepted"] <= s["proposals"]
    assert s["seconds_generator"] > 0 and s["seconds_heads"] > 0 and s["seconds_sampler"] >= 0
    assert s["seconds_generator"] + s["seconds_heads"] + s["seconds_sampler"] == pytest.approx(s["seconds_total"])
    assert s["unet_calls"] is None and s["budget_spent"] == s["proposals"] and not s["budget_exhausted"]
    # the pool, the burn-in (MALA first weighs the starting points with their gradients), then the sampling steps
    chains = s["chains"]
    c, per_chain, thinning = chains["num_chains"], chains["samples_per_chain"], chains["thinning"]
    assert chains["kernel"] == kernel and c == 2 and per_chain == 3 and chains["pool"]["proposals"] == 16
    assert 1 <= chains["distinct_starts"] <= c
    assert chains["moves"] == c * (per_chain - 1) * thinning and s["accepted"] <= chains["moves"]
    starts = c if kernel == "mala" else 0
    assert s["proposals"] == chains["pool"]["proposals"] + starts + c * FAST["burn_in"] + chains["moves"]
    assert (chains["jump_share"] == 1.0) == (kernel == "independent")  # local moves, with a few jumps
    d = s["diagnostics"]
    assert {"split_rhat", "ess_bulk", "nested_rhat", "reading_check", "warnings"} <= set(d)
    assert set(d["split_rhat"]) == {"log_w", "ratio[A]", "ratio[B]", "ratio[C]"} and s["warnings"] == d["warnings"]
    # the images are the generator's images of the returned latents
    again = pipe.get_proposal().generate(out.latents)
    pt = pipe("A & ~B", num_images=5, generator=seeded(), output_type="pt", **kwargs)
    assert torch.allclose(pt.images, (again / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_diagnostic_warnings_reach_the_caller_and_the_stats(monkeypatch):
    import s2m_diffusers.sampling as sampling

    real = sampling.chain_diagnostics

    def flagged(*args, **kwargs):  # the run's own diagnostics, and one beyond its threshold
        out = real(*args, **kwargs)
        out["warnings"] = [*out["warnings"], "split-R-hat of log_w is 1.500 (> 1.01)"]
        return out

    monkeypatch.setattr(sampling, "chain_diagnostics", flagged)
    pipe = gan_pipeline()
    with pytest.warns(UserWarning, match=r"S2M sampling: split-R-hat of log_w is 1\.500 \(> 1\.01\); see stats"):
        out = pipe("A & ~B", num_images=4, generator=seeded(), negation_margin=1.0, **FAST)
    assert out.stats["warnings"][-1] == "split-R-hat of log_w is 1.500 (> 1.01)"
    assert out.stats["warnings"] == out.stats["diagnostics"]["warnings"]


def test_mala_refuses_a_proposal_without_gradients():
    ddim = S2MPipeline(
        heads=S2MHeads(NAMES, sample_size=8, in_channels=1, cnn_channels=(4, 8)),
        unet=tiny_unet(),
        scheduler=DDPMScheduler(num_train_timesteps=100),
        num_inference_steps=2,
    )
    with pytest.raises(ValueError, match="kernel='mala' needs"):
        ddim("A", num_images=1, generator=seeded(), kernel="mala", **FAST)
    with pytest.raises(ValueError, match="kernel must be one of"):
        ddim("A", kernel="hmc")


def test_mala_with_heads_that_give_no_gradient_moves_without_one_or_says_why():
    """ExactHeads read thresholds of the image: log w has no gradient (it is 0 wherever it is finite). MALA is then
    still a valid chain with a zero gradient; what it must not do is fail inside autograd."""
    pipe = S2MPipeline(heads=ExactHeads(), gan=QuadrantGenerator())
    pipe.set_progress_bar_config(disable=True)
    try:
        out = pipe("A & ~B", num_images=2, generator=seeded(), kernel="mala", output_type="pt", **FAST)
    except ValueError as err:
        assert "mala" in str(err) and "differentiable" in str(err)
    else:
        present = quadrant_attributes(out.images * 2 - 1)
        assert (present[:, 0] & ~present[:, 1]).all() and out.stats["kernel"] == "mala"


def test_returned_images_satisfy_the_target_with_exact_heads():
    pipe = S2MPipeline(heads=ExactHeads(), gan=QuadrantGenerator())
    pipe.set_progress_bar_config(disable=True)
    for target, rule in [
        ("A & ~B", lambda s: s[:, 0] & ~s[:, 1]),
        ("A & B", lambda s: s[:, 0] & s[:, 1]),
        ("B & C & ~A", lambda s: s[:, 1] & s[:, 2] & ~s[:, 0]),
        ("A | B", lambda s: s[:, 0] | s[:, 1]),
    ]:
        out = pipe(target, num_images=16, generator=seeded(), output_type="pt", pool_size=16)
        images = out.images * 2 - 1
        assert rule(quadrant_attributes(images)).all(), target
        assert out.stats["unique_images"] > 8, target
    # without selection about a quarter of the proposals hold `A & ~B`: the sampler is doing the work
    share = pipe.get_proposal().sample(4000, seeded(1)).images
    assert 0.15 < (quadrant_attributes(share)[:, 0] & ~quadrant_attributes(share)[:, 1]).float().mean() < 0.35


def test_ddim_unet_end_to_end():
    unet = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    torch.manual_seed(1)
    heads = S2MHeads(NAMES, sample_size=8, in_channels=1, cnn_channels=(4, 8))
    pipe = S2MPipeline(heads=heads, unet=unet, scheduler=scheduler, num_inference_steps=3)
    pipe.set_progress_bar_config(disable=True)
    proposal = pipe.get_proposal()
    spread_heads(heads, proposal.generate(proposal.p_z().sample(128, seeded(1))))
    out = pipe("A & ~C", num_images=3, generator=seeded(), negation_margin=1.0, output_type="np", **FAST)
    assert out.images.shape == (3, 8, 8, 1) and out.latents.shape == (3, 1, 8, 8) and out.on_target.all()
    assert out.stats["proposal"] == "ddim"
    assert out.stats["proposals_per_image"] * 3 == pytest.approx(out.stats["proposals"])


def test_text_to_image_pipeline_as_proposal_through_from_pipe(tmp_path):
    from test_proposals import tiny_sd_pipeline

    sd = tiny_sd_pipeline(tmp_path)
    torch.manual_seed(1)
    heads = S2MHeads(NAMES, sample_size=16, in_channels=1, cnn_channels=(4, 8))
    pipe = S2MPipeline.from_pipe(sd, heads=heads, proposal_kwargs={"prompt": "a cat"}, num_inference_steps=2)
    pipe.set_progress_bar_config(disable=True)
    # no weights copied: the very same modules
    assert pipe.proposal_pipeline is sd and pipe.proposal_pipeline.unet is sd.unet
    assert pipe.proposal_pipeline.vae.decoder.conv_out.weight.data_ptr() == sd.vae.decoder.conv_out.weight.data_ptr()
    out = pipe("A & B", num_images=2, generator=seeded(), output_type="pt", pool_size=8, burn_in=2)
    assert out.images.shape == (2, 1, 16, 16) and out.latents.shape == (2, 4, 8, 8)
    assert out.stats["proposal"] == "pipeline"
    reference = sd(
        prompt="a cat", num_images_per_prompt=2, latents=out.latents, output_type="pt", num_inference_steps=2
    )
    assert torch.allclose(out.images, reference.images, atol=1e-4)
    # saved with the nested pipeline and loaded back: same images
    pipe.save_pretrained(tmp_path / "s2m")
    loaded = S2MPipeline.from_pretrained(tmp_path / "s2m")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.proposal_kwargs == {"prompt": "a cat"}
    again = loaded("A & B", num_images=2, generator=seeded(), output_type="pt", pool_size=8, burn_in=2)
    assert torch.allclose(again.images, out.images, atol=1e-5)


def test_from_pipe_of_a_pixel_unet_pipeline_uses_its_unet_as_ddim():
    ddpm = DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=100))
    heads = S2MHeads(NAMES, sample_size=8, in_channels=1, cnn_channels=(4, 8))
    pipe = S2MPipeline.from_pipe(ddpm, heads=heads, num_inference_steps=2)
    assert pipe.unet is ddpm.unet and pipe.scheduler is ddpm.scheduler and pipe.proposal_kind == "ddim"
    # from an S2MPipeline: new heads, same generator, same settings
    other = S2MHeads(NAMES, sample_size=8, in_channels=1, cnn_channels=(4, 8))
    swapped = S2MPipeline.from_pipe(pipe, heads=other)
    assert swapped.heads is other and swapped.unet is ddpm.unet and swapped.config.num_inference_steps == 2


# ---------------------------------------------------------------------------------------------------------------
# Class-conditional proposals


def test_conditional_proposal_fixes_the_first_required_attribute_with_the_df_correction():
    pipe = gan_pipeline(conditional=True)
    out = pipe("B & ~A", num_images=4, generator=seeded(), negation_margin=1.0, **FAST)
    assert out.stats["class_label"] == "B"
    assert out.class_labels.tolist() == [1, 1, 1, 1] and out.latents.shape == (4, 8)
    named = pipe("B & ~A", num_images=2, generator=seeded(), negation_margin=1.0, class_label="C", **FAST)
    assert named.class_labels.tolist() == [2, 2]


def test_conditional_proposal_draws_the_class_with_the_latent_for_or_targets():
    pipe = gan_pipeline(conditional=True)
    out = pipe("A | B", num_images=8, generator=seeded(), **FAST)
    assert out.stats["class_label"] == "drawn from p_G(c)"
    assert out.latents.shape == (8, 9)  # one extra coordinate draws the class
    # the class is a deterministic function of that coordinate: Phi(u) against the cumulative p_G(c) (uniform)
    u = torch.distributions.Normal(0.0, 1.0).cdf(out.latents[:, -1])
    assert out.class_labels.tolist() == torch.clamp((u * 3).floor().long(), max=2).tolist()


def test_fixed_class_without_df_head_is_refused():
    gan = dcgan(num_classes=3)
    heads = S2MHeads(NAMES, sample_size=8, in_channels=1, cnn_channels=(4, 8), conditional=False)
    pipe = S2MPipeline(heads=heads, gan=gan)
    with pytest.raises(ValueError, match="D_f"):
        pipe("A & B", generator=seeded(), class_label="A", **FAST)


# ---------------------------------------------------------------------------------------------------------------
# Outputs and reproducibility


def test_every_output_type_holds_the_same_images():
    pipe = gan_pipeline()
    kwargs = dict(num_images=3, negation_margin=1.0, **FAST)
    pil = pipe("A & ~B", generator=seeded(), output_type="pil", **kwargs)
    np_ = pipe("A & ~B", generator=seeded(), output_type="np", **kwargs)
    pt = pipe("A & ~B", generator=seeded(), output_type="pt", **kwargs)
    lat = pipe("A & ~B", generator=seeded(), output_type="latent", **kwargs)
    assert all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) and im.mode == "L" for im in pil.images)
    assert isinstance(np_.images, np.ndarray) and np_.images.shape == (3, 8, 8, 1)
    assert 0 <= np_.images.min() and np_.images.max() <= 1
    assert torch.equal(pt.images.permute(0, 2, 3, 1), torch.from_numpy(np_.images))
    assert np.array_equal(np.asarray(pil.images[0]), (np_.images[0, ..., 0] * 255).round().astype(np.uint8))
    assert torch.equal(lat.images, lat.latents) and torch.equal(lat.latents, pt.latents)
    images, latents, on_target, stats = pipe(
        "A & ~B", generator=seeded(), return_dict=False, output_type="pt", **kwargs
    )
    assert torch.equal(images, pt.images) and torch.equal(latents, pt.latents) and on_target.all()
    assert stats["proposals"] == pt.stats["proposals"]
    with pytest.raises(ValueError, match="output_type"):
        pipe("A", output_type="jpeg")


def test_same_seed_same_images_other_seed_other_images():
    pipe = gan_pipeline()
    kwargs = dict(num_images=4, negation_margin=1.0, output_type="pt", **FAST)
    a = pipe("A & ~B", generator=seeded(3), **kwargs)
    b = pipe("A & ~B", generator=seeded(3), **kwargs)
    c = pipe("A & ~B", generator=seeded(4), **kwargs)
    assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    assert a.stats["proposals"] == b.stats["proposals"] and a.stats["chains"] == b.stats["chains"]
    assert not torch.equal(a.latents, c.latents)


def test_a_list_of_generators_gives_each_image_its_own_generator():
    pipe = gan_pipeline()
    kwargs = dict(negation_margin=1.0, output_type="pt", **FAST)
    both = pipe("A & ~B", num_images=2, generator=[seeded(10), seeded(11)], **kwargs)
    second = pipe("A & ~B", num_images=1, generator=[seeded(11)], **kwargs)
    assert torch.equal(both.images[1], second.images[0])
    assert not torch.equal(both.images[0], both.images[1])
    assert both.stats["proposals_per_image"] * 2 == pytest.approx(both.stats["proposals"])
    assert len(both.stats["chains"]["runs"]) == 2  # one run (its own pool and chain) per image
    with pytest.raises(ValueError, match="list of 3 generators but requested 2 images"):
        pipe("A", num_images=2, generator=[seeded(0)] * 3)


def test_callback_runs_once_per_sampler_round_with_that_rounds_proposals():
    pipe = gan_pipeline()
    calls = []

    def callback(p, round_, phase, kwargs):
        assert p is pipe
        calls.append(
            (
                round_,
                phase,
                kwargs["latents"].shape[0],
                kwargs["log_w"].shape,
                int(torch.isfinite(kwargs["log_w"]).sum()),
            )
        )
        return {}

    out = pipe(
        "A & ~B",
        num_images=3,
        generator=seeded(),
        negation_margin=1.0,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "log_w"],
        **FAST,
    )
    assert [c[0] for c in calls] == list(range(len(calls)))
    assert sum(c[2] for c in calls) == out.stats["proposals"]  # every proposal went through one round
    phases = [c[1] for c in calls]
    assert phases == sorted(phases) and set(phases) == {0, 1, 2}  # the entry pool, the burn-in, the sampling
    assert calls[0][2] == FAST["pool_size"] and pipe.num_timesteps == 3
    with pytest.raises(ValueError, match="not available"):
        pipe("A", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


def test_micro_batch_size_does_not_change_the_images():
    pipe = gan_pipeline()
    kwargs = dict(num_images=3, negation_margin=1.0, output_type="pt", **FAST)
    a = pipe("A & ~B", generator=seeded(), micro_batch_size=64, **kwargs)
    b = pipe("A & ~B", generator=seeded(), micro_batch_size=5, **kwargs)
    assert torch.allclose(a.images, b.images, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Errors that teach


def test_unknown_attribute_names_the_heads_attributes():
    pipe = gan_pipeline()
    with pytest.raises(TargetError, match=r"Unknown attribute 'D'.*Known attributes: \['A', 'B', 'C'\].*heads were"):
        pipe("A & ~D")


def test_heads_for_another_image_size_or_channel_count():
    gan = dcgan()
    for kwargs, fragment in [
        (dict(sample_size=16, in_channels=1), "sample_size=16"),
        (dict(sample_size=8, in_channels=3), "in_channels=3"),
    ]:
        heads = S2MHeads(NAMES, cnn_channels=(4, 8), **kwargs)
        pipe = S2MPipeline(heads=heads, gan=gan)
        with pytest.raises(ValueError, match=rf"trained for images of shape.*{fragment}.*produces images of shape"):
            pipe("A", **FAST)
    # a generator whose config does not tell its image size: caught at its first images
    pipe = S2MPipeline(heads=S2MHeads(NAMES, sample_size=16, in_channels=1, cnn_channels=(4, 8)), gan=dcgan())
    pipe.gan.register_to_config(sample_size=None)
    with pytest.raises(ValueError, match=r"produces images of shape \(1, 8, 8\).*downscaled copy of larger"):
        pipe("A", **FAST)


def test_missing_heads_or_proposal():
    heads = S2MHeads(NAMES, sample_size=8, in_channels=1, cnn_channels=(4, 8))
    with pytest.raises(ValueError, match="needs `heads`.*S2MHeads.from_pretrained.*train-heads"):
        S2MPipeline(gan=dcgan())
    with pytest.raises(ValueError, match="needs a proposal.*gan=.*unet=.*proposal_pipeline=.*from_pipe"):
        S2MPipeline(heads=heads)
    with pytest.raises(ValueError, match="exactly one proposal"):
        S2MPipeline(heads=heads, gan=dcgan(), unet=tiny_unet(), scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="needs the `scheduler=`"):
        S2MPipeline(heads=heads, unet=tiny_unet())
    pipe = S2MPipeline(heads=heads, gan=dcgan())
    pipe.heads = None
    with pytest.raises(ValueError, match="needs `heads`"):
        pipe("A")


def test_budget_exhausted_says_how_far_it_got_what_the_pool_saw_and_what_to_try():
    pipe = S2MPipeline(heads=ExactHeads(), gan=QuadrantGenerator())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_images=20, max_proposals=60, num_chains=2, **FAST)
    with pytest.raises(BudgetExhaustedError) as info:
        pipe("B & C & ~A", generator=seeded(), **kwargs)
    message = str(info.value)
    assert (
        "budget of 60 ran out after 60 proposals with" in message and "of 20 images for target 'B & C & ~A'" in message
    )
    assert "the entry pool had" in message and "of its 16 draws on the target; 2 chains" in message
    assert (
        "Of the entry pool's 16 draws, the shares on the target's literals and on the whole were: 1 on 'B'" in message
    )
    assert (
        "max_proposals=240" in message and "class-conditional proposal" in message and "allow_partial=True" in message
    )
    assert "No proposal reached" not in message
    partial = pipe("B & C & ~A", generator=seeded(), allow_partial=True, **kwargs)
    assert partial.stats["budget_exhausted"] and 0 < partial.stats["num_images"] < 20
    assert f"with {partial.stats['num_images']} of 20" in message
    assert partial.stats["proposals"] == 60 and partial.stats["budget_spent"] == 60 and partial.on_target.all()
    # a combination no image holds (C is "not both A and B"): its weight is exp(-40)-small but finite under the
    # paper's formula; with a presence margin no draw reaches it, and the error says that the margins are why
    with pytest.raises(BudgetExhaustedError) as info:
        pipe("A & B & C", num_images=2, generator=seeded(), max_proposals=40, presence_margin=0.5, **FAST)
    message = str(info.value)
    assert "after 40 proposals with 0 of 2 images" in message and "pool had 0 of its 40 draws" in message
    assert "No proposal reached the whole target" in message and "presence_margin=0.5" in message
    assert "without the margins" in message and "allow_partial" not in message


def test_missing_target_explains_how_to_name_one():
    pipe = gan_pipeline()
    with pytest.raises(ValueError, match="Name a target.*--pipeline-kwargs"):
        pipe()
    pipe.register_to_config(default_target="A")
    assert len(pipe(num_images=1, generator=seeded(), **FAST).images) == 1


# ---------------------------------------------------------------------------------------------------------------
# Save and load


def test_save_and_load_in_this_process(tmp_path):
    pipe = gan_pipeline(default_target="A & ~B")
    kwargs = dict(num_images=3, negation_margin=1.0, output_type="pt", **FAST)
    before = pipe("A & ~B", generator=seeded(), **kwargs)
    pipe.save_pretrained(tmp_path / "s2m")
    loaded = S2MPipeline.from_pretrained(tmp_path / "s2m")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.heads) is S2MHeads and type(loaded.gan) is DCGANGenerator
    assert loaded.config.default_target == "A & ~B"
    after = loaded(generator=seeded(), **kwargs)
    # the same latents; images equal up to float32 rounding of the reloaded weights
    assert torch.equal(before.latents, after.latents) and torch.allclose(before.images, after.images, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["s2m"]  # no temporary folder left behind
    assert not os.path.exists(tmp_path / "s2m" / "fits")  # nothing measured: no fits folder


@pytest.mark.slow  # a fresh interpreter
def test_save_and_load_in_a_fresh_process_that_imports_only_diffusers(tmp_path):
    pipe = gan_pipeline()
    kwargs = dict(num_images=3, negation_margin=1.0, output_type="pt", **FAST)
    expected = pipe("A & ~B", generator=seeded(5), **kwargs).images
    pipe.save_pretrained(tmp_path / "s2m")
    code = f"""
import sys, torch
from diffusers import DiffusionPipeline
assert not any(m.startswith("s2m_diffusers") for m in sys.modules)
pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "s2m")!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
print(type(pipe).__name__, type(pipe.heads).__name__, type(pipe.gan).__name__)
out = pipe("A & ~B", generator=torch.Generator().manual_seed(5), **{kwargs!r})
torch.save(out.images, {str(tmp_path / "images.pt")!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "S2MPipeline S2MHeads DCGANGenerator" in result.stdout
    assert torch.allclose(torch.load(tmp_path / "images.pt"), expected, atol=1e-5)


def test_plain_diffusion_pipeline_from_pretrained_asks_for_trust_remote_code(tmp_path):
    from diffusers import DiffusionPipeline

    gan_pipeline().save_pretrained(tmp_path / "s2m")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path / "s2m")


def test_ddim_pipeline_round_trip(tmp_path):
    heads = S2MHeads(NAMES, sample_size=8, in_channels=1, cnn_channels=(4, 8))
    pipe = S2MPipeline(
        heads=heads, unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100), num_inference_steps=2
    )
    pipe.set_progress_bar_config(disable=True)
    before = pipe("A & B", num_images=2, generator=seeded(), output_type="pt", **FAST)
    pipe.save_pretrained(tmp_path / "s2m")
    loaded = S2MPipeline.from_pretrained(tmp_path / "s2m")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DDPMScheduler) and loaded.config.num_inference_steps == 2
    after = loaded("A & B", num_images=2, generator=seeded(), output_type="pt", **FAST)
    assert torch.equal(before.latents, after.latents) and torch.allclose(before.images, after.images, atol=1e-5)


def test_budget_spent_by_earlier_images_of_a_generator_list():
    pipe = S2MPipeline(heads=ExactHeads(), gan=QuadrantGenerator())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_images=2, generator=[seeded(0), seeded(1)], max_proposals=18, **FAST)
    # every image holds one of the attributes, so each image's run takes its pool of 16 and 2 burn-in steps: 18
    with pytest.raises(BudgetExhaustedError, match="after 18 proposals with 1 of 2 images") as info:
        pipe("A | B | C", **kwargs)
    assert info.value.result.z.shape[0] == 1
    partial = pipe("A | B | C", allow_partial=True, **kwargs)
    assert partial.stats["num_images"] == 1 and partial.stats["budget_exhausted"]
    assert partial.stats["proposals"] == 18 and partial.stats["proposals_per_image"] == 18


# ---------------------------------------------------------------------------------------------------------------
# Memory: micro-batches, downscaled copies for the heads, bounded chains, CPU offloading


class RecordingGenerator(QuadrantGenerator):
    """QuadrantGenerator at any size, recording the largest batch it was called with."""

    @register_to_config
    def __init__(self, latent_dim: int = 4, sample_size: int = 8, out_channels: int = 1):
        super().__init__(latent_dim, sample_size, out_channels)
        self.largest = 0

    def forward(self, latents):
        self.largest = max(self.largest, latents.shape[0])
        q = torch.tanh(self.scale * latents.view(-1, 1, 2, 2))
        k = self.config.sample_size // 2
        return q.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)  # (B, 1, S, S)


class RecordingHeads(ExactHeads):
    """ExactHeads that record the largest batch and the image shapes they saw."""

    def forward(self, images):
        self.seen = getattr(self, "seen", set()) | {tuple(images.shape[1:])}
        self.largest = max(getattr(self, "largest", 0), images.shape[0])
        return super().forward(images)


def test_heads_see_a_downscaled_copy_of_larger_images():
    gan, heads = RecordingGenerator(sample_size=16), RecordingHeads(sample_size=8)
    pipe = S2MPipeline(heads=heads, gan=gan)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("A & ~B", num_images=6, generator=seeded(), output_type="pt", **FAST)
    assert out.images.shape == (6, 1, 16, 16)  # the proposal's images are returned at full size
    assert heads.seen == {(1, 8, 8)}  # the heads only saw 8x8 copies
    present = quadrant_attributes(pipe.heads_view(out.images * 2 - 1))
    assert (present[:, 0] & ~present[:, 1]).all()  # and the exact heads still select the target
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.allclose(pipe.heads_view(images), prepare_images(images, 8, 1))  # as real data is prepared
    # smaller images, or other channels, are refused (see test_heads_for_another_image_size_or_channel_count)
    with pytest.raises(ValueError, match="never a smaller one"):
        S2MPipeline(heads=RecordingHeads(sample_size=32), gan=gan)("A", **FAST)


def test_generator_and_heads_run_in_micro_batches_and_chains_are_bounded():
    gan, heads = RecordingGenerator(), RecordingHeads()
    pipe = S2MPipeline(heads=heads, gan=gan)
    pipe.set_progress_bar_config(disable=True)
    rounds = []
    out = pipe(
        "A | B",
        num_images=1030,  # 258 chains of 4 images by default, but at most 256 side by side
        generator=seeded(),
        micro_batch_size=16,
        callback_on_step_end=lambda p, r, phase, kw: rounds.append(kw["latents"].shape[0]),
        **FAST,
    )
    assert len(out.images) == 1030 and out.on_target.all()
    assert gan.largest == 16 and heads.largest == 16  # never more than a micro-batch at once
    assert out.stats["chains"]["num_chains"] == 256 and max(rounds) == 256  # 256 chains (and their images) at once


def test_model_cpu_offload_sequence_names_components_and_runs():
    pipe = gan_pipeline()
    names = pipe.model_cpu_offload_seq.split("->")
    assert set(names) <= set(pipe.components) and names[-1] == "heads"
    plain = pipe("A & ~B", num_images=2, generator=seeded(), negation_margin=1.0, output_type="pt", **FAST)
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks of an accelerator, on the CPU: same code path
    assert execution_device(pipe.gan).type == "cpu" and getattr(pipe.gan, "_hf_hook", None) is not None
    offloaded = pipe("A & ~B", num_images=2, generator=seeded(), negation_margin=1.0, output_type="pt", **FAST)
    assert torch.equal(plain.images, offloaded.images)


def test_presence_margin_keeps_exact_heads_on_target_and_is_checked():
    pipe = S2MPipeline(heads=ExactHeads(), gan=QuadrantGenerator())
    pipe.set_progress_bar_config(disable=True)
    out = pipe("A & B", num_images=8, generator=seeded(), output_type="pt", presence_margin=0.9, **FAST)
    present = quadrant_attributes(out.images * 2 - 1)
    assert (present[:, 0] & present[:, 1]).all()
    with pytest.raises(ValueError, match="presence_margin"):
        pipe("A & B", num_images=1, generator=seeded(), presence_margin=2.0, **FAST)


def test_sampling_settings_as_one_config_or_as_keywords():
    from s2m_diffusers import S2MSamplingConfig

    pipe = gan_pipeline()
    config = S2MSamplingConfig(kernel="independent", pool_size=16, burn_in=2)
    a = pipe("A & ~B", num_images=3, generator=seeded(), output_type="pt", sampling=config)
    b = pipe(
        "A & ~B", num_images=3, generator=seeded(), output_type="pt", kernel="independent", pool_size=16, burn_in=2
    )
    c = pipe(
        "A & ~B",
        num_images=3,
        generator=seeded(),
        output_type="pt",
        sampling={"kernel": "independent"},
        pool_size=16,
        burn_in=2,
    )
    assert (
        torch.equal(a.latents, b.latents) and torch.equal(a.latents, c.latents) and a.stats["kernel"] == "independent"
    )
    with pytest.raises(TypeError, match=r"Unknown sampling setting\(s\) \['poolsize'\]"):
        pipe("A", num_images=1, poolsize=3)
    # settings of the removed latent refitting say what took their place
    for name, value, hint in [
        ("refit", "once", "latent refitting was removed"),
        ("fit_size", 16, "pool_size, pool_ess"),
        ("defensive", 0.1, "refitted densities were removed"),
        ("steps_after_entry", 2, "burn_in sets the steps"),
    ]:
        with pytest.raises(TypeError, match=f"The sampling setting '{name}' no longer exists: .*{hint}"):
            pipe("A", num_images=1, **{name: value})
        with pytest.raises(TypeError, match=f"'{name}' no longer exists"):
            pipe("A", num_images=1, sampling={name: value})


def test_auto_dv_strength_is_measured_once_per_target_counted_and_saved(tmp_path):
    pipe = gan_pipeline()
    kwargs = dict(num_images=2, negation_margin=1.0, output_type="pt", dv_strength="auto", **FAST)
    first = pipe("A & ~B", generator=seeded(), **kwargs)
    assert 0.0 <= first.stats["dv_strength"] <= 1.0 and list(pipe.auto_dv_strengths.values()) == [
        first.stats["dv_strength"]
    ]
    again = pipe("A & ~B", generator=seeded(), **kwargs)  # cached: no measurement
    assert torch.equal(first.latents, again.latents) and again.stats["dv_strength"] == first.stats["dv_strength"]
    assert first.stats["proposals"] - again.stats["proposals"] >= 256  # the measurement's draws counted once
    pipe.save_pretrained(tmp_path / "s2m")
    assert os.listdir(tmp_path / "s2m" / "fits") == ["dv_strength.json"]
    loaded = S2MPipeline.from_pretrained(tmp_path / "s2m")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.auto_dv_strengths == pipe.auto_dv_strengths
    assert loaded("A & ~B", generator=seeded(), **kwargs).stats["proposals"] == again.stats["proposals"]
