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

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import ConfigError, one_line


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
    method: str = "dense"  # dense | zo_grasp | grasp | random | uniform
    sparsity: float = 0.0
    ratios: str | None = None  # a saved layer-wise pruning ratio file; overrides method
    mask_interval: int | None = 5  # epochs between redraws of the coordinate sets; null: one fixed set
    ordering: str = "magnitude"  # magnitude | signed
    dense_unscored: bool = True
    q: int = 192
    mu: float = 5e-3
    samples_per_class: int = 25

    def __post_init__(self) -> None:
        methods = ("dense", "zo_grasp", "grasp", "random", "uniform")
        _require(self.method in methods, f"sparsity.method='{self.method}' is unknown; choose from: {', '.join(methods)}")
        _require(0.0 <= self.sparsity < 1.0, f"sparsity.sparsity={self.sparsity} must be in [0, 1)")
        _require(self.mask_interval is None or self.mask_interval >= 1,
                 f"sparsity.mask_interval={self.mask_interval} must be >= 1 (or null: never redrawn)")
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


@dataclass
class PdeSolverConfig:
    """A registered solver (`list_solvers()`) built twice: `params` shared, `reference`/`source` per grid."""

    name: str = "burgers"
    params: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .solvers import get_solver_class

        try:
            get_solver_class(self.name)
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"solver.name: {exc}") from exc


@dataclass
class PdeDataConfig:
    """Reference simulations: seeds 0.. for training, test_seed_start.. held out; `warmup_steps` discarded,
    then `steps` kept (cached in `cache_dir`)."""

    train_sims: int = 8
    test_sims: int = 4
    test_seed_start: int = 1000
    steps: int = 32
    warmup_steps: int = 0
    cache_dir: str = "data/pde"

    def __post_init__(self) -> None:
        _require(self.train_sims >= 1, f"data.train_sims={self.train_sims} must be >= 1")
        _require(self.test_sims >= 1, f"data.test_sims={self.test_sims} must be >= 1")
        _require(
            self.test_seed_start >= self.train_sims,
            f"data.test_seed_start={self.test_seed_start} must be >= data.train_sims={self.train_sims} "
            "(test simulations are held out)",
        )
        _require(self.steps >= 1, f"data.steps={self.steps} must be >= 1")
        _require(self.warmup_steps >= 0, f"data.warmup_steps={self.warmup_steps} must be >= 0")


PDE_METHODS = ("src", "non", "zo_sol", "fo_sol")


@dataclass
class PdeConfig(TrainConfig):
    """Solver-in-the-Loop; `method` picks the training, and the trainer's `mode` follows from it (not set)."""

    mode: str | None = None
    method: str = "zo_sol"  # src | non | zo_sol | fo_sol
    unroll: int = 4  # solver steps per training rollout (zo_sol, fo_sol)
    eval_steps: int | None = None  # rollout length on the test simulations (null: data.steps)
    init_from: str | None = None  # start from another run's weights (its checkpoint.pt or run directory)
    solver: PdeSolverConfig = field(default_factory=PdeSolverConfig)
    data: PdeDataConfig = field(default_factory=PdeDataConfig)
    model: Any = MISSING
    estimator: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

    def __post_init__(self) -> None:
        from .solvers import get_solver_class

        methods = ", ".join(PDE_METHODS)
        _require(self.method in PDE_METHODS, f"method='{self.method}' is unknown; choose from: {methods}")
        _require(self.mode is None, f"mode='{self.mode}' is not used by pde; set method (one of: {methods})")
        self.mode = "zo" if self.method == "zo_sol" else "fo"
        super().__post_init__()
        steps = self.data.steps
        _require(1 <= self.unroll <= steps, f"unroll={self.unroll} must be in [1, data.steps={steps}]")
        _require(
            self.eval_steps is None or 1 <= self.eval_steps <= steps,
            f"eval_steps={self.eval_steps} must be in [1, data.steps={steps}]",
        )
        _require(
            self.sparsity.ratios is not None or self.sparsity.method in ("dense", "random"),
            f"sparsity.method='{self.sparsity.method}' scores need class labels; pde supports dense or "
            "random (or sparsity.ratios=FILE)",
        )
        found = self.init_from is None or Path(self.init_from).exists()
        _require(found, f"init_from='{self.init_from}' does not exist")
        twin = getattr(get_solver_class(self.solver.name), "torch_twin", None)
        _require(
            self.method != "fo_sol" or callable(twin),
            f"method=fo_sol needs a differentiable torch twin of the solver and '{self.solver.name}' has "
            "none (burgers has one); use method=zo_sol",
        )


CERTIFY_MODES = ("deepzero", "zo_ae_ds", "fo_ds", "mse")


