"""Per-iteration learning-rate schedules built from torch.optim.lr_scheduler.

Configs name any torch scheduler with `_partial_: true`; step-count arguments the user left out
(`T_max`, `total_iters`) are filled with the steps after warmup, and a linear warmup is chained in
front with `SequentialLR`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LinearLR, LRScheduler, SequentialLR

STEP_COUNT_ARGS = ("T_max", "total_iters")


def build_scheduler(
    factory: Callable[..., LRScheduler] | None, optimizer: Optimizer, total_steps: int, warmup_steps: int
) -> LRScheduler | None:
    if warmup_steps >= total_steps and warmup_steps > 0:
        raise ValueError(f"warmup ({warmup_steps} steps) must be shorter than training ({total_steps} steps)")
    main = None
    if factory is not None:
        fn = getattr(factory, "func", factory)
        given = getattr(factory, "keywords", {})
        params = inspect.signature(fn).parameters
        fill = {k: max(1, total_steps - warmup_steps) for k in STEP_COUNT_ARGS if k in params and k not in given}
        main = factory(optimizer, **fill)
    if warmup_steps == 0:
        return main
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps)
    if main is None:
        return warmup
    return SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
