"""certify's data: in-memory images in [0, 1] pixels, the classifier's standardization, and the noise.

Every stage works in pixel space so that sigma and certified radii mean what they mean in Cohen et
al. and Salman et al.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from deepzero_apps.data import DataBundle, LabeledTensorDataset, build_datasets, image_ids
from deepzero_apps.data.classification import CIFAR10_MEAN, CIFAR10_STD
from deepzero_apps.data.images import per_channel
from deepzero_apps.errors import ConfigError


def _tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    if isinstance(dataset, LabeledTensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = zip(*DataLoader(dataset, batch_size=256))
    return torch.cat(xs), torch.cat(ys)


def pixel_data(data_cfg: DictConfig, seed: int) -> tuple[DataBundle, tuple[Tensor, Tensor]]:
    """In-memory train/test sets in [0, 1] pixels, plus the per-channel (mean, std) the classifier standardizes with.

    The builders normalize; this undoes it exactly: cifar10 by its constants, imagefolder by asking
    for mean 0 / std 1, digits and fake by their training min/max (digits' pixels span exactly
    0..16/16). Standardization with the builders' statistics then lives inside the classifier, so a
    checkpoint from `deepzero-task classify` plugs in unchanged.
    """
    if data_cfg.augment:
        raise ConfigError("data.augment=true is not supported by certify (images are kept in memory in pixel space)")
    zeros, ones = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    bundle = build_datasets(  # a dataset not on disk: FileNotFoundError, exit 2 at the error boundary
        data_cfg.name, data_cfg.root, train_limit=data_cfg.train_limit, test_limit=data_cfg.test_limit,
        seed=seed, image_size=data_cfg.image_size, channels=data_cfg.channels,
        **({"mean": zeros, "std": ones} if data_cfg.name == "imagefolder" else {}),
    )
    (train_x, train_y), (test_x, test_y) = _tensors(bundle.train), _tensors(bundle.test)
    c = bundle.in_channels
    if data_cfg.name in ("cifar10", "imagefolder"):
        mean, std = (torch.tensor(per_channel(v, c, "statistics")) for v in (CIFAR10_MEAN, CIFAR10_STD))
        if data_cfg.name == "cifar10":
            train_x, test_x = (x * std.view(1, c, 1, 1) + mean.view(1, c, 1, 1) for x in (train_x, test_x))
    else:
        lo, hi = train_x.min(), train_x.max()
        train_x, test_x = ((x - lo) / (hi - lo) for x in (train_x, test_x))
        mean, std = train_x.mean().repeat(c), train_x.std(unbiased=False).repeat(c)
    bundle.train = LabeledTensorDataset(train_x.contiguous(), train_y.long(), image_ids(bundle.train))
    bundle.test = LabeledTensorDataset(test_x.contiguous(), test_y.long(), image_ids(bundle.test))
    return bundle, (mean, std)


class NoisyInputs:
    """``x + N(0, sigma^2)`` for a batch's clean images, drawn once per batch.

    Every query of a ZO step must see the same noise, so the draw is cached for the batch object the
    estimator received; draw t is seeded by (seed, t) and `draws` is checkpointed, so resumes replay.
    """

    def __init__(self, sigma: float, seed: int):
        self.sigma, self.seed, self.draws = sigma, seed, 0
        self._last: tuple[Any, Tensor] | None = None

    def __call__(self, batch: Sequence[Tensor]) -> Tensor:
        if self._last is None or self._last[0] is not batch:
            clean = batch[0]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
            noise = torch.randn(clean.shape, generator=gen).to(clean)
            self._last = (batch, clean + self.sigma * noise)
            self.draws += 1
        return self._last[1]

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.draws = int(state["draws"])
