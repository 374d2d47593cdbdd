"""A `deepzero-task classify` run directory as a black box: `classifier=run classifier.run_dir=PATH`.

Everything comes from the run's own files, so nothing has to be guessed: the architecture and its
settings from `run_config.yaml` (the run's `model` node), the input shape, class count and the
normalisation the run trained with from `input.json` (written by classify), the weights from
`checkpoint.pt`. The result takes [0, 1] images `(N, C, H, W)` like every other black box: the
run's standardisation sits in front of the model. `export_run` writes it as one TorchScript or
`torch.export` file (`deepzero-task export`), for servers that have no deepzero-apps.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ..checkpoint import atomic_write, atomic_write_json, load_checkpoint
from ..errors import ConfigError, one_line
from ..rundir import CHECKPOINT, RUN_CONFIG

INPUT_FILE = "input.json"
EXPORT_FORMATS = ("torchscript", "export")


class Standardize(nn.Module):
    """Per-channel standardization in front of a classifier: the black box takes [0, 1] images, like an API."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1).clone())
        self.register_buffer("std", std.view(1, -1, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def write_input_spec(out_dir: Path, data: Any, dataset: str) -> None:
    """`input.json`: what a model trained on `data` (a `DataBundle`) takes, for `load_run` to rebuild it."""
    atomic_write_json(out_dir / INPUT_FILE, {
        "dataset": dataset, "shape": [data.in_channels, data.height, data.width], "num_classes": data.num_classes,
        "mean": list(data.mean), "std": list(data.std),
    })


def _read(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        why = {INPUT_FILE: "classify writes it since 2026-12-05; the run's own classify command with "
                           f"resume=true hydra.run.dir={run_dir} adds it to a finished run",
               CHECKPOINT: "the run has not finished an epoch, or it is not a classify run"}.get(name, "not a classify run")
        raise ConfigError(f"classifier.run_dir={run_dir} has no {name} ({why})")
    return path


def input_spec(run_dir: str | Path) -> dict[str, Any]:
    """The run's `input.json`: shape [C, H, W], num_classes, and the per-channel mean and std in [0, 1] pixels."""
    path = _read(Path(run_dir), INPUT_FILE)
    try:
        spec = json.loads(path.read_text())
        c = int(spec["shape"][0])
        if len(spec["shape"]) != 3 or len(spec["mean"]) != c or len(spec["std"]) != c or int(spec["num_classes"]) < 2:
            raise ValueError("shape, mean, std or num_classes do not fit together")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"{path} is not an input description: {one_line(exc)}") from exc
    return spec


def check_fits(run_dir: str | Path, shape: tuple[int, int, int], num_classes: int) -> None:
    """A one-line error unless the run was trained on `shape` images of `num_classes` classes (the task's data)."""
    spec = input_spec(run_dir)
    if tuple(spec["shape"]) != tuple(shape) or spec["num_classes"] != num_classes:
        raise ConfigError(
            f"classifier.run_dir={run_dir} takes {tuple(spec['shape'])} images of {spec['num_classes']} classes "
            f"(data={spec['dataset']}), but this data gives {tuple(shape)} images of {num_classes}; "
            "set data= (and data.image_size / data.channels) as the run had them")


def load_run(run_dir: str | Path, device: str = "cpu") -> nn.Sequential:
    """The classify run at `run_dir` as `Standardize -> model` in eval mode: [0, 1] images to logits."""
    from ..models.build import build_model  # the models package registers fast paths: imported when used

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"classifier.run_dir={run_dir} is not a directory")
    spec = input_spec(run_dir)
    try:
        node = OmegaConf.load(_read(run_dir, RUN_CONFIG)).model
    except Exception as exc:  # yaml or OmegaConf errors, or no `model` node
        raise ConfigError(f"{run_dir / RUN_CONFIG} has no readable model config: {one_line(exc)}") from exc
    c, h, w = spec["shape"]
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's random stream
        model = build_model(node, "classifier.run_dir model", in_channels=c, num_classes=spec["num_classes"],
                            in_features=c * h * w)
    state = load_checkpoint(_read(run_dir, CHECKPOINT), map_location="cpu")
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(f"{run_dir / CHECKPOINT} does not fit the run's model: {one_line(exc)[:300]}") from exc
    standardize = Standardize(torch.tensor(spec["mean"]), torch.tensor(spec["std"]))
    return nn.Sequential(standardize, model).to(device).eval()


def export_run(run_dir: str | Path, path: str | Path, fmt: str = "torchscript") -> Path:
    """Write the run's classifier ([0, 1] images -> logits) to `path`: TorchScript (`torch.jit.script`,
    loads with `torch.jit.load`) or `torch.export` with a dynamic batch size (loads with `torch.export.load`)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"format={fmt} is unknown; choose from: {', '.join(EXPORT_FORMATS)}")
    module, spec = load_run(run_dir), input_spec(run_dir)
    path = Path(path)
    with warnings.catch_warnings():  # torch 2.9+ marks TorchScript deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        if fmt == "torchscript":
            scripted = torch.jit.script(module)
            atomic_write(path, lambda f: torch.jit.save(scripted, f))
        else:
            example = torch.rand(2, *spec["shape"])
            program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            atomic_write(path, lambda f: torch.export.save(program, f))
    return path
