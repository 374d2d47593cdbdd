"""certify's fine-tuning: the denoiser trained through the black box by one `mode`.

``deepzero`` (sparse CGE over the denoiser's parameters with feature reuse), ``zo_ae_ds`` (ZO on an
autoencoder's latent, `certify_zoae`), ``fo_ds`` (backprop through the classifier: the white-box upper
bound). Queries are images sent to the classifier, counted the same way in every mode.

`build_sampler` and `build_trainer` are the generic wiring (estimator, optimizer, scheduler, sampler,
TrainerConfig), kept apart from the certify-specific objectives so a shared adapter layer can replace
them mechanically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import Dataset

from deepzero_apps.blackbox_loss import DenoiserLoss, ImageQueries, WhiteBox, labels_of, stability
from deepzero_apps.classifiers import black_box
from deepzero_apps.data import DataBundle, LabeledTensorDataset, balanced_subset
from deepzero_apps.engine import (
    FirstOrder,
    Objective,
    SparseCoordinateSampler,
    StagedObjective,
    compute_ratios,
    is_main,
    load_ratios,
    save_ratios,
)
from deepzero_apps.errors import ConfigError, one_line
from deepzero_apps.remote import HTTPClassifier
from deepzero_apps.tasks.certify_data import NoisyInputs
from deepzero_apps.tasks.certify_stages import pretrain_autoencoder
from deepzero_apps.tasks.certify_zoae import AEObjective, LatentZO
from deepzero_apps.trainer import Trainer, TrainerConfig


def fine_tune(cfg: DictConfig, typed: Any, data: DataBundle, classifier: Any, denoiser: nn.Module,
              metrics: Callable[[nn.Module], dict], out_dir: Path) -> tuple[nn.Module, dict]:
    """Fine-tune the denoiser by `cfg.mode`; returns the certified pipeline and the trainer summary."""
    # Fine-tuning, scoring and the autoencoder all see the denoiser as certification will: BatchNorm keeps
    # the pretrained statistics (and no forward pass here may move them).
    denoiser.eval()
    kind = cfg.classifier.output
    blackbox = black_box(classifier, cfg.classifier, data.num_classes, cfg.eval_batch_size)
    x, _ = balanced_subset(data.train, cfg.finetune_limit, cfg.seed).tensors
    train_set = LabeledTensorDataset(x, labels_of(blackbox, x.to(cfg.device), cfg.eval_batch_size).cpu())
    noisy = NoisyInputs(cfg.sigma, cfg.seed)
    extra: dict[str, Any] = {"blackbox": blackbox, "noise": noisy}
    if isinstance(classifier, HTTPClassifier):
        extra["http"] = classifier  # its retry counters survive a resume like the budget
    loss = DenoiserLoss(blackbox, kind, cfg.mse_weight, cfg.stab_weight)
    sampler, pipeline, report = None, denoiser, {}
    if cfg.mode == "fo_ds":
        extra["whitebox"] = WhiteBox(classifier, kind)
        objective: Objective = StagedObjective(denoiser, DenoiserLoss(extra["whitebox"], kind, cfg.mse_weight,
                                                                      cfg.stab_weight), inputs=noisy)
        estimator: Any = FirstOrder()
    elif cfg.mode == "deepzero":
        objective = StagedObjective(denoiser, loss, inputs=noisy)
        estimator = build_estimator(cfg)
        sampler = build_sampler(cfg, objective, lambda out, y: stability(blackbox(out), y, kind), data, out_dir)
    else:
        encoder, decoder, report = pretrain_autoencoder(cfg, data, denoiser, metrics, out_dir)
        print(f"certify: zo_ae_ds autoencoder: {report['epochs']} epochs (best {report['best_epoch']}), held-out "
              f"reconstruction MSE {report['heldout_recon_mse']:.5f}; noisy accuracy {report['pipeline']['noisy_acc']:.3f} "
              f"through it vs {report['denoiser']['noisy_acc']:.3f} for the bare denoiser")

        def per_image(z: Tensor, target: Tensor) -> Tensor:
            return cfg.stab_weight * stability(blackbox(decoder(z)), target, kind, reduction="none")

        objective = AEObjective(denoiser, encoder, decoder, per_image, noisy, cfg.mse_weight)
        zcfg = cfg.zo_ae_ds
        estimator = LatentZO(zcfg.estimator, q=zcfg.q, mu=zcfg.mu, seed=cfg.seed)
        pipeline = nn.Sequential(denoiser, encoder, decoder)
    objective.counter = ImageQueries([s for s in (blackbox, extra.get("whitebox")) if s is not None])
    trainer = build_trainer(cfg, typed, objective, estimator, train_set, lambda: metrics(pipeline), out_dir,
                            sampler, extra, title=f"certify {cfg.data.name} mode={cfg.mode}")
    if is_main():
        per_step = (sampler.num_coords if sampler is not None else objective.coords.dim) + 1
        if cfg.mode == "zo_ae_ds":
            per_step = estimator.queries_per_step(int(torch.tensor(encoder(x[:1].to(cfg.device)).shape[1:]).prod()))
        print(f"certify: mode={cfg.mode}, {objective.coords.dim:,} trainable parameters, "
              + ("backprop through the classifier" if cfg.mode == "fo_ds" else f"{per_step:,} queries of the batch per step")
              + f", query budget {typed.query_budget or 'none'}, output {out_dir}")
    summary = trainer.fit()
    if isinstance(classifier, HTTPClassifier):
        summary["http"] = classifier.state_dict()
    if report:
        summary["autoencoder"] = report
    return pipeline.eval(), summary


# ---- generic wiring: estimator, sampler, optimizer, scheduler, TrainerConfig -----------------------


def build_estimator(cfg: DictConfig) -> Any:
    try:
        return instantiate(cfg.estimator)
    except Exception as exc:
        raise ConfigError(f"estimator: {one_line(exc)}") from exc


def build_sampler(cfg: DictConfig, objective: StagedObjective, loss_fn: Callable[[Tensor, Tensor], Tensor],
                  data: DataBundle, out_dir: Path) -> SparseCoordinateSampler | None:
    """DeepZero's sparse coordinate sets: layer-wise ratios from ZO-GraSP on the pretrained denoiser.

    Scoring queries the black box (counted in the run's budget). Ratios are saved as `ratios.json`
    so a resumed run reuses them; `sparsity.ratios` supplies a saved file instead.
    """
    sp = cfg.sparsity
    own = out_dir / "ratios.json"
    if sp.ratios is None and sp.method == "dense":
        return None
    denoiser = objective.module
    if sp.ratios is not None or own.exists():
        try:
            ratios, _ = load_ratios(sp.ratios or own, denoiser)
        except ValueError as exc:
            raise ConfigError(f"sparsity.ratios: {exc}") from exc
    else:
        x, y = data.train.tensors
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(cfg.seed + 1))
        scored = ((x + cfg.sigma * noise).to(cfg.device), y.to(cfg.device))
        try:
            ratios = compute_ratios(sp.method, denoiser, loss_fn, scored, sparsity=sp.sparsity, ordering=sp.ordering,
                                    seed=cfg.seed, q=sp.q, mu=sp.mu, samples_per_class=sp.samples_per_class,
                                    counter=objective.counter)
        except ValueError as exc:
            raise ConfigError(f"sparsity: {exc}") from exc
        if is_main():
            save_ratios(own, ratios, {"method": sp.method, "sparsity": sp.sparsity, "ordering": sp.ordering,
                                      "model": cfg.denoiser.get("name", "denoiser"), "seed": cfg.seed})
    return SparseCoordinateSampler(objective.coords, ratios, mask_interval=sp.mask_interval, seed=cfg.seed,
                                   dense_unscored=sp.dense_unscored)


def build_trainer(cfg: DictConfig, typed: Any, objective: Objective, estimator: Any, train_set: Dataset,
                  evaluate: Callable[[], dict], out_dir: Path, sampler: SparseCoordinateSampler | None,
                  extra: dict[str, Any], title: str) -> Trainer:
    """The Trainer over the objective's parameters, with the run's optimizer, scheduler and TrainerConfig."""
    params = [b.param for b in objective.coords.blocks]
    try:
        optimizer = instantiate(cfg.optimizer)(params)
    except Exception as exc:  # torch.optim rejects bad values with ValueError/TypeError
        raise ConfigError(f"optimizer: {one_line(exc)}") from exc
    return Trainer(
        objective, estimator, optimizer, train_set, evaluate=evaluate, out_dir=out_dir,
        config=TrainerConfig(
            epochs=typed.epochs, batch_size=typed.batch_size, warmup_epochs=typed.warmup_epochs, seed=typed.seed,
            query_budget=typed.query_budget, checkpoint_every=typed.checkpoint_every, log_every=typed.log_every,
            on_nonfinite=typed.on_nonfinite, resume=typed.resume, progress=typed.progress,
        ),
        scheduler_factory=instantiate(cfg.scheduler) if cfg.scheduler is not None else None,
        sampler=sampler, device=cfg.device, extra_state=extra, title=title,
    )
