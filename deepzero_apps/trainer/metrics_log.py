"""`metrics.jsonl`: one JSON record a line, appended as the run goes and cut back on resume to exactly
the rows its checkpoint covers, so a resumed run writes what an uninterrupted one writes."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..errors import ConfigError, RunError

METRICS = "metrics.jsonl"


class MetricsLog:
    """The run's metrics file plus the loggers beside it (`sinks`: deepzero_apps.loggers)."""

    def __init__(self, path: Path, sinks: Sequence[Callable[[dict], None]] = ()):
        self.path, self.sinks = Path(path), tuple(sinks)
        self.rows = 0  # rows written so far (checkpointed)

    def append(self, record: dict, on_disk: Callable[[], str]) -> None:
        """Write one record; `on_disk()` names the checkpoint a write failure leaves."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise RunError(f"cannot write {self.path}: {exc.strerror or exc}; {on_disk()}") from exc
        self.rows += 1
        for sink in self.sinks:
            sink(record)

    def truncate(self, rows: int | None, step: int) -> None:
        """Keep exactly the `rows` the checkpoint covers (rewritten atomically): rows written after it are
        written again by the resumed run. Checkpoints without a row count keep records of steps <= `step`."""
        try:
            text = self.path.read_bytes().decode() if self.path.exists() else ""
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.path} is not UTF-8 text (byte {exc.start}); move it away to resume") from exc
        lines = text.splitlines(keepends=True)
        complete = [line for line in lines if line.endswith("\n")]
        kept = []
        for i, line in enumerate(complete if rows is None else complete[:rows], 1):
            record = metrics_record(line)
            if record is None:
                raise ConfigError(
                    f"{self.path} line {i} is not a metrics record: {line.strip()[:60]!r}; move it away to resume"
                )
            if rows is not None or record["step"] <= step:
                kept.append(line)
        self.rows = len(kept)
        if kept != lines:
            try:
                atomic_write_text(self.path, "".join(kept))
            except OSError as exc:
                raise RunError(f"cannot rewrite {self.path}: {exc.strerror or exc}") from exc


def metrics_record(line: str) -> dict | None:
    """The record on a metrics.jsonl line, or None if the line is not one (a kind and an integer step)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("kind"), str)
    return record if ok and isinstance(record.get("step"), int) and not isinstance(record["step"], bool) else None
