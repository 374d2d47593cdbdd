"""The project's two kinds of failure, so one boundary (the CLI) can report each in one line.

`ConfigError`: the user asked for something that cannot work (exit code 2, before any work).
`RunError`: a run failed while working (a black box, a solver, a file, a non-finite step; exit 1).
Subsystems subclass these instead of inventing parallel hierarchies; `one_line` is the single way a
message is flattened for the terminal.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names it."""


class RunError(RuntimeError):
    """A run failed while working; the message names what failed and what is still on disk."""


def one_line(exc: BaseException | str) -> str:
    """The message of ``exc`` with every run of whitespace collapsed (never empty)."""
    text = " ".join(str(exc).split())
    return text or (type(exc).__name__ if isinstance(exc, BaseException) else "")
