"""certify's measurements and reports: denoising metrics during training, Cohen's CERTIFY of the
smoothed pipeline (TSV, JSON, PNG), and the side-by-side comparison of finished runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from deepzero_apps.blackbox import BlackBoxClassifier
from deepzero_apps.blackbox.loaders import black_box
from deepzero_apps.blackbox.losses import labels_of
from deepzero_apps.checkpoint import atomic_write_json, atomic_write_text
from deepzero_apps.data import DataBundle, balanced_subset
from deepzero_apps.errors import ConfigError, one_line
from deepzero_apps.rundir import RESUME_MAY_CHANGE, flat_config
from deepzero_apps.smoothing import (
    Smoothed,
    certified_accuracy,
    certify_dataset,
    load_certification,
    resumable_certification,
)
from deepzero_apps.smoothing import plot_certified_accuracy as plot_curves

log = logging.getLogger(__name__)

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
CERTIFY_STAMP = "certify.stamp"  # the config hash the rows of certify.tsv(.partial) were certified under


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
    blackbox = black_box(classifier, cfg.classifier, data.num_classes, ccfg.batch_size, output="label",
                         run_dir=out_dir, account="certify")
    pipeline.eval()
    smoothed = Smoothed(lambda z: blackbox(pipeline(z)), data.num_classes, cfg.sigma, seed=cfg.seed)
    subset = balanced_subset(data.test, ccfg.limit, cfg.seed)
    out_csv, stamp_file = out_dir / "certify.tsv", out_dir / CERTIFY_STAMP
    # A resume keeps the rows already certified with the same config, each paid n0 + n images (a paid
    # black box's count starts from its ledger, which holds them and any image certified in part).
    stamp = certify_stamp(cfg, pipeline)
    same = cfg.resume and stamp_file.is_file() and stamp_file.read_text().strip() == stamp
    done = resumable_certification(out_csv) if same else []
    atomic_write_text(stamp_file, stamp + "\n")
    try:
        rows = certify_dataset(smoothed, subset, out_csv=out_csv, n0=ccfg.n0, n=ccfg.n, alpha=ccfg.alpha,
                               batch_size=ccfg.batch_size, seed=cfg.seed, device=cfg.device, progress=cfg.progress,
                               done=done, ids=subset.ids)
    except ValueError as exc:
        raise ConfigError(f"certify: cannot keep the interrupted certification: {one_line(exc)}; move "
                          f"{out_csv.name}.partial away to certify again") from exc
    if done:
        log.info(f"certify: kept {len(done)} rows certified before the interruption ({out_csv})")
    accuracy = certified_accuracy(rows, RADII)
    result = {"certified_accuracy": {str(r): a for r, a in accuracy.items()}, "examples": len(rows),
              "n0": ccfg.n0, "n": ccfg.n, "alpha": ccfg.alpha, "sigma": cfg.sigma,
              "queries": blackbox.queries + (0 if blackbox.ledger else len(done) * (ccfg.n0 + ccfg.n)), "wall_s": sum(r.time for r in rows)}
    atomic_write_json(out_dir / "certified_accuracy.json", result)
    plot_curves({cfg.method: rows}, out_dir / "certified_accuracy.png", title=f"{cfg.data.name}, sigma={cfg.sigma}")
    return result


def certify_stamp(cfg: DictConfig, pipeline: nn.Module) -> str:
    """A hash of the run's config (unresolved, so no secret's value; minus what a resume may change)
    and of the certified pipeline's weights (a resume with a raised budget trains further): rows of an
    interrupted certification are kept only under the same one."""
    flat = {k: v for k, v in flat_config(OmegaConf.to_container(cfg, resolve=False)).items()
            if k.split(".", 1)[0] not in RESUME_MAY_CHANGE and k not in RESUME_MAY_CHANGE}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode())
    for name, tensor in pipeline.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compare_runs(run_dirs: Sequence[str], out_dir: Path) -> dict:
    """Certified-accuracy curves of finished runs in one PNG, and their table as CSV and Markdown."""
    curves, table = {}, []
    for d in map(Path, run_dirs):
        try:
            summary = json.loads((d / "summary.json").read_text())
            rows = load_certification(d / "certify.tsv")
            accuracy = certified_accuracy(rows, RADII)  # ValueError for a certify.tsv without rows
        except (OSError, ValueError) as exc:
            raise ConfigError(f"compare: {d} is not a finished certify run ({one_line(exc)})") from exc
        label = summary["mode"] if summary["mode"] not in curves else f"{summary['mode']} ({d.name})"
        curves[label] = rows
        table.append({"mode": label, "train_queries": summary["train"].get("queries", 0),
                      **{f"r={r}": a for r, a in accuracy.items()}, "run": str(d)})
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
