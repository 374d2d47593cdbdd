"""Wrap an external executable (Fortran, C, legacy code, another Python) as a :class:`Solver`.

Every :meth:`ExternalSolver.step` runs the command once, with no shell, as an argument list:

* ``io="files"`` (default): the state is written to ``<tmp>/input.npy`` and the command must write the
  next state to ``<tmp>/output.npy``; ``{input}`` and ``{output}`` in the arguments are replaced by
  these absolute paths. ``<tmp>`` is a fresh directory (under ``workdir`` if given), deleted afterwards
  unless ``keep_files=True``.
* ``io="stdio"``: the state is sent as ``.npy`` bytes on stdin and the next state is read as ``.npy``
  bytes from stdout.

Other placeholders: ``{forcing}`` (path of ``forcing.npy`` when a forcing array is passed to
``step``), ``{step}`` (a call counter), ``{dt}``, ``{workdir}`` and ``{<name>}`` for any scalar keyword
passed to ``step`` (e.g. ``{re}``). Unknown placeholders are left as they are.

Initial states come from, in order: ``init_command`` (run like a step with ``{seed}`` and ``{output}``
placeholders and no input; stdout is used with ``io="stdio"``), or ``initial_state_file`` (a ``.npy``
path in which ``{seed}`` is replaced; one file may also hold a stack ``(S, C, ny, nx)`` indexed by
``seed % S``). The command's working directory is ``workdir`` (default: the current one).

Batches: with ``batch=True`` the executable declares that it steps many states per call, and
:meth:`ExternalSolver.step_batch` runs it once per batch: ``input.npy`` holds ``(B, C, ny, nx)``,
``output.npy`` must too, ``forcing.npy`` is ``(B, C, ny, nx)``, and a keyword with one value per
state (e.g. a Reynolds number per simulation) is written to ``<name>.npy`` of shape ``(B,)`` and its
placeholder ``{<name>}`` is that path (a keyword shared by the batch stays a plain value). Without it,
a batch is one call per state.

Failures raise :class:`SolverError` with one line naming the solver and step: non-zero exit (exit
code and the last line of stderr), timeout, missing or unreadable output, NaN/inf, wrong shape.

Output costs bounded memory however much a program prints: stdout goes to /dev/null with
``io="files"``; with ``io="stdio"`` it is read up to a float64 ``.npy`` of the expected shape plus
``NPY_SLACK`` bytes, and a program writing more is killed (one-line error). Of stderr only the last
``STDERR_TAIL`` bytes are kept, for the error line.
Nothing outside the per-step temporary directory is ever deleted.

Each call runs in a new session (its own process group) whose environment carries a unique tag. When
the call ends -- success, failure, timeout, Ctrl-C, or SIGTERM of the run (caught during the call, then
raised again) -- the group is killed, then every process still carrying the tag (background children
of a successful step, children that called ``setsid()`` or were re-parented) until none is left
(Linux ``/proc``). SIGKILL of the run cannot be caught: the program itself then gets SIGKILL from the
kernel (``PR_SET_PDEATHSIG``, Linux), but its own children are left to be killed by whoever ran the
run (e.g. a per-run cgroup: ``systemd-run --scope``, a container, a batch scheduler).

The program's environment is an allow-list, not the caller's whole environment (which may hold
secrets): the variables in :data:`ENV_ALLOW` that are set, plus ``env`` (a ``None`` value copies that
variable from the caller).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io as _io
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from .base import Grid, Solver, SolverError, check_state

__all__ = ["ExternalSolver"]

_IO_MODES = ("files", "stdio")

#: Variables passed on to external programs when set (``env`` adds others).
ENV_ALLOW: tuple[str, ...] = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC",
    "TZ", "TERM", "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "SYSTEMROOT",
)  # fmt: skip
_TAG = "DEEPZERO_SOLVER_CALL"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STDERR_TAIL = 64 * 1024  # bytes of a call's stderr kept for its error line; the rest is read and dropped
NPY_SLACK = 64 * 1024  # bytes io="stdio" output may hold beyond a float64 array of the expected shape


def _last_line(text: bytes | str | None) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _substitute(args: Sequence[str], mapping: Mapping[str, str]) -> list[str]:
    out = []
    for a in args:
        a = str(a)
        for key, val in mapping.items():
            a = a.replace("{" + key + "}", val)
        out.append(a)
    return out


class ExternalSolver(Solver):
    """A solver implemented by an external program.

    Args:
        command: argument list of one step, e.g. ``["./stepper", "{input}", "{output}"]``.
        grid: a :class:`Grid` or a mapping of its fields, e.g. ``{"shape": [32, 32], "size": [1, 1]}``;
            ``shape`` alone (a pair) is accepted too.
        channels: names of the state channels.
        timeout: seconds per invocation; the process group is killed when exceeded.
        workdir: working directory of the command and parent of the temporary directories.
        io: ``"files"`` or ``"stdio"`` (see the module docstring).
        init_command: optional argument list that produces an initial state (``{seed}``, ``{output}``).
        initial_state_file: optional ``.npy`` path (``{seed}`` is substituted) for initial states.
        dt: time step of the external code (informative; available as ``{dt}``).
        name: used in error messages.
        env: environment variables for the command on top of :data:`ENV_ALLOW` (``None``: copy it).
        keep_files: keep the per-step temporary directories (for debugging).
        batch: the command steps a whole batch per call (see the module docstring).
    """

    def __init__(
        self,
        command: Sequence[str],
        grid: Grid | Mapping[str, Any] | Sequence[int],
        channels: Sequence[str] = ("u",),
        timeout: float = 60.0,
        workdir: str | os.PathLike | None = None,
        io: str = "files",
        init_command: Sequence[str] | None = None,
        initial_state_file: str | os.PathLike | None = None,
        dt: float = 1.0,
        name: str = "external",
        env: Mapping[str, str] | None = None,
        keep_files: bool = False,
        batch: bool = False,
    ) -> None:
        if isinstance(command, (str, bytes)) or not command:
            raise ValueError(
                "command must be a non-empty argument list (no shell), e.g. ['./solver', '{input}', '{output}']"
            )
        if io not in _IO_MODES:
            raise ValueError(f"io must be one of {_IO_MODES}, got {io!r}")
        self.command = [str(a) for a in command]
        self.grid = _as_grid(grid)
        self.channels = tuple(str(c) for c in channels)
        if not self.channels:
            raise ValueError("channels must not be empty")
        self.timeout = float(timeout)
        self.workdir = Path(workdir) if workdir is not None else None
        self.io = io
        self.init_command = [str(a) for a in init_command] if init_command else None
        self.initial_state_file = str(initial_state_file) if initial_state_file is not None else None
        self.dt = float(dt)
        self.name = str(name)
        self.env = dict(env) if env else None
        self.keep_files = bool(keep_files)
        self.calls = 0
        self.batch_native = bool(batch)

    # -- running the program ----------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        """The allow-listed variables of this process plus ``env`` (``None`` values copied from here)."""
        env = {k: os.environ[k] for k in ENV_ALLOW if k in os.environ}
        for key, value in (self.env or {}).items():
            if value is not None:
                env[key] = str(value)
            elif key in os.environ:
                env[key] = os.environ[key]
        return env

    def _run(self, args: list[str], where: str, stdin: bytes | None, stdout_cap: int | None) -> bytes:
        """Run one call; returns its stdout when `stdout_cap` (the most bytes it may write) is given,
        else stdout goes to /dev/null. Only the last `STDERR_TAIL` bytes of stderr are kept."""
        tag = uuid.uuid4().hex
        env = {**self.environment(), _TAG: tag}
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_cap is not None else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=self.workdir,
                env=env,
                start_new_session=True,  # own process group: a timeout kills children too
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise SolverError(f"{where}: cannot start {args[0]!r}: {exc.strerror or exc}") from None
        err = _Drain(proc.stderr, STDERR_TAIL)
        out = None if stdout_cap is None else _Drain(proc.stdout, stdout_cap, overflow=lambda: _kill_group(proc))
        if stdin is not None:
            threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
        try:
            with _sigterm_raises():
                proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_all(proc, tag)
            raise SolverError(
                f"{where}: timed out after {self.timeout:g} s (process killed): {' '.join(args)[:200]}"
            ) from None
        except _Terminated:
            _kill_all(proc, tag)
            signal.raise_signal(signal.SIGTERM)  # the previous disposition, restored: by default the run dies of it
            raise SolverError(f"{where}: interrupted by SIGTERM (its processes were killed)") from None
        except BaseException:
            _kill_all(proc, tag)
            raise
        _kill_all(proc, tag)  # a successful step's background children too: nothing outlives the call
        if out is not None and out.exceeded:
            raise SolverError(f"{where}: command wrote more than {stdout_cap:,} bytes to stdout, more than a "
                              "float64 .npy of the expected shape (process killed)")
        if proc.returncode != 0:
            tail = _last_line(err.result()) or "(no stderr)"
            raise SolverError(f"{where}: command exited with code {proc.returncode}: {tail}")
        return b"" if out is None else out.result()

    def _call(
        self, where: str, args: Sequence[str], arrays: Mapping[str, np.ndarray], extra: Mapping[str, str],
        shape: tuple[int, ...],
    ) -> np.ndarray:
        """One call of `args`; `shape` is the output's expected shape, which bounds what stdout may hold."""
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"dz_{self.name}_", dir=self.workdir))
        try:
            mapping = {"workdir": str(self.workdir or Path.cwd()), "dt": repr(self.dt), **extra}
            for key, arr in arrays.items():
                path = tmp / f"{key}.npy"
                np.save(path, np.ascontiguousarray(arr, dtype=np.float64))
                mapping[key] = str(path)
            out_path = tmp / "output.npy"
            mapping["output"] = str(out_path)
            stdin = None
            if self.io == "stdio" and "input" in arrays:
                buf = _io.BytesIO()
                np.save(buf, np.ascontiguousarray(arrays["input"], dtype=np.float64))
                stdin = buf.getvalue()
            cap = 8 * int(np.prod(shape)) + NPY_SLACK if self.io == "stdio" else None
            stdout = self._run(_substitute(args, mapping), where, stdin, cap)
            if self.io == "stdio":
                if not stdout:
                    raise SolverError(
                        f"{where}: command wrote nothing to stdout (io='stdio' expects .npy bytes)"
                    )
                source: Any = _io.BytesIO(stdout)
                label = "stdout"
            else:
                if not out_path.exists():
                    raise SolverError(
                        f"{where}: command exited normally but did not write the output file {out_path.name}"
                    )
                source = out_path
                label = out_path.name
            try:
                result = np.load(source, allow_pickle=False)
            except Exception as exc:  # noqa: BLE001 - any parse failure is reported the same way
                raise SolverError(
                    f"{where}: cannot read {label} as .npy ({type(exc).__name__}: {exc})"
                ) from None
            return result
        finally:
            if not self.keep_files:
                shutil.rmtree(tmp, ignore_errors=True)

    # -- Solver API -------------------------------------------------------------------------------
    def step(self, state: np.ndarray, forcing: np.ndarray | None = None, **params: Any) -> np.ndarray:
        self.calls += 1
        where = f"solver {self.name!r} step {self.calls}"
        state = check_state(self.name, state, self.state_shape, step=self.calls, what="input state")
        arrays = {"input": state}
        if forcing is not None:
            arrays["forcing"] = np.asarray(forcing, dtype=np.float64)
        extra = {"step": str(self.calls)}
        extra.update({k: str(v) for k, v in params.items() if isinstance(v, (int, float, str, np.number))})
        out = self._call(where, self.command, arrays, extra, self.state_shape)
        return check_state(self.name, out, self.state_shape, step=self.calls, what="output")

    def step_batch(self, states: np.ndarray, forcing: Any = None, **params: Any) -> np.ndarray:
        """One process call for the whole batch when the command declares ``batch=True``."""
        if not self.batch_native:
            return super().step_batch(states, forcing=forcing, **params)
        self.calls += 1
        where = f"solver {self.name!r} batch step {self.calls}"
        shape = (len(states), *self.state_shape)
        states = check_state(self.name, states, shape, step=self.calls, what="input states")
        arrays = {"input": states}
        if forcing is not None:
            arrays["forcing"] = np.broadcast_to(np.asarray(forcing, dtype=np.float64), shape)
        extra = {"step": str(self.calls)}
        for key, value in params.items():
            if isinstance(value, (int, float, str, np.number)):
                extra[key] = str(value)
            elif value is not None:  # one value per state
                arrays[key] = np.asarray(value, dtype=np.float64).reshape(len(states))
        out = self._call(where, self.command, arrays, extra, shape)
        return check_state(self.name, out, shape, step=self.calls, what="output")

    def initial_state(self, seed: int, **params: Any) -> np.ndarray:
        label = f"initial_state(seed={seed})"
        where = f"solver {self.name!r} {label}"
        if self.init_command:
            extra = {"seed": str(int(seed))}
            extra.update(
                {k: str(v) for k, v in params.items() if isinstance(v, (int, float, str, np.number))}
            )
            out = self._call(where, self.init_command, {}, extra, self.state_shape)
        elif self.initial_state_file:
            path = Path(self.initial_state_file.replace("{seed}", str(int(seed))))
            if not path.exists():
                raise SolverError(f"{where}: initial state file {path} does not exist")
            try:
                out = np.load(path, allow_pickle=False)
            except Exception as exc:  # noqa: BLE001
                raise SolverError(
                    f"{where}: cannot read {path} as .npy ({type(exc).__name__}: {exc})"
                ) from None
            if out.ndim == 4:
                out = out[int(seed) % out.shape[0]]
        else:
            raise SolverError(f"{where}: no init_command or initial_state_file configured")
        return check_state(self.name, out, self.state_shape, step=label, what="initial state")

    def fingerprint(self) -> dict[str, Any]:
        """Adds the command lines and a sha256 of every file they name (the executable, found on
        ``PATH`` or relative to ``workdir``, and arguments that are existing files such as a script):
        rebuilding the program changes the reference-cache key."""
        out = super().fingerprint()
        files = {}
        for args in (self.command, self.init_command or []):
            for i, arg in enumerate(args):
                path = self._resolve(arg, executable=i == 0)
                if path is not None and path.is_file():
                    files[arg] = hashlib.sha256(path.read_bytes()).hexdigest()
        out.update(command=self.command, init_command=self.init_command, io=self.io, files=files)
        return out

    def _resolve(self, arg: str, executable: bool) -> Path | None:
        """The file `arg` names as the program will see it: an executable name is looked up on the
        program's own ``PATH`` (``environment()``, so ``params.env`` counts) with relative entries
        taken from ``workdir``, as ``Popen(env=..., cwd=workdir)`` runs it."""
        base = self.workdir or Path.cwd()
        if executable and os.sep not in arg:
            path_var = self.environment().get("PATH", os.defpath)
            for entry in path_var.split(os.pathsep):
                candidate = base / (entry or ".") / arg
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    return candidate
            return None
        if "{" in arg:
            return None
        path = Path(arg)
        return path if path.is_absolute() else base / path

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(command=self.command, io=self.io, timeout=self.timeout, batch=self.batch_native)
        return d


