"""Crash-safe checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so `torch.load(...,
weights_only=True)` reads it. Writing goes to a temporary file in the same directory, is fsync'ed,
then renamed over the old one: a kill at any moment leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read: truncated, empty, random bytes, a directory, unreadable."""


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished, then deliver it
    to whatever handler was there. torch.save turns a KeyboardInterrupt raised inside its writer into a
    RuntimeError, so an interrupt must never land in the middle of a write. Main thread only (where Python
    runs signal handlers); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        signal.raise_signal(signal.SIGINT)


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call `write(file_object)` on a temp file next to `path`, fsync, then rename onto `path`; a Ctrl-C
    meanwhile lands after the rename."""
    with interrupts_deferred():
        _atomic_write(Path(path), write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """A result file (summary, table, config) written whole or not at all: sweeps treat its presence as done."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, **dumps))


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete temp files a killed `atomic_write(path, ...)` left behind (a SIGKILL skips its cleanup)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at `path` (FileNotFoundError if there is none; CheckpointError naming it if it
    is anything but a readable checkpoint dict)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, OSError ... on bad files
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).split("\n", 1)[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {reason}); "
                              "move it away to start over") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def rng_state() -> dict:
    """Every random generator a run touches, in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
