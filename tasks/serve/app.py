"""`deepzero-task serve`: a local classifier behind the HTTP wire format of docs/blackbox.md.

    deepzero-task serve classifier=torchscript classifier.path=model.pt port=8000
    deepzero-task serve classifier=run classifier.run_dir=runs/classify/<time> port=8000

serves ``POST /predict`` (a ``.npy`` batch of [0, 1] images in, a ``.npy`` of what `classifier.output`
names out, with an ``X-Output`` header) and ``GET /health`` on FastAPI + uvicorn (`pip install
deepzero-apps[serve]`). It is the reference for a remote black box, and what the HTTP tests run against.
Requests are answered one at a time in arrival order, and each one appends a JSON line (images,
status, seconds) to the request log, so the images a run was charged for can be checked against it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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

    def __post_init__(self) -> None:
        require(self.classifier.kind in ("run", "callable", "torchscript"),
                f"serve needs a local classifier (classifier=run, callable or torchscript), got kind '{self.classifier.kind}'"
                + ("; a classify run is classifier=run classifier.run_dir=DIR" if self.classifier.kind == "train" else ""))
        require(0 <= self.port <= 65535, f"port={self.port} must be in [0, 65535]")
        require(self.threads is None or self.threads >= 1, f"threads={self.threads} must be >= 1 or null")



def create_app(blackbox: BlackBoxClassifier, request_log: Path) -> Any:
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
        try:
            x = torch.from_numpy(np.ascontiguousarray(decode(await request.body())))
        except ValueError as exc:
            return answer(0, 400, start, f"the body is not a .npy array: {exc}", media_type="text/plain")
        if x.dim() != 4 or not x.is_floating_point():
            return answer(0, 400, start, f"expected a float array (N, C, H, W), got {x.dtype} {tuple(x.shape)}",
                          media_type="text/plain")
        try:
            out = blackbox(x.float())
        except BlackBoxError as exc:
            return answer(len(x), 500, start, str(exc), media_type="text/plain")
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
    app = create_app(blackbox, request_log)
    print(f"serve: {describe(ccfg)['source']} ({ccfg.kind}, output={ccfg.output}) at "
          f"http://{typed.host}:{typed.port}/predict, request log {request_log}", flush=True)
    uvicorn.run(app, host=typed.host, port=typed.port, log_level="warning")
    return {"queries": blackbox.queries, "request_log": str(request_log)}


APP = App("serve", "serve a local classifier over HTTP as a black box (.npy in, .npy out)", ServeConfig, run)
