"""Running a stage "from inside": the exact shortcuts behind the batched evaluator.

A stage is described as a small tree: `Seq` (children in order), `Residual` (main + shortcut) and
`Leaf` (a module run as a whole). `trace` runs the tree once on the cached stage input and records
every node's base input and output. A coordinate of a leaf's parameter then changes the leaf's
output in a known way, and `Propagator` pushes that change through the rest of the tree for K
coordinates at once, carrying one of three states:

* `None`: nothing changed (the traced base value holds);
* `Sparse`: only channel c_k of perturbation k changed; its new values are kept, shaped (K, B, ...).
  A conv/linear/BatchNorm-affine coordinate starts here, and per-channel layers (BN, activations,
  pools) keep it here, so a perturbed channel costs 1/C of the layer;
* a dense tensor of K*B samples (perturbation-major), reached at the next channel-mixing layer, whose
  output is the traced base output plus that layer applied to the one changed input channel.

Everything is exact (equal to rerunning the perturbed model up to float rounding), device-agnostic,
and BatchNorm keeps per-perturbation batch statistics through `grouped_batchnorm`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair


@dataclass(eq=False)
class Leaf:
    """A module run as a whole; coordinates of its parameters are linearized when its type allows."""

    module: nn.Module


@dataclass(eq=False)
class Seq:
    items: tuple[Node, ...]


@dataclass(eq=False)
class Residual:
    """main(x) + shortcut(x)."""

    main: Node
    shortcut: Node


Node = Leaf | Seq | Residual
Trace = dict[Node, tuple[Tensor, Tensor]]


@dataclass
class Sparse:
    """Perturbation k changed only channel `channels[k]`; `values[k]` is that channel's new value."""

    values: Tensor
    channels: Tensor


State = Tensor | Sparse | None


# Composite modules whose forward is known, by exact type (a subclass may override forward); the
# bundled models register theirs in deepzero_apps.models.structures.
STRUCTURES: dict[type[nn.Module], Callable[[nn.Module], Node]] = {}


def register_structure(cls: type[nn.Module], describer: Callable[[nn.Module], Node]) -> None:
    """Teach `describe` the forward of a composite module type (its stage then gets the fast paths)."""
    STRUCTURES[cls] = describer


def describe(module: nn.Module) -> Node:
    """The tree of `module`; unknown composites become one opaque leaf (still exact, just slower)."""
    if type(module) in STRUCTURES:
        return STRUCTURES[type(module)](module)
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return Seq(tuple(describe(child) for child in module))
    return Leaf(module)


def leaves(node: Node, path: tuple[Node, ...] = ()) -> Iterator[tuple[Leaf, tuple[Node, ...]]]:
    """Every leaf with its path from the root (root first, leaf last)."""
    path = (*path, node)
    if isinstance(node, Leaf):
        yield node, path
    elif isinstance(node, Seq):
        for item in node.items:
            yield from leaves(item, path)
    else:
        yield from leaves(node.main, path)
        yield from leaves(node.shortcut, path)


def trace(node: Node, x: Tensor, record: Trace) -> Tensor:
    """Run the tree on the base input, recording each node's (input, output)."""
    if isinstance(node, Leaf):
        y = node.module(x.clone() if getattr(node.module, "inplace", False) else x)
    elif isinstance(node, Seq):
        y = x
        for item in node.items:
            y = trace(item, y, record)
    else:
        y = trace(node.main, x, record) + trace(node.shortcut, x, record)
    record[node] = (x, y)
    return y


