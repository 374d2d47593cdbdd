"""Noisy accuracy and MSE of finished certify runs' pipelines on one class-balanced test subset.

Runs made before commit 2bacc55 logged these metrics on the first `eval_limit` test images, which in
an image folder are one to three classes; this recomputes them the way runs do now (a class-balanced
subset, one fixed noise draw) from the run's own files, with no black-box budget involved:

    python results/certify/noisy_accuracy.py runs/certify_budget/sigma0.25/{mse,deepzero_100000,...}

Prints one JSON line per run: method, mse, noisy_acc, images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from deepzero_apps.blackbox import BlackBoxClassifier
from deepzero_apps.blackbox.run_source import Standardize
from deepzero_apps.checkpoint import load_checkpoint
from deepzero_apps.data import balanced_subset
from deepzero_apps.models.build import build_model
from deepzero_apps.tasks.certify.data import pixel_data
from deepzero_apps.tasks.certify.report import denoising_metrics
from deepzero_apps.tasks.certify.stages import build_denoiser
from deepzero_apps.tasks.certify.zoae import autoencoder

IMAGES = 500


def pipeline_of(cfg, run: Path, channels: int) -> nn.Module:
    """The certified pipeline: the run's fine-tuned denoiser (MSE-only: the pretrained one), behind
    ZO-AE-DS's encoder and frozen decoder for that method."""
    denoiser = build_denoiser(cfg, channels)
    if cfg.method == "mse":
        denoiser.load_state_dict(load_checkpoint(Path(cfg.pretrain.cache_dir) / "checkpoint.pt")["model"])
        return denoiser.eval()
    state = load_checkpoint(run / "checkpoint.pt")["model"]
    if cfg.method != "zo_ae_ds":
        denoiser.load_state_dict(state)
        return denoiser.eval()
    z = cfg.zo_ae_ds
    encoder, decoder = autoencoder(channels, z.latent_channels, z.width)
    nn.Sequential(denoiser, encoder).load_state_dict(state)  # the fine-tuned encoder; the decoder stays frozen
    ae = load_checkpoint(Path(z.cache_dir) / "autoencoder.pt")  # Sequential(encoder, decoder)
    decoder.load_state_dict({k.removeprefix("1."): v for k, v in ae.items() if k.startswith("1.")})
    return nn.Sequential(denoiser, encoder, decoder).eval()


def main(runs: list[str]) -> None:
    torch.set_num_threads(1)
    for run in map(Path, runs):
        cfg = OmegaConf.load(run / "run_config.yaml")
        data, norm = pixel_data(cfg.data, cfg.seed)
        model = build_model(cfg.model, "model", in_channels=data.in_channels, num_classes=data.num_classes,
                            in_features=data.in_features)
        model.load_state_dict(load_checkpoint(Path(cfg.classifier.cache_dir) / "checkpoint.pt")["model"])
        blackbox = BlackBoxClassifier(nn.Sequential(Standardize(*norm), model).eval(), output="label")
        x, y = balanced_subset(data.test, IMAGES, cfg.seed).tensors
        with torch.no_grad():
            metrics = denoising_metrics(pipeline_of(cfg, run, data.in_channels), blackbox, x, y, cfg.sigma, cfg.seed,
                                        IMAGES)
        print(json.dumps({"run": str(run), "method": cfg.method, **metrics, "images": len(y)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
