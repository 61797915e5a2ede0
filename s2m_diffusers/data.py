"""Single-positive data for training the S2M heads: pairs `(x, c)` where image x is known to hold attribute c.

Three sources, one result ([`SinglePositiveDataset`], images `(N, C, S, S)` in [-1, 1] and integer labels):

- a folder with one sub-folder per attribute (the sub-folder's name is the attribute): `from_folder`;
- a Hugging Face `datasets` dataset with an image column and a label column: `from_hf_dataset` (by name, from
  the Hub or from disk: [`load_hf_dataset`]);
- tensors: `from_tensors` (or the constructor, for images already in the proposal's format).

[`prepare_images`] is the one place where images of any origin are brought to the proposal's size, channel count
and value range:

1. channels: PIL images are converted with `Image.convert("L")` (1 channel) or `"RGB"` (3 channels); tensors with
   1 channel are repeated to 3, 3 channels are averaged with the ITU-R 601 luma weights to 1 (as PIL does), a 4th
   (alpha) channel is dropped;
2. size: the shorter side is resized to `sample_size` (bilinear, antialiased when shrinking), then the centre is
   cropped to `sample_size x sample_size`;
3. value range: mapped linearly from the source range (`[0, 255]` for PIL and integer arrays, the given
   `value_range` for float tensors) to [-1, 1], the diffusers convention for model inputs.

A folder of pre-generated proposal samples serves as a proposal for training ``D_v`` through [`ImageBank`].
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .targets import check_attribute_names
from .utils import optional_dependency

MIN_IMAGES_PER_ATTRIBUTE = 2  # one to train on and one held out for early stopping and calibration
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_LUMA = (0.299, 0.587, 0.114)


def _to_float_chw(image, value_range: tuple[float, float]) -> torch.Tensor:
    """One image (PIL, numpy or torch) as a float tensor (C, H, W) in [0, 1]."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):  # palette, alpha, 16-bit, bilevel, CMYK ...: 8-bit RGB(A)
            image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
        return _to_float_chw(np.asarray(image), (0, 255))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            value_range = (0, 255)
        tensor = torch.from_numpy(np.array(image, copy=True)).float()
        if tensor.ndim == 2:
            tensor = tensor[None]
        elif tensor.ndim == 3 and tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
            tensor = tensor.permute(2, 0, 1)  # HWC -> CHW
    elif isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            value_range = (0, 255)
        tensor = image.float()
        if tensor.ndim == 2:
            tensor = tensor[None]
    else:
        raise TypeError(f"Unsupported image type {type(image).__name__}; pass PIL images, numpy arrays or tensors.")
    if tensor.ndim != 3:
        raise ValueError(f"An image must have 2 or 3 dimensions (H, W) / (C, H, W), got shape {tuple(tensor.shape)}.")
    low, high = value_range
    return (tensor - low) / (high - low)


