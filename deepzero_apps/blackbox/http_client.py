"""A classifier behind one or several HTTP endpoints, queried like a local callable (the client of `deepzero-task serve`).

Wire format (docs/blackbox.md): ``POST <url>`` with ``Content-Type: application/x-npy`` and a ``.npy``
body holding a float32 batch ``(N, C, H, W)`` of [0, 1] images; the answer is ``200`` with a ``.npy``
body of ``(N, K)`` float32 logits or probabilities, or ``(N,)`` int64 labels, and an ``X-Output``
header naming which. Both sides read ``.npy`` with `decode`, which checks the header against the body
before allocating anything and never unpickles.

Bounds a paying user can rely on: ``timeout`` is a deadline for a whole request (connect, upload,
headers and body, however slowly a server trickles them); an answer larger than the expected
``batch x classes`` array is refused while it streams in; a ``Retry-After`` (or the doubled backoff)
is waited at most ``max_wait`` seconds. Connection errors, timeouts, 5xx and 429 are retried, on
another replica when there are several; other statuses are the caller's fault and fail at once.
Every failure is a `BlackBoxError` (a RunError: one line, exit 1) naming the URL without
credentials or query, with any configured secret scrubbed from the server's text.

Requests run on an asyncio loop in one daemon thread: the deadline is a cancellation, not a
per-read timeout, and replicas answer batches concurrently.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import math
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import httpx
import numpy as np
import torch
from numpy.lib import format as npy_format
from torch import Tensor

from ..errors import one_line
from .wrapper import OUTPUT_KINDS, BlackBoxError, OutputKind

NPY = "application/x-npy"
OUTPUT_HEADER = "X-Output"
NPY_HEADER_MAX = 4096  # bytes allowed for a .npy answer's header (numpy writes ~128)
MAX_CLASSES = 100_000  # classes assumed for the answer's size cap before the first answer tells
ERROR_BODY_MAX = 4096  # bytes of an error answer read for its message
T = TypeVar("T")


def encode(array: np.ndarray | Tensor) -> bytes:
    """A ``.npy`` body for an array or tensor."""
    buf = io.BytesIO()
    np.save(buf, array.detach().cpu().numpy() if isinstance(array, Tensor) else array, allow_pickle=False)
    return buf.getvalue()


def decode(body: bytes) -> np.ndarray:
    """The plain numeric array in a ``.npy`` body; ValueError for anything else.

    The header is checked against the body before any allocation, so a header claiming 2^40 rows,
    a structured or object dtype, an ``.npz`` archive or a truncated body is refused in one line."""
    buf = io.BytesIO(body)
    try:
        version = npy_format.read_magic(buf)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version} is not supported")
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read(buf)
    except (ValueError, EOFError, SyntaxError) as exc:
        raise ValueError(f"not a .npy array: {one_line(exc)[:200]}") from exc
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise ValueError(f"dtype {dtype.str} is not a plain numeric type")
    count = math.prod(shape)
    if count * dtype.itemsize != len(body) - buf.tell():
        raise ValueError(f"the header claims shape {shape} of {dtype.str} ({count * dtype.itemsize:,} bytes), "
                         f"the body holds {len(body) - buf.tell():,}")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=buf.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()


def display_url(url: str) -> str:
    """`url` without credentials, query and fragment: safe to print and to write to run files."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def url_secrets(url: str) -> list[str]:
    """The parts of `url` that may be credentials: the password, user and query values."""
    parts = urlsplit(url)
    found = [parts.password or "", parts.username or "", *(v for _, v in parse_qsl(parts.query))]
    return [unquote(s) for s in found if s]


def scrub(text: str, secrets: Sequence[str]) -> str:
    """`text` with every occurrence of a secret replaced by ``***`` (a server may echo a key)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


class _Retry(Exception):
    """A failure worth another attempt (connection, timeout, 5xx, 429); `wait` is the server's Retry-After."""

    def __init__(self, message: str, wait: float = 0.0):
        super().__init__(message)
        self.wait = wait


@dataclass
class _Replica:
    url: str
    shown: str
    failures: int = 0  # consecutive failed attempts: its pause before the next one doubles
    down_until: float = 0.0


@dataclass
class _Pending:
    index: int  # the chunk
    failed: int = 0  # its failed attempts
    tried: set[int] = field(default_factory=set)  # replicas that failed it since it last tried them all


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


_now = time.monotonic  # module-level so tests can run the client on a fake clock


