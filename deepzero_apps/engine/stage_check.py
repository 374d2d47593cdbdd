"""What feature reuse relies on, established once per objective (at its first query).

The engine never runs `forward`: it runs the stages, and a query perturbing a parameter restarts
at the stage that owns it, from that stage's cached input. Both are exact only if

* every stage that reads a parameter is known (ownership by *use*: a stage may read a parameter
  registered elsewhere, held as a plain attribute, or passed to a functional call), found here by
  running the stages once with every torch-function access to a parameter recorded;
* perturbing any parameter changes the composed stages exactly as it changes `forward`. Comparing
  the two at the current parameters only is not enough: a gate that starts at 0, a zero-initialised
  branch or a branch far below the output's size contribute nothing (or less than rounding) there.
  So they are also compared at a random point around the parameters and, from there, one parameter
  tensor at a time by their *changes*, with a tolerance relative to the size of those changes;
* a cached stage input stays what the base query saw: a stage that writes into its input (found
  here by the input's version counter) is then run on a copy (`StagedObjective._stage`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError
from .coords import Block

NUDGE = 0.25  # random perturbation: N(0, 1) * NUDGE * max(rms of the tensor, 0.1)
ULPS = 16  # rounding allowed in a change, in units of the output's float spacing


@dataclass
class Reads:
    """Which stages (by index) and which innermost modules read each parameter (by id), and which
    stages write into their input tensor."""

    stages: dict[int, set[int]] = field(default_factory=dict)
    modules: dict[int, set[nn.Module]] = field(default_factory=dict)
    writes_input: list[bool] = field(default_factory=list)


class _RecordReads(TorchFunctionMode):
    """Notes every watched tensor passed to a torch function (or read through a Tensor method)."""

    def __init__(self, watched: set[int], reads: Reads, modules: list[nn.Module]):
        super().__init__()
        self.watched, self.reads, self.modules, self.stage = watched, reads, modules, -1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for t in _tensor_args((args, kwargs or {})):
            if id(t) in self.watched:
                self.reads.stages.setdefault(id(t), set()).add(self.stage)
                if self.modules:
                    self.reads.modules.setdefault(id(t), set()).add(self.modules[-1])
        return func(*args, **(kwargs or {}))


def _tensor_args(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensor_args(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _tensor_args(item)


@contextmanager
def _module_stack(stack: list[nn.Module]) -> Iterator[None]:
    """While active, `stack` holds the modules whose forward is running (innermost last)."""

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(module)

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave, always_call=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def record_reads(stages: Sequence[nn.Module], x: torch.Tensor, params: Sequence[nn.Parameter]) -> Reads:
    """Run the stages on a copy of x, recording which stage (and innermost module) reads each
    parameter, and which stage modifies its input in place (its version counter moves)."""
    reads, stack = Reads(), []
    mode = _RecordReads({id(p) for p in params}, reads, stack)
    x = x.clone()
    with torch.no_grad(), _module_stack(stack), mode:
        for i, s in enumerate(stages):
            mode.stage, version = i, x._version
            y = s(x)
            reads.writes_input.append(x._version != version)
            x = y
    return reads


def registering_stages(stages: Sequence[nn.Module]) -> dict[int, int]:
    """The first stage that registers each parameter (by id)."""
    registered: dict[int, int] = {}
    for i, s in enumerate(stages):
        for p in s.parameters():
            registered.setdefault(id(p), i)
    return registered


def owners(
    blocks: Sequence[Block], stages: Sequence[nn.Module], reads: Reads, describe_model: str
) -> list[int]:
    """The earliest stage that reads or registers each parameter; a parameter that no stage does is
    named in a ConfigError (the engine could not restart a query perturbing it anywhere)."""
    registered = registering_stages(stages)
    out = []
    for b in blocks:
        used = set(reads.stages.get(id(b.param), ()))
        if id(b.param) in registered:
            used.add(registered[id(b.param)])
        if not used:
            raise ConfigError(
                f"trainable parameter '{b.name}' is used by none of the {describe_model}: the engine runs "
                "only the stages, so it could never change the loss; make a stage use it, or leave it out "
                "of training (requires_grad=False, or the objective's trainable=)"
            )
        out.append(min(used))
    return out


def close(got: Any, want: Any, scale: float | None = None) -> bool:
    """Tensors equal up to float rounding: max |got - want| <= sqrt(eps) * (max |want| + sqrt(eps)),
    or, with `scale`, <= ULPS * eps * scale (rounding of values of that size)."""
    if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)) or got.shape != want.shape:
        return False
    if not want.numel():
        return True
    if not want.is_floating_point():
        return torch.equal(got, want)
    eps = torch.finfo(want.dtype).eps
    tol = math.sqrt(eps) * (want.abs().max().item() + math.sqrt(eps)) if scale is None else ULPS * eps * scale
    return bool(((got - want).abs().max() <= tol).item())


def _peak(t: Any) -> float:
    return t.abs().max().item() if isinstance(t, torch.Tensor) and t.numel() else 0.0


def _nudge(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    u = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
    rms = p.detach().double().square().mean().sqrt().item() if p.numel() else 0.0
    return u * (NUDGE * max(rms, 0.1))


def describe_difference(got: Any, want: Any) -> str:
    if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and got.shape == want.shape:
        return f"outputs differ by up to {(got - want).abs().max().item():.3g}"
    return f"outputs differ in kind or shape ({_shape(got)} vs forward's {_shape(want)})"


def _shape(x: Any) -> str:
    return f"tensor {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_composition(
    forward: Callable[[], Any],
    composed: Callable[[], tuple[Any, list[torch.Tensor]]],
    blocks: Sequence[Block],
    refuse: Callable[[str], ConfigError],
) -> None:
    """Raise refuse(why) unless `composed()` (the stages: output and every stage's input) agrees
    with `forward()` at the current parameters, at a random point around them, and in the change
    each parameter tensor makes from there; and unless a parameter leaves the input of its owning
    stage (and of every earlier one) unchanged. Parameters are restored on exit."""
    saved = [b.param.detach().clone() for b in blocks]
    gen = torch.Generator().manual_seed(0)
    try:
        want, (got, _) = forward(), composed()
        if not close(got, want):
            raise refuse(describe_difference(got, want))
        with torch.no_grad():
            for b in blocks:
                b.param.add_(_nudge(b.param, gen))
        want0, (got0, inputs0) = forward(), composed()
        if not close(got0, want0):
            raise refuse(
                f"at a random perturbation of the parameters {describe_difference(got0, want0)} (at the "
                "current ones they agree: a gate, scale or branch that contributes nothing yet)"
            )
        for b in blocks:
            before = b.param.detach().clone()
            with torch.no_grad():
                b.param.add_(_nudge(b.param, gen))
            want, (got, inputs) = forward(), composed()
            for j in range(b.stage + 1):
                if not close(inputs[j], inputs0[j], scale=_peak(inputs0[j])):
                    raise refuse(
                        f"parameter '{b.name}' changes the input of stage {j}, but stage {b.stage} was found "
                        "to be the first that reads it (read in a way the engine cannot see, e.g. compiled "
                        "or scripted code)"
                    )
            if not _same_change(got - got0, want - want0, max(_peak(want), _peak(want0))):
                moved = (want - want0).abs().max().item()
                off = ((got - got0) - (want - want0)).abs().max().item()
                raise refuse(
                    f"when parameter '{b.name}' changes, forward's output changes by up to {moved:.3g} and "
                    f"the stages' change differs from that by up to {off:.3g}"
                )
            with torch.no_grad():
                b.param.copy_(before)
    finally:
        with torch.no_grad():
            for b, theta in zip(blocks, saved):
                b.param.copy_(theta)


def _same_change(got: torch.Tensor, want: torch.Tensor, size: float) -> bool:
    """Two changes of outputs of peak size `size` agree to sqrt(eps) of the change plus rounding."""
    if not want.is_floating_point():
        return torch.equal(got, want)
    eps = torch.finfo(want.dtype).eps
    tol = math.sqrt(eps) * _peak(want) + ULPS * eps * size
    return bool(((got - want).abs().max() <= tol).item())
