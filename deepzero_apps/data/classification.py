"""Image classification datasets behind one builder, sized for CPU budgets.

``digits`` (sklearn, offline, 8x8) is the default: it trains in seconds on a CPU. ``cifar10``
and ``imagefolder`` serve the paper-scale runs, ``fake`` serves tests. ``train_limit`` /
``test_limit`` take class-balanced, seed-deterministic subsets so runs fit a time budget;
``image_size`` resizes and ``channels`` picks 1 or 3 channels for every dataset alike.
All datasets yield ``(float32 CHW tensor, int label)``; bad data is a one-line ConfigError.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import ConfigError
from . import images
from .images import per_channel

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DATASETS = ("digits", "cifar10", "imagefolder", "fake")
log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Train/test datasets plus the shape facts needed to build a model."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    height: int
    width: int
    # The images are (pixels - mean) / std per channel, pixels in [0, 1] (fake: its raw values, 0 and 1):
    # what a model trained on them needs in front of it to take [0, 1] images (`blackbox.run_source`).
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @property
    def image_size(self) -> int:
        """The side of square images (a model that needs square ones asks this)."""
        if self.height != self.width:
            raise ConfigError(f"this model needs square images, got {self.height}x{self.width}; set data.image_size=N")
        return self.height

    @property
    def in_features(self) -> int:
        """Values per image: channels x height x width."""
        return self.in_channels * self.height * self.width


class LabeledTensorDataset(TensorDataset):
    """In-memory ``(images, labels)`` dataset that yields Python int labels.

    ``tensors`` stays available so full-batch code can skip the DataLoader. ``ids`` names each image
    in the dataset it came from (see `image_ids`; default: its position here).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: Sequence[str] | None = None) -> None:
        super().__init__(images, labels)
        if ids is not None and len(ids) != len(labels):
            raise ValueError(f"{len(ids)} image ids for {len(labels)} images")
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(labels))]

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
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    fake_shape: tuple[int, int, int] = (3, 32, 32),
    fake_classes: int = 10,
    fake_sizes: tuple[int, int] = (512, 128),
) -> DataBundle:
    """Build the train/test datasets called ``name`` (one of ``DATASETS``).

    ``root``: download folder for cifar10 (default ``./data``), the ``train/`` + ``test/`` tree
    for imagefolder; unused otherwise. ``augment`` (random crop with padding 4 + horizontal flip)
    applies to the training split of cifar10 and imagefolder only. ``image_size`` (H or [H, W])
    resizes every image; ``channels`` (1 or 3; default: what the images are) converts them.
    ``mean``/``std`` normalize cifar10 and imagefolder images (3 values are averaged for one
    channel); ``fake_*`` set the shape, class count and split sizes of ``fake``.
    """
    if channels not in (None, 1, 3):
        raise ConfigError(f"data.channels={channels} must be 1 or 3 (or null: what the images are)")
    if name == "cifar10":
        train, test, c, (h, w) = images.cifar10(root or "data", augment, mean, std, image_size, channels)
        bundle = DataBundle(train, test, 10, c, h, w, per_channel(mean, c, "mean"), per_channel(std, c, "std"))
    elif name == "imagefolder":
        train, test, classes, c, (h, w) = images.image_folder(root, augment, mean, std, image_size, channels)
        bundle = DataBundle(train, test, classes, c, h, w, per_channel(mean, c, "mean"), per_channel(std, c, "std"))
    elif name in ("digits", "fake"):
        if root is not None:
            # The value is not shown: it may be a resolved ${oc.env:...} secret, and this line reaches the run's log.
            log.warning(f"warning: data.root is ignored: data={name} is built in (data=imagefolder reads a tree)")
        bundle = _digits(seed) if name == "digits" else _fake(fake_shape, fake_classes, fake_sizes, seed)
        _reshape_tensors(bundle, images.as_size(image_size), channels)
        bundle.mean, bundle.std = bundle.mean * bundle.in_channels, bundle.std * bundle.in_channels
    else:
        raise ConfigError(f"unknown dataset '{name}'; choose from: {', '.join(DATASETS)}")
    if bundle.num_classes < 2:
        raise ConfigError(f"data={name} has {bundle.num_classes} class; classification needs at least two")
    bundle.train = balanced_subset(bundle.train, train_limit, seed)
    bundle.test = balanced_subset(bundle.test, test_limit, seed)
    return bundle


def _reshape_tensors(bundle: DataBundle, size: tuple[int, int] | None, channels: int | None) -> None:
    """Resize (bilinear, antialiased) and convert the channels of in-memory images, in place."""
    for split in ("train", "test"):
        x, y = getattr(bundle, split).tensors
        if size is not None and tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        if channels is not None and x.shape[1] != channels:
            x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1).contiguous()
        setattr(bundle, split, LabeledTensorDataset(x, y))
    bundle.in_channels, bundle.height, bundle.width = x.shape[1], x.shape[2], x.shape[3]


def balanced_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """At most ``limit`` items, classes as balanced as possible, chosen by a seeded shuffle.

    Items are taken round-robin over classes in shuffled order, so the subset of a smaller
    limit is contained in that of a larger one. Returns ``dataset`` itself when no limit applies.
    """
    labels = _labels(dataset)
    if limit is None or limit >= len(labels):
        return dataset
    if limit < 1:
        raise ConfigError(f"dataset limit must be >= 1, got {limit}")
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
        return LabeledTensorDataset(images[index], targets[index], [dataset.ids[i] for i in chosen])
    return Subset(dataset, chosen.tolist())


def image_ids(dataset: Dataset) -> list[str]:
    """Which image each item is, stable across subsets and runs: an image folder's file path relative to
    the tree (``test/cat/0001.jpg``), a `LabeledTensorDataset`'s own ids, else the index in the dataset
    the items were taken from (through any `Subset`s). Paired tests match tables by these."""
    if isinstance(dataset, Subset):
        parent = image_ids(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    if isinstance(dataset, LabeledTensorDataset):
        return list(dataset.ids)
    samples, root = getattr(dataset, "samples", None), getattr(dataset, "root", None)
    if samples is not None and root is not None:  # torchvision's ImageFolder / DatasetFolder
        top = Path(root)
        return [Path(path).relative_to(top.parent).as_posix() for path, _ in samples]
    return [str(i) for i in range(len(dataset))]  # type: ignore[arg-type]


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

    return DataBundle(to_dataset(x_train, y_train), to_dataset(x_test, y_test), 10, 1, 8, 8, (float(mean),), (float(std),))


def _fake(shape: tuple[int, int, int], num_classes: int, sizes: tuple[int, int], seed: int) -> DataBundle:
    """Gaussian noise around one random prototype per class: learnable, so training can improve."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=gen)

    def split(size: int) -> LabeledTensorDataset:
        labels = torch.arange(size) % num_classes
        labels = labels[torch.randperm(size, generator=gen)]
        images = (prototypes[labels] + torch.randn(size, *shape, generator=gen)) / 2**0.5
        return LabeledTensorDataset(images, labels)

    return DataBundle(split(sizes[0]), split(sizes[1]), num_classes, shape[0], shape[1], shape[2])
