import os
import subprocess

import pytest
import torch

import s2m_diffusers.demo.seven_to_three as seven_to_three
from s2m_diffusers.demo.seven_to_three import (
    ATTRIBUTE_NAMES,
    ATTRIBUTE_TABLE,
    FASHION_MNIST_ENV,
    SEVEN_TARGET_LITERALS,
    SEVEN_TARGETS,
    SOURCE_CLASS_ATTRIBUTES,
    combination_index,
    fashion_mnist_root,
    load_digits_7to3,
    load_digits_without_attributes,
    load_fashion_7to3,
)
from s2m_diffusers.evaluation import satisfies


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
        hits = satisfies(ATTRIBUTE_TABLE, present, absent, attribute_names=ATTRIBUTE_NAMES)
        assert hits.tolist() == [j == k for j in range(7)]
        # The string form names the same literals.
        literals = [s.strip() for s in SEVEN_TARGETS[k].split("&")]
        assert sorted(literals) == sorted(list(present) + [f"~{name}" for name in absent])
    assert satisfies(torch.tensor([True, False, True]), ["A"], ["B"], attribute_names=ATTRIBUTE_NAMES).item()
    assert satisfies(ATTRIBUTE_TABLE, ["A"], attribute_names=ATTRIBUTE_NAMES).sum() == 4  # A: 4 of the 7 combinations
    with pytest.raises(ValueError, match="Unknown attribute 'D'"):
        satisfies(ATTRIBUTE_TABLE, ["D"], attribute_names=ATTRIBUTE_NAMES)


def test_combination_index():
    assert combination_index(ATTRIBUTE_TABLE).tolist() == list(range(7))
    assert combination_index(torch.zeros(2, 3, dtype=torch.bool)).tolist() == [-1, -1]


def test_digits_without_attributes():
    images = load_digits_without_attributes()
    assert images.shape == (533, 1, 16, 16) and images.min() >= -1.0 and images.max() <= 1.0


def test_fashion_missing_files_error_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_7to3(root=str(tmp_path))


def test_fashion_root_from_argument_environment_or_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "env"))
    monkeypatch.setattr(seven_to_three, "_dpkg_fashion_mnist_root", lambda: "/from/dpkg")
    assert fashion_mnist_root(tmp_path) == str(tmp_path)  # an argument wins
    assert fashion_mnist_root() == str(tmp_path / "env")  # then the environment variable
    monkeypatch.delenv(FASHION_MNIST_ENV)
    assert fashion_mnist_root() == "/from/dpkg"  # then the Debian package's folder
    monkeypatch.setattr(seven_to_three, "_dpkg_fashion_mnist_root", lambda: None)
    with pytest.raises(FileNotFoundError, match=f"{FASHION_MNIST_ENV}.*apt-get install dataset-fashion-mnist"):
        load_fashion_7to3()  # neither: the error names both ways


def test_fashion_root_of_the_debian_package_is_the_folder_dpkg_lists(monkeypatch):
    listing = "/.\n/usr/share/datasets/fashion-mnist\n/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz\n"
    listing += "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz\n/usr/share/doc/dataset-fashion-mnist\n"
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=listing, stderr="")

    monkeypatch.setattr(seven_to_three.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(seven_to_three.subprocess, "run", fake_run)
    assert seven_to_three._dpkg_fashion_mnist_root() == "/usr/share/datasets/fashion-mnist"
    assert calls == [["/usr/bin/dpkg", "-L", "dataset-fashion-mnist"]]
    monkeypatch.setattr(
        seven_to_three.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "")
    )
    assert seven_to_three._dpkg_fashion_mnist_root() is None  # not installed


def _fashion_mnist_installed() -> bool:
    try:
        return os.path.isdir(fashion_mnist_root())
    except FileNotFoundError:
        return False


@pytest.mark.skipif(
    not _fashion_mnist_installed(), reason=f"set {FASHION_MNIST_ENV} or apt-get install dataset-fashion-mnist"
)
def test_fashion_7to3():
    data = load_fashion_7to3(max_per_class=20)
    assert data.images.shape == (280, 1, 16, 16) and len(data.train()) == 140 and len(data.heldout()) == 140
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0
    assert set(data.source_classes.tolist()) == set(range(7))
    assert data.attributes[torch.arange(len(data)), data.single_labels].all()
    assert load_fashion_7to3(size=28, max_per_class=2).images.shape == (28, 1, 28, 28)
