"""The training loop shared by every application: one entry point, `Trainer(...).fit()`.

    loop.py         Trainer and TrainerConfig: epochs, steps, evaluation, checkpoint save / resume
    guards.py       what a step must pass: finite loss, gradients and state; its query cost in advance
    metrics_log.py  metrics.jsonl, appended and cut back on resume to the checkpoint's rows
"""

from .guards import NonFiniteError
from .loop import CHECKPOINT, CURVE, Trainer, TrainerConfig, to_device
from .metrics_log import METRICS, MetricsLog

__all__ = ["CHECKPOINT", "CURVE", "METRICS", "MetricsLog", "NonFiniteError", "Trainer", "TrainerConfig", "to_device"]
