"""One writer per run directory, and resumes that continue the run they name.

A run holds an exclusive `fcntl.flock` on `<run dir>/.lock` from before anything is written until it
ends (the OS drops it when the process dies, even on SIGKILL), so a second process on the same
directory stops with the holder's PID instead of interleaving checkpoints and metrics. Under
torchrun only rank 0 writes, so only rank 0 locks.

At first start a run saves its own config (`run_config.yaml`, unresolved and `redact`ed, so no
secret is written); a resume compares the requested config with it, both redacted. Keys that only change how a run is
watched or where it stops (`RESUME_MAY_CHANGE`) may differ; any other difference is a one-line
error unless `resume_allow_changes=true`. Hydra's own files (`.hydra/*.yaml`) are written here,
redacted, instead of by Hydra (`save_hydra_files`); a resume's go to `.hydra/resume-N/`, so
`.hydra/config.yaml` stays the first start's.

Under torchrun every rank composes its own config from its own command line, and a resume (also
torchrun's automatic one after a lost worker) has every rank read rank 0's checkpoint: the ranks'
configs must agree (`check_ranks_agree`) and the run directory must be one every rank sees
(`check_shared_dir`); both are checked before the run starts.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .checkpoint import atomic_write_text
from .engine.distributed import gather_all, is_main, on_rank0, world_size
from .errors import ConfigError, RunError
from .redact import redact

LOCK = ".lock"
SHARED_CHECK = ".shared_check"  # rank 0's token, looked for by every rank, then removed
RUN_CONFIG = "run_config.yaml"
CHECKPOINT = "checkpoint.pt"
# Keys a resume may change: progress display, threads, logging/checkpoint cadence, how long ranks wait for
# each other, evaluation batch
# size, the budget, the non-finite policy, and how a remote black box is reached (timeouts, retries,
# rate limit, request size: the answers are the same). Everything else changes the run.
RESUME_MAY_CHANGE = frozenset({
    "resume", "resume_allow_changes", "progress", "threads", "log_every", "eval_every", "checkpoint_every",
    "dist_timeout", "eval_batch_size", "query_budget", "on_nonfinite", "max_skipped_fraction",
    "classifier.timeout", "classifier.retries", "classifier.backoff", "classifier.rate_limit",
    "classifier.max_batch", "classifier.max_wait",
})

_POLL_S = 0.2  # how often a waiter looks at a busy lock (and at the chain of holders)
_held: dict[str, int] = {}  # resolved run directory -> file descriptor holding its lock


class RunDirBusy(RunError):
    """Another live process holds the run directory's lock."""


def lock_run_dir(directory: str | os.PathLike, wait: bool = False, timeout: float | None = None) -> None:
    """Take `directory`'s exclusive lock for the rest of this run (idempotent; rank 0 only).

    Creates the directory; raises ConfigError if it cannot exist (a parent is a file), RunError if it
    is not writable. If another process holds it: RunDirBusy naming the holder's PID, or with `wait`
    (a shared cache stage, which the holder is training or restoring) a line naming the holder and a
    wait for it to let go: at most `timeout` seconds, and never in a cycle (RunError naming it): while
    waiting, this process notes in its own lock files what it waits for, so a waiter that finds the
    chain of holders leading back to a directory it holds itself knows nobody will ever let go."""
    if not is_main():
        return
    directory = Path(directory)
    key = str(directory.resolve())
    if key in _held:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, a read-only or missing mount ...
        raise ConfigError(f"run directory {directory} cannot be created: {exc.strerror} ({exc.filename})") from exc
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunError(f"run directory {directory} is not writable: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_note(Path(key))[0]
        if not wait:
            os.close(fd)
            raise RunDirBusy(
                f"{directory} is in use by another run (PID {holder}); wait for it to end or pick another hydra.run.dir"
            ) from None
        _announce_wait(directory, holder)
        try:
            _wait_for(fd, Path(key), timeout)  # Ctrl-C still interrupts the wait
        except BaseException:
            os.close(fd)
            raise
    _note(fd, None)
    _held[key] = fd


def _announce_wait(directory: Path, holder: str) -> None:
    print(f"waiting for {directory}: in use by another run (PID {holder})", flush=True)


def _note(fd: int, waits: Path | None) -> None:
    """Write this process's PID, and the directory it waits for if any, into a lock file it holds."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{'waits ' + str(waits) if waits else ''}\n".encode(), 0)


def _lock_note(directory: Path) -> tuple[str, Path | None]:
    """(holder PID, the directory the holder waits for) as noted in `directory`'s lock file."""
    try:
        lines = (directory / LOCK).read_text(errors="replace").splitlines()
    except OSError:
        return "unknown", None
    holder = lines[0].strip() if lines and lines[0].strip() else "unknown"
    waits = next((Path(ln[6:].strip()) for ln in lines[1:] if ln.startswith("waits ")), None)
    return holder, waits


def _wait_for(fd: int, directory: Path, timeout: float | None) -> None:
    """Poll for `directory`'s lock; RunError on a wait cycle or after `timeout` seconds."""
    for held in _held.values():
        _note(held, directory)
    try:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            chain, current = [], directory
            while current is not None and len(chain) < 16:
                holder, current = _lock_note(current)
                chain.append(f"PID {holder}")
                if current is not None and str(current) in _held:
                    raise RunError(
                        f"deadlock: waiting for {directory}, held by {' -> '.join(chain)}, which waits for "
                        f"{current}, held by this run; give the runs' stage cache_dirs no cross references"
                    )
            if timeout is not None and time.monotonic() - start > timeout:
                raise RunError(f"gave up waiting for {directory} after {timeout:g} s (held by "
                               f"PID {_lock_note(directory)[0]}); retry later or pick another cache_dir")
            time.sleep(_POLL_S)
    finally:
        for held in _held.values():
            _note(held, None)


def release_run_dir(directory: str | os.PathLike) -> None:
    """Drop this process's lock on `directory` before the run ends (a finished stage others may share)."""
    fd = _held.pop(str(Path(directory).resolve()), None)
    if fd is not None:
        os.close(fd)


def release_run_dirs() -> None:
    """Drop every lock this process holds (the end of a run, or of a multirun job)."""
    while _held:
        os.close(_held.popitem()[1])


def hydra_overrides(directory: str | os.PathLike, resume: bool) -> list[str]:
    """What to tell Hydra before it writes into `directory`: a run already there is refused
    without resume=true, and a resume writes Hydra's files to `.hydra/resume-N/`."""
    directory = Path(directory)
    if not (directory / CHECKPOINT).exists():
        return []
    if not resume:
        raise ConfigError(f"{directory / CHECKPOINT} already exists; pass resume=true to continue it or pick another output dir")
    n = 1
    while (directory / ".hydra" / f"resume-{n}").exists():
        n += 1
    return [f"hydra.output_subdir=.hydra/resume-{n}"]


def flat_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config container as `{"a.b.c": value}`."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flat_config(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_changes(saved: DictConfig, requested: DictConfig) -> list[str]:
    """`key: old -> new` for every run-changing difference between two configs (unresolved)."""
    old = flat_config(OmegaConf.to_container(saved, resolve=False))
    new = flat_config(OmegaConf.to_container(requested, resolve=False))
    missing = object()
    return [
        f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}"
        for k in sorted(old.keys() | new.keys())
        if k.split(".", 1)[0] not in RESUME_MAY_CHANGE and k not in RESUME_MAY_CHANGE
        and old.get(k, missing) != new.get(k, missing)
    ]