def _match_channels(images: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(N, c, H, W) -> (N, in_channels, H, W): drop alpha, repeat grey, or take luma."""
    c = images.shape[1]
    if c in (2, 4):  # grey+alpha, RGB+alpha
        images, c = images[:, : c - 1], c - 1
    if c == in_channels:
        return images
    if c == 1 and in_channels == 3:
        return images.expand(-1, 3, -1, -1)
    if c == 3 and in_channels == 1:
        weights = torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    raise ValueError(f"Cannot bring {c}-channel images to {in_channels} channels; only 1 <-> 3 are converted.")


def _resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): shorter side to `size` (bilinear), then a centre crop."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1.0
        )
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top : top + size, left : left + size]
    return images


def prepare_images(
    images: Iterable | torch.Tensor | np.ndarray,
    sample_size: int,
    in_channels: int,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Bring images to the proposal's format: float `(N, in_channels, sample_size, sample_size)` in [-1, 1].

    The one place where this happens (see the module docstring for the exact steps).

    Args:
        images (`Iterable`, `torch.Tensor` or `np.ndarray`): a batch tensor/array `(N, C, H, W)`, or any iterable
            of PIL images, arrays `(H, W)`, `(H, W, C)`, `(C, H, W)` or tensors `(C, H, W)` (sizes may differ).
        sample_size (`int`): side of the output images.
        in_channels (`int`): channels of the output images (1 or 3).
        value_range (`tuple[float, float]`, defaults to `(-1.0, 1.0)`): the range of float inputs; PIL images and
            uint8 arrays are always read as `[0, 255]`.

    Returns:
        `torch.Tensor`: `(N, in_channels, sample_size, sample_size)`, float32, in [-1, 1].
    """
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:  # one batch (N, C, H, W)
        low, high = (0, 255) if images.dtype in (np.uint8, torch.uint8) else value_range
        out = (torch.as_tensor(images).float() - low) / (high - low)  # (N, C, H, W) in [0, 1]
        out = _resize_center_crop(_match_channels(out, in_channels), sample_size)
    else:
        prepared = [
            _resize_center_crop(_match_channels(_to_float_chw(image, value_range)[None], in_channels), sample_size)
            for image in images
        ]
        if not prepared:
            return torch.empty(0, in_channels, sample_size, sample_size)
        out = torch.cat(prepared)
    return (out.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def _list_images(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    )


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Exception as error:  # PIL raises several types for bad files
        raise ValueError(
            f"Cannot read image {path!r} ({type(error).__name__}: {error}). Remove or replace it."
        ) from None


def load_image_folder(folder: str | os.PathLike, sample_size: int, in_channels: int) -> torch.Tensor:
    """All images of a flat folder, in file-name order, in the proposal's format (see [`prepare_images`]).

    Args:
        folder (`str` or `os.PathLike`): a folder of image files.
        sample_size (`int`): side of the output images.
        in_channels (`int`): channels of the output images.

    Returns:
        `torch.Tensor`: `(N, in_channels, sample_size, sample_size)` in [-1, 1].
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Image folder {folder!r} does not exist.")
    paths = _list_images(folder)
    if not paths:
        raise ValueError(f"Image folder {folder!r} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}).")
    return prepare_images((_open_image(p) for p in paths), sample_size, in_channels)


def load_hf_dataset(dataset_name: str | os.PathLike, dataset_config_name: str | None = None, split: str = "train"):
    """A Hugging Face `datasets` dataset by name, as diffusers' training scripts take it (`--dataset_name`).

    Args:
        dataset_name (`str` or `os.PathLike`): a folder written by `save_to_disk` (read with
            `datasets.load_from_disk`), or anything `datasets.load_dataset` reads: a local folder of data files
            (e.g. an `imagefolder` or parquet files), or a Hub dataset id (downloaded when online, else read from the
            cache).
        dataset_config_name (`str`, *optional*): the dataset's configuration (`load_dataset` only).
        split (`str`, defaults to `"train"`): the split taken from a dataset with several.

    Returns:
        `datasets.Dataset`: the split, with every row (the images are decoded when
        [`SinglePositiveDataset.from_hf_dataset`] reads them: the whole split is held in memory).

    Raises:
        ModuleNotFoundError: `datasets` is not installed (``pip install 's2m-diffusers[datasets]'``).
        ValueError: the dataset has no split `split` (the message lists its splits).
    """
    with optional_dependency("datasets", "A `datasets` dataset as training data"):
        import datasets

    path = os.fspath(dataset_name)
    saved = os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")
    )  # what `save_to_disk` writes
    if saved:
        if dataset_config_name is not None:
            raise ValueError(
                f"{path!r} is a dataset saved with `save_to_disk`, which has no configurations; drop "
                f"dataset_config_name={dataset_config_name!r}."
            )
        dataset = datasets.load_from_disk(path)
    else:
        dataset = datasets.load_dataset(path, dataset_config_name)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"The dataset {path!r} has no split {split!r}; its splits are {list(dataset)}.")
        dataset = dataset[split]
    return dataset


class SinglePositiveDataset(torch.utils.data.Dataset):
    """Single-positive pairs `(image, label)`: the image holds attribute `attribute_names[label]`.

    Args:
        images (`torch.Tensor`): `(N, C, S, S)` float in [-1, 1], the proposal's format (use [`prepare_images`] or
            the `from_*` constructors for anything else).
        labels (`torch.Tensor`): `(N,)` integers in `[0, n)`.
        attribute_names (`Sequence[str]`): the `n >= 2` attribute names, unique, matching `[A-Za-z0-9_.]+`.

    Examples:

    ```py
    >>> import torch
    >>> from s2m_diffusers.data import SinglePositiveDataset
    >>> data = SinglePositiveDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 1, 0]), ["smiling", "male"])
    >>> data.label_counts, data.sample_size, data.in_channels
    ([2, 2], 8, 1)
    ```
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, attribute_names: Sequence[str]):
        names = list(attribute_names)
        check_attribute_names(names)
        labels = torch.as_tensor(labels)
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"`images` must be (N, C, S, S) with square images, got shape {tuple(images.shape)}.")
        if not images.is_floating_point():
            raise ValueError(f"`images` must be float in [-1, 1], got dtype {images.dtype}; use `prepare_images`.")
        if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
            raise ValueError(
                f"`images` must lie in [-1, 1], got [{images.min():.3g}, {images.max():.3g}]; use `prepare_images` "
                "with the right `value_range`."
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"`labels` must be ({images.shape[0]},), one per image, got shape {tuple(labels.shape)}.")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"`labels` must be integers, got dtype {labels.dtype}.")
        bad = labels[(labels < 0) | (labels >= len(names))]
        if bad.numel():
            raise ValueError(
                f"Labels out of range: {sorted(set(bad.tolist()))[:10]}; labels index `attribute_names` "
                f"{names} and must lie in [0, {len(names) - 1}]."
            )
        if images.shape[0] == 0:
            raise ValueError("The dataset is empty.")
        self.images = images.float().contiguous()
        self.labels = labels.long()
        self.attribute_names = names

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def sample_size(self) -> int:
        return self.images.shape[-1]

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def label_counts(self) -> list[int]:
        """Number of single-positive labels per attribute (gives ``p_data(c)``)."""
        return torch.bincount(self.labels, minlength=len(self.attribute_names)).tolist()

    def subset(self, indices: torch.Tensor) -> SinglePositiveDataset:
        return SinglePositiveDataset(self.images[indices], self.labels[indices], self.attribute_names)

    def split(self, heldout_fraction: float, seed: int = 0) -> tuple[SinglePositiveDataset, SinglePositiveDataset]:
        """A stratified split: `round(heldout_fraction * n_c)` images of each label go to the held-out part, at
        least one and at most `n_c - 1`, so that every attribute is both trained on and held out.

        Args:
            heldout_fraction (`float`): share held out, in (0, 1).
            seed (`int`, defaults to 0): seed of the split.

        Returns:
            `tuple[SinglePositiveDataset, SinglePositiveDataset]`: `(train, heldout)`.

        Raises:
            ValueError: `heldout_fraction` outside (0, 1), or an attribute with fewer than
                `MIN_IMAGES_PER_ATTRIBUTE` (2) images, naming each such attribute.
        """
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(
                f"heldout_fraction must lie in (0, 1), got {heldout_fraction}: it is the share of each attribute's "
                "images held out for early stopping and calibration (0.2 is usual)."
            )
        few = [(n, c) for n, c in zip(self.attribute_names, self.label_counts) if c < MIN_IMAGES_PER_ATTRIBUTE]
        if few:
            listed = ", ".join(f"{name!r} ({count})" for name, count in few)
            raise ValueError(
                f"Each attribute needs at least {MIN_IMAGES_PER_ATTRIBUTE} images, one to train on and one held out "
                f"for early stopping and calibration (usable heads need hundreds); these have fewer: {listed}. Add "
                "images of them (into their sub-folders of the data folder), or leave those attributes out."
            )
        generator = torch.Generator().manual_seed(seed)
        heldout = torch.zeros(len(self), dtype=torch.bool)
        for c in range(len(self.attribute_names)):
            members = torch.nonzero(self.labels == c).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            heldout[members[: min(max(1, round(heldout_fraction * len(members))), len(members) - 1)]] = True
        return self.subset(torch.nonzero(~heldout).flatten()), self.subset(torch.nonzero(heldout).flatten())

    @classmethod
    def from_tensors(
        cls,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        attribute_names: Sequence[str],
        sample_size: int | None = None,
        in_channels: int | None = None,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> SinglePositiveDataset:
        """From a batch `(N, C, H, W)` of images in `value_range` (uint8 arrays: [0, 255]) and integer labels.

        Args:
            images (`torch.Tensor` or `np.ndarray`): `(N, C, H, W)`.
            labels: `(N,)` integers in `[0, n)`.
            attribute_names (`Sequence[str]`): the `n` attribute names.
            sample_size (`int`, *optional*): proposal's image side; defaults to the images' side.
            in_channels (`int`, *optional*): proposal's channels; defaults to the images' channels.
            value_range (`tuple[float, float]`, defaults to `(-1.0, 1.0)`): range of float images.
        """
        if images.ndim != 4:
            raise ValueError(f"`images` must be (N, C, H, W), got shape {tuple(images.shape)}.")
        sample_size = sample_size or images.shape[-1]
        in_channels = in_channels or images.shape[1]
        return cls(
            prepare_images(images, sample_size, in_channels, value_range), torch.as_tensor(labels), attribute_names
        )

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike,
        sample_size: int,
        in_channels: int,
        attribute_names: Sequence[str] | None = None,
    ) -> SinglePositiveDataset:
        """From a folder with one sub-folder of images per attribute; the sub-folder's name is the attribute.

        Args:
            root (`str` or `os.PathLike`): the folder, e.g. `root/smiling/001.png`, `root/male/7.jpg`.
            sample_size (`int`): the proposal's image side.
            in_channels (`int`): the proposal's channels (1 or 3).
            attribute_names (`Sequence[str]`, *optional*): the attributes (and their order); defaults to every
                sub-folder, sorted.
        """
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"Data folder {root!r} does not exist. Expected one sub-folder of images per attribute, "
                "e.g. root/smiling/001.png."
            )
        if attribute_names is None:
            attribute_names = sorted(
                d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
            )
        names = list(attribute_names)
        check_attribute_names(names)
        images, labels = [], []
        for label, name in enumerate(names):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"Attribute folder {folder!r} is missing; create it and put images of {name!r} in it."
                )
            paths = _list_images(folder)
            if not paths:
                raise ValueError(
                    f"Attribute folder {folder!r} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}). "
                    f"Add single-positive images of {name!r}, or remove the folder."
                )
            images.append(prepare_images((_open_image(p) for p in paths), sample_size, in_channels))
            labels += [label] * len(paths)
        return cls(torch.cat(images), torch.tensor(labels), names)

    @classmethod
    def from_hf_dataset(
        cls,
        dataset,
        sample_size: int,
        in_channels: int,
        image_column: str = "image",
        label_column: str = "label",
        attribute_names: Sequence[str] | None = None,
    ) -> SinglePositiveDataset:
        """From a Hugging Face `datasets.Dataset` with an image column and a label column.

        Args:
            dataset (`datasets.Dataset`): rows with an image (PIL, array or tensor) and a label.
            sample_size (`int`): the proposal's image side.
            in_channels (`int`): the proposal's channels (1 or 3).
            image_column (`str`, defaults to `"image"`): the image column.
            label_column (`str`, defaults to `"label"`): integer labels (the names come from a `ClassLabel`
                feature, or `attribute_names`) or string labels (the attribute names themselves).
            attribute_names (`Sequence[str]`, *optional*): the attribute names; defaults to the `ClassLabel` names
                or the sorted distinct string labels.
        """
        columns = list(getattr(dataset, "column_names", []))
        for column in (image_column, label_column):
            if column not in columns:
                raise ValueError(f"Column {column!r} is not in the dataset; its columns are {columns}.")
        raw_labels = list(dataset[label_column])
        if raw_labels and isinstance(raw_labels[0], str):
            names = list(attribute_names) if attribute_names is not None else sorted(set(raw_labels))
            unknown = sorted(set(raw_labels) - set(names))
            if unknown:
                raise ValueError(f"Labels {unknown[:10]} are not in `attribute_names` {names}.")
            labels = torch.tensor([names.index(label) for label in raw_labels])
        else:
            feature = getattr(dataset, "features", {}).get(label_column)
            names = attribute_names if attribute_names is not None else getattr(feature, "names", None)
            if names is None:
                raise ValueError(
                    f"Column {label_column!r} holds integers without a `ClassLabel` feature, so the attribute names "
                    "are unknown; pass `attribute_names`, or give the column a `ClassLabel` feature "
                    f"(`dataset.cast_column({label_column!r}, datasets.ClassLabel(names=[...]))`) or string labels."
                )
            labels = torch.tensor(raw_labels)
        images = prepare_images(dataset[image_column], sample_size, in_channels, value_range=(0.0, 1.0))
        return cls(images, labels, list(names))


