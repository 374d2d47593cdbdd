"""Full float32 arithmetic for zeroth-order queries, whatever the caller set.

A finite difference divides a loss change of size mu * g by mu, so every query must compute what its
parameters say. Reduced-precision float32 math rounds the operands first, and then the perturbation
itself: TF32 keeps 10 mantissa bits (the default of cuDNN convolutions on Ampere and later GPUs), so a
weight of 0.1 moves in steps of 6.1e-5 and a step of mu = 1e-4 (1.6 spacings) comes out as 1 or 2
of them: a gradient off by up to 40 % with nothing to show for it; bfloat16 (autocast, oneDNN's bf16 modes)
keeps 7 bits. `full_precision()` turns those off for the duration of a gradient estimate (autocast off,
every backend's float32 precision "ieee") and restores the caller's settings on exit, so the rest of a
program keeps its fast modes. Float64 models are unaffected either way. Autocast is per thread; the
precision settings are process-wide, so they stay at IEEE while any thread is inside.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch


def _precision_knobs() -> list[object]:
    """The per-backend `fp32_precision` settings (torch >= 2.9); empty on older torch."""
    groups = [getattr(torch.backends, name) for name in ("cuda", "cudnn", "mkldnn")]
    knobs = [getattr(g, op, None) for g in groups for op in ("matmul", "conv", "rnn")]
    return [k for k in knobs if hasattr(k, "fp32_precision")]


@contextmanager
def full_precision() -> Iterator[None]:
    """Run the block with autocast off and IEEE float32 matmuls and convolutions on every backend."""
    with ExitStack() as stack:
        for device in ("cpu", "cuda"):  # autocast is per thread
            if device == "cpu" or torch.cuda.is_available():
                stack.enter_context(torch.autocast(device, enabled=False))
        stack.enter_context(_ieee_float32())
        yield


_lock = threading.Lock()
_holders = 0  # blocks inside `_ieee_float32`, in any thread
_restore = ExitStack()


@contextmanager
def _ieee_float32() -> Iterator[None]:
    """The process-wide precision settings at IEEE while any thread is inside; the first to enter
    saves the caller's settings and the last to leave restores them (nested and concurrent estimates)."""
    global _holders
    with _lock:
        if _holders == 0:
            _switch_to_ieee(_restore)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _restore.close()


def _switch_to_ieee(restore: ExitStack) -> None:
    """Set every float32 precision setting to IEEE, pushing its undo onto `restore`.

    The legacy switches first (`set_float32_matmul_precision`, `cudnn.allow_tf32`: what most code
    sets, and what torch's own code still reads, so they must stay readable inside the block), then
    any per-backend setting they leave reduced (torch >= 2.9, e.g. oneDNN convolutions in bf16). A
    program that mixed the two APIs so that torch refuses to read the legacy switches gets the
    per-backend settings only.
    """
    knobs = _precision_knobs()
    for knob in knobs:  # restored last (the stack unwinds in reverse order): exactly as found
        restore.callback(setattr, knob, "fp32_precision", knob.fp32_precision)
    try:
        matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:  # torch: "you have used a mix of the legacy and new APIs"
        matmul = cudnn = None
    if matmul is not None:
        restore.callback(torch.set_float32_matmul_precision, matmul)
        restore.callback(setattr, torch.backends.cudnn, "allow_tf32", cudnn)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    for knob in knobs:
        if knob.fp32_precision not in ("none", "ieee"):
            knob.fp32_precision = "ieee"
