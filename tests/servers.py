"""Real `deepzero-task serve` processes on 127.0.0.1 for the HTTP tests (a helper module, no tests)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from sklearn.datasets import load_digits
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits_model(path: Path) -> Path:
    """A TorchScript digits classifier ([0, 1] images -> logits) trained first-order for a second, at `path`."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.jit.script(model.eval()).save(str(path))
    return path


class Server:
    """`deepzero-task serve` in a subprocess; `start` waits until /health answers. `extra`: more
    overrides, `env`: more environment variables."""

    def __init__(self, model: Path, port: int, log: Path, extra: tuple[str, ...] = (), env: dict | None = None):
        self.model, self.port, self.log, self.extra, self.env, self.proc = model, port, log, extra, env or {}, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predict"

    @property
    def run_dir(self) -> Path:
        return self.log.parent / f"serve_run_{self.port}"

    @property
    def out(self) -> Path:
        """The server's stdout and stderr."""
        return self.log.parent / f"serve_{self.port}.out"

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "deepzero_apps.cli", "serve", "classifier=torchscript",
               f"classifier.path={self.model}", f"port={self.port}", f"request_log={self.log}",
               f"hydra.run.dir={self.run_dir}", *self.extra]
        with self.out.open("a") as out:  # a file, not a pipe nobody reads while it runs
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True, env={**os.environ, **self.env})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.out.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.2)
        raise TimeoutError("the server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def rows(self) -> list[dict]:
        """The request log's rows (a line still being written, without its newline, is not one yet)."""
        return [json.loads(line) for line in self.log.read_text().split("\n")[:-1]] if self.log.exists() else []

    def images(self) -> int:
        return sum(r["images"] for r in self.rows() if r["status"] == 200)
