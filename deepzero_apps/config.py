"""Structured configs: what every app's typed schema is built from, and how a config is checked.

The shared parts live here (data, sparsity, the training loop's keys); each app's own schema lives
next to the app (tasks/classify/app.py, tasks/pde/config.py, tasks/certify/config.py, tasks/serve/app.py;
the black-box classifier's in deepzero_apps/blackbox/loaders.py) and reaches the CLI through its `App`.
The CLI stores each app's schema in Hydra's ConfigStore, so composition
itself rejects unknown keys and wrong types; `validate` then instantiates the dataclasses, whose `__post_init__` rejects impossible values. Both
happen before any work starts and surface as one-line `ConfigError`s (exit code 2 in the CLI).
Groups whose options are `_target_` objects (model, estimator, optimizer, scheduler) stay open
dicts so users can point them at their own classes; `validate` checks that each `_target_` imports
and accepts the keys given to it.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from .errors import ConfigError, one_line
from .rundir import check_resume, lock_run_dir


def describe_config_error(exc: BaseException) -> str:
    """One line for a config that cannot be composed: the file and line of a YAML syntax error, the
    expected type of a value that does not convert; otherwise the exception's own message."""
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in seen:
        if isinstance(cause, yaml.MarkedYAMLError) and cause.problem_mark is not None:
            mark = cause.problem_mark
            what = "; ".join(str(part) for part in (cause.context, cause.problem) if part)
            hint = (
                "; quote a value with ${...} in it inside [...] or {...}, e.g. '${oc.env:X}'"
                if "'{'" in str(cause.problem)
                else ""
            )
            return f"config file {mark.name}, line {mark.line + 1}, column {mark.column + 1}: {what}{hint}"
        converted = re.search(r"could not be converted to (\w+)", str(cause))
        if isinstance(cause, ValidationError) and converted:
            kind = TYPE_NAMES.get(converted.group(1), f"a {converted.group(1)}")
            return f"{cause.full_key}={cause.value!r}: expected {kind}"
    return one_line(exc)


TYPE_NAMES = {"Integer": "an integer", "Float": "a float", "Boolean": "a boolean (true or false)"}


def require(ok: bool, message: str) -> None:
    """A schema check: `message` is the one-line error when `ok` is false."""
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    augment: bool = False
    image_size: Any = None  # H or [H, W]: resize every image (null: keep; mixed sizes are an error)
    channels: int | None = None  # 1 | 3 (null: what the images are)

    def __post_init__(self) -> None:
        from .data import DATASETS
        from .data.images import as_size

        as_size(self.image_size)
        require(self.channels in (None, 1, 3), f"data.channels={self.channels} must be 1 or 3")

        require(self.name in DATASETS, f"data.name='{self.name}' is unknown; choose from: {', '.join(DATASETS)}")
        if self.name == "imagefolder":
            require(self.root is not None, "data.root is required for data.name=imagefolder")
            require(Path(self.root).is_dir(), f"data.root='{self.root}' does not exist")
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            require(value is None or value > 0, f"data.{key}={value} must be positive")


@dataclass
class SparsityConfig:
    method: str = "dense"  # dense | zo_grasp | grasp | random | uniform
    sparsity: float = 0.0
    ratios: str | None = None  # a saved layer-wise pruning ratio file (.json/.yaml); overrides method
    mask_interval: int | None = 5  # epochs between redraws: 5 as the official code; 1 = Algorithm 1 of the paper; null: one fixed set
    ordering: str = "magnitude"  # magnitude: keep largest |score| (official code) | signed: GraSP's ranking
    dense_unscored: bool = True  # biases and BatchNorm estimated densely
    q: int = 192
    mu: float = 5e-3
    samples_per_class: int = 25

    def __post_init__(self) -> None:
        methods = ("dense", "zo_grasp", "grasp", "random", "uniform")
        require(self.method in methods, f"sparsity.method='{self.method}' is unknown; choose from: {', '.join(methods)}")
        require(0.0 <= self.sparsity < 1.0, f"sparsity.sparsity={self.sparsity} must be in [0, 1)")
        require(self.mask_interval is None or self.mask_interval >= 1,
                 f"sparsity.mask_interval={self.mask_interval} must be >= 1 (or null: never redrawn)")
        require(self.ordering in ("magnitude", "signed"), f"sparsity.ordering='{self.ordering}' must be magnitude or signed")
        require(self.ratios is None or Path(self.ratios).is_file(), f"sparsity.ratios='{self.ratios}' does not exist")
        require(self.mu > 0, f"sparsity.mu={self.mu} must be > 0")
        require(self.q >= 1, f"sparsity.q={self.q} must be >= 1 (ZO-GraSP's random directions)")
        require(self.samples_per_class >= 1, f"sparsity.samples_per_class={self.samples_per_class} must be >= 1")


