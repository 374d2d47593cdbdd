"""`deepzero-task certify`'s schema: the black box (`ClassifierConfig`), the denoiser's stages, the
fine-tuning method and Cohen's certification."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from deepzero_apps.blackbox.loaders import ClassifierConfig
from deepzero_apps.config import DataConfig, ZOTrainConfig, method_mode, require

CERTIFY_METHODS = ("deepzero", "zo_ae_ds", "fo_ds", "mse")
FINETUNE_SUBSETS = ("all", "last", "norm", "adapter")


@dataclass
class DenoiserPretrainConfig:
    """First-order MSE pretraining of the denoiser (no classifier queries), shared by every mode."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    cache_dir: str | None = None  # null: <run dir>/pretrain

    def __post_init__(self) -> None:
        require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "pretrain.epochs, batch_size and lr must be positive")


@dataclass
class ZOAEDSConfig:
    """The ZO-AE-DS baseline: autoencoder size and the ZO estimator over its latent."""

    estimator: str = "cge"  # cge | rge
    q: int = 48  # rge directions (cge: latent_dim + 1 queries of the batch per step; rge: q + 1)
    mu: float = 5e-3
    latent_channels: int = 3  # latent = latent_channels x H/4 x W/4 (12 on digits, 192 on CIFAR-10)
    width: int = 16
    ae_epochs: int = 100  # most autoencoder epochs: it stops when the held-out MSE stops improving
    patience: int = 3  # epochs without held-out improvement before it stops
    holdout: float = 0.1  # fraction of the training images held out for that
    cache_dir: str | None = None  # null: <run dir>/autoencoder

    def __post_init__(self) -> None:
        require(self.estimator in ("cge", "rge"), f"zo_ae_ds.estimator='{self.estimator}' must be cge or rge")
        require(self.q >= 1 and self.mu > 0, f"zo_ae_ds needs q >= 1 and mu > 0, got q={self.q}, mu={self.mu}")
        require(min(self.latent_channels, self.width, self.ae_epochs, self.patience) >= 1,
                 "zo_ae_ds.latent_channels, width, ae_epochs and patience must be >= 1")
        require(0 < self.holdout < 1, f"zo_ae_ds.holdout={self.holdout} must be in (0, 1)")


@dataclass
class FinetuneConfig:
    """What fine-tuning trains; everything else keeps its pretrained weights. A ZO step costs one query
    per estimated coordinate, so a small subset buys many more steps of the same budget (issue #26)."""

    params: Any = "all"  # all | last (the denoiser's last `last` stages) | norm (normalisation affine parameters)
    # | adapter (a residual conv on the denoiser's output, zero-initialised: the identity) | a list of
    # fnmatch patterns over the denoiser's parameter names, e.g. ['5.*']
    last: int = 1  # params=last: how many of the denoiser's last stages train
    adapter_kernel: int = 1  # params=adapter: the adapter conv's kernel (1: 12 coordinates on RGB)

    def __post_init__(self) -> None:
        named = isinstance(self.params, str) and self.params in FINETUNE_SUBSETS
        patterns = not isinstance(self.params, str) and isinstance(self.params, list | tuple) and bool(self.params) \
            and all(isinstance(p, str) for p in self.params)
        require(named or patterns, f"finetune.params={self.params!r} must be one of {', '.join(FINETUNE_SUBSETS)} "
                                   "or a list of parameter-name patterns")
        require(self.last >= 1, f"finetune.last={self.last} must be >= 1")
        require(self.adapter_kernel >= 1 and self.adapter_kernel % 2 == 1,
                f"finetune.adapter_kernel={self.adapter_kernel} must be odd and >= 1")


@dataclass
class SmoothingConfig:
    """Cohen's CERTIFY on `limit` class-balanced test images."""

    limit: int = 100
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    batch_size: int = 1000

    def __post_init__(self) -> None:
        require(min(self.limit, self.n0, self.n, self.batch_size) >= 1, "certify.limit, n0, n and batch_size must be >= 1")
        require(0 < self.alpha < 1, f"certify.alpha={self.alpha} must be in (0, 1)")


@dataclass
class CertifyConfig(ZOTrainConfig):
    """Denoised smoothing through a black box; `method` picks how the denoiser is fine-tuned."""

    method: str = "deepzero"  # deepzero (sparse CGE) | zo_ae_ds (ZO on an AE latent) | fo_ds (white-box bound) | mse
    mode: str | None = None  # set from method (the trainer's zo | fo); `mode=METHOD` is the CLI's deprecated alias
    sigma: float = 0.25  # Gaussian noise std in [0, 1] pixel units, for training and certification
    mse_weight: float = 0.0  # fine-tuning loss: mse_weight * MSE(D(x'), x) + stab_weight * Stab (Salman et al.:
    stab_weight: float = 1.0  # MSE pretraining, then Stab fine-tuning)
    epochs: int = 50  # fine-tuning epochs (the query budget usually stops ZO modes first)
    batch_size: int = 16
    eval_batch_size: int = 1000
    query_budget: int | None = 500_000  # images sent to the black box while fine-tuning (scoring included)
    eval_limit: int = 200  # test images for the per-epoch denoising metrics (own black box, not budgeted)
    finetune_limit: int | None = None  # class-balanced training images for fine-tuning (null: all)
    compare: list[str] | None = None  # finished run dirs: plot and tabulate them instead of running
    data: DataConfig = field(default_factory=DataConfig)
    denoiser: Any = MISSING  # (`model` is the classifier's architecture when classifier=train)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    pretrain: DenoiserPretrainConfig = field(default_factory=DenoiserPretrainConfig)
    zo_ae_ds: ZOAEDSConfig = field(default_factory=ZOAEDSConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    certify: SmoothingConfig = field(default_factory=SmoothingConfig)

    def __post_init__(self) -> None:
        self.mode = method_mode("certify", self.method, self.mode, CERTIFY_METHODS, first_order=("fo_ds",))
        super().__post_init__()
        require(self.sigma > 0, f"sigma={self.sigma} must be > 0")
        require(self.mse_weight >= 0 and self.stab_weight > 0, "need mse_weight >= 0 and stab_weight > 0 (Stab drives the queries)")
        require(self.eval_limit >= 1, f"eval_limit={self.eval_limit} must be >= 1")
        require(self.finetune_limit is None or self.finetune_limit >= 1, f"finetune_limit={self.finetune_limit} must be >= 1")
        require(
            self.method == "mse" or self.classifier.output != "label",
            f"method={self.method} trains on the black box's scores, and classifier.output=label gives none (a 0-1 loss "
            "is flat, so every ZO difference is 0); use output=logits or probs, or method=mse to certify with labels only",
        )
        require(
            self.method != "fo_ds" or self.classifier.kind != "http",
            "method=fo_ds backpropagates through the classifier, and classifier=http can only be queried",
        )
        require(
            self.method != "zo_ae_ds" or self.finetune.params == "all",
            f"finetune.params={self.finetune.params!r} chooses the denoiser's parameters that DeepZero or FO-DS "
            "train; zo_ae_ds trains the denoiser and encoder first-order (keep finetune.params=all)",
        )
        require(
            self.sparsity.method != "grasp",
            "sparsity.method='grasp' needs gradients through the black box; use zo_grasp, random or dense",
        )

