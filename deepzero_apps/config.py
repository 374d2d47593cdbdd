"""Structured configs: the typed schema every application's YAML is merged onto.

The CLI stores each app's schema in Hydra's ConfigStore (from the app's `App`), so composition
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
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import ConfigError, one_line
from .rundir import check_resume, lock_run_dir


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
    image_size: Any = None  # H or [H, W]: resize every image (null: keep; mixed sizes are an error)
    channels: int | None = None  # 1 | 3 (null: what the images are)

    def __post_init__(self) -> None:
        from .data import DATASETS
        from .data.images import as_size

        as_size(self.image_size)
        _require(self.channels in (None, 1, 3), f"data.channels={self.channels} must be 1 or 3")

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
    ratios: str | None = None  # a saved layer-wise pruning ratio file (.json/.yaml); overrides method
    mask_interval: int | None = 5  # epochs between redraws: 5 as the official code; 1 = Algorithm 1 of the paper; null: one fixed set
    ordering: str = "magnitude"  # magnitude: keep largest |score| (official code) | signed: GraSP's ranking
    dense_unscored: bool = True  # biases and BatchNorm estimated densely
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
        _require(self.q >= 1, f"sparsity.q={self.q} must be >= 1 (ZO-GraSP's random directions)")
        _require(self.samples_per_class >= 1, f"sparsity.samples_per_class={self.samples_per_class} must be >= 1")


def _check_device(device: str) -> None:
    """cpu, or a CUDA device this machine has (the run would otherwise fail after loading its data)."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    _require(match is not None, f"device='{device}' must be cpu or cuda[:N]")
    if device != "cpu":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(match.group(1) or 0)
        _require(index < count, f"device='{device}' is not available: this machine has {count} CUDA device(s)")


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
    log_every: int = 10
    eval_every: int = 0  # steps between held-out evaluations logged to metrics.jsonl (0: at epoch ends only)
    on_nonfinite: str = "stop"  # stop | skip
    max_skipped_fraction: float = 0.1  # on_nonfinite=skip fails the run beyond this fraction of its steps
    progress: bool = True  # tqdm progress bars
    logger: Any = None  # the logger group: metric sinks beside metrics.jsonl (deepzero_apps.loggers)

    def __post_init__(self) -> None:
        _require(self.mode in ("zo", "fo"), f"mode='{self.mode}' is unknown; choose zo or fo")
        _require(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        _require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _require(0 <= self.warmup_epochs < self.epochs, f"warmup_epochs={self.warmup_epochs} must be in [0, epochs)")
        _require(self.query_budget is None or self.query_budget > 0, f"query_budget={self.query_budget} must be positive")
        _require(self.on_nonfinite in ("stop", "skip"), f"on_nonfinite='{self.on_nonfinite}' must be stop or skip")
        _require(
            0 <= self.max_skipped_fraction <= 1, f"max_skipped_fraction={self.max_skipped_fraction} must be in [0, 1]"
        )
        cores = os.cpu_count() or 1
        _require(
            self.threads is None or 1 <= self.threads <= cores,
            f"threads={self.threads} must be in [1, {cores}] (this machine's cores) or null",
        )
        _require(0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32 - 1]")
        _require(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0")
        _require(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        _require(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0")
        _require(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size} must be >= 1")
        _check_device(self.device)


@dataclass
class ClassifyConfig(TrainConfig):
    epochs: int = 4  # ZO on digits reaches >90% test accuracy in 4 epochs (88 steps)
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
        from .solvers import check_solver_config

        try:
            check_solver_config(self.name, {"params": self.params, "reference": self.reference, "source": self.source})
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"solver.name: {exc}" if "solver." not in str(exc) else str(exc)) from exc


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
        _require(_writable(Path(self.cache_dir)), f"data.cache_dir='{self.cache_dir}' cannot be created or written")


def _writable(path: Path) -> bool:
    """`path` is a directory a file can be created in, or could be made one (probed with a temporary
    directory in its nearest existing parent, removed at once); the run would otherwise fail late."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        with tempfile.TemporaryDirectory(dir=path):
            return True
    except OSError:
        return False


PDE_METHODS = ("src", "non", "zo_sol", "fo_sol")


@dataclass
class PdeConfig(TrainConfig):
    """Solver-in-the-Loop; `method` picks the training, and the trainer's `mode` follows from it (not set)."""

    mode: str | None = None
    method: str = "zo_sol"  # src: uncorrected solver | non: supervised one-step pairs (FO) | zo_sol | fo_sol
    epochs: int = 1
    batch_size: int = 2  # rollout windows (or one-step pairs for non) per step
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
            "none (burgers and phiflow_wake have one); use method=zo_sol",
        )


CERTIFY_METHODS = ("deepzero", "zo_ae_ds", "fo_ds", "mse")


CLASSIFIER_KINDS = ("train", "callable", "torchscript", "http")


@dataclass
class CertifyClassifierConfig:
    """The classifier behind the black box (the `classifier/` group picks `kind`; docs/blackbox.md)."""

    kind: str = "train"  # train (or load `checkpoint`) | callable | torchscript | http
    output: str = "logits"  # what the black box returns: logits | probs | label
    timeout: float = 60.0  # seconds per black-box call (http: per request)
    checkpoint: str | None = None  # train: trained weights of `model` instead of training
    cache_dir: str | None = None  # train: where stage 1 trains and is reused (null: <run dir>/classifier)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    target: str | None = None  # callable: import path of a factory called with `kwargs`
    kwargs: Any = None  # a dict; Any + null so one `classifier.kwargs={...}` override needs no `+`
    path: str | None = None  # torchscript: the saved module
    url: str | None = None  # http: the endpoint
    max_batch: int = 256  # http: most images per request
    retries: int = 4  # http: further attempts on connection errors, timeouts, 5xx, 429
    backoff: float = 0.5  # http: seconds before the first retry, doubled each time
    rate_limit: float | None = None  # http: most requests per second
    headers: Any = None  # http: a dict, e.g. {Authorization: "Bearer ${oc.env:KEY}"} (Any + null: no `+` needed)

    def __post_init__(self) -> None:
        kinds, outputs = ", ".join(CLASSIFIER_KINDS), ("logits", "probs", "label")
        _require(self.kind in CLASSIFIER_KINDS, f"classifier.kind='{self.kind}' is unknown; choose from: {kinds}")
        _require(self.output in outputs, f"classifier.output='{self.output}' is unknown; choose from: {', '.join(outputs)}")
        _require(self.checkpoint is None or Path(self.checkpoint).is_file(), f"classifier.checkpoint='{self.checkpoint}' does not exist")
        _require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "classifier.epochs, batch_size and lr must be positive")
        _require(0 < self.timeout < float("inf"), f"classifier.timeout={self.timeout} must be a positive number of seconds")
        _require(self.kind != "callable" or bool(self.target), "classifier=callable needs classifier.target=IMPORT.PATH")
        for key in ("kwargs", "headers"):
            value = getattr(self, key)
            _require(value is None or isinstance(value, dict), f"classifier.{key}={value!r} must be a dict, e.g. {{a: 1}}")
        _require(self.kind != "torchscript" or (self.path is not None and Path(self.path).is_file()),
                 f"classifier=torchscript needs classifier.path=FILE; '{self.path}' does not exist")
        _require(self.kind != "http" or str(self.url).startswith(("http://", "https://")),
                 f"classifier=http needs classifier.url=http(s)://...; got '{self.url}'")
        _require(self.max_batch >= 1 and self.retries >= 0 and self.backoff >= 0,
                 "classifier.max_batch must be >= 1, retries and backoff >= 0")
        _require(self.rate_limit is None or self.rate_limit > 0, f"classifier.rate_limit={self.rate_limit} must be > 0 or null")


@dataclass
class DenoiserPretrainConfig:
    """First-order MSE pretraining of the denoiser (no classifier queries), shared by every mode."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    cache_dir: str | None = None  # null: <run dir>/pretrain

    def __post_init__(self) -> None:
        _require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "pretrain.epochs, batch_size and lr must be positive")


@dataclass
class ZOAEDSConfig:
    """The ZO-AE-DS baseline: autoencoder size and the ZO estimator over its latent."""

    estimator: str = "cge"  # cge | rge
    q: int = 48  # rge directions (cge: latent_dim + 1 queries of the batch per step; rge: q + 1)
    mu: float = 5e-3
    latent_channels: int = 3  # latent = latent_channels x H/4 x W/4 (12 on digits, 192 on CIFAR-10)
    width: int = 16
    ae_epochs: int = 100  # most autoencoder epochs: it stops when the held-out MSE stops improving
    patience: int = 3  # epochs without held-out improvement before it stops
    holdout: float = 0.1  # fraction of the training images held out for that
    cache_dir: str | None = None  # null: <run dir>/autoencoder

    def __post_init__(self) -> None:
        _require(self.estimator in ("cge", "rge"), f"zo_ae_ds.estimator='{self.estimator}' must be cge or rge")
        _require(self.q >= 1 and self.mu > 0, f"zo_ae_ds needs q >= 1 and mu > 0, got q={self.q}, mu={self.mu}")
        _require(min(self.latent_channels, self.width, self.ae_epochs, self.patience) >= 1,
                 "zo_ae_ds.latent_channels, width, ae_epochs and patience must be >= 1")
        _require(0 < self.holdout < 1, f"zo_ae_ds.holdout={self.holdout} must be in (0, 1)")


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
    """Denoised smoothing through a black box; `method` picks how the denoiser is fine-tuned."""

    method: str = "deepzero"  # deepzero (sparse CGE) | zo_ae_ds (ZO on an AE latent) | fo_ds (white-box bound) | mse
    mode: str | None = None  # set from method (the trainer's zo | fo); `mode=METHOD` is the CLI's deprecated alias
    sigma: float = 0.25  # Gaussian noise std in [0, 1] pixel units, for training and certification
    mse_weight: float = 0.0  # fine-tuning loss: mse_weight * MSE(D(x'), x) + stab_weight * Stab (Salman et al.:
    stab_weight: float = 1.0  # MSE pretraining, then Stab fine-tuning)
    epochs: int = 50  # fine-tuning epochs (the query budget usually stops ZO modes first)
    batch_size: int = 16
    eval_batch_size: int = 1000
    query_budget: int | None = 500_000  # images sent to the black box while fine-tuning (scoring included)
    eval_limit: int = 200  # test images for the per-epoch denoising metrics (own black box, not budgeted)
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
        methods = ", ".join(CERTIFY_METHODS)
        _require(self.method in CERTIFY_METHODS, f"method='{self.method}' is unknown; choose from: {methods}")
        _require(self.mode is None, f"mode='{self.mode}' is not a certify setting; use method (one of: {methods})")
        self.mode = "fo" if self.method == "fo_ds" else "zo"
        super().__post_init__()
        _require(self.sigma > 0, f"sigma={self.sigma} must be > 0")
        _require(self.mse_weight >= 0 and self.stab_weight > 0, "need mse_weight >= 0 and stab_weight > 0 (Stab drives the queries)")
        _require(self.eval_limit >= 1, f"eval_limit={self.eval_limit} must be >= 1")
        _require(self.finetune_limit is None or self.finetune_limit >= 1, f"finetune_limit={self.finetune_limit} must be >= 1")
        _require(
            self.method == "mse" or self.classifier.output != "label",
            f"method={self.method} trains on the black box's scores, and classifier.output=label gives none (a 0-1 loss "
            "is flat, so every ZO difference is 0); use output=logits or probs, or method=mse to certify with labels only",
        )
        _require(
            self.method != "fo_ds" or self.classifier.kind != "http",
            "method=fo_ds backpropagates through the classifier, and classifier=http can only be queried",
        )
        _require(
            self.sparsity.method != "grasp",
            "sparsity.method='grasp' needs gradients through the black box; use zo_grasp, random or dense",
        )


@dataclass
class ServeConfig:
    """`deepzero-task serve`: a local classifier (callable or TorchScript) behind the HTTP wire format."""

    classifier: CertifyClassifierConfig = field(default_factory=CertifyClassifierConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    request_log: str | None = None  # one JSON line per request (null: <run dir>/requests.jsonl)
    device: str = "cpu"
    threads: int | None = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.classifier.kind in ("callable", "torchscript"),
                 f"serve needs a local classifier (classifier=callable or torchscript), got kind '{self.classifier.kind}'")
        _require(0 <= self.port <= 65535, f"port={self.port} must be in [0, 65535]")
        _require(self.threads is None or self.threads >= 1, f"threads={self.threads} must be >= 1 or null")


SCHEMAS: dict[str, type] = {"classify": ClassifyConfig, "pde": PdeConfig, "certify": CertifyConfig, "serve": ServeConfig}


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
        _require(not isinstance(value, int) or isinstance(value, bool) or value >= 1,
                 f"{group}.{key}={value} must be >= 1")


def validate(cfg: DictConfig, schema: str | type) -> Any:
    """Run the schema's value checks and the `_target_` checks; returns the typed config object.
    `schema`: the dataclass, or the name of a built-in app."""
    schema = SCHEMAS[schema] if isinstance(schema, str) else schema
    _check_keys(cfg, schema)
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    typed = OmegaConf.to_object(merged)
    plain = OmegaConf.to_container(merged, resolve=True)
    for group in ("model", "denoiser"):
        _check_sizes(plain.get(group), group)
    _check_targets(plain)
    return typed


def start_run(cfg: DictConfig, app: str | type) -> tuple[Any, Path]:
    """What every app does first: validate `cfg`, lock the run directory and check a resume against
    the run's saved config (`rundir`), set torch's thread count and seed; returns the typed config
    and Hydra's run directory."""
    typed = validate(cfg, app)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    lock_run_dir(out_dir)
    check_resume(out_dir, cfg, allow_changes=getattr(typed, "resume_allow_changes", False))
    if typed.threads is not None:
        torch.set_num_threads(typed.threads)
    torch.manual_seed(cfg.seed)
    return typed, out_dir