def check_resume(directory: str | os.PathLike, cfg: DictConfig, allow_changes: bool = False) -> None:
    """At first start save `cfg` as the run's config; on a resume (a checkpoint exists and
    cfg.resume) refuse a run-changing difference from it unless `allow_changes`."""
    if not is_main():
        return
    directory = Path(directory)
    path = directory / RUN_CONFIG
    if cfg.get("resume") and (directory / CHECKPOINT).exists() and path.exists():
        try:
            saved = OmegaConf.load(path)
        except Exception as exc:  # yaml, OS or OmegaConf errors: the file is not a config
            raise ConfigError(f"{path} cannot be read as a config ({exc}); move it away to resume without the check") from exc
        changes = config_changes(redact(saved), redact(cfg))
        if changes and not allow_changes:
            raise ConfigError(
                f"resume=true with a config that differs from the run's ({path}): {'; '.join(changes)}; "
                "pass resume_allow_changes=true to resume with them anyway"
            )
        if changes:
            print(f"resuming with changed config (resume_allow_changes=true): {'; '.join(changes)}")
        return
    try:
        atomic_write_text(path, OmegaConf.to_yaml(redact(cfg)))
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror}") from exc


def save_hydra_files(cfg: DictConfig, hydra_cfg: DictConfig, subdir: str) -> None:
    """Hydra's record of a job (`config.yaml`, `hydra.yaml`, `overrides.yaml` in `subdir` of its run
    directory), written redacted: the CLI sets `hydra.output_subdir=null` so Hydra writes none itself."""
    hydra_cfg = redact(hydra_cfg)
    hydra_cfg.hydra.output_subdir = subdir
    directory = Path(hydra_cfg.hydra.runtime.output_dir) / subdir
    files = {"config.yaml": redact(cfg), "hydra.yaml": hydra_cfg, "overrides.yaml": hydra_cfg.hydra.overrides.task}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, node in files.items():
            atomic_write_text(directory / name, OmegaConf.to_yaml(node))
    except OSError as exc:
        raise RunError(f"cannot write {directory}: {exc.strerror}") from exc


def check_ranks_agree(cfg: DictConfig) -> None:
    """Refuse a run-changing difference between a rank's config and rank 0's (the keys a resume may
    change may differ), on every rank, before anything is written."""
    if world_size() == 1:
        return
    configs = gather_all(OmegaConf.to_container(cfg, resolve=False))
    for r, other in enumerate(configs[1:], 1):
        changes = config_changes(OmegaConf.create(configs[0]), OmegaConf.create(other))
        if changes:
            raise ConfigError(
                f"rank {r}'s config differs from rank 0's (rank 0 -> rank {r}): {'; '.join(changes)}; "
                "launch every rank with the same overrides"
            )


def check_shared_dir(directory: str | os.PathLike, wait: float = 2.0) -> None:
    """Refuse a run directory some rank does not see (a node-local path): rank 0 writes a random token
    there and every rank looks for it, for up to `wait` seconds (a network filesystem's cache)."""
    if world_size() == 1:
        return
    path = Path(directory) / SHARED_CHECK

    def write() -> str:
        token = os.urandom(8).hex()
        try:
            atomic_write_text(path, token)
        except OSError as exc:
            raise RunError(f"cannot write {path}: {exc.strerror}") from exc
        return token

    token = on_rank0(write)
    deadline = time.monotonic() + wait
    while not (seen := _reads(path, token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    views = gather_all((socket.gethostname(), seen))
    on_rank0(lambda: path.unlink(missing_ok=True))
    blind = [f"rank {r} on {host}" for r, (host, ok) in enumerate(views) if not ok]
    if blind:
        raise ConfigError(
            f"run directory {directory} is not shared by every rank: {', '.join(blind)} cannot see rank 0's "
            "files there (a resume, also torchrun's restart, reads rank 0's checkpoint on every rank); "
            "put hydra.run.dir on a filesystem every node mounts at the same path"
        )


def _reads(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False
