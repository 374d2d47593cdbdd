"""`deepzero-task classify`: image classification trained through loss queries.

Thin adapter: data and model from the registries, a staged cross-entropy objective (so feature
reuse applies), the estimator / optimizer / scheduler from Hydra `_target_`s, and the shared Trainer.
`mode=fo` swaps only the estimator for backprop, for side-by-side baselines.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from deepzero_apps.config import ConfigError, start_run
from deepzero_apps.data import DataBundle, build_datasets
from deepzero_apps.engine import (
    FirstOrder,
    SparseCoordinateSampler,
    StagedObjective,
    compute_ratios,
    is_main,
    load_ratios,
    save_ratios,
)
from deepzero_apps.errors import one_line
from deepzero_apps.models import get_factory
from deepzero_apps.trainer import Trainer, TrainerConfig


def build_model(model_cfg: DictConfig, data: DataBundle) -> nn.Module:
    """Instantiate the model, filling the sizes its factory asks for from the data."""
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    target = spec.get("_target_", "")
    try:
        factory = get_factory(spec["name"]) if target.endswith("create_model") else _resolve(target)
        params = inspect.signature(factory).parameters
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"model: {one_line(exc)}") from exc
    sizes = {
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "in_features": data.in_channels * data.image_size**2,
    }
    fill = {k: v for k, v in sizes.items() if k in params and k not in spec}
    try:
        return instantiate(model_cfg, **fill)
    except Exception as exc:  # hydra wraps the factory's own error
        raise ConfigError(f"model: {one_line(exc)}") from exc


def _resolve(target: str) -> Any:
    from hydra.utils import get_method

    return get_method(target)


def cross_entropy(logits: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits, batch[1])


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: str) -> dict[str, float]:
    """Test accuracy and loss in eval mode (BatchNorm running statistics)."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return {"test_acc": correct / n, "test_loss": loss / n}


def balanced_examples(dataset, per_class: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` examples of every class, drawn in a seeded order (the pruning scorers' batch)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    picked: dict[int, list[torch.Tensor]] = {c: [] for c in range(num_classes)}
    for i in order:
        x, y = dataset[i]
        if len(picked[int(y)]) < per_class:
            picked[int(y)].append(x)
        if all(len(v) == per_class for v in picked.values()):
            break
    xs = [x for c in range(num_classes) for x in picked[c]]
    ys = [c for c in range(num_classes) for _ in picked[c]]
    return torch.stack(xs), torch.tensor(ys)


def build_sampler(cfg: DictConfig, model: nn.Module, objective: StagedObjective, data: DataBundle, out_dir: Path):
    """Sparse coordinate sets from layer-wise pruning ratios: a saved file, this run's own, or computed now.

    Ratios are computed once at initialisation and saved as `ratios.json`, so a resumed run reuses
    them instead of rescoring the trained weights.
    """
    sp = cfg.sparsity
    own = out_dir / "ratios.json"
    if sp.ratios is None and sp.method == "dense":
        return None
    if sp.ratios is not None or (cfg.resume and own.exists()):
        try:
            ratios, _ = load_ratios(sp.ratios or own, model)
        except ValueError as exc:
            raise ConfigError(f"sparsity.ratios: {exc}") from exc
    else:
        examples = balanced_examples(data.train, sp.samples_per_class, data.num_classes, cfg.seed)
        examples = (examples[0].to(cfg.device), examples[1].to(cfg.device))
        ratios = compute_ratios(sp.method, model, F.cross_entropy, examples, sparsity=sp.sparsity, ordering=sp.ordering,
                                seed=cfg.seed, q=sp.q, mu=sp.mu, samples_per_class=sp.samples_per_class,
                                counter=objective.counter)
        if is_main():
            save_ratios(own, ratios, {"method": sp.method, "sparsity": sp.sparsity, "ordering": sp.ordering,
                                      "model": cfg.model.name, "seed": cfg.seed})
    return SparseCoordinateSampler(objective.coords, ratios, mask_interval=sp.mask_interval, seed=cfg.seed,
                                   dense_unscored=sp.dense_unscored)


def build_estimator(cfg: DictConfig):
    if cfg.mode == "fo":
        return FirstOrder()
    try:
        return instantiate(cfg.estimator)
    except Exception as exc:
        raise ConfigError(f"estimator: {one_line(exc)}") from exc


def run(cfg: DictConfig) -> dict:
    typed, out_dir = start_run(cfg, "classify")
    estimator = build_estimator(cfg)
    try:
        data = build_datasets(
            cfg.data.name, cfg.data.root, train_limit=cfg.data.train_limit, test_limit=cfg.data.test_limit,
            augment=cfg.data.augment, seed=cfg.seed,
        )
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    model = build_model(cfg.model, data).to(cfg.device)
    objective = StagedObjective(model, cross_entropy)
    sampler = build_sampler(cfg, model, objective, data, out_dir)
    try:
        optimizer = instantiate(cfg.optimizer)(model.parameters())
    except Exception as exc:  # torch.optim rejects bad values with ValueError/TypeError
        raise ConfigError(f"optimizer: {one_line(exc)}") from exc
    scheduler = instantiate(cfg.scheduler) if cfg.scheduler is not None else None
    trainer = Trainer(
        objective, estimator, optimizer, data.train,
        evaluate=lambda: evaluate(model, data.test, cfg.eval_batch_size, cfg.device),
        out_dir=out_dir,
        config=TrainerConfig(
            epochs=typed.epochs, batch_size=typed.batch_size, warmup_epochs=typed.warmup_epochs, seed=typed.seed,
            query_budget=typed.query_budget, checkpoint_every=typed.checkpoint_every, log_every=typed.log_every,
            on_nonfinite=typed.on_nonfinite, max_skipped_fraction=typed.max_skipped_fraction,
            resume=typed.resume, progress=typed.progress,
        ),
        scheduler_factory=scheduler, sampler=sampler, device=cfg.device,
        title=f"classify {cfg.data.name} {cfg.model.name} mode={cfg.mode}",
    )
    if is_main():
        print(f"classify: {cfg.data.name} ({len(data.train)} train / {len(data.test)} test), model {cfg.model.name} "
              f"({objective.coords.dim:,} parameters), mode={cfg.mode}, output {out_dir}")
        if sampler is not None:
            print(f"sparsity: {sampler.num_coords:,} of {objective.coords.dim:,} coordinates estimated per step "
                  f"({sampler.queries_per_step():,} queries per step with forward differences)")
    summary = {**trainer.fit(), "parameters": objective.coords.dim, "mode": cfg.mode,
               "estimator": cfg.estimator._target_.rsplit(".", 1)[-1] if cfg.mode == "zo" else "FirstOrder"}
    if is_main():
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        ev = summary["eval"]
        print(f"classify done: test_acc={ev['test_acc']:.4f} queries={summary['queries']:,} "
              f"forward_equivalents={summary['forward_equivalents']:,.0f} steps={summary['steps']} "
              f"wall={summary['wall_s']:.1f}s stopped_by={summary['stopped']} output={out_dir}")
    return summary
