import math

import pytest
import torch

from s2m_diffusers.proposals import GeneratorProposal
from s2m_diffusers.testing.shapes import ShapesGenerator, shapes_attributes, shapes_single_positive


@pytest.fixture(scope="module")
def generator():
    return ShapesGenerator().eval()


def _tolerance(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)  # 5 standard errors of a share


def test_images_show_exactly_the_latent_attributes(generator):
    z = torch.randn(4000, generator.config.latent_dim, generator=torch.Generator().manual_seed(0))
    images = generator(z)
    assert images.shape == (4000, 1, 16, 16)
    assert images.abs().max() < 1.0  # no clamping, so patch means are exact
    assert torch.equal(generator.image_attributes(images), generator.latent_attributes(z))
    assert torch.equal(shapes_attributes(images), generator.latent_attributes(z))


def test_attribute_probability_matches_the_prior(generator):
    p = generator.attribute_probability
    assert p == pytest.approx(0.3, abs=1e-9)
    n = 20000
    z = torch.randn(n, generator.config.latent_dim, generator=torch.Generator().manual_seed(1))
    attributes = generator.image_attributes(generator(z))
    shares = attributes.double().mean(0)
    assert (shares - p).abs().max() < _tolerance(p, n)
    both = float(attributes[:, :2].all(1).double().mean())  # independent attributes: p^2
    assert abs(both - p**2) < _tolerance(p**2, n)


def test_nuisance_coordinates_change_only_the_texture(generator):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, generator.config.latent_dim, generator=g)
    other = z.clone()
    other[:, generator.config.num_attributes :] = torch.randn(64, generator.num_nuisance, generator=g)
    a, b = generator(z), generator(other)
    assert not torch.allclose(a, b)
    assert torch.allclose(generator.patch_means(a), generator.patch_means(b), atol=1e-6)
    features = generator.features(a)
    assert torch.allclose(features[:, 6:], torch.tanh(z[:, 6:]).double(), atol=1e-4)


def test_conditioned_latents_hold_the_conjunction(generator):
    z = generator.sample_latents(3000, torch.Generator().manual_seed(3), present=[0, 2], absent=[1])
    attributes = generator.image_attributes(generator(z))
    assert attributes[:, [0, 2]].all() and not attributes[:, 1].any()
    p = generator.attribute_probability
    assert abs(float(attributes[:, 3].double().mean()) - p) < _tolerance(p, 3000)  # the others stay free
    with pytest.raises(ValueError, match="disjoint"):
        generator.sample_latents(2, present=[0], absent=[0])


def test_single_positive_data_follows_the_papers_law(generator):
    data, attributes = shapes_single_positive(generator, 3000, seed=0)
    assert data.attribute_names == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert attributes[torch.arange(3000), data.labels].all()  # every label is an attribute the image shows
    assert torch.equal(generator.image_attributes(data.images), attributes)
    # x ~ p(x | y_c = 1): the other attributes keep the prior's probability 0.3.
    others = attributes.clone()
    others[torch.arange(3000), data.labels] = False
    p = generator.attribute_probability
    assert abs(float(others.double().sum() / (3000 * 5)) - p) < _tolerance(p, 3000 * 5)


def test_round_trip_and_proposal(tmp_path):
    model = ShapesGenerator(num_attributes=4, latent_dim=7, sample_size=12, out_channels=3, seed=5)
    model.save_pretrained(tmp_path)
    loaded = ShapesGenerator.from_pretrained(tmp_path)
    z = torch.randn(8, 7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(loaded(z), model(z))
    proposal = GeneratorProposal(loaded)
    assert proposal.latent_shape == (7,) and proposal.image_shape == (3, 12, 12)
    assert torch.equal(loaded.image_attributes(proposal.generate(z)), loaded.latent_attributes(z))


def test_bad_configs_teach():
    with pytest.raises(ValueError, match="latent_dim"):
        ShapesGenerator(num_attributes=6, latent_dim=4)
    with pytest.raises(ValueError, match="sample_size"):
        ShapesGenerator(num_attributes=6, sample_size=6)
    with pytest.raises(ValueError, match="latent"):
        ShapesGenerator()(torch.zeros(2, 3))
