"""The 7to3 benchmark: 7 source classes become the 7 non-empty combinations of 3 attributes A, B, C.

The construction comes from CP-GAN and is used by the S2M paper (arXiv 2206.05764) on CIFAR-10. Every image of
source class `k` holds exactly the attribute set `SOURCE_CLASS_ATTRIBUTES[k]`; it gets **one** positive label drawn
uniformly among those attributes (a single-positive pair), and its full attribute set is kept for evaluation only.

| source class  | 0 | 1    | 2 | 3    | 4 | 5    | 6       |
|---------------|---|------|---|------|---|------|---------|
| attribute set | A | A, B | B | B, C | C | A, C | A, B, C |

Two sources of real images work offline:

- `load_digits_7to3`: scikit-learn's bundled digits (8x8, 1797 images), classes 0..6, upsampled to 16x16.
- `load_fashion_7to3`: Fashion-MNIST classes 0..6, 28x28 downsampled to 16x16, from the folder that
  `fashion_mnist_root` finds: the environment variable `S2M_FASHION_MNIST`, else the Debian package
  `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`; located with `dpkg -L`).

Images are float tensors (N, 1, H, W) in [-1, 1], the diffusers convention for model inputs.

Examples:

```py
>>> from s2m_diffusers.demo.seven_to_three import SEVEN_TARGETS, load_digits_7to3
>>> data = load_digits_7to3()
>>> train, heldout = data.train(), data.heldout()
>>> train.images.shape[1:], data.attribute_names, SEVEN_TARGETS[1]
(torch.Size([1, 16, 16]), ('A', 'B', 'C'), 'A & B & ~C')
```
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ATTRIBUTE_NAMES: tuple[str, ...] = ("A", "B", "C")

# Attribute set of each source class, in the order of the table above.
SOURCE_CLASS_ATTRIBUTES: tuple[tuple[str, ...], ...] = (
    ("A",),
    ("A", "B"),
    ("B",),
    ("B", "C"),
    ("C",),
    ("A", "C"),
    ("A", "B", "C"),
)

# (7, 3) bool: row k is the attribute set of source class k over ATTRIBUTE_NAMES.
ATTRIBUTE_TABLE: torch.Tensor = torch.tensor(
    [[name in attributes for name in ATTRIBUTE_NAMES] for attributes in SOURCE_CLASS_ATTRIBUTES], dtype=torch.bool
)

# The 7 targets; SEVEN_TARGETS[k] holds exactly the images of source class k.
SEVEN_TARGETS: tuple[str, ...] = (
    "A & ~B & ~C",
    "A & B & ~C",
    "B & ~A & ~C",
    "B & C & ~A",
    "C & ~A & ~B",
    "A & C & ~B",
    "A & B & C",
)

# The same targets as (present, absent) attribute names, so that no parser is needed to score them.
SEVEN_TARGET_LITERALS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = tuple(
    (attributes, tuple(name for name in ATTRIBUTE_NAMES if name not in attributes))
    for attributes in SOURCE_CLASS_ATTRIBUTES
)

# Shipped Digits-7to3 models (installed with the package): `gan/`, `gan_conditional/`, `ddpm/` (a DDPMPipeline
# folder), `evaluator/` and the heads `heads_gan/`, `heads_ddpm/`, `heads_gan_conditional/`.
DIGITS_7TO3_PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "digits7to3")

# The two real-image sources of 7to3, by name (`load_7to3`).
DATASETS: tuple[str, ...] = ("digits", "fashion")

# The environment variable that names the Fashion-MNIST folder, and the Debian package that installs it.
FASHION_MNIST_ENV = "S2M_FASHION_MNIST"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"


def combination_index(attributes: torch.Tensor) -> torch.Tensor:
    """The source class (0..6) whose attribute set equals each row, or -1 for the empty set.

    Args:
        attributes (`torch.Tensor`): bool `(B, 3)` over `ATTRIBUTE_NAMES`.

    Returns:
        `torch.Tensor`: long `(B,)`: index into `SEVEN_TARGETS`, -1 where no attribute is present.
    """
    table = ATTRIBUTE_TABLE.to(attributes.device)  # (7, 3)
    matches = (attributes.bool()[:, None, :] == table[None]).all(dim=-1)  # (B, 7)
    return torch.where(matches.any(dim=1), matches.int().argmax(dim=1), -1)


@dataclass(eq=False)
class SevenToThree:
    """A 7to3 dataset: images, their source classes, full attribute sets, and one single-positive label each.

    Attributes:
        images (`torch.Tensor`): float `(N, 1, H, W)` in [-1, 1].
        source_classes (`torch.Tensor`): long `(N,)` in 0..6.
        attributes (`torch.Tensor`): bool `(N, 3)`: the full attribute set (for evaluation only).
        single_labels (`torch.Tensor`): long `(N,)`: index into `attribute_names` of the one positive label.
        is_heldout (`torch.Tensor`): bool `(N,)`: `False` for the `train` split (generators and heads), `True` for
            the `heldout` split (the evaluator and held-out head metrics).
        attribute_names (`tuple[str, ...]`): `("A", "B", "C")`.
    """

    images: torch.Tensor
    source_classes: torch.Tensor
    attributes: torch.Tensor
    single_labels: torch.Tensor
    is_heldout: torch.Tensor
    attribute_names: tuple[str, ...] = ATTRIBUTE_NAMES

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def train_indices(self) -> torch.Tensor:
        return torch.nonzero(~self.is_heldout).flatten()

    @property
    def heldout_indices(self) -> torch.Tensor:
        return torch.nonzero(self.is_heldout).flatten()

    @property
    def label_counts(self) -> list[int]:
        """Number of single-positive labels per attribute (gives p_data(c))."""
        return torch.bincount(self.single_labels, minlength=len(self.attribute_names)).tolist()

    def subset(self, indices: torch.Tensor) -> SevenToThree:
        """The rows `indices` of every field."""
        return SevenToThree(
            images=self.images[indices],
            source_classes=self.source_classes[indices],
            attributes=self.attributes[indices],
            single_labels=self.single_labels[indices],
            is_heldout=self.is_heldout[indices],
            attribute_names=self.attribute_names,
        )

    def train(self) -> SevenToThree:
        """The `train` split: for generators and heads."""
        return self.subset(self.train_indices)

    def heldout(self) -> SevenToThree:
        """The `heldout` split: for the evaluator and held-out head metrics."""
        return self.subset(self.heldout_indices)


def _draw_single_labels(source_classes: np.ndarray, seed: int) -> np.ndarray:
    """One positive label per image, uniform among the attributes of its source class."""
    rng = np.random.default_rng(seed)
    uniforms = rng.random(len(source_classes))
    labels = np.empty(len(source_classes), dtype=np.int64)
    for i, (k, u) in enumerate(zip(source_classes, uniforms)):
        choices = SOURCE_CLASS_ATTRIBUTES[k]
        labels[i] = ATTRIBUTE_NAMES.index(choices[int(u * len(choices))])
    return labels


def _stratified_heldout(source_classes: np.ndarray, heldout_fraction: float, seed: int) -> np.ndarray:
    """A bool mask that puts `round(heldout_fraction * n_k)` images of every source class k in the heldout split."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"`heldout_fraction` must lie in (0, 1), got {heldout_fraction}.")
    rng = np.random.default_rng(seed)
    is_heldout = np.zeros(len(source_classes), dtype=bool)
    for k in range(len(SOURCE_CLASS_ATTRIBUTES)):
        members = np.flatnonzero(source_classes == k)
        chosen = rng.permutation(members)[: int(round(heldout_fraction * len(members)))]
        is_heldout[chosen] = True
    return is_heldout


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, 1, h, w) images; antialiased when shrinking."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrinking = size < images.shape[-1]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