def is_standard(module: nn.Module, cls: type[nn.Module]) -> bool:
    """`module` is a `cls` whose forward is `cls`'s own (so its math is known)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _uses_batch_stats(bn: _BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


def is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _standardize(
    x: Tensor, dims: tuple[int, ...], eps: float, weight: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """(x - mean) / sqrt(var + eps) over `dims`, then * weight + bias (broadcastable; None: skipped).
    Two-pass (var_mean is several times slower on CPU, and so is vector_norm than squaring and summing:
    2-3.5x on ResNet-20's stacked activations); the scale and the affine are folded into one final pass,
    as these tensors are large and the passes memory-bound."""
    centered = x - x.mean(dims, keepdim=True)
    n = math.prod(x.shape[d] for d in dims)
    scale = centered.square().sum(dims, keepdim=True).div_(n).add_(eps).rsqrt_()
    if weight is not None:
        scale = scale * weight
    if bias is None:
        return centered.mul_(scale)
    return torch.addcmul(bias, centered, scale)


def _bn_params(bn: _BatchNorm, shape: tuple[int, ...], index: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """The BN weight and bias (gathered at `index`) viewed as `shape`; None where the BN has none."""
    return tuple(None if p is None else (p if index is None else p[index]).view(shape) for p in (bn.weight, bn.bias))


def batch_norm_per_group(bn: _BatchNorm, x: Tensor, batch_size: int) -> Tensor:
    """BatchNorm of K stacked batches, each with its own batch statistics; running stats untouched."""
    if not _uses_batch_stats(bn):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    groups = x.shape[0] // batch_size
    if groups * batch_size != x.shape[0]:
        raise ValueError(
            f"BatchNorm input of {x.shape[0]} samples is not a multiple of the batch {batch_size}"
        )
    if groups == 1:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.is_grad_enabled():
        return _native_batch_norm_per_group(bn, x, batch_size)  # ZO queries run without autograd
    c = x.shape[1]
    if is_channels_last(x):  # (K*B, H, W, C) in memory: statistics over (B, H, W), vectorized over C
        g = x.permute(0, 2, 3, 1).reshape(groups, -1, c)
        out = _standardize(g, (1,), bn.eps, *_bn_params(bn, (1, 1, c)))
        return out.view(x.shape[0], *x.shape[2:], c).permute(0, 3, 1, 2)
    g = x.reshape(groups, batch_size, c, -1)
    return _standardize(g, (1, 3), bn.eps, *_bn_params(bn, (1, 1, c, 1))).view(x.shape)


def _native_batch_norm_per_group(bn: _BatchNorm, x: Tensor, batch_size: int) -> Tensor:
    """One native train-mode BatchNorm per group, each written into its slice of one output: on CPU about
    2x the grouped two-pass arithmetic (ResNet-20's stacked activations), and the kernel the base
    forward's own BatchNorm runs."""
    out = torch.empty_like(x)
    mean, invstd = (torch.empty(x.shape[1], dtype=x.dtype) for _ in range(2))
    for part, dest in zip(x.split(batch_size), out.split(batch_size)):
        torch.ops.aten.native_batch_norm.out(
            part, bn.weight, bn.bias, None, None, True, 0.0, bn.eps, out=dest, save_mean=mean, save_invstd=invstd
        )
    return out


@contextmanager
def grouped_batchnorm(module: nn.Module, batch_size: int) -> Iterator[None]:
    """While active, every standard BatchNorm in `module` normalizes each block of `batch_size` samples
    with that block's own statistics (as K separate train-mode forwards) and never updates running
    statistics. Non-standard BatchNorms (SyncBatchNorm, custom forwards) are left alone."""
    bns = [m for m in module.modules() if is_standard(m, _BatchNorm)]
    saved = [m.__dict__.get("forward") for m in bns]
    for m in bns:
        m.forward = partial(batch_norm_per_group, m, batch_size=batch_size)
    try:
        yield
    finally:
        for m, old in zip(bns, saved):
            del m.forward
            if old is not None:
                m.forward = old


def channels(t: Tensor, ch: Tensor) -> Tensor:
    """Channel ch[k] of the base tensor t (B, C, ...) for each k, as (K, B, ...)."""
    return t.transpose(0, 1)[ch]


def _normalized(bn: _BatchNorm, v: Tensor, ch: Tensor) -> Tensor:
    """(v - mean) / std per perturbation k, for channel-k values v of shape (K, B, ...)."""
    if _uses_batch_stats(bn):
        return _standardize(v, tuple(range(1, v.dim())), bn.eps)
    shape = (len(ch),) + (1,) * (v.dim() - 1)
    return (v - bn.running_mean[ch].view(shape)) * torch.rsqrt(bn.running_var[ch].view(shape) + bn.eps)


def _sparse_batch_norm(bn: _BatchNorm, v: Tensor, ch: Tensor) -> Tensor:
    """BatchNorm of the changed channels v (K, B, ...), each with its own batch statistics or the
    running ones."""
    weight, bias = _bn_params(bn, (len(ch),) + (1,) * (v.dim() - 1), ch)
    if _uses_batch_stats(bn):
        return _standardize(v, tuple(range(1, v.dim())), bn.eps, weight, bias)
    out = _normalized(bn, v, ch)
    out = out if weight is None else out.mul_(weight)
    return out if bias is None else out.add_(bias)


def from_base(fn: Callable[[Tensor], Tensor], s: Sparse, x: Tensor, y: Tensor) -> Sparse:
    """A channel-wise layer that rounds (BatchNorm, average pooling) on the changed channels, as the
    base output y plus fn's change: y + (fn(values) - fn(base values)). Running fn on the one-channel
    values directly would sum in another order than the base forward's kernel (other layout, other
    width), and that offset, divided by mu, would bias every coordinate; the difference is exactly 0
    where the values did not change, so the query's loss minus the base loss measures the change alone."""
    change = fn(s.values) - fn(channels(x, s.channels))
    return Sparse(channels(y, s.channels) + change, s.channels)


def _pad(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """x padded as `conv` pads its input (any padding mode), so windows start at (0, 0)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)


def _taps(
    xp: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], size
) -> list[Tensor]:
    """Views of the padded xp (..., Hp, Wp), one per kernel tap (i, j): pixel (h, w) of view (i, j) is
    the input that tap multiplies for output pixel (h, w). Slicing beats F.unfold, whose CPU kernel
    loops over samples."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, size
    return [
        xp[..., i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]


def _conv_from_sparse(conv: nn.Conv2d, s: Sparse, x: Tensor, y: Tensor) -> Tensor:
    """conv(x + d e_c) = conv(x) + conv_c(d): each perturbation's one changed input channel, unfolded
    and multiplied by that channel's filters (one GEMM per perturbation), added to the base output y."""
    k, b = s.values.shape[:2]
    taps = _taps(
        _pad(conv, s.values - channels(x, s.channels)),
        conv.kernel_size,
        conv.stride,
        conv.dilation,
        y.shape[2:],
    )
    w = conv.weight[:, s.channels].transpose(0, 1).reshape(k, conv.out_channels, -1)  # (K, O, taps)
    if is_channels_last(y):  # rows are the B*H*W pixels, columns the channels: y's own layout
        out = torch.matmul(torch.stack(taps, -1).view(k, -1, len(taps)), w.transpose(1, 2))
        out += y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        return out.view(k * b, *y.shape[2:], y.shape[1]).permute(0, 3, 1, 2)
    out = torch.matmul(w.unsqueeze(1), torch.stack(taps, 2).view(k, b, len(taps), -1))
    out += y.reshape(b, y.shape[1], -1)
    return out.view(k * b, *y.shape[1:])


def _max_pool(pool: nn.MaxPool2d, v: Tensor) -> Tensor | None:
    """Max pooling of the (K, B, H, W) changed channels as a max over tap views (the NCHW CPU kernel
    is slow on many one-channel maps); None for padded, ceil-mode or index-returning pools."""
    if pool.padding not in (0, (0, 0)) or pool.ceil_mode or pool.return_indices:
        return None
    kernel, stride, dilation = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.dilation)
    size = [
        (n - dl * (kk - 1) - 1) // st + 1 for n, kk, st, dl in zip(v.shape[-2:], kernel, stride, dilation)
    ]
    return functools.reduce(torch.maximum, _taps(v, kernel, stride, dilation, size))


def effective_step(param: Tensor, local: Tensor, step: float) -> Tensor:
    """The change an in-place `p[j] += step` really makes, fl(p + step) - p, per coordinate."""
    p = param.detach().view(-1)[local]
    return (p + step) - p


def linear_source(
    module: nn.Module, pname: str, local: Tensor, step: float, x: Tensor, y: Tensor
) -> Sparse | None:
    """Output of a conv/linear/BatchNorm leaf with coordinate `local[k]` of its parameter `pname`
    moved by `step`, from the base input x and output y alone (outputs are linear in these
    parameters). None when this leaf/parameter has no closed form."""
    if pname not in ("weight", "bias"):
        return None
    delta = effective_step(getattr(module, pname), local, step)
    k = len(local)
    if is_standard(module, nn.Conv2d):
        if pname == "bias":
            return Sparse(channels(y, local) + delta.view(k, 1, 1, 1), local)
        # Weight (o, i, a, b) adds delta * (input channel i seen through window offset (a, b)) to channel o.
        o, i, a, b = torch.unravel_index(local, module.weight.shape)
        c_in = o // (module.out_channels // module.groups) * (module.in_channels // module.groups) + i
        xp = _pad(module, x.index_select(1, c_in))
        (sh, sw), (dh, dw) = module.stride, module.dilation
        rows = a[:, None] * dh + sh * torch.arange(y.shape[2], device=x.device)
        cols = b[:, None] * dw + sw * torch.arange(y.shape[3], device=x.device)
        seen = xp[:, torch.arange(k, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return Sparse(channels(y, o) + delta.view(k, 1, 1, 1) * seen.transpose(0, 1), o)
    if is_standard(module, nn.Linear):
        if x.dim() != 2:
            return None
        if pname == "bias":
            return Sparse(channels(y, local) + delta.view(k, 1), local)
        o, j = torch.unravel_index(local, module.weight.shape)
        return Sparse(channels(y, o) + delta.view(k, 1) * channels(x, j), o)
    if is_standard(module, _BatchNorm):
        tail = (1,) * (y.dim() - 1)
        if pname == "bias":
            return Sparse(channels(y, local) + delta.view(k, *tail), local)
        return Sparse(
            channels(y, local) + delta.view(k, *tail) * _normalized(module, channels(x, local), local), local
        )
    return None


def repeat_batch(base: Tensor, k: int) -> Tensor:
    """K copies of the batch stacked along dim 0, in base's memory layout (channels_last stays)."""
    fmt = torch.channels_last if is_channels_last(base) else torch.contiguous_format
    out = torch.empty(
        (k * base.shape[0], *base.shape[1:]), dtype=base.dtype, device=base.device, memory_format=fmt
    )
    out.view(k, *base.shape).copy_(base)
    return out


ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish,
)  # fmt: skip
POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
EXACT_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)  # no sums
CHANNELWISE: set[type[nn.Module]] = set()  # registered module types that act on each channel alone


def register_channelwise(cls: type[nn.Module]) -> None:
    """Declare that `cls` maps every channel of every sample on its own (a pool, an activation), so
    a perturbation confined to one channel stays there (its stage then gets the fast paths)."""
    CHANNELWISE.add(cls)


class Propagator:
    """Pushes the states of K perturbations through traced trees (see the module docstring)."""

    def __init__(self, record: Trace, k: int):
        self.record, self.k = record, k

    def dense(self, state: State, base: Tensor) -> Tensor:
        """K*B samples: the base repeated, with each perturbation's changed channel written in."""
        if isinstance(state, Tensor):
            return state
        out = repeat_batch(base, self.k)
        if state is not None:
            out.view(self.k, *base.shape)[torch.arange(self.k, device=base.device), :, state.channels] = (
                state.values
            )
        return out

    def run(self, node: Node, state: State) -> State:
        """State of `node`'s output given the state of its input."""
        if state is None:
            return None
        if isinstance(node, Leaf):
            return self._leaf(node, state)
        if isinstance(node, Seq):
            for item in node.items:
                state = self.run(item, state)
            return state
        return self._add(node, self.run(node.main, state), self.run(node.shortcut, state))

    def resume(self, path: tuple[Node, ...], state: State) -> State:
        """State of `path[0]`'s output when the leaf `path[-1]` outputs `state` (all else base)."""
        for parent, child in zip(reversed(path[:-1]), reversed(path[1:])):
            if isinstance(parent, Seq):
                at = next(i for i, item in enumerate(parent.items) if item is child)
                for item in parent.items[at + 1 :]:
                    state = self.run(item, state)
            elif child is parent.main:
                state = self._add(parent, state, None)
            else:
                state = self._add(parent, None, state)
        return state

    @staticmethod
    def _per_channel(m: nn.Module, v: Tensor) -> Tensor:
        """m on (K, B, ...) one-channel values, run as K * B one-channel samples."""
        out = m(v.reshape(v.shape[0] * v.shape[1], 1, *v.shape[2:]))
        return out.reshape(*v.shape[:2], *out.shape[2:])

    def _add(self, node: Residual, main: State, shortcut: State) -> State:
        y_main, y_short = self.record[node.main][1], self.record[node.shortcut][1]
        if main is None and shortcut is None:
            return None
        if isinstance(main, Sparse) and shortcut is None:
            return Sparse(main.values + channels(y_short, main.channels), main.channels)
        if main is None and isinstance(shortcut, Sparse):
            return Sparse(channels(y_main, shortcut.channels) + shortcut.values, shortcut.channels)
        if main is None or shortcut is None:  # dense + base: broadcast the base over the K groups
            dense, base = (shortcut, y_main) if main is None else (main, y_short)
            return (dense.view(self.k, *base.shape) + base).view(dense.shape)
        return self.dense(main, y_main) + self.dense(shortcut, y_short)

    def _leaf(self, leaf: Leaf, state: Tensor | Sparse) -> State:
        m = leaf.module
        if isinstance(state, Tensor):
            return m(state)
        x, y = self.record[leaf]
        v, ch, k = state.values, state.channels, self.k
        if type(m) is nn.MaxPool2d and v.dim() == 4:
            pooled = _max_pool(m, v)
            if pooled is not None:
                return Sparse(pooled, ch)
        if type(m) in ELEMENTWISE or (type(m) in EXACT_POOLS and v.dim() >= 3):  # per element or max: exact
            return Sparse(self._per_channel(m, v), ch)
        if (type(m) in POOLS or type(m) in CHANNELWISE) and v.dim() >= 3:
            return from_base(lambda u: self._per_channel(m, u), state, x, y)
        if is_standard(m, _BatchNorm):
            return from_base(lambda u: _sparse_batch_norm(m, u, ch), state, x, y)
        if is_standard(m, nn.Conv2d) and m.groups == 1:
            return _conv_from_sparse(m, state, x, y)
        if is_standard(m, nn.Linear) and v.dim() == 2:
            d = v - channels(x, ch)
            out = y + d.unsqueeze(-1) * m.weight[:, ch].t().unsqueeze(1)
            return out.reshape(k * y.shape[0], -1)
        if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1 and v[0, 0].numel() == 1:
            return Sparse(v.reshape(k, v.shape[1]), ch)
        return m(self.dense(state, x))
