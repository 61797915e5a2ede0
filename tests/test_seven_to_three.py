import os

import pytest
import torch

from s2m_diffusers.seven_to_three import (
    ATTRIBUTE_NAMES,
    ATTRIBUTE_TABLE,
    FASHION_MNIST_ROOT,
    SEVEN_TARGET_LITERALS,
    SEVEN_TARGETS,
    SOURCE_CLASS_ATTRIBUTES,
    combination_index,
    load_digits_7to3,
    load_digits_without_attributes,
    load_fashion_7to3,
    satisfies,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits_7to3()


def test_digits_shapes_range_and_splits(digits):
    n = len(digits)
    assert n == 1264 and digits.images.shape == (n, 1, 16, 16) and digits.images.dtype == torch.float32
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0
    assert digits.source_classes.shape == (n,) and set(digits.source_classes.tolist()) == set(range(7))
    assert digits.attributes.shape == (n, 3) and digits.attributes.dtype == torch.bool
    assert digits.attribute_names == ("A", "B", "C")
    train, heldout = digits.train(), digits.heldout()
    assert (len(train), len(heldout)) == (885, 379)
    assert not set(digits.train_indices.tolist()) & set(digits.heldout_indices.tolist())
    assert not train.is_heldout.any() and heldout.is_heldout.all()
    for split in (train, heldout):  # every source class in both splits, stratified ~70/30
        counts = torch.bincount(split.source_classes, minlength=7)
        assert (counts > 0).all()
    share = torch.bincount(heldout.source_classes, minlength=7) / torch.bincount(digits.source_classes, minlength=7)
    assert ((share - 0.3).abs() < 0.01).all()
    assert sum(train.label_counts) == len(train)


def test_digits_labels_are_attributes_of_their_image(digits):
    assert digits.attributes[torch.arange(len(digits)), digits.single_labels].all()
    torch.testing.assert_close(digits.attributes, ATTRIBUTE_TABLE[digits.source_classes])
    # Uniform among the image's attributes: the 3-attribute class spreads its labels over A, B, C.
    labels_of_six = digits.single_labels[digits.source_classes == 6]
    shares = torch.bincount(labels_of_six, minlength=3).float() / len(labels_of_six)
    assert ((shares - 1 / 3).abs() < 0.12).all()
    # Single-attribute classes always carry that attribute.
    assert (digits.single_labels[digits.source_classes == 0] == 0).all()
    assert (digits.single_labels[digits.source_classes == 4] == 2).all()


def test_digits_deterministic_with_seed(digits):
    again = load_digits_7to3()
    assert torch.equal(again.images, digits.images) and torch.equal(again.single_labels, digits.single_labels)
    assert torch.equal(again.is_heldout, digits.is_heldout)
    other = load_digits_7to3(seed=1)
    assert not torch.equal(other.single_labels, digits.single_labels)
    assert not torch.equal(other.is_heldout, digits.is_heldout)
    assert load_digits_7to3(size=8).images.shape == (1264, 1, 8, 8)


def test_seven_targets_select_exactly_their_class():
    assert len(SEVEN_TARGETS) == 7 and len(SOURCE_CLASS_ATTRIBUTES) == 7
    for k, (present, absent) in enumerate(SEVEN_TARGET_LITERALS):
        assert sorted(present + absent) == list(ATTRIBUTE_NAMES)
        hits = satisfies(ATTRIBUTE_TABLE, present, absent)
        assert hits.tolist() == [j == k for j in range(7)]
        # The string form names the same literals.
        literals = [s.strip() for s in SEVEN_TARGETS[k].split("&")]
        assert sorted(literals) == sorted(list(present) + [f"~{name}" for name in absent])
    assert satisfies(torch.tensor([True, False, True]), ["A"], ["B"]).item()
    assert satisfies(ATTRIBUTE_TABLE, ["A"]).sum() == 4  # A is in 4 of the 7 combinations
    with pytest.raises(ValueError, match="Unknown attribute 'D'"):
        satisfies(ATTRIBUTE_TABLE, ["D"])


def test_combination_index():
    assert combination_index(ATTRIBUTE_TABLE).tolist() == list(range(7))
    assert combination_index(torch.zeros(2, 3, dtype=torch.bool)).tolist() == [-1, -1]


def test_digits_without_attributes():
    images = load_digits_without_attributes()
    assert images.shape == (533, 1, 16, 16) and images.min() >= -1.0 and images.max() <= 1.0


def test_fashion_missing_files_error_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_7to3(root=str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="apt-get install dataset-fashion-mnist")
def test_fashion_7to3():
    data = load_fashion_7to3(max_per_class=20)
    assert data.images.shape == (280, 1, 16, 16) and len(data.train()) == 140 and len(data.heldout()) == 140
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0
    assert set(data.source_classes.tolist()) == set(range(7))
    assert data.attributes[torch.arange(len(data)), data.single_labels].all()
    assert load_fashion_7to3(size=28, max_per_class=2).images.shape == (28, 1, 28, 28)
