"""A user's classifier, however it is reached: a classify run, a Python callable, a TorchScript file or an HTTP endpoint.

`load_classifier` turns the `classifier` config node into the callable behind a black box, and
`black_box` wraps it in the query-only `BlackBoxClassifier` with the node's output kind and timeout.
`describe` is what may be written to run files about it: never headers, and URLs without their query.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ..config import require
from ..errors import ConfigError, one_line
from .http_client import HTTPClassifier, display_url
from .ledger import QueryLedger
from .run_source import load_run
from .wrapper import BlackBoxClassifier, OutputKind

CLASSIFIER_KINDS = ("train", "run", "callable", "torchscript", "http")


@dataclass
class ClassifierConfig:
    """The classifier behind the black box (the `classifier/` group picks `kind`; docs/blackbox.md)."""

    kind: str = "train"  # train (or load `checkpoint`) | run | callable | torchscript | http
    output: str = "logits"  # what the black box returns: logits | probs | label
    timeout: float = 60.0  # seconds per black-box call (http: per request)
    checkpoint: str | None = None  # train: trained weights of `model` instead of training
    cache_dir: str | None = None  # train: where stage 1 trains and is reused (null: <run dir>/classifier)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    run_dir: str | None = None  # run: a `deepzero-task classify` run directory (model, normalisation, weights)
    target: str | None = None  # callable: import path of a factory called with `kwargs`
    kwargs: Any = None  # a dict; Any + null so one `classifier.kwargs={...}` override needs no `+`
    path: str | None = None  # torchscript: the saved module
    url: Any = None  # http: the endpoint, or a list of replicas serving the same model
    max_batch: int = 256  # http: most images per request
    retries: int = 4  # http: further attempts on connection errors, timeouts, 5xx, 429
    backoff: float = 0.5  # http: seconds before the first retry, doubled each time
    rate_limit: float | None = None  # http: most requests per second, over all replicas
    max_wait: float = 60.0  # http: the longest pause before a retry, whatever Retry-After asks
    headers: Any = None  # http: a dict, e.g. {Authorization: "Bearer ${oc.env:KEY}"} (Any + null: no `+` needed)

    def __post_init__(self) -> None:
        kinds, outputs = ", ".join(CLASSIFIER_KINDS), ("logits", "probs", "label")
        require(self.kind in CLASSIFIER_KINDS, f"classifier.kind='{self.kind}' is unknown; choose from: {kinds}")
        require(self.output in outputs, f"classifier.output='{self.output}' is unknown; choose from: {', '.join(outputs)}")
        require(self.checkpoint is None or Path(self.checkpoint).is_file(), f"classifier.checkpoint='{self.checkpoint}' does not exist")
        require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "classifier.epochs, batch_size and lr must be positive")
        require(0 < self.timeout < float("inf"), f"classifier.timeout={self.timeout} must be a positive number of seconds")
        require(self.kind != "run" or (self.run_dir is not None and Path(self.run_dir).is_dir()),
                f"classifier=run needs classifier.run_dir=DIR (a classify run); '{self.run_dir}' is not a directory")
        require(self.kind != "callable" or bool(self.target), "classifier=callable needs classifier.target=IMPORT.PATH")
        for key in ("kwargs", "headers"):
            value = getattr(self, key)
            require(value is None or isinstance(value, dict), f"classifier.{key}={value!r} must be a dict, e.g. {{a: 1}}")
        require(self.kind != "torchscript" or (self.path is not None and Path(self.path).is_file()),
                 f"classifier=torchscript needs classifier.path=FILE; '{self.path}' does not exist")
        if self.kind == "http":
            check_urls(self.url)
        check_headers(self.headers)
        require(self.max_batch >= 1 and self.retries >= 0 and self.backoff >= 0,
                 "classifier.max_batch must be >= 1, retries and backoff >= 0")
        require(0 <= self.max_wait < float("inf"), f"classifier.max_wait={self.max_wait} must be a finite number of seconds >= 0")
        require(self.rate_limit is None or self.rate_limit > 0, f"classifier.rate_limit={self.rate_limit} must be > 0 or null")


def check_urls(url: Any) -> None:
    """`classifier.url` is one http(s) URL or a non-empty list of them; the error never shows a
    credential or query (`display_url`)."""
    urls = list(url) if isinstance(url, (list, tuple)) else [url]
    require(bool(urls), "classifier.url=[] names no endpoint")
    for i, one in enumerate(urls):
        key = "classifier.url" if len(urls) == 1 and not isinstance(url, (list, tuple)) else f"classifier.url[{i}]"
        require(isinstance(one, str) and one.startswith(("http://", "https://")),
                f"classifier=http needs {key}=http(s)://...; got '{_shown(str(one))}'")
        try:
            httpx.URL(one).port  # noqa: B018 (parses the host and port)
            if not urlsplit(one).hostname:
                raise ValueError("no host")
        except (ValueError, httpx.InvalidURL) as exc:
            raise ConfigError(f"{key} is not a valid URL ({one_line(exc)}): '{_shown(one)}'") from None


def _shown(url: str) -> str:
    """A possibly malformed `url` safe to print: without credentials, query and fragment."""
    return re.sub(r"//[^/]*@", "//", url).split("?")[0].split("#")[0]


def check_headers(headers: Any) -> None:
    """Header names and values must be printable ASCII (httpx sends nothing else); the error names
    the header, never its value (a secret)."""
    for name, value in (headers or {}).items():
        for what, text in (("name", str(name)), ("value", str(value))):
            bad = next((i for i, ch in enumerate(text) if not (" " <= ch <= "~" or ch == "\t")), None)
            require(bad is None, f"classifier.headers['{_printable(str(name))}']: the {what} must be printable "
                                 f"ASCII (character {bad} is not)")


def _printable(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode()[:64]


def load_classifier(ccfg: DictConfig, device: str) -> Callable[[Tensor], Tensor]:
    """The callable for `classifier.kind` run, callable, torchscript or http (`train` is the task's own stage)."""
    if ccfg.kind == "run":
        return load_run(ccfg.run_dir, device)
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
            ccfg.url if isinstance(ccfg.url, str) else list(ccfg.url), provides=ccfg.output, max_batch=ccfg.max_batch, timeout=ccfg.timeout, retries=ccfg.retries,
            backoff=ccfg.backoff, rate_limit=ccfg.rate_limit, max_wait=ccfg.max_wait,
            headers=OmegaConf.to_container(ccfg.headers, resolve=True) if ccfg.headers is not None else None,
        )
    raise ConfigError(f"classifier.kind={ccfg.kind} is built by the task, not loaded")


