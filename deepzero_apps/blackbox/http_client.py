"""A classifier behind an HTTP endpoint, queried like a local callable (the client of `deepzero-task serve`).

Wire format (docs/blackbox.md): ``POST <url>`` with ``Content-Type: application/x-npy`` and a ``.npy``
body holding a float32 batch ``(N, C, H, W)`` of [0, 1] images; the answer is ``200`` with a ``.npy``
body of ``(N, K)`` float32 logits or probabilities, or ``(N,)`` int64 labels, and an ``X-Output``
header naming which. ``.npy`` is exact for float32 and is read with ``allow_pickle=False``, so neither
side ever unpickles what the other sent.

Connection errors, timeouts, 5xx and 429 are retried with exponential backoff; other statuses are the
caller's fault and fail at once. Every failure is a `BlackBoxError` (a RunError: one line, exit 1)
naming the URL and the last error. The URL is shown without its query string and credentials, which
may hold an API key.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import torch
from torch import Tensor

from ..errors import one_line
from .wrapper import OUTPUT_KINDS, BlackBoxError, OutputKind

NPY = "application/x-npy"
OUTPUT_HEADER = "X-Output"


def encode(array: np.ndarray | Tensor) -> bytes:
    """A ``.npy`` body for an array or tensor."""
    buf = io.BytesIO()
    np.save(buf, array.detach().cpu().numpy() if isinstance(array, Tensor) else array, allow_pickle=False)
    return buf.getvalue()


def decode(body: bytes) -> np.ndarray:
    """The array in a ``.npy`` body (never unpickles); ValueError when it is not one."""
    return np.load(io.BytesIO(body), allow_pickle=False)


def display_url(url: str) -> str:
    """`url` without credentials, query and fragment: safe to print and to write to run files."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


class HTTPClassifier:
    """Batches of images -> the remote classifier's outputs (a callable for `BlackBoxClassifier`).

    Args:
        url: the endpoint (e.g. ``http://127.0.0.1:8000/predict``).
        provides: what the server returns (``logits``, ``probs`` or ``label``); its ``X-Output``
            header must agree.
        max_batch: most images per request; larger batches are split.
        timeout: seconds per request (connect, read and write).
        retries: further attempts after a connection error, timeout, 5xx or 429.
        backoff: seconds before the first retry, doubled for each next one (429's
            ``Retry-After`` is honoured when longer).
        rate_limit: most requests per second (``None``: unlimited).
        headers: sent with every request (e.g. an ``Authorization`` read from the environment).
        transport: an httpx transport instead of the network (tests).

    ``images`` counts the images of requests that succeeded; ``retried_images`` and ``retries``
    count what was sent again, so a budget counted by the caller stays exact.
    """

    def __init__(
        self,
        url: str,
        *,
        provides: OutputKind = "logits",
        max_batch: int = 256,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        rate_limit: float | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if provides not in OUTPUT_KINDS:
            raise ValueError(f"provides must be one of {OUTPUT_KINDS}, got {provides!r}")
        if max_batch < 1 or timeout <= 0 or retries < 0 or backoff < 0 or (rate_limit is not None and rate_limit <= 0):
            raise ValueError(f"need max_batch >= 1, timeout > 0, retries >= 0, backoff >= 0, rate_limit > 0 or None; "
                             f"got {max_batch}, {timeout}, {retries}, {backoff}, {rate_limit}")
        self.url, self.shown = url, display_url(url)
        self.provides, self.max_batch, self.retries_allowed, self.backoff = provides, max_batch, retries, backoff
        self.interval = 0.0 if rate_limit is None else 1.0 / rate_limit
        self._client = httpx.Client(timeout=timeout, headers={"Content-Type": NPY, **dict(headers or {})},
                                    transport=transport)
        self._next_slot = 0.0
        self.images = self.retried_images = self.retries = 0

    def __call__(self, x: Tensor) -> Tensor:
        return torch.cat([self._post(chunk) for chunk in x.split(self.max_batch)]).to(x.device)

    def _wait_for_slot(self) -> None:
        now = time.monotonic()
        if self._next_slot > now:
            time.sleep(self._next_slot - now)
        self._next_slot = max(now, self._next_slot) + self.interval

    def _post(self, chunk: Tensor) -> Tensor:
        body = encode(chunk.float())
        last, delay = "", self.backoff
        for attempt in range(self.retries_allowed + 1):
            if attempt:
                self.retries += 1
                self.retried_images += len(chunk)
                time.sleep(delay)
                delay *= 2
            self._wait_for_slot()
            try:
                response = self._client.post(self.url, content=body)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                last = f"{type(exc).__name__}: {one_line(exc)}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}: {one_line(response.text[:200])}"
                delay = max(delay, _retry_after(response))
                continue
            if response.status_code != 200:
                raise BlackBoxError(f"black box at {self.shown} refused the request: HTTP {response.status_code}: "
                                    f"{one_line(response.text[:200])}")
            self.images += len(chunk)
            return self._read(response)
        raise BlackBoxError(f"black box at {self.shown} failed after {self.retries_allowed + 1} attempts; "
                            f"last error: {last}")

    def _read(self, response: httpx.Response) -> Tensor:
        kind = response.headers.get(OUTPUT_HEADER, self.provides)
        if kind != self.provides:
            raise BlackBoxError(f"black box at {self.shown} returns {kind}, but classifier.output={self.provides}")
        try:
            array = decode(response.content)
        except ValueError as exc:
            raise BlackBoxError(f"black box at {self.shown} answered a body that is not .npy: {one_line(exc)}") from exc
        return torch.from_numpy(np.ascontiguousarray(array))

    def state_dict(self) -> dict[str, int]:
        """The retry counters, so they survive a resume like the query budget does."""
        return {"retries": self.retries, "retried_images": self.retried_images}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.retries, self.retried_images = int(state["retries"]), int(state["retried_images"])


def _retry_after(response: httpx.Response) -> float:
    try:
        return float(response.headers.get("Retry-After", 0))
    except ValueError:  # an HTTP date: fall back to the exponential delay
        return 0.0