def _tagged(tag: str) -> list[int]:
    """PIDs of the processes whose environment carries ``_TAG=tag`` (Linux ``/proc``; else none)."""
    needle = f"{_TAG}={tag}".encode()
    found = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry.name))
            except OSError:  # gone, or not ours
                continue
    return found


def _kill_all(proc: subprocess.Popen, tag: str) -> None:
    """Kill the call's process group, then every process still carrying its tag, until none is left.

    Safe after the program exited: its group id cannot be reused while a member lives."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(OSError):
            proc.kill()
    for _ in range(50):
        left = [pid for pid in _tagged(tag) if pid != os.getpid()]
        if not left:
            break
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)


def _feed(pipe: IO[bytes], data: bytes) -> None:
    """Write a call's stdin in a thread (the program may write before it reads); it may exit first."""
    with contextlib.suppress(OSError), pipe:
        pipe.write(data)


class _Drain:
    """Read a pipe to its end in a daemon thread, so a program never blocks on a full pipe, keeping at
    most `limit` bytes: the last ones, or with `overflow` the first ones, calling `overflow` (and
    keeping nothing) once the program writes more. Endless output costs no memory."""

    def __init__(self, pipe: IO[bytes], limit: int, overflow: Callable[[], None] | None = None) -> None:
        self.data, self.limit, self.overflow, self.exceeded = bytearray(), limit, overflow, False
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        with pipe:
            while chunk := os.read(pipe.fileno(), 1 << 16):
                if self.exceeded:
                    continue
                self.data += chunk
                if len(self.data) <= self.limit:
                    continue
                if self.overflow is None:
                    del self.data[: len(self.data) - self.limit]
                else:
                    self.exceeded = True
                    self.data.clear()
                    self.overflow()

    def result(self) -> bytes:
        """What was kept, once the pipe is closed (waits at most 5 s: a child that escaped may hold it)."""
        self.thread.join(5)
        return bytes(self.data)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the parent dies, even by SIGKILL (Linux
    ``PR_SET_PDEATHSIG``; elsewhere a no-op). Only the direct child: its own children are not covered."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Terminated(BaseException):
    """SIGTERM arrived during a call (see `_sigterm_raises`)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a program runs, turn SIGTERM into `_Terminated` so the call's processes are killed first
    (the caller then raises the signal again under the previous disposition: by default the run dies
    of it). In a worker thread, or where SIGTERM is ignored, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, None):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _as_grid(grid: Grid | Mapping[str, Any] | Sequence[int]) -> Grid:
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, Mapping):
        kw = dict(grid)
        if "shape" in kw:
            kw["shape"] = tuple(kw["shape"])
        if "size" in kw:
            kw["size"] = tuple(kw["size"])
        kw.setdefault("boundary", "custom")
        return Grid(**kw)
    return Grid(shape=tuple(grid), boundary="custom")
