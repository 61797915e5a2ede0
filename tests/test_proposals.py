"""Proposal adapters: deterministic maps from latents to images in [-1, 1], micro-batched, on tiny models."""

import json
import math

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    ModelMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from test_pipeline import tiny_unet
from torch import nn

from s2m_diffusers.models.gan import DCGANGenerator
from s2m_diffusers.proposals import (
    DDIMProposal,
    GeneratorProposal,
    PipelineProposal,
    eval_mode,
)

torch.set_num_threads(1)


def tiny_sd_pipeline(tmp_path, scheduler=None) -> StableDiffusionPipeline:
    """A text-to-image pipeline with a VAE, built from configs (a CLIP tokenizer over single characters)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# DDIM


def test_ddim_matches_diffusers_ddim_pipeline_with_eta_zero():
    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    proposal = DDIMProposal(unet, scheduler, num_inference_steps=3)
    assert proposal.latent_shape == (1, 8, 8) and proposal.image_shape == (1, 8, 8)
    assert isinstance(proposal.scheduler, DDIMScheduler) and isinstance(scheduler, DDPMScheduler)  # user's untouched
    z = latents((3, 1, 8, 8))
    images = proposal.generate(z)
    assert images.shape == (3, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    # DDIMPipeline draws its initial noise from the generator exactly as `latents` does.
    pipe = DDIMPipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        batch_size=3, generator=torch.Generator().manual_seed(0), eta=0.0, num_inference_steps=3, output_type="np"
    ).images
    assert torch.allclose(torch.from_numpy(reference).permute(0, 3, 1, 2), (images / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_ddim_is_deterministic_and_independent_of_micro_batches():
    unet = tiny_unet()
    z = latents((5, 1, 8, 8), seed=1)
    a = DDIMProposal(unet, DDPMScheduler(num_train_timesteps=100), 3, micro_batch_size=64).generate(z)
    b = DDIMProposal(unet, DDPMScheduler(num_train_timesteps=100), 3, micro_batch_size=2).generate(z)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(a, DDIMProposal(unet, DDPMScheduler(num_train_timesteps=100), 3).generate(z))
    assert not torch.allclose(a[0], a[1])


def test_ddim_class_conditional_unet_needs_labels():
    unet = tiny_unet(num_class_embeds=3)
    proposal = DDIMProposal(unet, DDPMScheduler(num_train_timesteps=100), 2)
    assert proposal.num_classes == 3
    z = latents((2, 1, 8, 8))
    with pytest.raises(ValueError, match="class_labels"):
        proposal.generate(z)
    x0 = proposal.generate(z, torch.tensor([0, 0]))
    x1 = proposal.generate(z, torch.tensor([1, 1]))
    assert not torch.allclose(x0, x1)
    images, labels = proposal(4, torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 8, 8) and labels.shape == (4,) and labels.max() < 3


def test_latent_log_density_is_the_standard_normal():
    proposal = DDIMProposal(tiny_unet(), DDPMScheduler(num_train_timesteps=100), 2)
    s = proposal.sample(3, torch.Generator().manual_seed(0))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(s.latents).flatten(1).sum(1)
    assert torch.allclose(s.log_prob, expected, atol=1e-4)
    assert s.latents.shape == (3, 1, 8, 8) and s.images.shape == (3, 1, 8, 8)
    # same generator, same sample
    again = proposal.sample(3, torch.Generator().manual_seed(0))
    assert torch.equal(s.latents, again.latents) and torch.equal(s.images, again.images)


def test_wrong_latent_shape_is_named():
    proposal = DDIMProposal(tiny_unet(), DDPMScheduler(num_train_timesteps=100), 2)
    with pytest.raises(ValueError, match=r"\(n, 1, 8, 8\)"):
        proposal.generate(torch.zeros(2, 4, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# GAN generators


def test_dcgan_adapter_reads_config_and_uses_eval_mode():
    torch.manual_seed(0)
    gan = DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=4)
    gan.train()  # batch norm in training mode would make an image depend on the rest of its batch
    proposal = GeneratorProposal(gan, micro_batch_size=3)
    assert proposal.latent_shape == (8,) and proposal.image_shape == (1, 8, 8) and proposal.num_classes is None
    z = latents((7, 8))
    batch = proposal.generate(z)
    alone = torch.cat([proposal.generate(z[i : i + 1]) for i in range(7)])
    assert torch.allclose(batch, alone, atol=1e-6)
    assert gan.training and all(m.training for m in gan.modules())  # mode restored
    assert batch.abs().max() <= 1
    images = proposal(5, torch.Generator().manual_seed(0))
    assert isinstance(images, torch.Tensor) and images.shape == (5, 1, 8, 8)


def test_conditional_dcgan_draws_classes_from_class_probs():
    gan = DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=4, num_classes=3)
    proposal = GeneratorProposal(gan, class_probs=[0.0, 0.0, 1.0])
    assert proposal.is_conditional and proposal.num_classes == 3
    images, labels = proposal(6, torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, 8, 8) and labels.tolist() == [2] * 6
    with pytest.raises(ValueError, match="class_probs has 2 entries"):
        GeneratorProposal(gan, class_probs=[0.5, 0.5])


class PlainGenerator(ModelMixin, ConfigMixin):
    """Any ModelMixin whose forward maps latents to images; no latent_dim in its config."""

    @register_to_config
    def __init__(self, width: int = 6):
        super().__init__()
        self.linear = nn.Linear(width, 16)

    def forward(self, latents):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=torch.tanh(self.linear(latents.flatten(1))).view(-1, 1, 4, 4))


def test_any_model_mixin_generator_with_explicit_latent_shape():
    model = PlainGenerator()
    with pytest.raises(ValueError, match="latent_shape"):
        GeneratorProposal(model)
    proposal = GeneratorProposal(model, latent_shape=(6,))
    s = proposal.sample(3, torch.Generator().manual_seed(0))
    assert s.images.shape == (3, 1, 4, 4) and proposal.image_shape is None
    assert torch.allclose(s.images, torch.tanh(model.linear(s.latents)).view(-1, 1, 4, 4), atol=1e-6)


def test_micro_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="micro_batch_size"):
        GeneratorProposal(PlainGenerator(), latent_shape=(6,), micro_batch_size=0)


def test_eval_mode_restores_each_submodule():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    model[0].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[0].training and model[1].training


# ---------------------------------------------------------------------------------------------------------------
# Any pipeline that accepts latents=


def test_pipeline_adapter_on_text_to_image_with_vae(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    proposal = PipelineProposal(pipe, pipeline_kwargs={"prompt": "a cat"}, num_inference_steps=2, micro_batch_size=2)
    assert proposal.latent_shape == (4, 8, 8)  # unet in_channels x sample_size
    z = latents((3, 4, 8, 8))
    images = proposal.generate(z)
    assert images.shape == (3, 1, 16, 16)  # decoded through the VAE
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.5  # [0, 1] output mapped to [-1, 1]
    reference = pipe(prompt="a cat", num_images_per_prompt=3, latents=z, output_type="pt", num_inference_steps=2)
    assert torch.allclose(images, reference.images * 2 - 1, atol=1e-4)
    proposal.check_deterministic()
    assert pipe._progress_bar_config == {"disable": True}  # the pipeline's own settings are restored


def test_pipeline_adapter_rejects_a_stochastic_sampler(tmp_path):
    pipe = tiny_sd_pipeline(
        tmp_path, scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1)
    )
    proposal = PipelineProposal(pipe, pipeline_kwargs={"prompt": "a cat"}, num_inference_steps=3)
    with pytest.raises(ValueError, match="not deterministic.*DDPMScheduler.*DDIMScheduler"):
        proposal.check_deterministic()


def test_pipeline_without_latents_argument_is_refused():
    pipe = DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(ValueError, match="does not accept `latents=`.*DDIMProposal"):
        PipelineProposal(pipe)


def test_pipeline_kwargs_cannot_set_what_the_adapter_sets(tmp_path):
    with pytest.raises(ValueError, match="must not set `latents`"):
        PipelineProposal(tiny_sd_pipeline(tmp_path), pipeline_kwargs={"prompt": "a", "latents": None})


def test_pipeline_latent_shape_follows_fixed_height_and_width(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    proposal = PipelineProposal(pipe, pipeline_kwargs={"prompt": "a", "height": 32, "width": 16})
    assert proposal.latent_shape == (4, 32 // pipe.vae_scale_factor, 16 // pipe.vae_scale_factor)
    assert math.prod(proposal.latent_shape) == 4 * 16 * 8
