"""Image classification datasets behind one builder, sized for CPU budgets.

``digits`` (sklearn, offline, 8x8) is the default: it trains in seconds on a CPU. ``cifar10``
and ``imagefolder`` serve the paper-scale runs, ``fake`` serves tests. ``train_limit`` /
``test_limit`` take class-balanced, seed-deterministic subsets so runs fit a time budget.
All datasets yield ``(float32 CHW tensor, int label)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DATASETS = ("digits", "cifar10", "imagefolder", "fake")


@dataclass
class DataBundle:
    """Train/test datasets plus the shape facts needed to build a model."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


class LabeledTensorDataset(TensorDataset):
    """In-memory ``(images, labels)`` dataset that yields Python int labels.

    ``tensors`` stays available so full-batch code can skip the DataLoader.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(images, labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.tensors
        return images[index], int(labels[index])


def build_datasets(
    name: str,
    root: str | None = None,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    augment: bool = False,
    seed: int = 0,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    fake_shape: tuple[int, int, int] = (3, 32, 32),
    fake_classes: int = 10,
    fake_sizes: tuple[int, int] = (512, 128),
) -> DataBundle:
    """Build the train/test datasets called ``name`` (one of ``DATASETS``).

    ``root``: download folder for cifar10 (default ``./data``), the ``train/`` + ``test/`` tree
    for imagefolder; unused otherwise. ``augment`` (random crop with padding 4 + horizontal flip)
    applies to the training split of cifar10 and imagefolder only. ``mean``/``std`` normalize
    imagefolder images; ``fake_*`` set the shape, class count and split sizes of ``fake``.
    """
    if name == "digits":
        bundle = _digits(seed)
    elif name == "cifar10":
        bundle = _cifar10(root or "data", augment)
    elif name == "imagefolder":
        bundle = _imagefolder(root, augment, mean, std)
    elif name == "fake":
        bundle = _fake(fake_shape, fake_classes, fake_sizes, seed)
    else:
        raise ValueError(f"unknown dataset '{name}'; choose from: {', '.join(DATASETS)}")
    bundle.train = balanced_subset(bundle.train, train_limit, seed)
    bundle.test = balanced_subset(bundle.test, test_limit, seed)
    return bundle


def balanced_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """At most ``limit`` items, classes as balanced as possible, chosen by a seeded shuffle.

    Items are taken round-robin over classes in shuffled order, so the subset of a smaller
    limit is contained in that of a larger one. Returns ``dataset`` itself when no limit applies.
    """
    labels = _labels(dataset)
    if limit is None or limit >= len(labels):
        return dataset
    if limit < 1:
        raise ValueError(f"dataset limit must be >= 1, got {limit}")
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    rank = np.empty(len(order), dtype=np.int64)  # position of each item within its class
    for c in np.unique(shuffled):
        mask = shuffled == c
        rank[mask] = np.arange(mask.sum())
    chosen = np.sort(order[np.lexsort((np.arange(len(order)), rank))[:limit]])
    if isinstance(dataset, LabeledTensorDataset):
        images, targets = dataset.tensors
        index = torch.from_numpy(chosen)
        return LabeledTensorDataset(images[index], targets[index])
    return Subset(dataset, chosen.tolist())


def _labels(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    return np.asarray(dataset.targets)  # torchvision CIFAR10 and ImageFolder


def _digits(seed: int) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )
    mean, std = x_train.mean(), x_train.std()

    def to_dataset(x: np.ndarray, y: np.ndarray) -> LabeledTensorDataset:
        x = torch.from_numpy((x - mean) / std).unsqueeze(1).float()
        return LabeledTensorDataset(x, torch.from_numpy(y).long())

    return DataBundle(to_dataset(x_train, y_train), to_dataset(x_test, y_test), 10, 1, 8)


def _transforms(image_size: int, augment: bool, mean: Sequence[float], std: Sequence[float]):
    from torchvision import transforms as T

    to_tensor = [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    train = T.Compose(
        [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(), *to_tensor] if augment else to_tensor
    )
    return train, T.Compose(to_tensor)


def _cifar10(root: str, augment: bool) -> DataBundle:
    from torchvision.datasets import CIFAR10

    train_tf, test_tf = _transforms(32, augment, CIFAR10_MEAN, CIFAR10_STD)
    train = CIFAR10(root, train=True, download=True, transform=train_tf)
    test = CIFAR10(root, train=False, download=True, transform=test_tf)
    return DataBundle(train, test, 10, 3, 32)


def _imagefolder(root: str | None, augment: bool, mean: Sequence[float], std: Sequence[float]) -> DataBundle:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if root is None:
        raise ValueError("dataset 'imagefolder' needs root= (a folder holding train/ and test/)")
    for path in (Path(root), Path(root) / "train", Path(root) / "test"):
        if not path.is_dir():
            raise FileNotFoundError(f"imagefolder: no such directory: {path}")
    train = ImageFolder(str(Path(root) / "train"))
    with Image.open(train.samples[0][0]) as first:
        image_size = first.size[1]
    train.transform, test_transform = _transforms(image_size, augment, mean, std)
    test = ImageFolder(str(Path(root) / "test"), transform=test_transform)
    if test.classes != train.classes:
        raise ValueError(
            f"imagefolder: train classes {train.classes} differ from test classes {test.classes}"
        )
    return DataBundle(train, test, len(train.classes), 3, image_size)


def _fake(shape: tuple[int, int, int], num_classes: int, sizes: tuple[int, int], seed: int) -> DataBundle:
    """Gaussian noise around one random prototype per class: learnable, so training can improve."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=gen)

    def split(size: int) -> LabeledTensorDataset:
        labels = torch.arange(size) % num_classes
        labels = labels[torch.randperm(size, generator=gen)]
        images = (prototypes[labels] + torch.randn(size, *shape, generator=gen)) / 2**0.5
        return LabeledTensorDataset(images, labels)

    return DataBundle(split(sizes[0]), split(sizes[1]), num_classes, shape[0], shape[1])
