"""Metric sinks beside `metrics.jsonl` (which the Trainer always writes: resume and the learning curve
read it): the `logger` config group picks one (`jsonl`: none, `tensorboard`, `mlflow`, `wandb`).

A sink is a callable taking each metrics record the Trainer writes (`{"kind": "train" | "epoch" |
"skipped", "step": ..., ...}`); nested dicts (`eval`) become `eval/<name>` scalars.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from .errors import ConfigError, one_line

Sink = Callable[[Mapping[str, Any]], None]


def scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """`(tag, value)` for every number in `record` except the step, under `<kind>/` (`eval` nested)."""
    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield tag, float(value)


def _require(package: str, logger: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(
            f"logger={logger} needs the '{package}' package: pip install 'deepzero-apps[{logger}]'"
        ) from exc


class TensorBoardLogger:
    """Scalars for TensorBoard (`torch.utils.tensorboard`), as the official DeepZero code logs."""

    def __init__(self, out_dir: Path, log_dir: str | None = None):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir or str(Path(out_dir) / "tensorboard"))

    def __call__(self, record: Mapping[str, Any]) -> None:
        for tag, value in scalars(record, f"{record.get('kind', 'metrics')}/"):
            self.writer.add_scalar(tag, value, global_step=int(record.get("step", 0)))
        if record.get("kind") == "epoch":
            self.writer.flush()


class MLflowLogger:
    """Metrics to an MLflow run (the local `mlruns/` unless `tracking_uri` says otherwise)."""

    def __init__(self, out_dir: Path, experiment: str = "deepzero", tracking_uri: str | None = None):
        self.mlflow = _require("mlflow", "mlflow")
        if tracking_uri:
            self.mlflow.set_tracking_uri(tracking_uri)
        self.mlflow.set_experiment(experiment)
        self.run = self.mlflow.start_run(run_name=Path(out_dir).name)

    def __call__(self, record: Mapping[str, Any]) -> None:
        tags = record.get("kind", "metrics")
        metrics = {f"{tags}/{tag}": value for tag, value in scalars(record)}
        self.mlflow.log_metrics(metrics, step=int(record.get("step", 0)))


class WandbLogger:
    """Metrics to Weights & Biases (`mode=offline` keeps them in the run directory until `wandb sync`)."""

    def __init__(self, out_dir: Path, project: str = "deepzero", mode: str = "offline"):
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(project=project, dir=str(out_dir), mode=mode, name=Path(out_dir).name)

    def __call__(self, record: Mapping[str, Any]) -> None:
        tags = record.get("kind", "metrics")
        self.run.log({f"{tags}/{tag}": value for tag, value in scalars(record)}, step=int(record.get("step", 0)))


def build_logger(node: DictConfig | None, out_dir: Path) -> list[Sink]:
    """The sinks of `cfg.logger` (empty for `jsonl`: metrics.jsonl alone), built for this run dir."""
    if node is None or "_target_" not in node:
        return []
    try:
        return [instantiate(node, out_dir=out_dir)]
    except ConfigError:
        raise
    except Exception as exc:  # hydra wraps the sink's own error
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        raise cause or ConfigError(f"logger: {one_line(exc)}") from exc
