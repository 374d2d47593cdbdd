"""The images a run has paid a remote black box for, kept in its run directory across kills and resumes.

A checkpoint restores the counters of its own moment; images bought after it (the interrupted
fine-tuning step, evaluations, the image being certified) were paid all the same. The ledger is an
append-only text file, one ``<account> <images>`` line per call, written and fsync'ed *before*
the images are sent, and answered by a negative line when the call fails (refunding what no server
answered): a run killed at any moment has on disk every image a server may have charged. A restarted run's counters
(and the budget checks on them) start from it, so those images are counted as spent, never re-bought
uncounted. Under torchrun each rank appends to its own file; the paid total sums them all.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..engine.distributed import rank

LEDGER = "queries.ledger"
TORN = b" torn\n"  # ends a line a kill cut short with a third field, so that it is never read


class QueryLedger:
    """Append-only, fsync'ed record of the images paid per account (e.g. ``train``, ``eval``, ``certify``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / (LEDGER if rank() == 0 else f"{LEDGER}.{rank()}")

    def paid(self, account: str) -> int:
        """Images charged to `account` by every rank so far."""
        total = 0
        for path in sorted(self.run_dir.glob(f"{LEDGER}*")):
            for line in path.read_text().split("\n")[:-1]:  # an unterminated last line is torn
                fields = line.split()
                if len(fields) == 2 and fields[0] == account and fields[1].lstrip("-").isdigit():
                    total += int(fields[1])
        return total

    def record(self, account: str, images: int) -> None:
        """Append `images` (negative: a refund) to `account`, fsync'ed before returning. A line torn by a
        kill mid-write (its images were not sent yet) is closed with a marker that makes it unreadable."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            os.write(fd, (TORN if torn else b"") + f"{account} {images}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
