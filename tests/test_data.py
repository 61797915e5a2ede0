import numpy as np
import pytest
import torch
from PIL import Image

from s2m_diffusers.data import ImageBank, ImageBankProposal, SinglePositiveDataset, load_image_folder, prepare_images


def _write(path, size=(12, 10), mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def _folder(root, names=("smiling", "male"), per_class=3):
    for c, name in enumerate(names):
        for i in range(per_class + c):
            _write(root / name / f"{i}.png", size=(12 + i, 10), value=40 * (c + 1))
    return root


def test_prepare_images_from_pil_arrays_and_tensors():
    images = [Image.new("RGB", (20, 10), (255, 255, 255)), Image.new("L", (8, 8), 0), Image.new("P", (8, 8))]
    out = prepare_images(images, sample_size=8, in_channels=1)
    assert out.shape == (3, 1, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.ones(1, 8, 8))
    torch.testing.assert_close(out[1], -torch.ones(1, 8, 8))
    arrays = np.full((2, 1, 4, 4), 255, dtype=np.uint8)
    torch.testing.assert_close(prepare_images(arrays, 8, 3), torch.ones(2, 3, 8, 8))
    floats = torch.zeros(2, 3, 16, 16)
    torch.testing.assert_close(prepare_images(floats, 8, 1, value_range=(0.0, 1.0)), -torch.ones(2, 1, 8, 8))
    # A wide image is resized on its shorter side, then centre-cropped.
    wide = torch.zeros(1, 1, 4, 8)
    wide[..., 2:6] = 1.0
    torch.testing.assert_close(prepare_images(wide, 4, 1, value_range=(0.0, 1.0)), torch.ones(1, 1, 4, 4))


def test_from_folder(tmp_path):
    data = SinglePositiveDataset.from_folder(_folder(tmp_path), sample_size=8, in_channels=1)
    assert data.attribute_names == ["male", "smiling"]  # sorted sub-folders
    assert data.label_counts == [4, 3] and data.images.shape == (7, 1, 8, 8)
    assert data.images.min() >= -1 and data.images.max() <= 1
    image, label = data[0]
    assert image.shape == (1, 8, 8) and label == 0
    chosen = SinglePositiveDataset.from_folder(tmp_path, 8, 3, attribute_names=["smiling", "male"])
    assert chosen.label_counts == [3, 4] and chosen.in_channels == 3


def test_from_folder_skips_what_is_not_an_image(tmp_path):
    """As the README's data section says: notes, hidden files and sub-folders in an attribute folder are skipped,
    and a hidden folder is no attribute."""
    root = _folder(tmp_path)
    (root / "male" / "notes.txt").write_text("taken on 3 May")
    (root / "male" / ".DS_Store").write_bytes(b"\0\1")
    _write(root / "male" / ".ipynb_checkpoints" / "0-checkpoint.png")
    _write(root / "male" / "._0.png")  # macOS metadata beside an image
    _write(root / ".cache" / "0.png")
    data = SinglePositiveDataset.from_folder(root, sample_size=8, in_channels=1)
    assert data.attribute_names == ["male", "smiling"] and data.label_counts == [4, 3]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SinglePositiveDataset.from_folder(tmp_path / "nowhere", 8, 1)
    root = _folder(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="Attribute folder .*old.* is missing"):
        SinglePositiveDataset.from_folder(root, 8, 1, attribute_names=["male", "old"])
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.* holds no images"):
        SinglePositiveDataset.from_folder(root, 8, 1)
    (root / "empty").rmdir()
    (root / "male" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Cannot read image .*broken.png"):
        SinglePositiveDataset.from_folder(root, 8, 1)
    one = _folder(tmp_path / "one", names=("male",))
    with pytest.raises(ValueError, match="at least 2 attributes"):
        SinglePositiveDataset.from_folder(one, 8, 1)
    bad = _folder(tmp_path / "bad", names=("black hair", "male"))
    with pytest.raises(ValueError, match="'black hair' is not allowed"):
        SinglePositiveDataset.from_folder(bad, 8, 1)


def test_tensor_errors():
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match="Duplicate attribute names"):
        SinglePositiveDataset(images, torch.tensor([0, 1, 0, 1]), ["a", "a"])
    with pytest.raises(ValueError, match=r"Labels out of range: \[2, 5\]"):
        SinglePositiveDataset(images, torch.tensor([0, 1, 2, 5]), ["a", "b"])
    with pytest.raises(ValueError, match="Labels out of range"):
        SinglePositiveDataset(images, torch.tensor([0, 1, -1, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="at least 2 attributes"):
        SinglePositiveDataset(images, torch.zeros(4, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        SinglePositiveDataset(images + 255, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="one per image"):
        SinglePositiveDataset(images, torch.tensor([0, 1]), ["a", "b"])


def test_from_tensors_converts():
    images = np.full((4, 3, 10, 10), 255, dtype=np.uint8)
    data = SinglePositiveDataset.from_tensors(images, [0, 1, 1, 0], ["a", "b"], sample_size=8, in_channels=1)
    assert data.images.shape == (4, 1, 8, 8) and torch.allclose(data.images, torch.ones(4, 1, 8, 8))


class FakeClassLabel:
    def __init__(self, names):
        self.names = names


class FakeHFDataset:
    """The parts of `datasets.Dataset` that `from_hf_dataset` uses."""

    def __init__(self, columns, features=None):
        self.columns, self.features = columns, features or {}
        self.column_names = list(columns)

    def __getitem__(self, key):
        return self.columns[key]


def test_from_hf_dataset_duck_typed():
    images = [Image.new("L", (8, 8), 255 * (i % 2)) for i in range(4)]
    ds = FakeHFDataset({"img": images, "lab": [0, 1, 0, 1]}, {"lab": FakeClassLabel(["x", "y"])})
    data = SinglePositiveDataset.from_hf_dataset(ds, 4, 1, image_column="img", label_column="lab")
    assert data.attribute_names == ["x", "y"] and data.label_counts == [2, 2]
    torch.testing.assert_close(data.images[1], torch.ones(1, 4, 4))
    strings = FakeHFDataset({"image": images, "label": ["y", "x", "y", "y"]})
    assert SinglePositiveDataset.from_hf_dataset(strings, 4, 1).label_counts == [1, 3]
    with pytest.raises(ValueError, match="Column 'picture' is not in the dataset"):
        SinglePositiveDataset.from_hf_dataset(ds, 4, 1, image_column="picture", label_column="lab")
    with pytest.raises(ValueError, match="pass `attribute_names`"):
        SinglePositiveDataset.from_hf_dataset(FakeHFDataset({"image": images, "label": [0, 1, 0, 1]}), 4, 1)
    out_of_range = FakeHFDataset({"image": images, "label": [0, 1, 2, 1]}, {"label": FakeClassLabel(["x", "y"])})
    with pytest.raises(ValueError, match="Labels out of range"):
        SinglePositiveDataset.from_hf_dataset(out_of_range, 4, 1)


def test_from_real_hf_dataset():
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (6, 6), (0, 0, 0)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["p", "q"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1, 1]}, features=features)
    data = SinglePositiveDataset.from_hf_dataset(ds, 4, 3)
    assert data.attribute_names == ["p", "q"] and data.label_counts == [1, 3] and data.images.shape == (4, 3, 4, 4)


def test_split_is_stratified_and_seeded():
    data = SinglePositiveDataset(torch.zeros(40, 1, 4, 4), torch.arange(40) % 4, ["a", "b", "c", "d"])
    train, heldout = data.split(0.2, seed=3)
    assert heldout.label_counts == [2, 2, 2, 2] and train.label_counts == [8, 8, 8, 8]
    again = data.split(0.2, seed=3)[1]
    assert torch.equal(again.labels, heldout.labels)


def test_image_bank(tmp_path):
    assert ImageBankProposal is ImageBank  # the deprecated name still works
    for i in range(5):
        _write(tmp_path / f"{i}.png", size=(8, 8), mode="L", value=50 * i)
    bank = ImageBank.from_folder(tmp_path, 8, 1)
    assert len(bank) == 5 and load_image_folder(tmp_path, 8, 1).shape == (5, 1, 8, 8)
    draws = bank(7, torch.Generator().manual_seed(0))
    assert draws.shape == (7, 1, 8, 8)
    train, heldout = bank.split(0.4)
    assert len(train) == 3 and len(heldout) == 2
    assert not any(torch.equal(a, b) for a in train.images for b in heldout.images)