def black_box(source: Any, ccfg: DictConfig, num_classes: int | None, batch_size: int,
              output: OutputKind | None = None, run_dir: Path | None = None, account: str = "") -> BlackBoxClassifier:
    """`source` as a query-only black box returning `output` (default: `classifier.output`).

    Local classifiers return logits and get the per-call timeout here; an HTTP one returns what its
    server sends, times each request itself and, given the `run_dir`, charges the images it sends to
    `account` in the run's query ledger (`ledger.py`): they are paid for, whatever becomes of the run.
    """
    remote = isinstance(source, HTTPClassifier)
    if remote and num_classes is not None:
        source.num_classes = num_classes  # caps the size of its answers
    box = BlackBoxClassifier(
        source, output=output or ccfg.output, provides=ccfg.output if remote else "logits", batch_size=batch_size,
        num_classes=num_classes, name="classifier", timeout=None if remote else ccfg.timeout,
    )
    if remote and run_dir is not None:
        box.charge_to(QueryLedger(run_dir), account)
    return box


def describe(ccfg: DictConfig) -> dict[str, Any]:
    """What a run records about its classifier: safe to write (no headers, no URL query or credentials)."""
    where = {"train": ccfg.get("checkpoint"), "run": ccfg.get("run_dir"), "callable": ccfg.get("target"),
             "torchscript": ccfg.get("path"), "http": _display(ccfg.get("url"))}[ccfg.kind]
    return {"kind": ccfg.kind, "output": ccfg.output, "source": where}


def _display(url: Any) -> str | list[str] | None:
    if url is None or isinstance(url, str):
        return None if url is None else display_url(url)
    return [display_url(str(u)) for u in url]
