"""`deepzero-task certify`: a certified defense for a black-box classifier (denoised smoothing).

    app.py      the command: pipeline order, run directory, compare=
    config.py   CertifyConfig, the schema (defaults with a comment per key)
    data.py     pixel-space datasets, noisy inputs, the classifier's normalisation
    stages.py   cached stages: the black-box classifier, denoiser pretraining (first order)
    train.py    fine-tuning through the black box: DeepZero, ZO-AE-DS, FO-DS
    zoae.py     ZO-AE-DS's autoencoder and its latent-space estimator
    report.py   randomized-smoothing certification, denoising metrics, compare tables
"""

from .app import APP, run

__all__ = ["APP", "run"]
