"""`deepzero-task serve`: a local classifier behind the HTTP wire format of docs/blackbox.md.

    deepzero-task serve classifier=torchscript classifier.path=model.pt port=8000
    deepzero-task serve classifier=run classifier.run_dir=runs/classify/<time> port=8000

serves ``POST /predict`` (a ``.npy`` batch of [0, 1] images in, a ``.npy`` of what `classifier.output`
names out, with an ``X-Output`` header) and ``GET /health`` on FastAPI + uvicorn (`pip install
deepzero-apps[serve]`). It is the reference for a remote black box, and what the HTTP tests run against.
Requests are answered one at a time in arrival order, and each one appends a JSON line (images,
status, seconds) to the request log, so the images a run was charged for can be checked against it.

It survives hostile clients: a request body is capped (`max_body_mb`, 413), a request's headers and
body must arrive within `request_timeout` seconds (408, or the connection is closed), at most
`max_connections` are open (others are closed at once, so the process never runs out of file
descriptors), a body that is not a plain float ``(N, C, H, W)`` array of finite values is a 400 and
an input the classifier cannot take a 422 (a client error is never a 5xx that clients retry), and
SIGTERM stops it cleanly (exit 0). With `token` set, ``/predict`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from deepzero_apps.apps import App
from deepzero_apps.blackbox import BlackBoxClassifier, BlackBoxError
from deepzero_apps.blackbox.http_client import NPY, OUTPUT_HEADER, decode, encode
from deepzero_apps.blackbox.loaders import ClassifierConfig, black_box, describe, load_classifier
from deepzero_apps.config import require, start_run
from deepzero_apps.errors import ConfigError

try:
    from fastapi import FastAPI, Request, Response
except ImportError:  # the optional `serve` extra
    FastAPI = None

NEEDS_EXTRA = "deepzero-task serve needs FastAPI and uvicorn: pip install 'deepzero-apps[serve]'"


@dataclass
class ServeConfig:
    """`deepzero-task serve`: a local classifier (a classify run, callable or TorchScript) behind the HTTP wire format."""

    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    request_log: str | None = None  # one JSON line per request (null: <run dir>/requests.jsonl)
    device: str = "cpu"
    threads: int | None = 1
    seed: int = 0
    token: str | None = None  # /predict needs `Authorization: Bearer <token>`; write it as ${oc.env:NAME}
    max_body_mb: float = 256.0  # largest request body (413 beyond)
    request_timeout: float = 30.0  # seconds a client has to send a request's headers and body
    max_connections: int = 128  # open connections beyond it are closed at once

    def __post_init__(self) -> None:
        require(self.classifier.kind in ("run", "callable", "torchscript"),
                f"serve needs a local classifier (classifier=run, callable or torchscript), got kind '{self.classifier.kind}'"
                + ("; a classify run is classifier=run classifier.run_dir=DIR" if self.classifier.kind == "train" else ""))
        require(0 <= self.port <= 65535, f"port={self.port} must be in [0, 65535]")
        require(self.threads is None or self.threads >= 1, f"threads={self.threads} must be >= 1 or null")
        require(self.request_log is None or not Path(self.request_log).is_dir(),
                f"request_log='{self.request_log}' is a directory; name a file")
        require(0 < self.max_body_mb < float("inf"), f"max_body_mb={self.max_body_mb} must be a positive number")
        require(0 < self.request_timeout < float("inf"), f"request_timeout={self.request_timeout} must be positive")
        require(self.max_connections >= 1, f"max_connections={self.max_connections} must be >= 1")
        require(self.token is None or (self.token.strip() != "" and self.token.isascii() and self.token.isprintable()),
                "token must be a non-empty printable ASCII string (or null)")


class _TooLarge(Exception):
    pass


async def _body(request: Request, cap: int) -> bytes:
    """The request's body, refused (`_TooLarge`) as soon as it passes `cap` bytes."""
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > cap:
            raise _TooLarge
    return bytes(data)


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def guarded_protocol(max_connections: int, request_timeout: float) -> type:
    """uvicorn's h11 protocol with what it lacks against slow clients: a connection whose next request
    has not arrived within `request_timeout` seconds (of opening, or of the previous answer) is
    closed, and past `max_connections` open ones the oldest idle one is closed for each new one (the
    new one when none is idle), so idle sockets can neither exhaust file descriptors nor lock out
    `/health`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    opened: dict[Any, None] = {}  # open connections, oldest first

    class GuardedH11Protocol(H11Protocol):
        _guard: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            opened[self] = None
            if len(opened) > max_connections:
                idle = next((c for c in opened if c is not self and c._idle()), self)
                opened.pop(idle)
                idle.transport.close()
            if self in opened:
                self._arm()

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            armed = self.cycle
            self._guard = self.loop.call_later(request_timeout, lambda: self.cycle is armed and self.transport.close())

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._guard is not None:
                self._guard.cancel()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            opened.pop(self, None)
            if self._guard is not None:
                self._guard.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def create_app(blackbox: BlackBoxClassifier, request_log: Path, token: str | None = None,
               max_body: int = 256 << 20, request_timeout: float = 30.0) -> Any:
    """The ASGI app answering `/predict` with `blackbox`'s outputs and logging every request."""
    if FastAPI is None:
        raise ConfigError(NEEDS_EXTRA)
    app = FastAPI(title="deepzero-apps black box", docs_url=None, redoc_url=None)
    request_log.parent.mkdir(parents=True, exist_ok=True)

    def answer(images: int, status: int, start: float, content: bytes | str, **kwargs: Any) -> Response:
        line = json.dumps({"images": images, "status": status, "seconds": round(time.monotonic() - start, 6)})
        with request_log.open("a") as f:
            f.write(line + "\n")
        return Response(content, status_code=status, **kwargs)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "output": blackbox.output, "queries": blackbox.queries}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        # Computed inside the event loop on purpose: requests are answered one at a time, in order.
        start = time.monotonic()

        def refuse(status: int, message: str, **kwargs: Any) -> Response:
            return answer(0, status, start, message, media_type="text/plain", **kwargs)

        if token is not None and not _authorized(request, token):
            return refuse(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            return refuse(413, f"the body has {int(declared):,} bytes; at most {max_body:,}")
        try:
            body = await asyncio.wait_for(_body(request, max_body), request_timeout)
        except _TooLarge:
            return refuse(413, f"the body has more than {max_body:,} bytes")
        except asyncio.TimeoutError:
            return refuse(408, f"the body did not arrive within {request_timeout:g} s")
        try:
            x = torch.from_numpy(decode(body))
        except ValueError as exc:
            return refuse(400, f"the body is not a .npy array: {exc}")
        if x.dim() != 4 or not x.is_floating_point() or 0 in x.shape:
            return refuse(400, f"expected a float array (N, C, H, W) of at least one image, got {x.dtype} {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            return refuse(400, "the images hold NaN or inf")
        try:
            out = blackbox(x.float())
        except BlackBoxError as exc:  # raised by the classifier on this input: the input's fault, else ours
            if exc.__cause__ is None:
                return answer(len(x), 500, start, str(exc), media_type="text/plain")
            return answer(len(x), 422, start, f"the classifier cannot take this input {tuple(x.shape)}: "
                          f"{_last_line(exc.__cause__)}", media_type="text/plain")
        return answer(len(x), 200, start, encode(out), media_type=NPY, headers={OUTPUT_HEADER: blackbox.output})

    return app


def run(cfg: DictConfig) -> dict:
    typed, out_dir = start_run(cfg, ServeConfig)
    try:
        import uvicorn
    except ImportError as exc:
        raise ConfigError(NEEDS_EXTRA) from exc
    ccfg = cfg.classifier
    blackbox = black_box(load_classifier(ccfg, cfg.device), ccfg, num_classes=None, batch_size=1024)
    request_log = Path(cfg.request_log) if cfg.request_log else out_dir / "requests.jsonl"
    app = create_app(blackbox, request_log, typed.token, int(typed.max_body_mb * 2**20), typed.request_timeout)
    print(f"serve: {describe(ccfg)['source']} ({ccfg.kind}, output={ccfg.output}) at "
          f"http://{typed.host}:{typed.port}/predict, request log {request_log}"
          + (", bearer token required" if typed.token else ""), flush=True)
    if typed.token is None and not _loopback(typed.host):
        print(f"serve: warning: host={typed.host} accepts other machines and no token is set: anyone who reaches "
              "this port can query the classifier (set token=${oc.env:NAME})", file=sys.stderr, flush=True)
    # uvicorn re-raises the SIGTERM it handled once it has shut down; a no-op handler makes that a clean exit
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=typed.host, port=typed.port, log_level="warning",
                    http=guarded_protocol(typed.max_connections, typed.request_timeout),
                    timeout_keep_alive=min(5, int(typed.request_timeout) or 1),
                    timeout_graceful_shutdown=math.ceil(typed.request_timeout))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"serve: stopped after {blackbox.queries:,} images", flush=True)
    return {"queries": blackbox.queries, "request_log": str(request_log)}


def _last_line(exc: BaseException) -> str:
    """The gist of a model's error (TorchScript's carry their interpreter traceback before it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


APP = App("serve", "serve a local classifier over HTTP as a black box (.npy in, .npy out)", ServeConfig, run)
