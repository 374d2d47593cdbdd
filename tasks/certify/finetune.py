"""certify's trainable subset (`finetune.params`): which of the denoiser's parameters fine-tuning
estimates, everything else frozen, and what one step of it costs, known before training starts.

ZO's cost grows with the coordinates it estimates and the whole denoiser is the worst case: the last
stages, the normalisation parameters or a small identity-initialised adapter on the output buy many
more steps of the same query budget. The subset is the engine's (`engine.subsets`), so sparsity,
feature reuse and batching work on it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from deepzero_apps.engine import Objective, model_stages, select_parameters
from deepzero_apps.errors import ConfigError, one_line
from deepzero_apps.models import ResidualAdapter

from .stages import build_denoiser


def trainable_denoiser(cfg: DictConfig, denoiser: nn.Module, channels: int) -> tuple[nn.Module, list[str]]:
    """The module fine-tuning trains and certification uses (the denoiser, or with `params=adapter` the
    denoiser's stages followed by a `ResidualAdapter`), and the names of its trainable parameters."""
    ft = cfg.finetune
    if ft.params == "adapter":
        module = nn.Sequential(*model_stages(denoiser), ResidualAdapter(channels, ft.adapter_kernel).to(cfg.device))
        prefix = f"{len(module) - 1}."
        return module, [n for n, _ in module.named_parameters() if n.startswith(prefix)]
    spec = ft.params if isinstance(ft.params, str) else [str(p) for p in ft.params]
    try:
        return denoiser, select_parameters(denoiser, spec, ft.last)
    except ValueError as exc:
        raise ConfigError(f"finetune.params: {one_line(exc)}") from exc


def check_finetune(cfg: DictConfig, channels: int) -> None:
    """Refuse a `finetune.params` that selects nothing before any stage trains, on a throwaway denoiser
    built with the random generators forked (the real one, and the classifier, draw as without it)."""
    with torch.random.fork_rng():
        trainable_denoiser(cfg, build_denoiser(cfg, channels), channels)


def step_cost(cfg: DictConfig, objective: Objective, queries_per_step: int, spent: int) -> dict[str, Any]:
    """What fine-tuning the subset costs: trainable coordinates, the first stage a query reruns from
    (the ones before it run once per step), queries and images per step, and the steps the rest of
    the query budget affords (`spent`: images already sent, the labels and any scoring)."""
    view = objective.coords
    images = queries_per_step * cfg.batch_size
    budget = cfg.query_budget
    params = cfg.finetune.params
    return {
        "params": params if isinstance(params, str) else [str(p) for p in params],
        "trainable": view.dim,
        "of": sum(p.numel() for p in objective.module.parameters()),
        "tensors": [b.name for b in view.blocks],
        "first_stage": min(objective.block_stages()),
        "stages": objective.num_stages,
        "queries_per_step": queries_per_step,
        "images_per_step": images,
        "steps_in_budget": None if budget is None else max(0, budget - spent) // images,
    }
