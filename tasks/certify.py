"""`deepzero-task certify`: a certified defense for a black-box classifier (denoised smoothing).

Pipeline, every stage in pixel space ([0, 1] images, so sigma and radii mean what they mean in
Cohen et al. and Salman et al.):

1. the classifier is trained first-order (or loaded, or any user callable) and then only used
   through `BlackBoxClassifier`: queries counted, no autograd path;
2. a DnCNN denoiser is pretrained first-order on MSE to the clean image (the denoiser is ours; no
   classifier query), cached so every mode starts from the same weights;
3. the denoiser is fine-tuned on ``mse_weight * MSE + stab_weight * Stab`` (Stab: cross-entropy of the
   black box on the denoised image against its label of the clean image) by one `mode`:
   ``deepzero`` (sparse CGE over the denoiser's parameters with feature reuse), ``zo_ae_ds`` (the
   autoencoder baseline, `certify_zoae`), ``fo_ds`` (backprop through the classifier: the white-box
   upper bound) or ``mse`` (no fine-tuning: the common starting point). Queries are images sent to
   the classifier, counted the same way in every mode, and `query_budget` caps them;
4. the smoothed classifier ``g(x) = argmax P(f(D(x + eps)) = c)`` is certified on a test subset
   (Cohen's CERTIFY) and certified accuracy vs radius is written as TSV, JSON and PNG.

``compare=[run_dir, ...]`` instead plots and tabulates finished runs side by side.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from deepzero_apps.adapter import (
    build_estimator,
    build_optimizer,
    build_sampler,
    build_scheduler,
    trainer_config,
)
from deepzero_apps.apps import App
from deepzero_apps.blackbox import BlackBoxClassifier
from deepzero_apps.checkpoint import atomic_write, load_checkpoint
from deepzero_apps.config import CertifyConfig, ConfigError, start_run
from deepzero_apps.data import DataBundle, LabeledTensorDataset, balanced_subset, build_datasets
from deepzero_apps.data.classification import CIFAR10_MEAN, CIFAR10_STD
from deepzero_apps.data.images import per_channel
from deepzero_apps.engine import (
    FirstOrder,
    Objective,
    QueryCounter,
    StagedObjective,
    is_main,
)
from deepzero_apps.errors import one_line
from deepzero_apps.loggers import build_logger
from deepzero_apps.models import get_factory
from deepzero_apps.smoothing import Smoothed, certified_accuracy, certify_dataset, load_certification
from deepzero_apps.smoothing import plot_certified_accuracy as plot_curves
from deepzero_apps.tasks.certify_zoae import AEObjective, autoencoder, latent_estimator
from deepzero_apps.tasks.classify import build_model, cross_entropy
from deepzero_apps.tasks.classify import evaluate as classifier_accuracy
from deepzero_apps.trainer import Trainer, TrainerConfig

log = logging.getLogger(__name__)
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
MODES = ("deepzero", "zo_ae_ds", "fo_ds", "mse")


# ---- data in pixel space ---------------------------------------------------------------------------


def _tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    if isinstance(dataset, LabeledTensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = zip(*DataLoader(dataset, batch_size=256))
    return torch.cat(xs), torch.cat(ys)


def pixel_data(data_cfg: DictConfig, seed: int) -> tuple[DataBundle, tuple[Tensor, Tensor]]:
    """In-memory train/test sets in [0, 1] pixels, plus the per-channel (mean, std) the classifier standardizes with.

    The builders normalize; this undoes it exactly: cifar10 by its constants, imagefolder by asking
    for mean 0 / std 1, digits and fake by their training min/max (digits' pixels span exactly
    0..16/16). Standardization with the builders' statistics then lives inside the classifier, so a
    checkpoint from `deepzero-task classify` plugs in unchanged.
    """
    if data_cfg.augment:
        raise ConfigError("data.augment=true is not supported by certify (images are kept in memory in pixel space)")
    zeros, ones = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    try:
        bundle = build_datasets(
            data_cfg.name, data_cfg.root, train_limit=data_cfg.train_limit, test_limit=data_cfg.test_limit,
            seed=seed, image_size=data_cfg.image_size, channels=data_cfg.channels,
            **({"mean": zeros, "std": ones} if data_cfg.name == "imagefolder" else {}),
        )
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    (train_x, train_y), (test_x, test_y) = _tensors(bundle.train), _tensors(bundle.test)
    c = bundle.in_channels
    if data_cfg.name in ("cifar10", "imagefolder"):
        mean, std = (torch.tensor(per_channel(v, c, "statistics")) for v in (CIFAR10_MEAN, CIFAR10_STD))
        if data_cfg.name == "cifar10":
            train_x, test_x = (x * std.view(1, c, 1, 1) + mean.view(1, c, 1, 1) for x in (train_x, test_x))
    else:
        lo, hi = train_x.min(), train_x.max()
        train_x, test_x = ((x - lo) / (hi - lo) for x in (train_x, test_x))
        mean, std = train_x.mean().repeat(c), train_x.std(unbiased=False).repeat(c)
    bundle.train = LabeledTensorDataset(train_x.contiguous(), train_y.long())
    bundle.test = LabeledTensorDataset(test_x.contiguous(), test_y.long())
    return bundle, (mean, std)


class Standardize(nn.Module):
    """Per-channel standardization in front of the classifier: the black box takes [0, 1] images, like an API."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1).clone())
        self.register_buffer("std", std.view(1, -1, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


# ---- noise, losses, query accounting ---------------------------------------------------------------


class NoisyInputs:
    """``x + N(0, sigma^2)`` for a batch's clean images, drawn once per batch.

    Every query of a ZO step must see the same noise, so the draw is cached for the batch object the
    estimator received; draw t is seeded by (seed, t) and `draws` is checkpointed, so resumes replay.
    """

    def __init__(self, sigma: float, seed: int):
        self.sigma, self.seed, self.draws = sigma, seed, 0
        self._last: tuple[Any, Tensor] | None = None

    def __call__(self, batch: Sequence[Tensor]) -> Tensor:
        if self._last is None or self._last[0] is not batch:
            clean = batch[0]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
            noise = torch.randn(clean.shape, generator=gen).to(clean)
            self._last = (batch, clean + self.sigma * noise)
            self.draws += 1
        return self._last[1]

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.draws = int(state["draws"])


class WhiteBox:
    """The classifier with gradients (FO-DS only), counting images like `BlackBoxClassifier` does."""

    def __init__(self, model: Callable[[Tensor], Tensor], output: str):
        self.model, self.output, self.queries = model, output, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.queries += len(x)
        logits = self.model(x)
        return logits.softmax(1) if self.output == "probs" else logits

    def state_dict(self) -> dict[str, int]:
        return {"queries": self.queries}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.queries = int(state["queries"])


class ImageQueries:
    """An objective counter whose `queries` are the images its classifiers have seen (the budget's unit).

    The engine counts loss queries; a loss query here sends a whole batch, and ZO-AE-DS's queries
    are not parameter queries at all, so every mode reports and budgets the classifiers' own counts
    (restored on resume through the trainer's `extra_state`). Forward-equivalents stay the engine's.
    """

    def __init__(self, sources: Sequence[Any]):
        self.sources, self.loss_queries, self.forward_equivalents = list(sources), 0, 0.0

    @property
    def queries(self) -> int:
        return sum(s.queries for s in self.sources)

    def add(self, queries: int, forward_equivalents: float) -> None:
        self.loss_queries += queries
        self.forward_equivalents += forward_equivalents

    def snapshot(self) -> QueryCounter:
        return QueryCounter(self.queries, self.forward_equivalents)

    def since(self, earlier: QueryCounter) -> QueryCounter:
        return self.snapshot().since(earlier)

    def state_dict(self) -> dict[str, float]:
        return {"loss_queries": self.loss_queries, "forward_equivalents": self.forward_equivalents}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.loss_queries, self.forward_equivalents = int(state["loss_queries"]), float(state["forward_equivalents"])


def stability(outputs: Tensor, target: Tensor, kind: str, reduction: str = "mean") -> Tensor:
    """Stab loss of Salman et al.: cross-entropy of the classifier's output against its clean label.

    From probabilities it is the NLL of their log; a label-only black box gives only the 0-1 loss.
    """
    if kind == "logits":
        return F.cross_entropy(outputs, target, reduction=reduction)
    if kind == "probs":
        return F.nll_loss(outputs.clamp_min(1e-12).log(), target, reduction=reduction)
    wrong = (outputs != target).float()
    return wrong.mean() if reduction == "mean" else wrong


class DenoiserLoss:
    """``mse_weight * MSE(out, clean) + stab_weight * Stab(classifier(out), clean label)``: a StagedObjective loss_fn."""

    def __init__(self, classifier: Callable[[Tensor], Tensor], kind: str, mse_weight: float, stab_weight: float):
        self.classifier, self.kind, self.mse_weight, self.stab_weight = classifier, kind, mse_weight, stab_weight

    def __call__(self, out: Tensor, batch: Sequence[Tensor]) -> Tensor:
        stab = self.stab_weight * stability(self.classifier(out), batch[1], self.kind)
        return self.mse_weight * F.mse_loss(out, batch[0]) + stab if self.mse_weight else stab


def labels_of(blackbox: BlackBoxClassifier, x: Tensor, batch_size: int) -> Tensor:
    """Top-1 labels of the black box (counted queries), whatever its output kind."""
    outs = [blackbox(chunk) for chunk in x.split(batch_size)]
    out = torch.cat(outs)
    return out if blackbox.output == "label" else out.argmax(1)


@torch.no_grad()
def denoising_metrics(
    pipeline: nn.Module, blackbox: BlackBoxClassifier, x: Tensor, y: Tensor, sigma: float, seed: int, batch_size: int
) -> dict[str, float]:
    """MSE to the clean images and the black box's accuracy on denoised noisy images (fixed noise draw)."""
    was_training = pipeline.training
    pipeline.eval()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 7919))
    device = next(pipeline.parameters()).device
    se, correct = 0.0, 0
    for xb, nb, yb in zip(x.split(batch_size), noise.split(batch_size), y.split(batch_size)):
        xb, yb = xb.to(device), yb.to(device)
        out = pipeline(xb + sigma * nb.to(device))
        se += float(F.mse_loss(out, xb, reduction="sum"))
        correct += int((labels_of(blackbox, out, batch_size) == yb).sum())
    pipeline.train(was_training)
    return {"mse": se / x.numel(), "noisy_acc": correct / len(x)}


