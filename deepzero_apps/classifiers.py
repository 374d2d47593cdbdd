"""A user's classifier, however it is reached: a Python callable, a TorchScript file or an HTTP endpoint.

`load_classifier` turns the `classifier` config node into the callable behind a black box, and
`black_box` wraps it in the query-only `BlackBoxClassifier` with the node's output kind and timeout.
`describe` is what may be written to run files about it: never headers, and URLs without their query.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .blackbox import BlackBoxClassifier, OutputKind
from .errors import ConfigError, one_line
from .remote import HTTPClassifier, display_url


def load_classifier(ccfg: DictConfig, device: str) -> Callable[[Tensor], Tensor]:
    """The callable for `classifier.kind` callable, torchscript or http (`train` is the task's own stage)."""
    if ccfg.kind == "callable":
        kwargs = OmegaConf.to_container(ccfg.kwargs, resolve=True) if ccfg.kwargs is not None else {}
        spec = {"_target_": ccfg.target, **kwargs}
        try:
            fn = instantiate(spec)
        except Exception as exc:
            raise ConfigError(f"classifier.target={ccfg.target}: {one_line(exc)}") from exc
        if not callable(fn):
            raise ConfigError(f"classifier.target={ccfg.target} returned {type(fn).__name__}, not a callable")
        return fn.to(device) if isinstance(fn, torch.nn.Module) else fn
    if ccfg.kind == "torchscript":
        try:
            with warnings.catch_warnings():  # torch 2.9+ marks TorchScript deprecated; it still loads
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(ccfg.path, map_location=device).eval()
        except Exception as exc:  # RuntimeError/ValueError for anything that is not a TorchScript archive
            raise ConfigError(f"classifier.path={ccfg.path} is not a TorchScript file: {one_line(exc)[:200]}") from exc
    if ccfg.kind == "http":
        return HTTPClassifier(
            ccfg.url, provides=ccfg.output, max_batch=ccfg.max_batch, timeout=ccfg.timeout, retries=ccfg.retries,
            backoff=ccfg.backoff, rate_limit=ccfg.rate_limit,
            headers=OmegaConf.to_container(ccfg.headers, resolve=True) if ccfg.headers is not None else None,
        )
    raise ConfigError(f"classifier.kind={ccfg.kind} is built by the task, not loaded")


def black_box(source: Any, ccfg: DictConfig, num_classes: int | None, batch_size: int,
              output: OutputKind | None = None) -> BlackBoxClassifier:
    """`source` as a query-only black box returning `output` (default: `classifier.output`).

    Local classifiers return logits and get the per-call timeout here; an HTTP one returns what its
    server sends and times each request itself.
    """
    remote = isinstance(source, HTTPClassifier)
    return BlackBoxClassifier(
        source, output=output or ccfg.output, provides=ccfg.output if remote else "logits", batch_size=batch_size,
        num_classes=num_classes, name="classifier", timeout=None if remote else ccfg.timeout,
    )


def describe(ccfg: DictConfig) -> dict[str, Any]:
    """What a run records about its classifier: safe to write (no headers, no URL query or credentials)."""
    where = {"train": ccfg.get("checkpoint"), "callable": ccfg.get("target"), "torchscript": ccfg.get("path"),
             "http": display_url(str(ccfg.get("url")))}[ccfg.kind]
    return {"kind": ccfg.kind, "output": ccfg.output, "source": where}