class ImageBank:
    """Pre-generated samples of a proposal, for training the heads: `bank(n, generator)` draws `n` of them with
    replacement, as a proposal callable does (it is not a generator adapter: it has no latents).

    Args:
        images (`torch.Tensor`): `(N, C, S, S)` in [-1, 1], samples of the proposal.
        class_labels (`torch.Tensor`, *optional*): `(N,)` the class each sample was generated for (a
            class-conditional proposal); the draws are then `(images, class_labels)`.
    """

    def __init__(self, images: torch.Tensor, class_labels: torch.Tensor | None = None):
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"`images` must be a non-empty (N, C, S, S) batch, got shape {tuple(images.shape)}.")
        self.images = images
        self.class_labels = class_labels

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, sample_size: int, in_channels: int) -> ImageBank:
        """The images of a flat folder of pre-generated samples, in the proposal's format."""
        return cls(load_image_folder(folder, sample_size, in_channels))

    def __len__(self) -> int:
        return self.images.shape[0]

    def split(self, heldout_fraction: float, seed: int = 0) -> tuple[ImageBank, ImageBank]:
        """Two disjoint banks `(train, heldout)`, so that calibration never sees the training samples."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        k = max(1, round(heldout_fraction * len(self)))
        if k >= len(self):
            raise ValueError(
                f"Cannot split {len(self)} pre-generated samples with heldout_fraction={heldout_fraction}: both parts "
                "need samples (training, and held out for calibration). Use a larger bank (hundreds of samples)."
            )
        parts = order[k:], order[:k]
        labels = self.class_labels
        return tuple(ImageBank(self.images[p], None if labels is None else labels[p]) for p in parts)

    def __call__(self, n: int, generator: torch.Generator | None = None):
        index = torch.randint(len(self), (n,), generator=generator)
        if self.class_labels is None:
            return self.images[index]
        return self.images[index], self.class_labels[index]


# Deprecated alias: the bank is not a generator adapter; use `ImageBank`.
ImageBankProposal = ImageBank
