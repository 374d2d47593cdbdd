"""Classification datasets: shapes, normalization, determinism, subsets and error messages."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from deepzero_apps.data import DataBundle, build_datasets


def labels_of(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def test_digits_shapes_sizes_and_normalization():
    bundle = build_datasets("digits")
    assert isinstance(bundle, DataBundle)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 8)
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    x, y = bundle.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    images = bundle.train.tensors[0]
    assert abs(images.mean().item()) < 1e-5 and abs(images.std().item() - 1) < 1e-3
    # Stratified split: every class appears in the test set in proportion.
    assert min(Counter(labels_of(bundle.test)).values()) >= 35


def test_digits_split_depends_on_seed_only():
    a, b, c = (
        build_datasets("digits", seed=1),
        build_datasets("digits", seed=1),
        build_datasets("digits", seed=2),
    )
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_limits_are_balanced_and_deterministic():
    bundle = build_datasets("digits", train_limit=100, test_limit=25, seed=3)
    assert (len(bundle.train), len(bundle.test)) == (100, 25)
    assert set(Counter(labels_of(bundle.train)).values()) == {10}
    assert sorted(Counter(labels_of(bundle.test)).values()) == [2] * 5 + [3] * 5
    again = build_datasets("digits", train_limit=100, test_limit=25, seed=3)
    assert torch.equal(bundle.train.tensors[0], again.train.tensors[0])
    assert len(build_datasets("digits", train_limit=10_000).train) == 1437
    with pytest.raises(ValueError, match="limit"):
        build_datasets("digits", train_limit=0)


def test_fake_is_deterministic_and_configurable():
    a = build_datasets("fake", seed=5)
    b = build_datasets("fake", seed=5)
    c = build_datasets("fake", seed=6)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 3, 32)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    x, y = a.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    small = build_datasets("fake", fake_shape=(1, 6, 6), fake_classes=3, fake_sizes=(30, 9), train_limit=12)
    assert (small.num_classes, small.in_channels, small.image_size) == (3, 1, 6)
    assert (len(small.train), len(small.test)) == (12, 9)
    assert set(Counter(labels_of(small.train)).values()) == {4}


@pytest.fixture
def image_tree(tmp_path):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path


def test_imagefolder(image_tree):
    bundle = build_datasets("imagefolder", str(image_tree), augment=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (2, 3, 10)
    assert (len(bundle.train), len(bundle.test)) == (6, 4)
    x, y = bundle.test[0]
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32 and y in (0, 1)
    assert x.min() >= -1 and x.max() <= 1  # (v - 0.5) / 0.5 for v in [0, 1]
    assert bundle.train[0][0].shape == (3, 10, 10)  # random crop keeps the size
    limited = build_datasets("imagefolder", str(image_tree), train_limit=2)
    assert sorted(labels_of(limited.train)) == [0, 1]


def test_imagefolder_missing_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_datasets("imagefolder", str(missing))
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="test") as info:
        build_datasets("imagefolder", str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="root"):
        build_datasets("imagefolder")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits.*cifar10.*imagefolder.*fake"):
        build_datasets("mnist")
