"""certify's first-order stages, each cached in its own directory: the classifier that becomes the black
box, the denoiser's MSE pretraining, and ZO-AE-DS's autoencoder.

A stage directory holds `stage.json`, what the stage was trained with: the config as written (an
interpolation such as ``${oc.env:KEY}`` stays text, its value is never written) and a SHA-256 of the
resolved values, so a changed value still invalidates the cache, and the stage's kind. Another
configuration is refused instead of silently reusing stale weights; a cache directory that is the
run's own, or holds anything but a stage of its kind (another run, another stage), is refused before
anything is written there. Waiting for a stage another run holds ends on a wait cycle or after
`STAGE_WAIT_S` (`deepzero_apps.rundir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import Dataset

from deepzero_apps.blackbox.loaders import describe, load_classifier
from deepzero_apps.blackbox.run_source import Standardize, check_fits
from deepzero_apps.checkpoint import atomic_write, atomic_write_json, load_checkpoint
from deepzero_apps.data import DataBundle
from deepzero_apps.engine import FirstOrder, Objective, StagedObjective
from deepzero_apps.errors import ConfigError, RunError, one_line
from deepzero_apps.models.build import build_model
from deepzero_apps.rundir import LOCK, lock_run_dir, release_run_dir
from deepzero_apps.trainer import Trainer, TrainerConfig

from .data import NoisyInputs
from .zoae import autoencoder

log = logging.getLogger(__name__)


def fingerprint(**parts: Any) -> dict[str, Any]:
    """A stage's identity for `stage.json`: config nodes unresolved, plus a hash of their resolved values."""

    def plain(value: Any, resolve: bool) -> Any:
        return OmegaConf.to_container(value, resolve=resolve) if isinstance(value, DictConfig) else value

    resolved = json.dumps({k: plain(v, True) for k, v in parts.items()}, sort_keys=True, default=str)
    written = {k: plain(v, False) for k, v in parts.items()}
    return json.loads(json.dumps({**written, "resolved_sha256": hashlib.sha256(resolved.encode()).hexdigest()},
                                 sort_keys=True, default=str))


STAGE_FILE = "stage.json"
# The stage training code's revision, part of every stamp. 2: the Trainer restores train mode after each
# evaluation; stages written before (no "revision") and trained for more than one epoch ran from epoch 2 with
# BatchNorm frozen at epoch 1's statistics (the classifier collapsed to chance), so they are not reused.
STAGE_REVISION = 2
STAGE_WAIT_S = 24 * 3600.0  # longest wait for a stage another run is training (a deadlock is refused at once)


def check_stage_dir(stage_dir: Path, out_dir: Path, title: str) -> None:
    """Refuse, before anything is written there, a cache directory that is this run's own directory
    (its lock would be dropped mid-run and the stage would overwrite the run's files) or that holds
    something other than a stage of this kind (another run, another stage)."""
    if stage_dir.resolve() == out_dir.resolve():
        raise ConfigError(f"{title} cache_dir {stage_dir} is this run's own directory; point it elsewhere")
    stamp = stage_dir / STAGE_FILE
    if stamp.is_file():
        try:
            kind = json.loads(stamp.read_text()).get("stage", title)
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{stamp} is not a stage description ({one_line(exc)}); refused untouched") from exc
        if kind != title:
            raise ConfigError(f"{stage_dir} holds a '{kind}' stage, not a '{title}' one; refused untouched: "
                              "point the stage's cache_dir elsewhere")
    elif stage_dir.is_dir() and any(p.name != LOCK for p in stage_dir.iterdir()):
        raise ConfigError(f"{stage_dir} is not a '{title}' stage (it has files but no {STAGE_FILE}, e.g. another "
                          "run's directory); refused untouched: point the stage's cache_dir elsewhere")
    elif stage_dir.exists() and not stage_dir.is_dir():
        raise ConfigError(f"{title} cache_dir {stage_dir} is not a directory")


