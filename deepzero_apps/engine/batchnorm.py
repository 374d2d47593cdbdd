"""BatchNorm semantics for zeroth-order queries.

A ZO step evaluates the loss many times on one batch. Only the base query is a "real" training
forward: it runs in the module's current mode and updates running statistics once, exactly like the
forward of a first-order step. Every perturbed query runs in the same mode (train mode: statistics of
its own batch, as the perturbed function really is) but must leave running statistics untouched,
otherwise d queries would drag the running averages d times per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


def _norm_layers(module: nn.Module) -> list[_NormBase]:
    return [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm running statistic (and its batch counter) bit for bit on exit."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in _norm_layers(module)
        if m.running_mean is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
