"""certify's measurements and reports: denoising metrics during training, Cohen's CERTIFY of the
smoothed pipeline (TSV, JSON, PNG), and the side-by-side comparison of finished runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from deepzero_apps.blackbox import BlackBoxClassifier
from deepzero_apps.blackbox.loaders import black_box
from deepzero_apps.blackbox.losses import labels_of
from deepzero_apps.checkpoint import atomic_write_json, atomic_write_text
from deepzero_apps.data import DataBundle, balanced_subset
from deepzero_apps.errors import ConfigError, one_line
from deepzero_apps.smoothing import Smoothed, certified_accuracy, certify_dataset, load_certification
from deepzero_apps.smoothing import plot_certified_accuracy as plot_curves

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


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


def certify_pipeline(cfg: DictConfig, data: DataBundle, classifier: Any, pipeline: nn.Module, out_dir: Path) -> dict:
    """Cohen's CERTIFY of ``f(pipeline(x + eps))`` on a class-balanced test subset; writes TSV, JSON and PNG."""
    ccfg = cfg.certify
    blackbox = black_box(classifier, cfg.classifier, data.num_classes, ccfg.batch_size, output="label")
    pipeline.eval()
    smoothed = Smoothed(lambda z: blackbox(pipeline(z)), data.num_classes, cfg.sigma, seed=cfg.seed)
    subset = balanced_subset(data.test, ccfg.limit, cfg.seed)
    rows = certify_dataset(smoothed, subset, out_csv=out_dir / "certify.tsv", n0=ccfg.n0, n=ccfg.n, alpha=ccfg.alpha,
                           batch_size=ccfg.batch_size, seed=cfg.seed, device=cfg.device, progress=cfg.progress,
                           ids=subset.ids)
    accuracy = certified_accuracy(rows, RADII)
    result = {"certified_accuracy": {str(r): a for r, a in accuracy.items()}, "examples": len(rows),
              "n0": ccfg.n0, "n": ccfg.n, "alpha": ccfg.alpha, "sigma": cfg.sigma, "queries": blackbox.queries,
              "wall_s": sum(r.time for r in rows)}
    atomic_write_json(out_dir / "certified_accuracy.json", result)
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
    atomic_write_text(out_dir / "compare.csv", "\n".join(csv_lines) + "\n")
    md = ["| " + " | ".join(header[:-1]) + " |", "|" + "---|" * (len(header) - 1)]
    md += ["| " + " | ".join(f"{row[h]:.1%}" if h.startswith("r=") else f"{row[h]:,}" if isinstance(row[h], int)
                             else str(row[h]) for h in header[:-1]) + " |" for row in table]
    atomic_write_text(out_dir / "compare.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return {"compare": table}
