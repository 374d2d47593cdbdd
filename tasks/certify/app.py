"""`deepzero-task certify`: a certified defense for a black-box classifier (denoised smoothing).

Pipeline, every stage in pixel space ([0, 1] images, so sigma and radii mean what they mean in
Cohen et al. and Salman et al.):

1. the classifier is the user's (`classifier=run|callable|torchscript|http`, docs/blackbox.md) or trained
   first-order here (`classifier=train`), and then only used through `BlackBoxClassifier`: queries
   counted, a timeout per call, no autograd path (`stages.py`);
2. a DnCNN denoiser is pretrained first-order on MSE to the clean image (no classifier query), cached
   so every method starts from the same weights (`stages.py`);
3. the denoiser is fine-tuned through the black box by one `method` (`train.py`), or not at all
   (``mse``: the common starting point); `query_budget` caps the images sent;
4. the smoothed classifier ``g(x) = argmax P(f(D(x + eps)) = c)`` is certified on a test subset
   (Cohen's CERTIFY) and certified accuracy vs radius is written as TSV, JSON and PNG (`report.py`).

``compare=[run_dir, ...]`` instead plots and tabulates finished runs side by side.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig
from torch import nn

from deepzero_apps.apps import App
from deepzero_apps.blackbox.http_client import HTTPClassifier
from deepzero_apps.blackbox.loaders import black_box
from deepzero_apps.checkpoint import atomic_write_json
from deepzero_apps.config import start_run
from deepzero_apps.data import balanced_subset
from deepzero_apps.engine import is_main

from .config import CertifyConfig
from .data import pixel_data
from .finetune import check_finetune
from .report import certify_pipeline, compare_runs, denoising_metrics
from .stages import build_classifier, build_denoiser, pretrain_denoiser
from .train import fine_tune

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    typed, out_dir = start_run(cfg, CertifyConfig)
    if cfg.compare:
        return compare_runs(cfg.compare, out_dir)
    data, norm = pixel_data(cfg.data, cfg.seed)
    check_finetune(cfg, data.in_channels)  # a bad finetune.params stops here, before any training
    classifier, clf_info = build_classifier(cfg, data, norm, out_dir)
    # Class-balanced: an image folder's test set is sorted by class, so its first images are one or two classes.
    eval_x, eval_y = balanced_subset(data.test, cfg.eval_limit, cfg.seed).tensors
    eval_box = black_box(classifier, cfg.classifier, data.num_classes, cfg.eval_batch_size, output="label",
                         run_dir=out_dir, account="eval")

    def metrics(pipeline: nn.Module) -> dict[str, float]:
        """Evaluation through its own black box, so it never spends the training budget."""
        return denoising_metrics(pipeline, eval_box, eval_x, eval_y, cfg.sigma, cfg.seed, cfg.eval_batch_size)

    denoiser = build_denoiser(cfg, data.in_channels)
    pretrain_denoiser(cfg, data, denoiser, metrics, out_dir)
    if cfg.method == "mse":
        pipeline, train = denoiser.eval(), {"queries": 0, "eval": metrics(denoiser)}
    else:
        pipeline, train = fine_tune(cfg, typed, data, classifier, denoiser, metrics, out_dir)
    cert = certify_pipeline(cfg, data, classifier, pipeline, out_dir)
    summary = {"mode": cfg.method, "method": cfg.method, "data": cfg.data.name, "sigma": cfg.sigma, "classifier": clf_info, "train": train,
               "eval_queries": eval_box.queries, "certify": cert}
    if isinstance(classifier, HTTPClassifier):  # requests and retries of the whole run (httpx logs none)
        summary["http"] = classifier.state_dict()
    if is_main():
        atomic_write_json(out_dir / "summary.json", summary)
        acc = " ".join(f"r={r}:{a:.3f}" for r, a in cert["certified_accuracy"].items())
        http = (f" http_requests={summary['http']['requests']:,} retries={summary['http']['retries']:,}"
                if "http" in summary else "")
        log.info(f"certify done: method={cfg.method} train_queries={train['queries']:,}{http} certified {acc} "
                 f"output={out_dir}")
    return summary


APP = App(
    "certify", "certified defense of a black-box classifier: denoiser trained by DeepZero, ZO-AE-DS or FO",
    CertifyConfig, run, aliases={"mode": "method"},
)