def _build(
    images01: torch.Tensor, source_classes: np.ndarray, is_heldout: np.ndarray, size: int, seed: int
) -> SevenToThree:
    """Resize images in [0, 1], map to [-1, 1], attach attribute sets and single-positive labels."""
    images = _resize(images01, size).clamp(0.0, 1.0) * 2.0 - 1.0
    classes = torch.from_numpy(source_classes.astype(np.int64))
    return SevenToThree(
        images=images.contiguous(),
        source_classes=classes,
        attributes=ATTRIBUTE_TABLE[classes],
        single_labels=torch.from_numpy(_draw_single_labels(source_classes, seed)),
        is_heldout=torch.from_numpy(is_heldout),
    )


def load_digits_7to3(size: int = 16, heldout_fraction: float = 0.3, seed: int = 0) -> SevenToThree:
    """Digits-7to3 from scikit-learn's bundled digits (offline): classes 0..6, 1264 images (885 train, 379 heldout).

    Args:
        size (`int`, defaults to 16): side of the returned images (bilinear resize of the 8x8 digits).
        heldout_fraction (`float`, defaults to 0.3): share of each source class put in the `heldout` split.
        seed (`int`, defaults to 0): seed of the split and of the single-positive labels.

    Returns:
        [`SevenToThree`]: images `(1264, 1, size, size)` in [-1, 1].
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < len(SOURCE_CLASS_ATTRIBUTES)
    source_classes = digits.target[keep].astype(np.int64)
    images01 = torch.from_numpy(digits.images[keep].astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    is_heldout = _stratified_heldout(source_classes, heldout_fraction, seed)
    return _build(images01, source_classes, is_heldout, size, seed)


def load_digits_without_attributes(size: int = 16) -> torch.Tensor:
    """The digits 7, 8 and 9 of scikit-learn's digits (533 images): images that hold none of A, B, C.

    They lie outside the 7to3 universe; the evaluator uses half of them as its "no attribute" class, so that it can
    flag generated images that are no combination at all.

    Args:
        size (`int`, defaults to 16): side of the returned images (bilinear resize of the 8x8 digits).

    Returns:
        `torch.Tensor`: images `(533, 1, size, size)` in [-1, 1].
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target >= len(SOURCE_CLASS_ATTRIBUTES)
    images01 = torch.from_numpy(digits.images[keep].astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    return (_resize(images01, size).clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def _dpkg_fashion_mnist_root() -> str | None:
    """The folder of `train-images-idx3-ubyte.gz` among the files `dpkg -L dataset-fashion-mnist` lists, or None."""
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return None
    try:
        listing = subprocess.run(
            [dpkg, "-L", FASHION_MNIST_PACKAGE], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if listing.returncode != 0:  # the package is not installed
        return None
    for path in listing.stdout.splitlines():
        if os.path.basename(path).startswith("train-images-idx3-ubyte"):
            return os.path.dirname(path)
    return None


def fashion_mnist_root(root: str | os.PathLike | None = None) -> str:
    """The folder of the Fashion-MNIST IDX files: `root`, else `$S2M_FASHION_MNIST`, else the Debian package's.

    Args:
        root (`str`, *optional*): a folder to use as is.

    Returns:
        `str`: the folder (its files are checked when they are read).

    Raises:
        `FileNotFoundError`: when `root` is `None`, the environment variable is unset and the Debian package
            `dataset-fashion-mnist` is not installed; the message names both ways to provide the data.
    """
    if root is not None:
        return os.fspath(root)
    if os.environ.get(FASHION_MNIST_ENV):
        return os.environ[FASHION_MNIST_ENV]
    found = _dpkg_fashion_mnist_root()
    if found is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found. Either set the environment variable {FASHION_MNIST_ENV} to a folder that "
            "holds `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz` and "
            f"`t10k-labels-idx1-ubyte.gz` (gzipped or not), or install the Debian package with `apt-get install "
            f"{FASHION_MNIST_PACKAGE}` (found with `dpkg -L {FASHION_MNIST_PACKAGE}`); or pass `root=`."
        )
    return found


def _read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic number {magic:#x}).")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_7to3(
    size: int = 16,
    root: str | os.PathLike | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> SevenToThree:
    """Fashion-7to3: Fashion-MNIST classes 0..6 (T-shirt, trouser, pullover, dress, coat, sandal, shirt).

    The `train` split is Fashion-MNIST's training file, the `heldout` split its test file (42,000 + 7,000 images).

    Args:
        size (`int`, defaults to 16): side of the returned images (antialiased bilinear resize of 28x28).
        root (`str`, *optional*): folder holding `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
            `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz` (gzipped or not). Defaults to
            [`fashion_mnist_root`]: `$S2M_FASHION_MNIST`, else the Debian package `dataset-fashion-mnist`.
        max_per_class (`int`, *optional*): keep at most this many images per source class in each split (the
            first ones in file order).
        seed (`int`, defaults to 0): seed of the single-positive labels.

    Returns:
        [`SevenToThree`]: images `(N, 1, size, size)` in [-1, 1].
    """
    root = fashion_mnist_root(root)
    images, classes, heldout = [], [], []
    for prefix, is_heldout in (("train", False), ("t10k", True)):
        paths = _fashion_files(root, prefix)
        split_images, split_labels = _read_idx(paths[0]), _read_idx(paths[1]).astype(np.int64)
        keep = split_labels < len(SOURCE_CLASS_ATTRIBUTES)
        if max_per_class is not None:
            rank = np.zeros_like(keep)
            for k in range(len(SOURCE_CLASS_ATTRIBUTES)):
                rank[np.flatnonzero(split_labels == k)[:max_per_class]] = True
            keep &= rank
        images.append(split_images[keep])
        classes.append(split_labels[keep])
        heldout.append(np.full(int(keep.sum()), is_heldout))
    images01 = torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0)[:, None]  # (N, 1, 28, 28)
    return _build(images01, np.concatenate(classes), np.concatenate(heldout), size, seed)


def _fashion_files(root: str, prefix: str) -> tuple[str, str]:
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [os.path.join(root, f"{prefix}-{kind}{ext}") for ext in (".gz", "")]
        found = [p for p in candidates if os.path.exists(p)]
        if not found:
            raise FileNotFoundError(
                f"Fashion-MNIST file {candidates[0]} not found. Install it with "
                f"`apt-get install {FASHION_MNIST_PACKAGE}` (Debian/Ubuntu), or set {FASHION_MNIST_ENV} or pass "
                "`root=` to a folder that holds the four IDX files."
            )
        paths.append(found[0])
    return paths[0], paths[1]


def load_fashion_without_attributes(size: int = 16, root: str | os.PathLike | None = None) -> torch.Tensor:
    """Fashion-MNIST test images of classes 7, 8, 9 (sneaker, bag, ankle boot): real images outside the 7to3 universe.

    They train and test the evaluator's "no attribute" class, like `load_digits_without_attributes` for Digits.

    Args:
        size (`int`, defaults to 16): side of the returned images (antialiased bilinear resize of 28x28).
        root (`str`, *optional*): folder of the IDX files; defaults to [`fashion_mnist_root`].

    Returns:
        `torch.Tensor`: images `(3000, 1, size, size)` in [-1, 1].
    """
    image_path, label_path = _fashion_files(fashion_mnist_root(root), "t10k")
    images, labels = _read_idx(image_path), _read_idx(label_path).astype(np.int64)
    images01 = torch.from_numpy(images[labels >= len(SOURCE_CLASS_ATTRIBUTES)].astype(np.float32) / 255.0)[:, None]
    return (_resize(images01, size).clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def load_7to3(dataset: str, size: int = 16, seed: int = 0) -> SevenToThree:
    """`load_digits_7to3` or `load_fashion_7to3` by name.

    Args:
        dataset (`str`): `"digits"` or `"fashion"`.
        size (`int`, defaults to 16): side of the returned images.
        seed (`int`, defaults to 0): seed of the single-positive labels (and of Digits' split).

    Returns:
        [`SevenToThree`]: images in [-1, 1].
    """
    if dataset == "digits":
        return load_digits_7to3(size=size, seed=seed)
    if dataset == "fashion":
        return load_fashion_7to3(size=size, seed=seed)
    raise ValueError(f"Unknown 7to3 dataset {dataset!r}; choose one of {list(DATASETS)}.")


def load_without_attributes(dataset: str, size: int = 16) -> torch.Tensor:
    """Real images outside the 7to3 universe of `dataset` (digits 7-9, or Fashion-MNIST classes 7-9), in [-1, 1]."""
    if dataset == "digits":
        return load_digits_without_attributes(size=size)
    if dataset == "fashion":
        return load_fashion_without_attributes(size=size)
    raise ValueError(f"Unknown 7to3 dataset {dataset!r}; choose one of {list(DATASETS)}.")