# ---- cached first-order stages ---------------------------------------------------------------------


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def fit_stage(
    stage_dir: Path,
    fingerprint: dict[str, Any],
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    train_set: Dataset,
    evaluate: Callable[[], dict[str, float]],
    cfg: DictConfig,
    epochs: int,
    batch_size: int,
    title: str,
    scheduler: Callable[..., Any] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> dict:
    """Train a white-box stage first-order in `stage_dir`, or reuse the finished run found there.

    The stage always resumes its own checkpoint, so a finished stage is a cache and an interrupted
    one continues; `stage.json` records what it was trained with, and a different configuration is
    refused instead of silently reusing stale weights.
    """
    stamp = stage_dir / "stage.json"
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
    if not stamp.exists():
        atomic_write(stamp, lambda f: f.write(json.dumps(fingerprint, indent=2, sort_keys=True).encode()))
    elif json.loads(stamp.read_text()) != fingerprint:
        raise ConfigError(f"{stage_dir} holds a '{title}' stage trained with another configuration; "
                          "delete it or point the stage's cache_dir elsewhere")
    trainer = Trainer(
        objective, FirstOrder(), optimizer, train_set, evaluate, stage_dir,
        TrainerConfig(epochs=epochs, batch_size=batch_size, seed=cfg.seed, resume=True, log_every=cfg.log_every,
                      progress=cfg.progress),
        scheduler_factory=scheduler, device=cfg.device, extra_state=extra_state, title=title,
    )
    summary = trainer.fit()
    (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _cache_dir(path: str | None, out_dir: Path, name: str) -> Path:
    return Path(path) if path else out_dir / name


def build_classifier(cfg: DictConfig, data: DataBundle, norm: tuple[Tensor, Tensor], out_dir: Path) -> tuple[Any, dict]:
    """Stage 1: the classifier that becomes the black box, mapping [0, 1] images to logits.

    `classifier.callable` (a `_target_`) supplies any callable instead; `classifier.checkpoint` loads
    trained weights of `model` (a trainer checkpoint or a state dict); otherwise `model` is trained
    first-order here and cached in `classifier.cache_dir`.
    """
    ccfg = cfg.classifier
    if ccfg.callable is not None:
        try:
            built = instantiate(ccfg.callable)
        except Exception as exc:
            raise ConfigError(f"classifier.callable: {one_line(exc)}") from exc
        if not callable(built):
            raise ConfigError(f"classifier.callable: {ccfg.callable._target_} returned a {type(built).__name__}, "
                              "not a callable mapping [0, 1] images to logits")
        return built, {"source": "callable"}
    model = build_model(cfg.model, data).to(cfg.device)
    standardize = Standardize(*norm).to(cfg.device)
    classifier = nn.Sequential(standardize, model)

    def accuracy() -> dict[str, float]:
        return classifier_accuracy(classifier, data.test, cfg.eval_batch_size, cfg.device)

    if ccfg.checkpoint is not None:
        state = load_checkpoint(ccfg.checkpoint, map_location=cfg.device)
        try:
            model.load_state_dict(state.get("model", state))
        except RuntimeError as exc:
            raise ConfigError(f"classifier.checkpoint={ccfg.checkpoint} does not fit model: {one_line(exc)[:300]}") from exc
        return classifier.eval(), {"source": ccfg.checkpoint, **accuracy()}
    stage_dir = _cache_dir(ccfg.cache_dir, out_dir, "classifier")
    fingerprint = {"data": _plain(cfg.data), "model": _plain(cfg.model), "seed": cfg.seed,
                   **{k: ccfg[k] for k in ("epochs", "batch_size", "lr")}}
    objective = StagedObjective(model, cross_entropy, inputs=lambda b: standardize(b[0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=ccfg.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    summary = fit_stage(stage_dir, fingerprint, objective, optimizer, data.train, accuracy, cfg, ccfg.epochs,
                        ccfg.batch_size, "classifier", scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR))
    return classifier.eval(), {"source": str(stage_dir), **summary["eval"]}


def build_denoiser(cfg: DictConfig, channels: int) -> nn.Module:
    """The denoiser from its `_target_` (DnCNN by default), with `channels` filled from the data."""
    spec = OmegaConf.to_container(cfg.denoiser, resolve=True)
    try:
        target = spec.get("_target_", "")
        factory = get_factory(spec["name"]) if target.endswith("create_model") else None
        takes_channels = factory is None or "channels" in inspect.signature(factory).parameters
        fill = {"channels": channels} if takes_channels and "channels" not in spec else {}
        return instantiate(cfg.denoiser, **fill).to(cfg.device)
    except Exception as exc:
        raise ConfigError(f"denoiser: {one_line(exc)}") from exc


# ---- the modes -------------------------------------------------------------------------------------


def scoring_batch(cfg: DictConfig, data: DataBundle) -> tuple[Tensor, Tensor]:
    """ZO-GraSP scores the denoiser on noisy training images (a fixed draw); scoring queries the black box."""
    x, y = data.train.tensors
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(cfg.seed + 1))
    return (x + cfg.sigma * noise).to(cfg.device), y.to(cfg.device)


def pretrain_autoencoder(cfg: DictConfig, data: DataBundle, denoiser: nn.Module, metrics: Callable[[nn.Module], dict],
                         out_dir: Path) -> tuple[nn.Module, nn.Module]:
    """ZO-AE-DS's autoencoder, trained first-order to rebuild clean images from denoised ones (no queries)."""
    zcfg = cfg.zo_ae_ds
    if data.image_size % 4:
        raise ConfigError(f"zo_ae_ds needs an image size divisible by 4, got {data.image_size}")
    encoder, decoder = (m.to(cfg.device) for m in autoencoder(data.in_channels, zcfg.latent_channels, zcfg.width))
    ae = nn.Sequential(encoder, decoder)
    noisy = NoisyInputs(cfg.sigma, cfg.seed)

    def denoised(batch: Sequence[Tensor]) -> Tensor:
        with torch.no_grad():
            return denoiser(noisy(batch))

    objective = StagedObjective(ae, lambda out, b: F.mse_loss(out, b[0]), inputs=denoised)
    fingerprint = {"data": _plain(cfg.data), "denoiser": _plain(cfg.denoiser), "sigma": cfg.sigma, "seed": cfg.seed,
                   "pretrain": {k: cfg.pretrain[k] for k in ("epochs", "batch_size", "lr")},
                   "autoencoder": {k: zcfg[k] for k in ("latent_channels", "width", "ae_epochs")}}
    fit_stage(_cache_dir(zcfg.cache_dir, out_dir, "autoencoder"), fingerprint, objective,
              torch.optim.Adam(ae.parameters(), lr=cfg.pretrain.lr), data.train,
              lambda: metrics(nn.Sequential(denoiser, encoder, decoder)), cfg, zcfg.ae_epochs, cfg.pretrain.batch_size,
              "autoencoder", extra_state={"noise": noisy})
    return encoder, decoder


def train_mode(cfg: DictConfig, typed: Any, data: DataBundle, classifier: Any, denoiser: nn.Module,
               metrics: Callable[[nn.Module], dict], out_dir: Path) -> tuple[nn.Module, dict]:
    """Fine-tune the denoiser by `cfg.method`; returns the certified pipeline and the trainer summary."""
    # Fine-tuning, scoring and the autoencoder all see the denoiser as certification will: BatchNorm keeps
    # the pretrained statistics (and no forward pass here may move them).
    denoiser.eval()
    kind = cfg.classifier.output
    blackbox = BlackBoxClassifier(classifier, output=kind, batch_size=cfg.eval_batch_size,
                                  num_classes=data.num_classes, name="classifier")
    x, _ = balanced_subset(data.train, cfg.finetune_limit, cfg.seed).tensors
    train_set = LabeledTensorDataset(x, labels_of(blackbox, x.to(cfg.device), cfg.eval_batch_size).cpu())
    noisy = NoisyInputs(cfg.sigma, cfg.seed)
    extra: dict[str, Any] = {"blackbox": blackbox, "noise": noisy}
    loss = DenoiserLoss(blackbox, kind, cfg.mse_weight, cfg.stab_weight)
    sampler, pipeline = None, denoiser
    if cfg.method == "fo_ds":
        extra["whitebox"] = WhiteBox(classifier, kind)
        objective: Objective = StagedObjective(denoiser, DenoiserLoss(extra["whitebox"], kind, cfg.mse_weight,
                                                                      cfg.stab_weight), inputs=noisy)
        estimator: Any = FirstOrder()
    elif cfg.method == "deepzero":
        objective = StagedObjective(denoiser, loss, inputs=noisy)
        estimator = build_estimator(cfg, objective.coords.dim)
        sampler = build_sampler(cfg, objective, out_dir, cfg.denoiser.get("name", "denoiser"),
                                lambda out, y: stability(blackbox(out), y, kind), partial(scoring_batch, cfg, data))
    else:
        encoder, decoder = pretrain_autoencoder(cfg, data, denoiser, metrics, out_dir)

        def per_image(z: Tensor, target: Tensor) -> Tensor:
            return cfg.stab_weight * stability(blackbox(decoder(z)), target, kind, reduction="none")

        zcfg = cfg.zo_ae_ds
        objective = AEObjective(denoiser, encoder, decoder, per_image, noisy, cfg.mse_weight,
                                latent_estimator(zcfg.estimator, zcfg.q, zcfg.mu, cfg.seed))
        estimator = FirstOrder()  # exact through the white box, ZO through the black box (a zo_function)
        extra["latent"] = objective.latent  # its call count seeds RGE's directions: replayed on resume
        pipeline = nn.Sequential(denoiser, encoder, decoder)
    objective.counter = ImageQueries([s for s in (blackbox, extra.get("whitebox")) if s is not None])
    params = [b.param for b in objective.coords.blocks]
    trainer = Trainer(
        objective, estimator, build_optimizer(cfg, params), train_set, evaluate=lambda: metrics(pipeline),
        out_dir=out_dir, config=trainer_config(typed), scheduler_factory=build_scheduler(cfg), sampler=sampler,
        sinks=build_logger(cfg.logger, out_dir), device=cfg.device, extra_state=extra, title=f"certify {cfg.data.name} method={cfg.method}",
    )
    if is_main():
        per_step = (sampler.num_coords if sampler is not None else objective.coords.dim) + 1
        if cfg.method == "zo_ae_ds":
            per_step = objective.latent.queries_per_call(encoder(x[:1].to(cfg.device))[0].numel())
        log.info(f"certify: method={cfg.method}, {objective.coords.dim:,} trainable parameters, "
              + ("backprop through the classifier" if cfg.method == "fo_ds" else f"{per_step:,} queries of the batch per step")
              + f", query budget {typed.query_budget or 'none'}, output {out_dir}")
    return pipeline.eval(), trainer.fit()


# ---- certification and comparison -----------------------------------------------------------------


def certify_pipeline(cfg: DictConfig, data: DataBundle, classifier: Any, pipeline: nn.Module, out_dir: Path) -> dict:
    """Cohen's CERTIFY of ``f(pipeline(x + eps))`` on a class-balanced test subset; writes TSV, JSON and PNG."""
    ccfg = cfg.certify
    blackbox = BlackBoxClassifier(classifier, output="label", batch_size=ccfg.batch_size,
                                  num_classes=data.num_classes, name="classifier")
    pipeline.eval()
    smoothed = Smoothed(lambda z: blackbox(pipeline(z)), data.num_classes, cfg.sigma, seed=cfg.seed)
    subset = balanced_subset(data.test, ccfg.limit, cfg.seed)
    rows = certify_dataset(smoothed, subset, out_csv=out_dir / "certify.tsv", n0=ccfg.n0, n=ccfg.n, alpha=ccfg.alpha,
                           batch_size=ccfg.batch_size, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    accuracy = certified_accuracy(rows, RADII)
    result = {"certified_accuracy": {str(r): a for r, a in accuracy.items()}, "examples": len(rows),
              "n0": ccfg.n0, "n": ccfg.n, "alpha": ccfg.alpha, "sigma": cfg.sigma, "queries": blackbox.queries,
              "wall_s": sum(r.time for r in rows)}
    (out_dir / "certified_accuracy.json").write_text(json.dumps(result, indent=2))
    plot_curves({cfg.method: rows}, out_dir / "certified_accuracy.png", title=f"{cfg.data.name}, sigma={cfg.sigma}")
    return result


def compare_runs(run_dirs: Sequence[str], out_dir: Path) -> dict:
    """Certified-accuracy curves of finished runs in one PNG, and their table as CSV and Markdown."""
    curves, table = {}, []
    for d in map(Path, run_dirs):
        try:
            summary = json.loads((d / "summary.json").read_text())
            rows = load_certification(d / "certify.tsv")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"compare: {d} is not a finished certify run ({one_line(exc)})") from exc
        label = summary["mode"] if summary["mode"] not in curves else f"{summary['mode']} ({d.name})"
        curves[label] = rows
        table.append({"mode": label, "train_queries": summary["train"].get("queries", 0),
                      **{f"r={r}": a for r, a in certified_accuracy(rows, RADII).items()}, "run": str(d)})
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, out_dir / "compare.png", title="certified accuracy")
    header = list(table[0])
    csv_lines = [",".join(header)] + [",".join(str(row[h]) for h in header) for row in table]
    (out_dir / "compare.csv").write_text("\n".join(csv_lines) + "\n")
    md = ["| " + " | ".join(header[:-1]) + " |", "|" + "---|" * (len(header) - 1)]
    md += ["| " + " | ".join(f"{row[h]:.1%}" if h.startswith("r=") else f"{row[h]:,}" if isinstance(row[h], int)
                             else str(row[h]) for h in header[:-1]) + " |" for row in table]
    (out_dir / "compare.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return {"compare": table}


def run(cfg: DictConfig) -> dict:
    typed, out_dir = start_run(cfg, "certify")
    if cfg.compare:
        return compare_runs(cfg.compare, out_dir)
    data, norm = pixel_data(cfg.data, cfg.seed)
    classifier, clf_info = build_classifier(cfg, data, norm, out_dir)
    eval_x, eval_y = (t[: cfg.eval_limit] for t in data.test.tensors)
    eval_box = BlackBoxClassifier(classifier, output="label", batch_size=cfg.eval_batch_size,
                                  num_classes=data.num_classes, name="classifier")

    def metrics(pipeline: nn.Module) -> dict[str, float]:
        """Evaluation through its own black box, so it never spends the training budget."""
        return denoising_metrics(pipeline, eval_box, eval_x, eval_y, cfg.sigma, cfg.seed, cfg.eval_batch_size)

    denoiser = build_denoiser(cfg, data.in_channels)
    noisy = NoisyInputs(cfg.sigma, cfg.seed)
    pre = cfg.pretrain
    fit_stage(_cache_dir(pre.cache_dir, out_dir, "pretrain"),
              {"data": _plain(cfg.data), "denoiser": _plain(cfg.denoiser), "sigma": cfg.sigma, "seed": cfg.seed,
               **{k: pre[k] for k in ("epochs", "batch_size", "lr")}},
              StagedObjective(denoiser, lambda out, b: F.mse_loss(out, b[0]), inputs=noisy),
              torch.optim.Adam(denoiser.parameters(), lr=pre.lr), data.train, lambda: metrics(denoiser), cfg,
              pre.epochs, pre.batch_size, "denoiser pretraining", extra_state={"noise": noisy})
    if cfg.method == "mse":
        pipeline, train = denoiser.eval(), {"queries": 0, "eval": metrics(denoiser)}
    else:
        pipeline, train = train_mode(cfg, typed, data, classifier, denoiser, metrics, out_dir)
    cert = certify_pipeline(cfg, data, classifier, pipeline, out_dir)
    summary = {"mode": cfg.method, "method": cfg.method, "data": cfg.data.name, "sigma": cfg.sigma, "classifier": clf_info, "train": train,
               "certify": cert}
    if is_main():
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc = " ".join(f"r={r}:{a:.3f}" for r, a in cert["certified_accuracy"].items())
        log.info(f"certify done: method={cfg.method} train_queries={train['queries']:,} certified {acc} output={out_dir}")
    return summary


APP = App(
    "certify", "certified defense of a black-box classifier: denoiser trained by DeepZero, ZO-AE-DS or FO",
    CertifyConfig, run, aliases={"mode": "method"},
)
