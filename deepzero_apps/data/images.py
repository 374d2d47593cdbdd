"""Image files on disk (CIFAR-10, ImageFolder trees), checked before any work.

Everything a tree could get wrong is found by one scan of the image headers and reported as a
one-line `ConfigError` naming a file: an unreadable image, sizes that differ (unless `image_size`
resizes them), one class only, train/test class sets that differ. Grayscale trees stay one channel
unless `channels=3` asks otherwise. An image whose header reads but whose pixels do not decode is
reported the same way when it is loaded.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, one_line

# PIL modes whose pixels carry one value (everything else is converted to RGB).
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
Size = tuple[int, int]  # (height, width)


def as_size(image_size: Any) -> Size | None:
    """`H` or `[H, W]` as (H, W); None stays None; anything else is a ConfigError naming it."""
    if image_size is None:
        return None
    hw = [image_size] * 2 if isinstance(image_size, int) else list(image_size) if isinstance(image_size, (list, tuple)) else []
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise ConfigError(f"data.image_size={image_size!r} must be H or [H, W] with positive integer sides")
    return hw[0], hw[1]


def per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """A normalization constant for `channels` channels: given per channel, or one value repeated,
    or (3 values for 1 channel) their average, the grayscale of the RGB statistics."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise ConfigError(f"data {what} has {len(values)} values for {channels} channels")


def transforms(size: Size, resize: bool, channels: int, augment: bool, mean, std) -> tuple[Any, Any]:
    """(train, test) transforms: optional resize and grayscale, optional crop+flip, tensor, normalize."""
    from torchvision import transforms as T

    shape = [T.Resize(size)] if resize else []
    to_tensor = [T.ToTensor(), T.Normalize(per_channel(mean, channels, "mean"), per_channel(std, channels, "std"))]
    augmentation = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose(shape + augmentation + to_tensor), T.Compose(shape + to_tensor)


class Loader:
    """ImageFolder's loader: the file as `mode` ("L" or "RGB"); a file that does not decode is a
    one-line ConfigError naming it. A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, path: str):
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.convert(self.mode)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            raise ConfigError(f"data: cannot read image {path}: {one_line(exc)}") from exc


def _scan(samples: Sequence[tuple[str, int]]) -> tuple[dict[Size, str], set[str]]:
    """Every image's header: {(H, W): first file of that size}, and the set of PIL modes."""
    from PIL import Image

    sizes: dict[Size, str] = {}
    modes: set[str] = set()
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                w, h = im.size
                modes.add(im.mode)
        except Exception as exc:
            raise ConfigError(f"data: cannot read image {path}: {one_line(exc)}") from exc
        sizes.setdefault((h, w), path)
    return sizes, modes


def _folder(path: Path) -> Any:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, OSError) as exc:  # no class folders, a class without images
        raise ConfigError(f"data.root: {path}: {one_line(exc)}") from exc


def _check_classes(train: list[str], test: list[str], root: Path) -> None:
    if len(train) < 2:
        raise ConfigError(
            f"data.root={root}: train/ has {len(train)} class folder(s) ({', '.join(train)}); "
            "classification needs at least two"
        )
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise ConfigError(
            f"data.root={root}: train/ and test/ hold different classes (only in train: "
            f"{', '.join(only_train[:5]) or 'none'}; only in test: {', '.join(only_test[:5]) or 'none'})"
        )


def image_folder(
    root: str | None, augment: bool, mean: Sequence[float], std: Sequence[float],
    image_size: int | Sequence[int] | None, channels: int | None,
) -> tuple[Any, Any, int, int, Size]:
    """(train, test, num_classes, channels, (H, W)) of a `root/{train,test}/<class>/<image>` tree."""
    if root is None:
        raise ConfigError("data=imagefolder needs data.root=PATH (a folder holding train/ and test/)")
    for path in (Path(root), Path(root) / "train", Path(root) / "test"):
        if not path.is_dir():
            raise ConfigError(f"data.root: no such directory: {path}")
    train, test = _folder(Path(root) / "train"), _folder(Path(root) / "test")
    _check_classes(train.classes, test.classes, Path(root))
    sizes, modes = _scan(train.samples + test.samples)
    size = as_size(image_size)
    if size is None and len(sizes) > 1:
        (a, first), (b, other) = list(sizes.items())[:2]
        raise ConfigError(
            f"data.root={root}: images differ in size ({first} is {a[0]}x{a[1]}, {other} is {b[0]}x{b[1]}, "
            "height x width); set data.image_size=H or [H,W] to resize them all"
        )
    channels = channels or (1 if modes <= GRAY_MODES else 3)
    loader = Loader("L" if channels == 1 else "RGB")
    train.loader = test.loader = loader
    train.transform, test.transform = transforms(
        size or next(iter(sizes)), size is not None, channels, augment, mean, std
    )
    return train, test, len(train.classes), channels, size or next(iter(sizes))


def cifar10(
    root: str, augment: bool, mean: Sequence[float], std: Sequence[float],
    image_size: int | Sequence[int] | None, channels: int | None,
) -> tuple[Any, Any, int, Size]:
    """(train, test, channels, (H, W)) of torchvision's CIFAR-10 under `root`, downloaded if absent."""
    from torchvision.datasets import CIFAR10

    size, channels = as_size(image_size), channels or 3
    train_tf, test_tf = transforms(size or (32, 32), size is not None, channels, augment, mean, std)
    if channels == 1:
        from torchvision.transforms import Grayscale

        train_tf.transforms.insert(0, Grayscale(1))
        test_tf.transforms.insert(0, Grayscale(1))
    try:
        train = CIFAR10(root, train=True, transform=train_tf)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        _download_cifar10(root)
        train = CIFAR10(root, train=True, transform=train_tf)
    test = CIFAR10(root, train=False, transform=test_tf)
    return train, test, channels, size or (32, 32)


def _download_cifar10(root: str) -> None:
    """Make sure CIFAR-10 is under `root`; when it cannot be had, undo every file and folder this
    attempt created and say where a copy can come from instead."""
    from torchvision.datasets import CIFAR10

    path = Path(root)
    top = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)  # first folder we'd create
    archive = path / CIFAR10.filename
    had_archive = archive.exists()
    try:
        CIFAR10(root, train=True, download=True)
    except Exception as exc:  # URLError offline, HTTP errors, a corrupt archive
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        elif not had_archive:
            archive.unlink(missing_ok=True)
        raise ConfigError(
            f"data=cifar10: CIFAR-10 is not on disk under data.root={root} and could not be downloaded "
            f"({one_line(exc)}); put torchvision's cifar-10-batches-py there, or use an image tree copy: "
            "data=imagefolder data.root=PATH (PATH/train/<class>/*.png and PATH/test/<class>/*.png)"
        ) from exc
