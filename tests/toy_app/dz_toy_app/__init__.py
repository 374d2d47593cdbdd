"""A third-party app in one file plus its configs: registered by an entry point in the
`deepzero_apps.apps` group, composed with the shared groups, wired through the adapter layer."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from deepzero_apps.adapter import build_optimizer
from deepzero_apps.apps import App
from deepzero_apps.config import validate

log = logging.getLogger(__name__)


@dataclass
class ToyConfig:
    target: float = 3.0
    steps: int = 50
    optimizer: Any = None


def run(cfg: DictConfig) -> dict:
    typed = validate(cfg, ToyConfig)
    w = torch.zeros((), requires_grad=True)
    optimizer = build_optimizer(cfg, [w])
    for _ in range(typed.steps):
        optimizer.zero_grad()
        ((w - typed.target) ** 2).backward()
        optimizer.step()
    result = {"w": float(w.detach())}
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "result.json").write_text(json.dumps(result))
    log.info(f"toy done: w={result['w']:.4f}")
    return result


APP = App("toy", "a toy app from the tests", ToyConfig, run, config_path=str(Path(__file__).parent / "configs"))