def _check_device(device: str) -> None:
    """cpu, or a CUDA device this machine has (the run would otherwise fail after loading its data)."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    require(match is not None, f"device='{device}' must be cpu or cuda[:N]")
    if device != "cpu":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(match.group(1) or 0)
        require(index < count, f"device='{device}' is not available: this machine has {count} CUDA device(s)")


@dataclass
class TrainConfig:
    """Fields shared by every application's training loop."""

    mode: str = "zo"  # zo: gradients from loss queries (estimator group) | fo: backprop baseline
    device: str = "cpu"  # cpu | cuda[:N]
    threads: int | None = 1  # torch intra-op threads (null: torch's default); small ZO queries run fastest on one
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 1024
    warmup_epochs: float = 0.0
    seed: int = 0
    resume: bool = False  # continue the checkpoint in hydra.run.dir
    resume_allow_changes: bool = False  # resume even if run-changing keys differ from run_config.yaml
    query_budget: int | None = None  # stop cleanly after this many loss queries
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at epoch ends)
    dist_timeout: float = 1800.0  # under torchrun: seconds a rank waits for the others (joining, any collective)
    log_every: int = 10
    eval_every: int = 0  # steps between held-out evaluations logged to metrics.jsonl (0: at epoch ends only)
    on_nonfinite: str = "stop"  # stop | skip
    max_skipped_fraction: float = 0.1  # on_nonfinite=skip fails the run beyond this fraction of its steps
    progress: bool = True  # tqdm progress bars
    logger: Any = None  # the logger group: metric sinks beside metrics.jsonl (deepzero_apps.loggers)

    def __post_init__(self) -> None:
        require(self.mode in ("zo", "fo"), f"mode='{self.mode}' is unknown; choose zo or fo")
        require(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        require(0 <= self.warmup_epochs < self.epochs, f"warmup_epochs={self.warmup_epochs} must be in [0, epochs)")
        require(self.query_budget is None or self.query_budget > 0, f"query_budget={self.query_budget} must be positive")
        require(self.on_nonfinite in ("stop", "skip"), f"on_nonfinite='{self.on_nonfinite}' must be stop or skip")
        require(
            0 <= self.max_skipped_fraction <= 1, f"max_skipped_fraction={self.max_skipped_fraction} must be in [0, 1]"
        )
        cores = os.cpu_count() or 1
        require(
            self.threads is None or 1 <= self.threads <= cores,
            f"threads={self.threads} must be in [1, {cores}] (this machine's cores) or null",
        )
        require(0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32 - 1]")
        require(self.dist_timeout > 0, f"dist_timeout={self.dist_timeout} must be > 0 (seconds)")
        require(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0")
        require(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        require(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0")
        require(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size} must be >= 1")
        _check_device(self.device)




def method_mode(app: str, method: str, mode: str | None, methods: tuple[str, ...], first_order: tuple[str, ...]) -> str:
    """The trainer's zo|fo `mode` of an app that names a `method` instead; `mode` itself is refused."""
    names = ", ".join(methods)
    require(method in methods, f"method='{method}' is unknown; choose from: {names}")
    require(mode is None, f"mode='{mode}' is not used by {app}; set method (one of: {names})")
    return "fo" if method in first_order else "zo"


@dataclass
class ZOTrainConfig(TrainConfig):
    """TrainConfig plus the groups every training app composes (open `_target_` dicts, and sparsity)."""

    model: Any = MISSING
    estimator: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)


@contextlib.contextmanager
def _silenced(logger: logging.Logger) -> Iterator[None]:
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _check_targets(node: Any, key: str = "") -> None:
    """Every `_target_` in `node` must import and accept the arguments listed next to it."""
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
        with _silenced(logging.getLogger("hydra.utils")):  # it logs the failure it raises: one report
            target = get_object(str(node["_target_"]))
    except Exception as exc:  # ImportError, or whatever the imported module raises
        raise ConfigError(f"{name}='{node['_target_']}' cannot be imported: {one_line(exc)}") from exc
    require(callable(target), f"{name}='{node['_target_']}' is not callable")
    kwargs = {k: v for k, v in node.items() if not (str(k).startswith("_") and str(k).endswith("_"))}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature: checked when instantiated
        return
    try:
        bound = signature.bind_partial(*node.get("_args_", []), **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{key or 'config'}: {node['_target_']} does not accept these arguments: {exc}") from exc
    for arg, value in bound.arguments.items():
        kind = _scalar_kind(signature.parameters[arg].annotation)
        wrong = isinstance(value, str) or (kind == "int" and isinstance(value, float))
        if kind is not None and wrong:
            where = f"{key}.{arg}" if key else arg
            raise ConfigError(f"{where}={value!r}: expected {SCALARS[kind]} ({node['_target_']}'s {arg})")


SCALARS = {"float": "a float", "int": "an integer", "bool": "a boolean (true or false)"}


def _scalar_kind(annotation: Any) -> str | None:
    """'float', 'int' or 'bool' when a target's annotation (a type, a union or, under postponed
    evaluation, its text) admits only numbers of that kind (and None); None when anything else fits."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    names = set(re.findall(r"[A-Za-z_][\w.]*", text)) - {"None", "NoneType", "Optional", "Union", "typing"}
    names = {n.rsplit(".", 1)[-1] for n in names} - {"Tensor"}  # `float | Tensor`: a config gives the float
    for kind in SCALARS:
        if kind in names and names <= {"float", "int", "bool"}:
            return kind
    return None


# Sizes of a model or denoiser (`_target_` groups stay open dicts) that only make sense positive.
POSITIVE_SIZES = ("channels", "depth", "width", "blocks", "kernel_size", "hidden", "layers", "latent_channels")


def _check_keys(cfg: Any, schema: type, prefix: str = "") -> None:
    """Refuse keys the schema does not have, also those added with `+` (a typo like `+chekpoint_every`)."""
    known = {f.name: f.type for f in fields(schema)}
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"'{prefix}{key}' is not a setting of this app{hint}")
    for f in fields(schema):
        if is_dataclass(f.default_factory) and isinstance(cfg.get(f.name), DictConfig):  # type: ignore[arg-type]
            _check_keys(cfg[f.name], f.default_factory, f"{prefix}{f.name}.")


def _check_sizes(node: Any, group: str) -> None:
    for key in POSITIVE_SIZES:
        value = node.get(key) if isinstance(node, dict) else None
        require(not isinstance(value, int) or isinstance(value, bool) or value >= 1,
                 f"{group}.{key}={value} must be >= 1")


def validate(cfg: DictConfig, schema: type) -> Any:
    """Run the schema's value checks and the `_target_` checks; returns the typed config object."""
    _check_keys(cfg, schema)
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    typed = OmegaConf.to_object(merged)
    plain = OmegaConf.to_container(merged, resolve=True)
    for group in ("model", "denoiser"):
        _check_sizes(plain.get(group), group)
    _check_targets(plain)
    return typed


def start_run(cfg: DictConfig, schema: type) -> tuple[Any, Path]:
    """What every app does first: validate `cfg`, lock the run directory and check a resume against
    the run's saved config (`rundir`), set torch's thread count and seed; returns the typed config
    and Hydra's run directory."""
    typed = validate(cfg, schema)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    lock_run_dir(out_dir)
    check_resume(out_dir, cfg, allow_changes=getattr(typed, "resume_allow_changes", False))
    if typed.threads is not None:
        torch.set_num_threads(typed.threads)
    torch.manual_seed(cfg.seed)
    return typed, out_dir