class HTTPClassifier:
    """Batches of images -> the remote classifier's outputs (a callable for `BlackBoxClassifier`).

    Args:
        url: the endpoint (e.g. ``http://127.0.0.1:8000/predict``), or a list of replicas serving the
            same model: requests are spread over them (one in flight per replica), and a failed
            request is retried on another one.
        provides: what the server returns (``logits``, ``probs`` or ``label``); its ``X-Output``
            header must agree.
        max_batch: most images per request; larger batches are split.
        timeout: seconds a whole request may take, from connecting to the last byte of the answer.
        retries: further attempts of a request after a connection error, timeout, 5xx or 429.
        backoff: seconds a replica pauses after a failure, doubled for each consecutive one (a
            longer ``Retry-After`` wins); both at most ``max_wait``.
        rate_limit: most requests per second, over all replicas (``None``: unlimited).
        headers: sent with every request (e.g. an ``Authorization`` read from the environment).
        max_wait: the longest pause before a retry, whatever the server asks.
        num_classes: the answer's classes, for the cap on its size (``None``: `MAX_CLASSES` until
            the first answer tells).
        transport: an httpx transport instead of the network (tests).

    ``images`` counts the images of requests that succeeded, each once; ``requests`` every request
    sent; ``retries`` and ``retried_images`` what was sent again, so a budget counted by the caller
    stays exact.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        provides: OutputKind = "logits",
        max_batch: int = 256,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        rate_limit: float | None = None,
        headers: Mapping[str, str] | None = None,
        max_wait: float = 60.0,
        num_classes: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if provides not in OUTPUT_KINDS:
            raise ValueError(f"provides must be one of {OUTPUT_KINDS}, got {provides!r}")
        if not urls or max_batch < 1 or not 0 < timeout < math.inf or retries < 0 or backoff < 0 \
                or not 0 <= max_wait < math.inf or (rate_limit is not None and rate_limit <= 0):
            raise ValueError(f"need a url, max_batch >= 1, finite timeout > 0, retries >= 0, backoff >= 0, finite "
                             f"max_wait >= 0, rate_limit > 0 or None; got {len(urls)} urls, {max_batch}, {timeout}, "
                             f"{retries}, {backoff}, {max_wait}, {rate_limit}")
        self.replicas = [_Replica(u, display_url(u)) for u in urls]
        self.shown = ", ".join(r.shown for r in self.replicas)
        self.provides, self.max_batch, self.retries_allowed = provides, max_batch, retries
        self.timeout, self.backoff, self.max_wait, self.num_classes = timeout, backoff, max_wait, num_classes
        self.interval = 0.0 if rate_limit is None else 1.0 / rate_limit
        headers = dict(headers or {})
        self._secrets = [str(v) for v in headers.values()] + [s for u in urls for s in url_secrets(u)]
        self._client = httpx.AsyncClient(
            timeout=timeout, transport=transport, follow_redirects=False,
            headers={"Content-Type": NPY, "Accept-Encoding": "identity", **headers},
        )
        self._next_slot = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.images = self.requests = self.retried_images = self.retries = 0

    # ---- the caller's side: synchronous ----------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        chunks = list(x.detach().float().cpu().split(self.max_batch))
        return torch.cat(self._run(self._query(chunks))).to(x.device)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="http black box", daemon=True).start()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C included: stop what is in flight
            future.cancel()
            raise

    def close(self) -> None:
        """Close the connections and stop the loop's thread (a daemon: exiting without it is fine)."""
        if self._loop is not None:
            self._run(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None

    # ---- the loop's side -----------------------------------------------------------------
    async def _query(self, chunks: list[Tensor]) -> list[Tensor]:
        """Every chunk answered, in order: one worker per replica takes chunks from a shared pool; a
        failed chunk goes back to the pool for a replica that has not failed it yet (any again once
        all have), and a replica pauses after a failure; until the chunk's retries are spent."""
        results: list[Tensor | None] = [None] * len(chunks)
        bodies = [encode(c) for c in chunks]
        pool: list[_Pending] = [_Pending(i) for i in range(len(chunks))]
        ready = asyncio.Condition()
        done = asyncio.get_running_loop().create_future()
        left = [len(chunks)]

        def finish(exc: BaseException | None) -> None:
            if not done.done():
                done.set_exception(exc) if exc is not None else done.set_result(None)

        def take(r: int) -> _Pending:
            return pool.pop(next(k for k, item in enumerate(pool) if r not in item.tried))

        async def worker(r: int, replica: _Replica) -> None:
            while True:
                if replica.down_until > _now():
                    await _sleep(replica.down_until - _now())
                async with ready:
                    await ready.wait_for(lambda: any(r not in p.tried for p in pool))
                    item = take(r)
                n = len(chunks[item.index])
                if item.failed:
                    self.retries += 1
                    self.retried_images += n
                try:
                    results[item.index] = await self._attempt(replica, bodies[item.index], n)
                except _Retry as exc:
                    replica.failures += 1
                    pause = min(self.max_wait, max(self.backoff * 2 ** (replica.failures - 1), exc.wait))
                    replica.down_until = _now() + pause
                    item.failed += 1
                    if item.failed > self.retries_allowed:
                        last = f"{exc}" if len(self.replicas) == 1 else f"{exc} (at {replica.shown})"
                        finish(BlackBoxError(f"black box at {self.shown} failed after {item.failed} attempts; "
                                             f"last error: {last}"))
                        return
                    item.tried = set() if len(item.tried) + 1 == len(self.replicas) else item.tried | {r}
                    async with ready:
                        pool.append(item)
                        ready.notify_all()
                    continue
                except BaseException as exc:  # BlackBoxError: the server's answer is unusable, not retried
                    finish(exc)
                    return
                replica.failures = 0
                self.images += n
                left[0] -= 1
                if left[0] == 0:
                    finish(None)

        workers = [asyncio.create_task(worker(r, replica)) for r, replica in enumerate(self.replicas)]
        try:
            await done
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return results  # type: ignore[return-value]

    async def _wait_for_slot(self) -> None:
        now = _now()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self.interval
        if slot > now:
            await _sleep(slot - now)

    async def _attempt(self, replica: _Replica, body: bytes, n: int) -> Tensor:
        await self._wait_for_slot()
        self.requests += 1
        try:
            return await asyncio.wait_for(self._exchange(replica, body, n), self.timeout)
        except asyncio.TimeoutError:
            raise _Retry(f"timed out after {self.timeout:g} s (the whole request)") from None
        except httpx.TransportError as exc:  # connection refused/reset, a broken answer
            raise _Retry(f"{type(exc).__name__}: {scrub(one_line(exc), self._secrets)}") from None

    async def _exchange(self, replica: _Replica, body: bytes, n: int) -> Tensor:
        async with self._client.stream("POST", replica.url, content=body) as response:
            status = response.status_code
            if status != 200:
                text = scrub(one_line((await _read(response, ERROR_BODY_MAX, truncate=True)).decode(errors="replace")),
                             self._secrets)[:200]
                if status == 429 or status >= 500:
                    raise _Retry(f"HTTP {status}: {text}", _retry_after(response.headers.get("Retry-After")))
                raise BlackBoxError(f"black box at {replica.shown} refused the request: HTTP {status}: {text}")
            kind = response.headers.get(OUTPUT_HEADER, self.provides)
            if kind != self.provides:
                raise BlackBoxError(f"black box at {replica.shown} returns {scrub(kind, self._secrets)[:50]}, "
                                    f"but classifier.output={self.provides}")
            cap = self._answer_cap(n)
            data = await _read(response, cap)
            if data is None:
                raise BlackBoxError(f"black box at {replica.shown} answered more than {cap:,} bytes for a batch of "
                                    f"{n} ({self._classes_shown()}); refused")
        try:
            array = decode(data)
        except ValueError as exc:
            raise BlackBoxError(f"black box at {replica.shown} answered a body that is not a .npy array: "
                                f"{one_line(exc)}") from exc
        if self.num_classes is None and array.ndim == 2 and array.shape[0] == n and self.provides != "label":
            self.num_classes = array.shape[1]
        return torch.from_numpy(array)

    def _answer_cap(self, n: int) -> int:
        """The most bytes an answer for `n` images may have: 8-byte values, plus a header."""
        per_image = 8 if self.provides == "label" else 8 * (self.num_classes or MAX_CLASSES)
        return NPY_HEADER_MAX + n * per_image

    def _classes_shown(self) -> str:
        if self.provides == "label":
            return "labels"
        return f"{self.num_classes} classes" if self.num_classes else f"at most {MAX_CLASSES:,} classes"

    def state_dict(self) -> dict[str, int]:
        """The request and retry counters, so they survive a resume like the query budget does."""
        return {"requests": self.requests, "retries": self.retries, "retried_images": self.retried_images}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.requests = int(state.get("requests", 0))  # absent in checkpoints of 0.2
        self.retries, self.retried_images = int(state["retries"]), int(state["retried_images"])


async def _read(response: httpx.Response, cap: int, truncate: bool = False) -> bytes | None:
    """The answer's body, at most `cap` bytes: None past it (or its first `cap` bytes with `truncate`).
    A declared Content-Length past the cap is refused before reading."""
    declared = response.headers.get("Content-Length", "")
    if not truncate and declared.isdigit() and int(declared) > cap:
        return None
    data = bytearray()
    async for piece in response.aiter_bytes():
        data += piece
        if len(data) > cap:
            return bytes(data[:cap]) if truncate else None
    return bytes(data)


def _retry_after(value: str | None) -> float:
    """Seconds a ``Retry-After`` asks for (delta seconds or an HTTP date); 0 when absent, malformed,
    negative or not finite (the caller caps it at `max_wait`)."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return 0.0
    return seconds if 0 <= seconds < math.inf else 0.0