def claim_stage(stage_dir: Path, stamp: dict[str, Any], title: str) -> None:
    """Write `stage.json` into a new stage directory, or check that an existing one was trained the same way."""
    path = stage_dir / STAGE_FILE
    stamp = {**stamp, "stage": title, "revision": STAGE_REVISION}
    if not path.exists():
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, stamp, sort_keys=True)
        return
    found = {"stage": title, **json.loads(path.read_text())}  # caches written before "stage" existed count
    if found.get("revision", 1) != STAGE_REVISION:
        raise ConfigError(f"{stage_dir} holds a '{title}' stage trained by deepzero-apps before stage revision "
                          f"{STAGE_REVISION} (BatchNorm frozen from its second epoch); delete it to train it again")
    if found != stamp:
        raise ConfigError(f"{stage_dir} holds a '{title}' stage trained with another configuration; "
                          "delete it or point the stage's cache_dir elsewhere")


def cache_dir(path: str | None, out_dir: Path, name: str) -> Path:
    return Path(path) if path else out_dir / name


def enter_stage(stage_dir: Path, out_dir: Path, stamp: dict[str, Any], title: str) -> None:
    """Check `stage_dir` untouched, wait for its lock (another run may be training or reading it), claim it."""
    check_stage_dir(stage_dir, out_dir, title)
    lock_run_dir(stage_dir, wait=True, timeout=STAGE_WAIT_S)
    try:
        check_stage_dir(stage_dir, out_dir, title)  # what the previous holder left
        claim_stage(stage_dir, stamp, title)
    except BaseException:
        release_run_dir(stage_dir)
        raise


