"""Datasets for `lc-onnx finetune`: scikit-learn's bundled digits, or any ImageFolder directory.

Both give 3-channel float images of `img_size x img_size`, normalised to mean 0.5 / std 0.5 per channel
(or as an `ImageFormat` says: a pretrained transformers model's image processor), so the same model
definitions (and timm's pretrained stems) work on either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from lc_onnx.errors import UserError, one_line

logger = logging.getLogger(__name__)

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
_SPLIT_NAMES = (("train", "test"), ("train", "val"))


@dataclass(frozen=True)
class ImageFormat:
    """What a model wants its images as: `size x size`, normalised per channel (`(x - mean) / std` of
    values in [0, 1]); the default is the mean 0.5 / std 0.5 every timm model here is trained with."""

    size: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @property
    def default_normalisation(self) -> bool:
        return self.mean == (0.5, 0.5, 0.5) and self.std == (0.5, 0.5, 0.5)


@dataclass
class Splits:
    """Train and test datasets yielding `(image[3, S, S], label)`."""

    train: Dataset
    test: Dataset
    num_classes: int


def load(dataset: str, image: ImageFormat | int) -> Splits:
    """`"digits"` or a directory: `DIR/train` + `DIR/test` (or `DIR/val`) ImageFolders, or one ImageFolder
    split 80/20 with a fixed seed; images as `image` says (an int: that size, mean = std = 0.5)."""
    image = ImageFormat(image) if isinstance(image, int) else image
    if dataset == "digits":
        return digits(image.size, image)
    return image_folder(Path(dataset), image.size, image)


def digits(img_size: int = 16, image: ImageFormat | None = None) -> Splits:
    """The 1797 8x8 digits of `sklearn.datasets.load_digits` (bundled, no download), bilinearly upsampled.

    The train/test split is fixed (stratified, 20 % test, seed 0: 1437 / 360 images) whatever the
    seed is, so runs with different seeds are evaluated on the same images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if img_size != 8:
        images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode="bilinear")
    if image is None or image.default_normalisation:
        images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    else:
        mean, std = (
            torch.tensor(v, dtype=torch.float32)[None, :, None, None] for v in (image.mean, image.std)
        )
        images = (images.expand(-1, 3, -1, -1) - mean) / std
    labels = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=data.target,
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return Splits(
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
        10,
    )


def image_folder(root: Path, img_size: int, image: ImageFormat | None = None) -> Splits:
    from torchvision import datasets, transforms

    image = image or ImageFormat(img_size)
    if not root.is_dir():
        raise UserError(f"{{dataset}} {root}: not 'digits' and not a directory", params=["dataset"])
    tf = transforms.Compose(
        [
            transforms.Resize((img_size, img_size)),
            transforms.ToTensor(),
            transforms.Normalize(list(image.mean), list(image.std)),
        ]
    )

    def folder(path: Path):
        try:
            return datasets.ImageFolder(str(path), transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images
            raise UserError(
                f"{{dataset}} {path}: not an ImageFolder ({one_line(exc)})", params=["dataset"]
            ) from None

    for train_name, test_name in _SPLIT_NAMES:
        if (root / train_name).is_dir() and (root / test_name).is_dir():
            train, test = folder(root / train_name), folder(root / test_name)
            if train.classes != test.classes:
                raise UserError(
                    f"{{dataset}} {root}: {train_name}/ and {test_name}/ have different classes",
                    params=["dataset"],
                )
            return Splits(train, test, len(train.classes))
    full = folder(root)
    n_test = max(1, round(len(full) * DIGITS_TEST_FRACTION))
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED)).tolist()
    return Splits(
        torch.utils.data.Subset(full, perm[n_test:]),
        torch.utils.data.Subset(full, perm[:n_test]),
        len(full.classes),
    )
