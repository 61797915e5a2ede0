import os

import pytest
import torch

from s2m_diffusers.demo import DIGITS_7TO3_PRETRAINED
from s2m_diffusers.evaluation import AttributeEvaluator, combination_shares
from s2m_diffusers.models.gan import DCGANDiscriminator, DCGANGenerator


def _latents(n, dim=8, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sample_size", [8, 16, 32])
def test_generator_shapes_and_range(sample_size):
    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, sample_size=sample_size, out_channels=3, base_channels=4).eval()
    images = generator(_latents(5))
    assert images.shape == (5, 3, sample_size, sample_size)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert generator(_latents(5)[:, :, None, None]).shape == images.shape  # (B, D, 1, 1) latents too


def test_generator_eval_output_depends_on_own_latent_only():
    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, sample_size=8, base_channels=4).eval()
    z = _latents(6)
    torch.testing.assert_close(generator(z)[:2], generator(z[:2]))


def test_conditional_generator_needs_labels_and_they_matter():
    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, sample_size=8, base_channels=4, num_classes=3).eval()
    z = _latents(4)
    with pytest.raises(ValueError, match="pass `class_labels`"):
        generator(z)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.2"):
        generator(z, torch.tensor([0, 1, 2, 3]))
    a = generator(z, torch.zeros(4, dtype=torch.long))
    b = generator(z, torch.ones(4, dtype=torch.long))
    assert a.shape == (4, 1, 8, 8) and not torch.allclose(a, b)
    unconditional = DCGANGenerator(latent_dim=8, sample_size=8, base_channels=4)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="8 dimensions"):
        unconditional(torch.randn(4, 7))


def test_bad_sample_size():
    with pytest.raises(ValueError, match="sample_size"):
        DCGANGenerator(sample_size=12)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_save_load_round_trip(tmp_path, num_classes):
    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, sample_size=8, base_channels=4, num_classes=num_classes).eval()
    discriminator = DCGANDiscriminator(sample_size=8, base_channels=4, num_classes=num_classes).eval()
    z, labels = _latents(3), (None if num_classes is None else torch.tensor([0, 2, 1]))
    images = generator(z, labels)
    logits = discriminator(images, labels)
    assert logits.shape == (3,)
    generator.save_pretrained(tmp_path / "g")
    discriminator.save_pretrained(tmp_path / "d")
    assert (tmp_path / "g" / "diffusion_pytorch_model.safetensors").exists()
    loaded_g = DCGANGenerator.from_pretrained(tmp_path / "g").eval()
    loaded_d = DCGANDiscriminator.from_pretrained(tmp_path / "d").eval()
    assert loaded_g.config.num_classes == num_classes
    torch.testing.assert_close(loaded_g(z, labels), images, rtol=0, atol=0)
    torch.testing.assert_close(loaded_d(images, labels), logits, rtol=1e-5, atol=1e-5)


def test_discriminator_gradients_reach_the_generator():
    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, sample_size=8, base_channels=4, num_classes=2)
    discriminator = DCGANDiscriminator(sample_size=8, base_channels=4, num_classes=2)
    labels = torch.tensor([0, 1, 1])
    discriminator(generator(_latents(3), labels), labels).sum().backward()
    assert generator.class_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, num_classes", [("gan", None), ("gan_conditional", 3)])
def test_shipped_gans_load_and_generate(name, num_classes):
    generator = DCGANGenerator.from_pretrained(os.path.join(DIGITS_7TO3_PRETRAINED, name)).eval()
    assert generator.config.num_classes == num_classes and generator.config.sample_size == 16
    z = torch.randn(6, generator.config.latent_dim, generator=torch.Generator().manual_seed(0))
    labels = None if num_classes is None else torch.zeros(6, dtype=torch.long)  # one class: z alone must vary
    with torch.no_grad():
        images = generator(z, labels)
    assert images.shape == (6, 1, 16, 16) and images.min() >= -1.0 and images.max() <= 1.0
    assert images.std(dim=0).mean() > 0.2  # different latents give different images (no mode collapse)


def test_shipped_ddpm_loads_and_samples_with_ddim():
    from diffusers import DDIMScheduler, DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(os.path.join(DIGITS_7TO3_PRETRAINED, "ddpm"))
    assert pipeline.scheduler.config.clip_sample is False
    assert pipeline.unet.config.sample_size == 16 and pipeline.unet.config.in_channels == 1
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipeline.unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert x.shape == (16, 1, 16, 16) and torch.isfinite(x).all() and x.abs().max() < 1.5
    # Digits of the 7 source classes, as the shipped evaluator sees them (real images: 55% of pixels < -0.5).
    assert (x < -0.5).float().mean() > 0.4
    evaluator = AttributeEvaluator.from_pretrained(os.path.join(DIGITS_7TO3_PRETRAINED, "evaluator"))
    shares, _ = combination_shares(evaluator, x.clamp(-1.0, 1.0))
    assert shares[:7].sum() >= 0.6