@dataclass
class CertifyClassifierConfig:
    """Stage 1 of certify: the classifier behind the black box (trained first-order, loaded, or a callable)."""

    output: str = "logits"  # what the black box returns: logits | probs | label
    checkpoint: str | None = None  # trained weights of `model` instead of training
    callable: Any = None  # a `_target_` returning any callable [0, 1] images -> logits
    cache_dir: str | None = None  # where stage 1 trains and is reused (null: <run dir>/classifier)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05

    def __post_init__(self) -> None:
        kinds = ("logits", "probs", "label")
        _require(self.output in kinds, f"classifier.output='{self.output}' is unknown; choose from: {', '.join(kinds)}")
        _require(self.checkpoint is None or Path(self.checkpoint).is_file(), f"classifier.checkpoint='{self.checkpoint}' does not exist")
        _require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "classifier.epochs, batch_size and lr must be positive")


@dataclass
class DenoiserPretrainConfig:
    """First-order MSE pretraining of the denoiser (no classifier queries), shared by every mode."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    cache_dir: str | None = None  # null: <run dir>/pretrain

    def __post_init__(self) -> None:
        _require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "pretrain.epochs, batch_size and lr must be positive")


@dataclass
class ZOAEDSConfig:
    """The ZO-AE-DS baseline: autoencoder size and the ZO estimator over its latent."""

    estimator: str = "cge"  # cge | rge
    q: int = 192  # rge directions
    mu: float = 5e-3
    latent_channels: int = 3  # latent = latent_channels x H/4 x W/4
    width: int = 16
    ae_epochs: int = 5
    cache_dir: str | None = None  # null: <run dir>/autoencoder

    def __post_init__(self) -> None:
        _require(self.estimator in ("cge", "rge"), f"zo_ae_ds.estimator='{self.estimator}' must be cge or rge")
        _require(self.q >= 1 and self.mu > 0, f"zo_ae_ds needs q >= 1 and mu > 0, got q={self.q}, mu={self.mu}")
        _require(min(self.latent_channels, self.width, self.ae_epochs) >= 1, "zo_ae_ds.latent_channels, width and ae_epochs must be >= 1")


@dataclass
class SmoothingConfig:
    """Cohen's CERTIFY on `limit` class-balanced test images."""

    limit: int = 100
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    batch_size: int = 1000

    def __post_init__(self) -> None:
        _require(min(self.limit, self.n0, self.n, self.batch_size) >= 1, "certify.limit, n0, n and batch_size must be >= 1")
        _require(0 < self.alpha < 1, f"certify.alpha={self.alpha} must be in (0, 1)")


@dataclass
class CertifyConfig(TrainConfig):
    """Denoised smoothing through a black box; `mode` picks how the denoiser is fine-tuned."""

    mode: str = "deepzero"  # deepzero | zo_ae_ds | fo_ds | mse
    sigma: float = 0.25
    mse_weight: float = 0.0
    stab_weight: float = 1.0
    eval_limit: int = 256
    finetune_limit: int | None = None  # class-balanced training images for fine-tuning (null: all)
    compare: list[str] | None = None  # finished run dirs: plot and tabulate them instead of running
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # the classifier's architecture
    denoiser: Any = MISSING
    estimator: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    classifier: CertifyClassifierConfig = field(default_factory=CertifyClassifierConfig)
    pretrain: DenoiserPretrainConfig = field(default_factory=DenoiserPretrainConfig)
    zo_ae_ds: ZOAEDSConfig = field(default_factory=ZOAEDSConfig)
    certify: SmoothingConfig = field(default_factory=SmoothingConfig)

    def __post_init__(self) -> None:
        _require(self.mode in CERTIFY_MODES, f"mode='{self.mode}' is unknown; choose from: {', '.join(CERTIFY_MODES)}")
        mode, self.mode = self.mode, "fo" if self.mode == "fo_ds" else "zo"  # the shared checks know zo | fo
        super().__post_init__()
        self.mode = mode
        _require(self.sigma > 0, f"sigma={self.sigma} must be > 0")
        _require(self.mse_weight >= 0 and self.stab_weight > 0, "need mse_weight >= 0 and stab_weight > 0 (Stab drives the queries)")
        _require(self.eval_limit >= 1, f"eval_limit={self.eval_limit} must be >= 1")
        _require(self.finetune_limit is None or self.finetune_limit >= 1, f"finetune_limit={self.finetune_limit} must be >= 1")
        _require(
            self.mode != "fo_ds" or self.classifier.output != "label",
            "mode=fo_ds backpropagates through the classifier's output; classifier.output=label has no gradient",
        )
        _require(
            self.sparsity.method != "grasp",
            "sparsity.method='grasp' needs gradients through the black box; use zo_grasp, random or dense",
        )


SCHEMAS: dict[str, type] = {"classify": ClassifyConfig, "pde": PdeConfig, "certify": CertifyConfig}


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
        raise ConfigError(f"{name}='{node['_target_']}' cannot be imported: {one_line(exc)}") from exc
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


def start_run(cfg: DictConfig, app: str) -> tuple[Any, Path]:
    """What every app does first: validate `cfg`, set torch's thread count and seed; returns the
    typed config and Hydra's run directory."""
    typed = validate(cfg, app)
    if typed.threads is not None:
        torch.set_num_threads(typed.threads)
    torch.manual_seed(cfg.seed)
    return typed, Path(HydraConfig.get().runtime.output_dir)


register_configs()