def fit_stage(
    stage_dir: Path,
    out_dir: Path,
    stamp: dict[str, Any],
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
    one continues.
    """
    enter_stage(stage_dir, out_dir, stamp, title)
    try:
        trainer = Trainer(
            objective, FirstOrder(), optimizer, train_set, evaluate, stage_dir,
            TrainerConfig(epochs=epochs, batch_size=batch_size, seed=cfg.seed, resume=True, log_every=cfg.log_every,
                          progress=cfg.progress),
            scheduler_factory=scheduler, device=cfg.device, extra_state=extra_state, title=title, phase=title,
        )
        summary = trainer.fit()
        atomic_write_json(stage_dir / "summary.json", summary)
    finally:
        release_run_dir(stage_dir)  # a finished stage is a cache: concurrent runs may share it
    return summary


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Any, batch_size: int, device: str) -> dict[str, float]:
    """Test accuracy of a white-box classifier on an in-memory dataset, in eval mode; the model's mode is
    restored (the stage's training runs on after each epoch's evaluation, BatchNorm in train mode)."""
    was_training = model.training
    model.eval()
    x, y = dataset.tensors
    correct = sum(int((model(xb.to(device)).argmax(1) == yb.to(device)).sum())
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    model.train(was_training)
    return {"test_acc": correct / len(y)}


def near_chance(test_acc: float, num_classes: int, n_test: int) -> bool:
    """Test accuracy within three binomial standard deviations above chance (1 / num_classes)."""
    chance = 1.0 / num_classes
    return test_acc <= chance + 3.0 * math.sqrt(chance * (1.0 - chance) / max(1, n_test))


def warn_if_chance(info: dict, data: DataBundle, what: str) -> None:
    """One warning line when the black box built here guesses: certifying it would mean nothing."""
    acc, n = info.get("test_acc"), len(data.test)
    if acc is not None and near_chance(acc, data.num_classes, n):
        log.warning(f"warning: the classifier ({what}) is at chance: test accuracy {acc:.2%} on {n} images, "
                    f"{data.num_classes} classes; a guessing black box certifies nothing (e.g. lower classifier.lr "
                    "or train longer)")


def build_classifier(cfg: DictConfig, data: DataBundle, norm: tuple[Tensor, Tensor], out_dir: Path) -> tuple[Any, dict]:
    """Stage 1: the classifier that becomes the black box, mapping [0, 1] images to logits (or to what an
    HTTP server returns).

    `classifier=run|callable|torchscript|http` is the user's own (`run`: a classify run directory, checked
    against the task's data); with `classifier=train` `model` is loaded from `classifier.checkpoint` or
    trained first-order here and cached in `classifier.cache_dir`.
    """
    ccfg = cfg.classifier
    if ccfg.kind == "run":
        check_fits(ccfg.run_dir, (data.in_channels, data.height, data.width), data.num_classes)
    if ccfg.kind != "train":
        return load_classifier(ccfg, cfg.device), describe(ccfg)
    model = build_model(cfg.model, "model", in_channels=data.in_channels, num_classes=data.num_classes,
                        in_features=data.in_features).to(cfg.device)
    standardize = Standardize(*norm).to(cfg.device)
    classifier = nn.Sequential(standardize, model)

    def evaluate() -> dict[str, float]:
        return accuracy(classifier, data.test, cfg.eval_batch_size, cfg.device)

    if ccfg.checkpoint is not None:
        state = load_checkpoint(ccfg.checkpoint, map_location=cfg.device)
        try:
            model.load_state_dict(state.get("model", state))
        except RuntimeError as exc:
            raise ConfigError(f"classifier.checkpoint={ccfg.checkpoint} does not fit model: {one_line(exc)[:300]}") from exc
        info = {**describe(ccfg), **evaluate()}
        warn_if_chance(info, data, f"classifier.checkpoint={ccfg.checkpoint}")
        return classifier.eval(), info
    stage_dir = cache_dir(ccfg.cache_dir, out_dir, "classifier")
    stamp = fingerprint(data=cfg.data, model=cfg.model, seed=cfg.seed, epochs=ccfg.epochs, batch_size=ccfg.batch_size,
                        lr=ccfg.lr)
    objective = StagedObjective(model, lambda logits, b: F.cross_entropy(logits, b[1]), inputs=lambda b: standardize(b[0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=ccfg.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    summary = fit_stage(stage_dir, out_dir, stamp, objective, optimizer, data.train, evaluate, cfg, ccfg.epochs,
                        ccfg.batch_size, "classifier", scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR))
    info = {**describe(ccfg), "source": str(stage_dir), **summary["eval"]}
    warn_if_chance(info, data, f"stage {stage_dir}")
    return classifier.eval(), info


def build_denoiser(cfg: DictConfig, channels: int) -> nn.Module:
    """The denoiser from its `_target_` (DnCNN by default), with `channels` filled from the data."""
    return build_model(cfg.denoiser, "denoiser", channels=channels).to(cfg.device)


def pretrain_denoiser(cfg: DictConfig, data: DataBundle, denoiser: nn.Module,
                      metrics: Callable[[nn.Module], dict], out_dir: Path) -> None:
    """Stage 2: the denoiser trained first-order on MSE to the clean image (no classifier query)."""
    pre, noisy = cfg.pretrain, NoisyInputs(cfg.sigma, cfg.seed)
    fit_stage(cache_dir(pre.cache_dir, out_dir, "pretrain"), out_dir,
              fingerprint(data=cfg.data, denoiser=cfg.denoiser, sigma=cfg.sigma, seed=cfg.seed, epochs=pre.epochs,
                          batch_size=pre.batch_size, lr=pre.lr),
              StagedObjective(denoiser, lambda out, b: F.mse_loss(out, b[0]), inputs=noisy),
              torch.optim.Adam(denoiser.parameters(), lr=pre.lr), data.train, lambda: metrics(denoiser), cfg,
              pre.epochs, pre.batch_size, "denoiser pretraining", extra_state={"noise": noisy})


def pretrain_autoencoder(cfg: DictConfig, data: DataBundle, denoiser: nn.Module,
                         metrics: Callable[[nn.Module], dict], out_dir: Path) -> tuple[nn.Module, nn.Module, dict]:
    """ZO-AE-DS's autoencoder, trained first-order to rebuild clean images from denoised ones (no queries)
    until its reconstruction stops improving.

    A fair baseline needs a converged autoencoder: `holdout` of the training images are held out
    with one fixed noise draw, and training stops after `patience` epochs without a lower held-out
    MSE (at most `ae_epochs`); the best epoch's weights are kept. Returns the encoder, the decoder and
    a report: held-out reconstruction MSE, and the pipeline's noisy accuracy beside the bare denoiser's.
    """
    zcfg = cfg.zo_ae_ds
    if data.image_size % 4:
        raise ConfigError(f"zo_ae_ds needs an image size divisible by 4, got {data.image_size}")
    encoder, decoder = (m.to(cfg.device) for m in autoencoder(data.in_channels, zcfg.latent_channels, zcfg.width))
    ae = nn.Sequential(encoder, decoder)
    stage_dir = cache_dir(zcfg.cache_dir, out_dir, "autoencoder")
    weights, report_file = stage_dir / "autoencoder.pt", stage_dir / "summary.json"
    # One process trains it; released once it is on disk, for others to share.
    enter_stage(stage_dir, out_dir, fingerprint(
        data=cfg.data, denoiser=cfg.denoiser, sigma=cfg.sigma, seed=cfg.seed, batch_size=cfg.pretrain.batch_size,
        lr=cfg.pretrain.lr, pretrain_epochs=cfg.pretrain.epochs,
        autoencoder={k: zcfg[k] for k in ("latent_channels", "width", "ae_epochs", "patience", "holdout")},
    ), "autoencoder")
    try:
        if weights.exists() and report_file.exists():
            ae.load_state_dict(load_checkpoint(weights, map_location=cfg.device))
            return encoder, decoder, json.loads(report_file.read_text())
        report = _fit_autoencoder(cfg, data.train.tensors[0], denoiser, ae)
        report["pipeline"] = metrics(nn.Sequential(denoiser, encoder, decoder))
        report["denoiser"] = metrics(denoiser)
        atomic_write(weights, lambda f: torch.save(ae.state_dict(), f))
        atomic_write_json(report_file, report)
    finally:
        release_run_dir(stage_dir)
    return encoder, decoder, report


def _fit_autoencoder(cfg: DictConfig, x: Tensor, denoiser: nn.Module, ae: nn.Module) -> dict[str, Any]:
    """Adam on MSE(ae(denoiser(x + noise)), x) with early stopping on the held-out split; keeps the best weights."""
    zcfg, pre = cfg.zo_ae_ds, cfg.pretrain
    gen = torch.Generator().manual_seed(cfg.seed + 104_729)
    order = torch.randperm(len(x), generator=gen)
    n_hold = max(1, round(zcfg.holdout * len(x)))
    held, train = x[order[:n_hold]].to(cfg.device), x[order[n_hold:]].to(cfg.device)
    held_noisy = held + cfg.sigma * torch.randn(held.shape, generator=gen).to(held)
    with torch.no_grad():
        held_in = torch.cat([denoiser(b) for b in held_noisy.split(pre.batch_size)])
    optimizer = torch.optim.Adam(ae.parameters(), lr=pre.lr)
    history: list[float] = []
    best, best_state = float("inf"), None
    for _ in range(zcfg.ae_epochs):
        ae.train()
        for idx in torch.randperm(len(train), generator=gen).split(pre.batch_size):
            clean = train[idx]
            with torch.no_grad():
                denoised = denoiser(clean + cfg.sigma * torch.randn(clean.shape, generator=gen).to(clean))
            optimizer.zero_grad()
            F.mse_loss(ae(denoised), clean).backward()
            optimizer.step()
        ae.eval()
        with torch.no_grad():
            mse = float(sum(F.mse_loss(ae(b), c, reduction="sum") for b, c in
                            zip(held_in.split(pre.batch_size), held.split(pre.batch_size))) / held.numel())
        history.append(mse)
        log.info(f"certify: zo_ae_ds autoencoder epoch {len(history)}: held-out reconstruction MSE {mse:.5f}")
        if mse < best:
            best, best_state = mse, {k: v.clone() for k, v in ae.state_dict().items()}
        elif len(history) - 1 - history.index(best) >= zcfg.patience:
            break
    if best_state is None:
        raise RunError(f"zo_ae_ds: the autoencoder's held-out MSE is not finite ({history[-1]}); lower pretrain.lr")
    ae.load_state_dict(best_state)
    ae.eval()
    return {"epochs": len(history), "best_epoch": history.index(best) + 1, "heldout_recon_mse": best,
            "heldout_images": n_hold, "history": history,
            "stopped": "no improvement" if len(history) < zcfg.ae_epochs else "ae_epochs"}
