"""certify's fine-tuning: the denoiser trained through the black box by one `method`.

``deepzero`` (sparse CGE over the denoiser's parameters with feature reuse), ``zo_ae_ds`` (ZO on an
autoencoder's latent, `zoae.py`), ``fo_ds`` (backprop through the classifier: the white-box upper
bound). Queries are images sent to the classifier, counted the same way in every method.

The generic wiring (estimator, optimizer, scheduler, sampler with the shared ratio-reuse rule,
TrainerConfig, metric loggers) comes from the adapter layer every app shares (`deepzero_apps.adapter`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from deepzero_apps.adapter import (
    build_estimator,
    build_optimizer,
    build_sampler,
    build_scheduler,
    trainer_config,
)
from deepzero_apps.blackbox import BlackBoxClassifier
from deepzero_apps.blackbox.http_client import HTTPClassifier
from deepzero_apps.blackbox.loaders import black_box
from deepzero_apps.blackbox.losses import DenoiserLoss, ImageQueries, WhiteBox, labels_of, stability
from deepzero_apps.checkpoint import atomic_write
from deepzero_apps.data import DataBundle, LabeledTensorDataset, balanced_subset
from deepzero_apps.engine import FirstOrder, Objective, StagedObjective, in_subset, is_main
from deepzero_apps.errors import one_line
from deepzero_apps.loggers import build_logger
from deepzero_apps.trainer import Trainer

from .data import NoisyInputs
from .finetune import step_cost, trainable_denoiser
from .stages import pretrain_autoencoder
from .zoae import AEObjective, latent_estimator

log = logging.getLogger(__name__)


def fine_tune(cfg: DictConfig, typed: Any, data: DataBundle, classifier: Any, denoiser: nn.Module,
              metrics: Callable[[nn.Module], dict], out_dir: Path) -> tuple[nn.Module, dict]:
    """Fine-tune the denoiser by `cfg.method`; returns the certified pipeline and the trainer summary."""
    # Fine-tuning, scoring and the autoencoder all see the denoiser as certification will: BatchNorm keeps
    # the pretrained statistics (and no forward pass here may move them).
    denoiser.eval()
    kind = cfg.classifier.output
    blackbox = black_box(classifier, cfg.classifier, data.num_classes, cfg.eval_batch_size, run_dir=out_dir,
                         account="train")
    blackbox.limit = typed.query_budget  # a hard cap also for labelling and ZO-GraSP scoring before training
    x, _ = balanced_subset(data.train, cfg.finetune_limit, cfg.seed).tensors
    train_set = LabeledTensorDataset(x, black_box_labels(blackbox, x, cfg, out_dir))
    noisy = NoisyInputs(cfg.sigma, cfg.seed)
    extra: dict[str, Any] = {"blackbox": blackbox, "noise": noisy}
    if isinstance(classifier, HTTPClassifier):
        extra["http"] = classifier  # its retry counters survive a resume like the budget
    loss = DenoiserLoss(blackbox, kind, cfg.mse_weight, cfg.stab_weight)
    module, names = trainable_denoiser(cfg, denoiser, data.in_channels)  # finetune.params; the rest stays frozen
    sampler, pipeline, report, calls = None, module, {}, 1  # calls: classifier calls per loss query
    if cfg.method == "fo_ds":
        extra["whitebox"] = WhiteBox(classifier, kind)
        objective: Objective = StagedObjective(module, DenoiserLoss(extra["whitebox"], kind, cfg.mse_weight,
                                                                    cfg.stab_weight), inputs=noisy, trainable=in_subset(names))
        estimator: Any = FirstOrder()
    elif cfg.method == "deepzero":
        objective = StagedObjective(module, loss, inputs=noisy, trainable=in_subset(names))
        estimator = build_estimator(cfg, objective.coords.dim)
        sampler = build_sampler(cfg, objective, out_dir, cfg.denoiser.get("name", "denoiser"),
                                lambda out, y: stability(blackbox(out), y, kind), partial(scoring_batch, cfg, data))
    else:
        encoder, decoder, report = pretrain_autoencoder(cfg, data, denoiser, metrics, out_dir)
        log.info(f"certify: zo_ae_ds autoencoder: {report['epochs']} epochs (best {report['best_epoch']}), held-out "
              f"reconstruction MSE {report['heldout_recon_mse']:.5f}; noisy accuracy {report['pipeline']['noisy_acc']:.3f} "
              f"through it vs {report['denoiser']['noisy_acc']:.3f} for the bare denoiser")

        def per_image(z: Tensor, target: Tensor) -> Tensor:
            return cfg.stab_weight * stability(blackbox(decoder(z)), target, kind, reduction="none")

        zcfg = cfg.zo_ae_ds
        objective = AEObjective(denoiser, encoder, decoder, per_image, noisy, cfg.mse_weight,
                                latent_estimator(zcfg.estimator, zcfg.q, zcfg.mu, cfg.seed))
        estimator = FirstOrder()  # exact through the white box, ZO through the black box (a zo_function)
        extra["latent"] = objective.latent  # its call count seeds RGE's directions: replayed on resume
        pipeline = nn.Sequential(denoiser, encoder, decoder)
        with torch.no_grad():
            calls = objective.latent.queries_per_call(encoder(x[:1].to(cfg.device))[0].numel())
    objective.counter = ImageQueries([s for s in (blackbox, extra.get("whitebox")) if s is not None], calls)
    params = [b.param for b in objective.coords.blocks]
    trainer = Trainer(
        objective, estimator, build_optimizer(cfg, params), train_set, evaluate=lambda: metrics(pipeline),
        out_dir=out_dir, config=trainer_config(typed), scheduler_factory=build_scheduler(cfg), sampler=sampler,
        sinks=build_logger(cfg.logger, out_dir), device=cfg.device, extra_state=extra,
        title=f"certify {cfg.data.name} method={cfg.method}", phase=f"fine-tuning ({cfg.method})",
    )
    dim = sampler.num_coords if sampler is not None else objective.coords.dim
    cost = step_cost(cfg, objective, calls * estimator.queries_per_step(dim), blackbox.queries)
    if is_main():
        first = f"from stage {cost['first_stage']} of {cost['stages']}" if cost["first_stage"] else "every stage"
        log.info(f"certify: method={cfg.method}, finetune.params={cost['params']}: {cost['trainable']:,} of {cost['of']:,} "
                 f"parameters trainable ({first}), "
                 + ("backprop through the classifier" if cfg.method == "fo_ds" else f"{cost['queries_per_step']:,} queries of the batch per step")
                 + f" = {cost['images_per_step']:,} images, query budget {typed.query_budget or 'none'}"
                 + (f" (~{cost['steps_in_budget']:,} steps)" if cost["steps_in_budget"] is not None else "") + f", output {out_dir}")
    summary = trainer.fit()
    summary["finetune"] = cost | {"first_stage": min(objective.block_stages())}  # traced by the first query
    if isinstance(classifier, HTTPClassifier):
        summary["http"] = classifier.state_dict()
    if report:
        summary["autoencoder"] = report
    return pipeline.eval(), summary


LABELS = "train_labels.pt"  # the black box's labels of the training images, paid for once per run


def black_box_labels(blackbox: BlackBoxClassifier, x: Tensor, cfg: DictConfig, out_dir: Path) -> Tensor:
    """The black box's labels of `x`, queried once per run directory and kept in `LABELS`: a restart
    (a resume, or a run killed before its first checkpoint) reads them back instead of buying them
    again, and still charges their images to the budget (a checkpoint then restores the count anyway;
    a paid black box's count already holds them, from its query ledger)."""
    path, digest = out_dir / LABELS, hashlib.sha256(x.cpu().contiguous().numpy().tobytes()).hexdigest()
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if saved["inputs_sha256"] == digest and saved["labels"].shape == (len(x),):
                blackbox.queries = max(blackbox.queries, int(saved["images"]))
                return saved["labels"]
        except Exception as exc:  # noqa: BLE001 - a damaged file is queried again, never trusted
            log.info(f"certify: {path} unreadable ({one_line(exc)}); labelling the training images again")
    before = blackbox.queries
    labels = labels_of(blackbox, x.to(cfg.device), cfg.eval_batch_size).cpu()
    if is_main():
        record = {"labels": labels, "inputs_sha256": digest, "images": blackbox.queries - before}
        atomic_write(path, lambda f: torch.save(record, f))
    return labels


def scoring_batch(cfg: DictConfig, data: DataBundle) -> tuple[Tensor, Tensor]:
    """ZO-GraSP scores the denoiser on noisy training images (a fixed draw); scoring queries the black box."""
    x, y = data.train.tensors
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(cfg.seed + 1))
    return (x + cfg.sigma * noise).to(cfg.device), y.to(cfg.device)
