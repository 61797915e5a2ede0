import os

import numpy as np
import pytest
import torch

from s2m_diffusers.demo import (
    ATTRIBUTE_NAMES,
    ATTRIBUTE_TABLE,
    DIGITS_7TO3_PRETRAINED,
    SEVEN_TARGET_LITERALS,
    SOURCE_CLASS_ATTRIBUTES,
    load_digits_7to3,
    load_digits_without_attributes,
)
from s2m_diffusers.evaluation import (
    AttributeEvaluator,
    combination_shares,
    evaluator_attribute_probs,
    evaluator_attributes,
    evaluator_class_probs,
    evaluator_features,
    frechet_distance,
    random_shift,
    target_accuracy,
    target_probabilities,
)


def _gaussian(n, d, shift=0.0, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


def test_frechet_distance_zero_on_itself_and_grows_with_a_shift():
    a = _gaussian(2000, 8)
    assert abs(frechet_distance(a, a)) < 1e-6
    distances = [frechet_distance(a, _gaussian(2000, 8, shift, seed=1)) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] < 0.1
    # Same covariance: the distance is |mu_a - mu_b|^2 = 8 * shift^2 (up to sampling noise).
    assert abs(distances[3] - 8 * 4.0) < 1.5
    # Torch tensors are accepted as well.
    assert abs(frechet_distance(torch.from_numpy(a), torch.from_numpy(a))) < 1e-6


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = _gaussian(300, 5), _gaussian(300, 5, seed=1) * np.array([1.0, 2.0, 0.5, 1.0, 3.0]) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * covmean)
    assert frechet_distance(a, b, eps=0.0) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_random_shift():
    images = -torch.ones(8, 1, 9, 9)
    images[:, :, 3:6, 3:6] = 1.0  # a centred square survives any shift by <= 3 pixels
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert torch.equal((shifted == 1.0).sum(dim=(1, 2, 3)), torch.full((8,), 9))
    assert not torch.equal(shifted, images)
    assert random_shift(images, 0) is images


def test_evaluator_outputs_and_round_trip(tmp_path):
    torch.manual_seed(0)
    class_attributes = [*SOURCE_CLASS_ATTRIBUTES, ()]
    evaluator = AttributeEvaluator(ATTRIBUTE_NAMES, class_attributes, base_channels=4).eval()
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    assert evaluator(images).shape == (5, 8) and evaluator_features(evaluator, images).shape == (5, 16)
    probs = evaluator_class_probs(evaluator, images)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    # P(attribute) sums the combinations that hold it; P(target) of the 7 targets plus "none" sums to 1.
    torch.testing.assert_close(evaluator_attribute_probs(evaluator, images)[:, 0], probs[:, [0, 1, 5, 6]].sum(1))
    total = sum(target_probabilities(evaluator, images, p, a) for p, a in SEVEN_TARGET_LITERALS) + probs[:, 7]
    torch.testing.assert_close(total, torch.ones(5))
    rows = evaluator_attributes(evaluator, images)
    assert rows.dtype == torch.bool and rows.shape == (5, 3)
    shares, low_confidence = combination_shares(evaluator, images, min_confidence=0.0)
    assert shares.shape == (8,) and low_confidence == 0.0 and shares.sum() == pytest.approx(1.0)
    evaluator.save_pretrained(tmp_path)
    loaded = AttributeEvaluator.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(images), evaluator(images), rtol=0, atol=0)
    assert [tuple(c) for c in loaded.config.class_attributes] == [tuple(c) for c in class_attributes]
    with pytest.raises(ValueError, match="not in"):
        AttributeEvaluator(ATTRIBUTE_NAMES, class_attributes=[("A",), ("D",)])


@pytest.fixture(scope="module")
def shipped():
    evaluator = AttributeEvaluator.from_pretrained(os.path.join(DIGITS_7TO3_PRETRAINED, "evaluator")).eval()
    return evaluator, load_digits_7to3()


def test_shipped_evaluator_on_real_images(shipped):
    evaluator, data = shipped
    assert list(evaluator.config.attribute_names) == ["A", "B", "C"]
    for split, minimum in ((data.train(), 0.97), (data.heldout(), 0.99)):  # never seen / its training data
        agree = (evaluator_attributes(evaluator, split.images) == split.attributes).all(dim=1).float().mean()
        assert agree >= minimum, (len(split), agree)
    unseen = data.train()
    for k, (present, absent) in enumerate(SEVEN_TARGET_LITERALS):
        assert target_accuracy(evaluator, unseen.images[unseen.source_classes == k], present, absent) >= 0.93
        assert target_accuracy(evaluator, unseen.images[unseen.source_classes != k], present, absent) <= 0.02


def test_shipped_evaluator_flags_images_outside_the_universe(shipped):
    evaluator, _ = shipped
    if len(evaluator.config.class_attributes) == 7:
        pytest.skip("evaluator trained without the 'no attribute' class")
    outside = load_digits_without_attributes()
    assert (~evaluator_attributes(evaluator, outside).any(dim=1)).float().mean() >= 0.95
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shares, low_confidence = combination_shares(evaluator, noise)
    assert shares[:7].sum() <= 0.5  # pure noise is mostly no combination


def test_class_table_of_the_7to3_combinations_is_the_attribute_table():
    evaluator = AttributeEvaluator(ATTRIBUTE_NAMES, SOURCE_CLASS_ATTRIBUTES, base_channels=2)
    assert torch.equal(evaluator.class_table, ATTRIBUTE_TABLE)
    with pytest.raises(TypeError):  # the library knows no dataset: the attributes and combinations are required
        AttributeEvaluator(base_channels=2)
