"""The allocator setting every `deepzero-task` run applies at start-up, and its opt-out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deepzero_apps import cli

FAULTS = """
import resource, torch
from deepzero_apps.allocator import tune_malloc
applied = tune_malloc()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # 64 MB, above glibc's largest dynamic mmap threshold (32 MB): mmap'ed each time
    torch.empty(2**23).fill_(1.0)  # unless the thresholds keep freed memory in the heap
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(opt_out: str) -> tuple[str, int]:
    env = {**os.environ, "DEEPZERO_MALLOC_TUNING": opt_out}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_thresholds_keep_freed_activations_in_the_heap():
    tuned, default = page_faults("1"), page_faults("0")
    assert tuned[0] == "True" and default[0] == "False"
    assert tuned[1] * 2 < default[1], (tuned, default)  # 64 MB of fresh pages faulted in per tensor


def test_every_cli_run_applies_it_first(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append(1))
    assert cli.main(["no-such-app"]) == cli.USAGE_ERROR
    assert calls == [1]
