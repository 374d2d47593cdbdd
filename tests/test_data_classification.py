"""Classification datasets: shapes, normalization, determinism, subsets and error messages."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepzero_apps.data import DataBundle, LabeledTensorDataset, balanced_subset, build_datasets, image_ids
from deepzero_apps.errors import ConfigError


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
    with pytest.raises(ConfigError, match="nowhere"):
        build_datasets("imagefolder", str(missing))
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="test") as info:
        build_datasets("imagefolder", str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="root"):
        build_datasets("imagefolder")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits.*cifar10.*imagefolder.*fake"):
        build_datasets("mnist")


def make_tree(root: Path, classes=("cat", "dog"), mode="RGB", size=(10, 10), test_classes=None, per_class=2):
    """root/{train,test}/<class>/<i>.png of random pixels; size is (height, width)."""
    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for cls in names:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = size if mode == "L" else (*size, 3)
                Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(folder / f"{i}.png")
    return root


def one_line_error(match, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        build_datasets(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_grayscale_tree_stays_one_channel_unless_asked(tmp_path):
    root = str(make_tree(tmp_path, mode="L"))
    gray = build_datasets("imagefolder", root)
    assert gray.in_channels == 1 and gray.train[0][0].shape == (1, 10, 10) and gray.test[0][0].shape == (1, 10, 10)
    rgb = build_datasets("imagefolder", root, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert rgb.in_channels == 3 and rgb.train[0][0].shape == (3, 10, 10)
    assert torch.equal(rgb.train[0][0][0], rgb.train[0][0][2])  # gray replicated


def test_color_tree_to_one_channel(tmp_path):
    bundle = build_datasets("imagefolder", str(make_tree(tmp_path)), channels=1, augment=True)
    assert bundle.in_channels == 1 and bundle.train[0][0].shape == (1, 10, 10)
    one_line_error("data.channels=2 must be 1 or 3", "imagefolder", str(tmp_path), channels=2)


def test_mixed_sizes_name_a_file_of_each_size_and_image_size_resizes(tmp_path):
    root = make_tree(tmp_path)
    Image.fromarray(np.zeros((12, 9, 3), dtype=np.uint8)).save(root / "test" / "dog" / "odd.png")
    msg = one_line_error("images differ in size", "imagefolder", str(root))
    assert "10x10" in msg and "12x9" in msg and "odd.png" in msg and "data.image_size" in msg
    square = build_datasets("imagefolder", str(root), image_size=8)
    assert (square.height, square.width) == (8, 8) and square.image_size == 8
    assert {tuple(square.test[i][0].shape) for i in range(len(square.test))} == {(3, 8, 8)}
    rect = build_datasets("imagefolder", str(root), image_size=[6, 8], augment=True)
    assert (rect.height, rect.width, rect.in_features) == (6, 8, 144)
    assert rect.train[0][0].shape == rect.test[4][0].shape == (3, 6, 8)
    with pytest.raises(ConfigError, match="needs square images, got 6x8"):
        _ = rect.image_size
    one_line_error("data.image_size=.0, 8. must be H or", "imagefolder", str(root), image_size=[0, 8])


def test_corrupt_images_are_named(tmp_path):
    root = make_tree(tmp_path)
    (root / "train" / "cat" / "bad.png").write_bytes(b"not an image at all")
    msg = one_line_error("cannot read image", "imagefolder", str(root))
    assert "bad.png" in msg
    (root / "train" / "cat" / "bad.png").unlink()
    good = (root / "train" / "dog" / "0.png").read_bytes()
    (root / "train" / "dog" / "cut.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut
    bundle = build_datasets("imagefolder", str(root))
    index = [i for i, (path, _) in enumerate(bundle.train.samples) if path.endswith("cut.png")][0]
    with pytest.raises(ConfigError, match="cannot read image .*cut.png"):
        bundle.train[index]


def test_class_sets(tmp_path):
    msg = one_line_error("has 1 class folder.*at least two", "imagefolder", str(make_tree(tmp_path / "a", ("cat",))))
    assert "cat" in msg
    root = make_tree(tmp_path / "b", ("cat", "dog"), test_classes=("cat", "cow"))
    msg = one_line_error("different classes", "imagefolder", str(root))
    assert "only in train: dog" in msg and "only in test: cow" in msg
    empty = make_tree(tmp_path / "c")
    (empty / "train" / "emu").mkdir()
    (empty / "test" / "emu").mkdir()
    one_line_error("emu", "imagefolder", str(empty))


def test_tensor_datasets_resize_and_convert():
    bundle = build_datasets("digits", image_size=16, channels=3, train_limit=20)
    assert (bundle.in_channels, bundle.height, bundle.width) == (3, 16, 16)
    assert bundle.train[0][0].shape == bundle.test[0][0].shape == (3, 16, 16)
    fake = build_datasets("fake", fake_shape=(3, 6, 6), channels=1, image_size=[4, 5])
    assert fake.test[0][0].shape == (1, 4, 5) and fake.in_features == 20


def test_cifar10_not_on_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):  # what torchvision does offline: creates the folder and the archive, then fails
        os.makedirs(self.root, exist_ok=True)
        Path(self.root, self.filename).write_bytes(b"partial")
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(CIFAR10, "download", offline)
    root = tmp_path / "data" / "cifar10"
    msg = one_line_error("CIFAR-10 is not on disk", "cifar10", str(root))
    assert "data=imagefolder data.root=" in msg and "name resolution" in msg
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user file")
    one_line_error("not on disk", "cifar10", str(tmp_path / "mine"))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["keep.txt"]


def test_cli_cifar10_offline_exits_2_in_one_line(tmp_path):
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}  # surely offline
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "deepzero_apps.cli", "classify", "data=cifar10", "threads=1",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CIFAR-10 is not on disk" in lines[0] and "data=imagefolder" in lines[0]
    assert not (tmp_path / "data").exists()


def test_a_root_given_to_a_built_in_dataset_is_named_as_ignored(caplog):
    with caplog.at_level("WARNING", logger="deepzero_apps.data.classification"):
        build_datasets("digits", train_limit=20, test_limit=20)
        assert not caplog.records
        build_datasets("digits", "/some/tree", train_limit=20, test_limit=20)
    assert [r.getMessage() for r in caplog.records] == [
        "warning: data.root is ignored: data=digits is built in (data=imagefolder reads a tree)"]


def test_image_ids_name_the_same_images_through_every_subset(tmp_path):
    # Issue #26: paired tests match certification tables by image, not by row; a smaller balanced subset's
    # rows are other images than a larger one's at the same positions, so only ids can pair them.
    root = make_tree(tmp_path, classes=("a", "b", "c"), per_class=6)
    bundle = build_datasets("imagefolder", str(root), test_limit=12)
    ids = image_ids(bundle.test)
    assert len(set(ids)) == 12 and all(i.startswith("test/") and i.endswith(".png") for i in ids)
    x, y = zip(*(bundle.test[i] for i in range(len(bundle.test))))
    tensors = LabeledTensorDataset(torch.stack(x), torch.tensor(y), ids)
    small, large = balanced_subset(tensors, 3, seed=0), balanced_subset(tensors, 6, seed=0)
    assert set(small.ids) < set(large.ids)
    assert small.ids != large.ids[:3]  # the same rows are other images: pairing by position is wrong
    by_id = {i: (xi, yi) for i, xi, yi in zip(large.ids, *large.tensors)}
    for i, xi, yi in zip(small.ids, *small.tensors):
        assert torch.equal(by_id[i][0], xi) and by_id[i][1] == yi
    assert image_ids(build_datasets("digits", test_limit=5).test) == image_ids(build_datasets("digits", test_limit=5).test)
