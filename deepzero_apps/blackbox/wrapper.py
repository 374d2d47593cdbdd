"""Query-only wrapper around a classifier, the black box that zeroth-order training works through.

DeepZero's setting is a model whose gradients we may not use: the only thing allowed is to send a
batch of images and read back its outputs. :class:`BlackBoxClassifier` enforces that contract in the
API so that a pipeline cannot silently backpropagate through the classifier:

* it is not an ``nn.Module``, so its parameters are never collected by ``.parameters()`` of an
  enclosing module or handed to an optimizer;
* it evaluates under ``torch.no_grad()`` with the model in ``eval()`` mode and returns detached
  tensors, and it refuses inputs that require grad instead of silently cutting the graph;
* the wrapped model lives in a private attribute. This is about the API contract, not security:
  Python code in the same process can always reach it.

It also counts queries (the cost measure of ZO methods) and turns failures of the wrapped callable
(exceptions, NaN/inf, wrong shapes, timeouts) into one-line :class:`BlackBoxError` messages that
name the black box.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import RunError, one_line
from .ledger import QueryLedger

__all__ = ["BlackBoxClassifier", "BlackBoxError", "OutputKind", "OUTPUT_KINDS"]

OutputKind = Literal["logits", "probs", "label"]
# Ordered by information: each kind can be computed from the ones before it, never from those after.
OUTPUT_KINDS: tuple[str, ...] = ("logits", "probs", "label")


class BlackBoxError(RunError):
    """A black-box query was misused or the black box itself failed."""


class BlackBoxClassifier:
    """Batched, query-only access to a classifier mapping a float batch ``(N, C, H, W)`` to logits.

    Args:
        model_or_callable: an ``nn.Module`` or any callable returning, for a batch of ``N``, what
            ``provides`` names. Modules are put in ``eval()`` mode before every query, and inputs
            are moved to the device of the module's first parameter (outputs come back on the
            input's device).
        output: what ``__call__`` returns: ``"logits"``, ``"probs"`` (softmax of the logits) or
            ``"label"`` (top-1 class, ``LongTensor`` of shape ``(N,)``).
        provides: what the wrapped callable returns: ``"logits"`` (default), ``"probs"`` (rows of
            class probabilities) or ``"label"`` (integer classes, shape ``(N,)``), e.g. a remote
            model that reveals only labels. ``output`` must be computable from it.
        batch_size: largest batch handed to the wrapped callable at once; bigger queries are chunked.
        num_classes: expected number of classes, used to validate outputs. When ``None`` it is
            taken from the first valid output and enforced from then on.
        name: used in every error message.
        timeout: seconds allowed for each invocation of the wrapped callable (one chunk). The
            callable then runs in a worker thread; Python cannot kill a thread, so a timed-out call
            keeps running in the background while :class:`BlackBoxError` is raised.

    ``limit`` (attribute, default ``None``): the most images ever sent. A call that would go past it
    raises :class:`BlackBoxError` before sending anything, so a paid budget is a hard cap even for
    queries spent outside a training loop's own check (labelling, pruning scores).

    :meth:`charge_to` a :class:`QueryLedger` (a paid black box): every chunk is recorded there before
    it is sent (refunded if the call fails), and ``queries`` starts from, and is restored to no less
    than, what the ledger says was paid, so images bought in a unit a kill lost stay counted.
    """

    def __init__(
        self,
        model_or_callable: nn.Module | Callable[[Tensor], Tensor],
        *,
        output: OutputKind = "logits",
        provides: OutputKind = "logits",
        batch_size: int = 1024,
        num_classes: int | None = None,
        name: str = "black box",
        timeout: float | None = None,
    ) -> None:
        if not callable(model_or_callable):
            raise TypeError(f"model_or_callable must be callable, got {type(model_or_callable).__name__}")
        for key, kind in (("output", output), ("provides", provides)):
            if kind not in OUTPUT_KINDS:
                raise ValueError(f"{key} must be one of {OUTPUT_KINDS}, got {kind!r}")
        if OUTPUT_KINDS.index(output) < OUTPUT_KINDS.index(provides):
            raise ValueError(f"black box {name!r} returns {provides}; output={output} cannot be computed from it")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self._model = model_or_callable
        self.output: OutputKind = output
        self.provides: OutputKind = provides
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.name = name
        self.timeout = timeout
        self.queries = 0
        self.calls = 0
        self.limit: int | None = None
        self.ledger: QueryLedger | None = None
        self.account = ""
        if isinstance(model_or_callable, nn.Module):
            model_or_callable.eval()

    def __repr__(self) -> str:
        return (
            f"BlackBoxClassifier(name={self.name!r}, output={self.output!r}, num_classes={self.num_classes}, "
            f"queries={self.queries}, calls={self.calls})"
        )

    def __call__(self, x: Tensor) -> Tensor:
        """Query the black box on a batch; returns a detached tensor of the configured ``output`` kind.

        ``queries`` grows by the number of images sent (also when the black box then fails, as a
        paid API would still charge), ``calls`` by one per ``__call__`` whatever the chunking.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"black box {self.name!r} expects a torch.Tensor batch, got {type(x).__name__}")
        if x.requires_grad:
            raise BlackBoxError(
                f"black box {self.name!r} is query-only: the input requires grad but no gradient can flow "
                "through a black box; detach the input (ZO estimators only need forward queries)"
            )
        if not x.is_floating_point() or x.dim() < 1:
            raise BlackBoxError(
                f"black box {self.name!r} expects a floating-point batch (N, C, H, W), "
                f"got dtype {x.dtype} and shape {tuple(x.shape)}"
            )
        n = x.shape[0]
        if self.limit is not None and self.queries + n > self.limit:
            raise BlackBoxError(
                f"black box {self.name!r}: sending {n} more images would exceed its query limit of {self.limit:,} "
                f"({self.queries:,} sent); nothing was sent"
            )
        self.calls += 1
        chunks = x.split(self.batch_size) if n > 0 else (x,)
        out = torch.cat([self._query_chunk(chunk) for chunk in chunks]) if n > 0 else self._query_chunk(x)
        if self.output == self.provides:
            return out
        if self.output == "probs":
            return out.softmax(dim=1)
        return out.argmax(dim=1)

    def _query_chunk(self, chunk: Tensor) -> Tensor:
        """Send one chunk to the wrapped callable and validate what comes back."""
        n = chunk.shape[0]
        self.queries += n
        if isinstance(self._model, nn.Module):
            self._model.eval()
            param = next(self._model.parameters(), None)
            model_input = chunk if param is None else chunk.to(param.device)
        else:
            model_input = chunk
        if self.ledger is None:
            return self._validate(self._invoke(model_input), n).to(chunk.device)
        self.ledger.record(self.account, n)
        answered = getattr(self._model, "images", 0)  # an HTTP client counts the images it got answers for
        try:
            out = self._invoke(model_input)
        except BlackBoxError:  # no answer or an error status: only the answered requests were charged
            self.ledger.record(self.account, getattr(self._model, "images", 0) - answered - n)
            raise
        return self._validate(out, n).to(chunk.device)

    def charge_to(self, ledger: QueryLedger, account: str) -> None:
        """Record every image sent in `ledger` under `account`; ``queries`` starts from what it holds."""
        self.ledger, self.account = ledger, account
        self.queries = max(self.queries, ledger.paid(account))

    def _evaluate(self, x: Tensor) -> object:
        # Grad mode is thread-local, so no_grad must be entered here, inside the worker when timed.
        with torch.no_grad():
            return self._model(x)

    def _invoke(self, x: Tensor) -> object:
        """Run the wrapped callable (in a worker thread when a timeout is set), wrapping its failures."""
        try:
            if self.timeout is None:
                return self._evaluate(x)
            return self._invoke_timed(x)
        except BlackBoxError:
            raise
        except Exception as err:
            raise BlackBoxError(
                f"black box {self.name!r} failed: {type(err).__name__}: {one_line(str(err))}"
            ) from err

    def _invoke_timed(self, x: Tensor) -> object:
        """The call in a daemon thread: a hung black box cannot stall the run, nor its process's exit."""
        result: list[object] = []
        failure: list[BaseException] = []

        def work() -> None:
            try:
                result.append(self._evaluate(x))
            except BaseException as err:  # re-raised in the caller's thread
                failure.append(err)

        worker = threading.Thread(target=work, name=f"blackbox {self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise BlackBoxError(
                f"black box {self.name!r} timed out after {self.timeout:g} s on a batch of {x.shape[0]}"
            )
        if failure:
            raise failure[0]
        return result[0]

    def _validate(self, out: object, n: int) -> Tensor:
        """Check type, shape, range and finiteness of what the callable returned; the result is detached."""
        what = "labels" if self.provides == "label" else self.provides
        if not isinstance(out, Tensor):
            raise BlackBoxError(f"black box {self.name!r} returned {type(out).__name__}, expected a {what} Tensor")
        out = out.detach()
        if self.provides == "label":
            return self._validate_labels(out, n)
        if not out.is_floating_point():
            raise BlackBoxError(f"black box {self.name!r} returned dtype {out.dtype}, expected floating-point {what}")
        expected = f"({n}, {self.num_classes if self.num_classes is not None else 'num_classes'})"
        if (
            out.dim() != 2
            or out.shape[0] != n
            or (self.num_classes is not None and out.shape[1] != self.num_classes)
        ):
            raise BlackBoxError(
                f"black box {self.name!r} returned shape {tuple(out.shape)} for a batch of {n}, expected {expected}"
            )
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).any(dim=1).sum())
            raise BlackBoxError(f"black box {self.name!r} returned NaN/inf {what} for {bad} of {n} inputs")
        if self.provides == "probs" and (
            bool((out < 0).any()) or not torch.allclose(out.sum(1), torch.ones(n, dtype=out.dtype), atol=1e-3)
        ):
            raise BlackBoxError(f"black box {self.name!r} returned probs that are negative or do not sum to 1")
        if self.num_classes is None:
            self.num_classes = out.shape[1]
        return out

    def _validate_labels(self, out: Tensor, n: int) -> Tensor:
        if out.is_floating_point() or out.is_complex() or out.dtype == torch.bool or tuple(out.shape) != (n,):
            raise BlackBoxError(
                f"black box {self.name!r} returned dtype {out.dtype} shape {tuple(out.shape)} for a batch of {n}, "
                f"expected integer labels of shape ({n},)"
            )
        top = self.num_classes if self.num_classes is not None else float("inf")
        if n and (int(out.min()) < 0 or int(out.max()) >= top):
            raise BlackBoxError(f"black box {self.name!r} returned labels outside [0, {self.num_classes})")
        return out.long()

    def reset_counters(self) -> None:
        """Zero the ``queries`` and ``calls`` counters (e.g. between training and evaluation)."""
        self.queries = 0
        self.calls = 0

    def state_dict(self) -> dict[str, int]:
        """Counters only, so that query budgets survive checkpoint/resume; the model is not included."""
        return {"queries": self.queries, "calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counters saved by :meth:`state_dict`; ``queries`` never below the ledger's paid
        images (a checkpoint predates those bought after it)."""
        missing = {"queries", "calls"} - set(state)
        if missing:
            raise KeyError(f"black box {self.name!r} state_dict is missing {sorted(missing)}")
        self.queries = max(int(state["queries"]), self.ledger.paid(self.account) if self.ledger else 0)
        self.calls = int(state["calls"])
