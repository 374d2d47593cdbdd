"""Structured configs: the typed schema every application's YAML is merged onto.

Registered in Hydra's ConfigStore, so composition itself rejects unknown keys and wrong types;
`validate` then instantiates the dataclasses, whose `__post_init__` rejects impossible values. Both
happen before any work starts and surface as one-line `ConfigError`s (exit code 2 in the CLI).
Groups whose options are `_target_` objects (model, estimator, optimizer, scheduler) stay open
dicts so users can point them at their own classes; `validate` checks that each `_target_` imports
and accepts the keys given to it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    augment: bool = False

    def __post_init__(self) -> None:
        from .data import DATASETS

        _require(self.name in DATASETS, f"data.name='{self.name}' is unknown; choose from: {', '.join(DATASETS)}")
        if self.name == "imagefolder":
            _require(self.root is not None, "data.root is required for data.name=imagefolder")
            _require(Path(self.root).is_dir(), f"data.root='{self.root}' does not exist")
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"data.{key}={value} must be positive")


@dataclass
class SparsityConfig:
    method: str = "dense"  # dense | zo_grasp | grasp | random
    sparsity: float = 0.0
    ratios: str | None = None  # a saved layer-wise pruning ratio file; overrides method
    mask_interval: int = 5
    ordering: str = "magnitude"  # magnitude | signed
    dense_unscored: bool = True
    q: int = 192
    mu: float = 5e-3
    samples_per_class: int = 25

    def __post_init__(self) -> None:
        methods = ("dense", "zo_grasp", "grasp", "random")
        _require(self.method in methods, f"sparsity.method='{self.method}' is unknown; choose from: {', '.join(methods)}")
        _require(0.0 <= self.sparsity < 1.0, f"sparsity.sparsity={self.sparsity} must be in [0, 1)")
        _require(self.mask_interval >= 1, f"sparsity.mask_interval={self.mask_interval} must be >= 1")
        _require(self.ordering in ("magnitude", "signed"), f"sparsity.ordering='{self.ordering}' must be magnitude or signed")
        _require(self.ratios is None or Path(self.ratios).is_file(), f"sparsity.ratios='{self.ratios}' does not exist")
        _require(self.mu > 0, f"sparsity.mu={self.mu} must be > 0")


@dataclass
class TrainConfig:
    """Fields shared by every application's training loop."""

    mode: str = "zo"  # zo | fo
    device: str = "cpu"
    threads: int | None = 1  # torch intra-op threads; ZO queries are small, one thread avoids sync overhead
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 1024
    warmup_epochs: float = 0.0
    seed: int = 0
    resume: bool = False
    query_budget: int | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    on_nonfinite: str = "stop"
    progress: bool = True

    def __post_init__(self) -> None:
        _require(self.mode in ("zo", "fo"), f"mode='{self.mode}' is unknown; choose zo or fo")
        _require(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        _require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _require(0 <= self.warmup_epochs < self.epochs, f"warmup_epochs={self.warmup_epochs} must be in [0, epochs)")
        _require(self.query_budget is None or self.query_budget > 0, f"query_budget={self.query_budget} must be positive")
        _require(self.on_nonfinite in ("stop", "skip"), f"on_nonfinite='{self.on_nonfinite}' must be stop or skip")
        _require(self.threads is None or self.threads >= 1, f"threads={self.threads} must be >= 1 or null")
        _require(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0")
        _require(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        _require(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size} must be >= 1")
        _require(
            self.device == "cpu" or self.device.startswith("cuda"), f"device='{self.device}' must be cpu or cuda[:N]"
        )


@dataclass
class ClassifyConfig(TrainConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING
    estimator: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)


SCHEMAS: dict[str, type] = {"classify": ClassifyConfig}


def register_configs() -> None:
    """Store each application's schema as `<app>_schema` (the first entry of its defaults list)."""
    cs = ConfigStore.instance()
    for app, schema in SCHEMAS.items():
        cs.store(name=f"{app}_schema", node=schema)


def _check_targets(node: Any, key: str = "") -> None:
    """Every `_target_` in `node` must import and accept the arguments listed next to it."""
    from hydra._internal.utils import _locate

    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_targets(item, f"{key}[{i}]")
        return
    if not isinstance(node, dict):
        return
    for k, v in node.items():
        _check_targets(v, f"{key}.{k}" if key else str(k))
    if "_target_" not in node:
        return
    name = f"{key}._target_" if key else "_target_"
    try:
        target = _locate(str(node["_target_"]))
    except Exception as exc:  # ImportError, or whatever the imported module raises
        raise ConfigError(f"{name}='{node['_target_']}' cannot be imported: {' '.join(str(exc).split())}") from exc
    _require(callable(target), f"{name}='{node['_target_']}' is not callable")
    kwargs = {k: v for k, v in node.items() if not (str(k).startswith("_") and str(k).endswith("_"))}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature: checked when instantiated
        return
    try:
        signature.bind_partial(*node.get("_args_", []), **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{key or 'config'}: {node['_target_']} does not accept these arguments: {exc}") from exc


def validate(cfg: DictConfig, app: str) -> Any:
    """Run the schema's value checks and the `_target_` checks; returns the typed config object."""
    merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[app]), cfg)
    typed = OmegaConf.to_object(merged)
    _check_targets(OmegaConf.to_container(merged, resolve=True))
    return typed


register_configs()
