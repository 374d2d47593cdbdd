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


def cli(*args: str) -> list[str]:
    """The command line of a `deepzero-task` process run by this interpreter."""
    return [sys.executable, "-m", "deepzero_apps.cli", *args]


def digits_model(path: Path) -> Path:
    """A TorchScript digits classifier ([0, 1] images -> logits) trained first-order for half a second, at `path`."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):  # 97 % training accuracy
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.jit.script(model.eval()).save(str(path))
    return path


def wait_until_healthy(proc: subprocess.Popen, port: int, output, timeout: float = 180) -> None:
    """Wait until the server `proc` answers /health on `port`; `output()` explains a server that exited.
    It polls with a bare TCP connect (uvicorn listens once the app has started) and asks /health once
    the port accepts: an `httpx.get` builds a TLS context each call, ~40 ms of CPU, 20 times a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, output()
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return
        time.sleep(0.05)
    raise TimeoutError("the server did not start")


class Server:
    """`deepzero-task serve` in a subprocess; `start` waits until /health answers (and starts it again,
    on the same port and request log, after a kill). `extra`: more overrides, `env`: more environment
    variables."""

    def __init__(
        self, model: Path, port: int, log: Path, extra: tuple[str, ...] = (), env: dict | None = None
    ):
        self.model, self.port, self.log, self.extra, self.env = model, port, log, extra, env or {}
        self.proc: subprocess.Popen | None = None

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
        cmd = cli(
            "serve",
            "classifier=torchscript",
            f"classifier.path={self.model}",
            f"port={self.port}",
            f"request_log={self.log}",
            f"hydra.run.dir={self.run_dir}",
            *self.extra,
        )
        self.first_row, self.out_from = self.mark(), self.out.stat().st_size if self.out.exists() else 0
        with self.out.open("a") as out:  # a file, not a pipe nobody reads while it runs
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        wait_until_healthy(self.proc, self.port, self.out.read_text)
        return self

    def output(self) -> str:
        """What the process started last printed (stdout and stderr)."""
        with self.out.open("rb") as f:
            f.seek(self.out_from)
            return f.read().decode()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def mark(self) -> int:
        """How many rows the request log has: a test sharing the server counts `rows(since=mark)`."""
        return self.log.read_bytes().count(b"\n") if self.log.exists() else 0

    def rows(self, since: int = 0) -> list[dict]:
        """The request log's rows from row `since` on (a line still being written, without its newline, is
        not one yet)."""
        return (
            [json.loads(line) for line in self.log.read_text().split("\n")[since:-1]]
            if self.log.exists()
            else []
        )

    def images(self, since: int = 0) -> int:
        """Images answered (HTTP 200) in the rows from row `since` on."""
        return sum(r["images"] for r in self.rows(since) if r["status"] == 200)
