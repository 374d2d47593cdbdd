"""`deepzero-task export run_dir=PATH [format=torchscript|export] [output=FILE]`.

Writes a classify run's classifier (its model, weights and input standardisation, so it takes [0, 1]
images) as a file that runs without deepzero-apps: TorchScript (`torch.jit.load`; serve it with
`deepzero-task serve classifier=torchscript classifier.path=FILE`) or a `torch.export` program
(`torch.export.load`). The file is loaded back and checked against the run's model before the
command reports success.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from deepzero_apps.apps import App
from deepzero_apps.blackbox.run_source import EXPORT_FORMATS, export_run, input_spec, load_run
from deepzero_apps.config import require, start_run
from deepzero_apps.errors import RunError

log = logging.getLogger(__name__)
SUFFIX = {"torchscript": ".pt", "export": ".pt2"}


@dataclass
class ExportConfig:
    """`deepzero-task export`: which run, which format, where."""

    run_dir: str | None = None  # a `deepzero-task classify` run directory
    format: str = "torchscript"  # torchscript (torch.jit.script) | export (torch.export, dynamic batch)
    output: str | None = None  # the file to write (null: <this run's dir>/classifier.pt, or .pt2 for export)
    threads: int | None = 1
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.run_dir is not None and Path(self.run_dir).is_dir(),
                f"export needs run_dir=DIR (a classify run); '{self.run_dir}' is not a directory")
        require(self.format in EXPORT_FORMATS, f"format='{self.format}' is unknown; choose from: {', '.join(EXPORT_FORMATS)}")


def load_exported(path: Path, fmt: str) -> torch.nn.Module:
    """The exported file as a module, the way a user loads it."""
    if fmt == "export":
        return torch.export.load(str(path)).module()
    with warnings.catch_warnings():  # torch 2.9+ marks TorchScript deprecated; it still loads
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def run(cfg: DictConfig) -> dict:
    typed, out_dir = start_run(cfg, ExportConfig)
    path = Path(typed.output) if typed.output else out_dir / f"classifier{SUFFIX[typed.format]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_run(typed.run_dir, path, typed.format)
    images = torch.rand(5, *input_spec(typed.run_dir)["shape"], generator=torch.Generator().manual_seed(typed.seed))
    with torch.no_grad():
        error = float((load_exported(path, typed.format)(images) - load_run(typed.run_dir)(images)).abs().max())
    if not error <= 1e-4:
        raise RunError(f"export: {path} differs from the run's model by {error:.3g} on random images")
    log.info(f"export done: {path} ({typed.format}, from {typed.run_dir}; max |logit difference| on 5 random "
             f"images {error:.1e})")
    return {"path": str(path), "format": typed.format, "max_abs_error": error}


APP = App("export", "write a classify run as a TorchScript or torch.export file ([0, 1] images -> logits)",
          ExportConfig, run)
