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
torch.set_num_threads(1)
x, conv = torch.randn(64, 16, 32, 32), torch.nn.Conv2d(16, 16, 3, padding=1)
with torch.no_grad():
    conv(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # 4 MB activations: glibc trims the freed top of the heap and faults it back
        torch.relu(conv(x)) + x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(opt_out: str, mmap_threshold: str | None = None) -> tuple[str, int]:
    env = {**os.environ, "DEEPZERO_MALLOC_TUNING": opt_out}
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(var, None)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = mmap_threshold
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


ONE_ACTIVATION_PER_STEP = 20 * (64 * 16 * 32 * 32 * 4 // 4096)  # pages: 20 steps x one 4-MB activation


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_thresholds_keep_freed_activations_in_the_heap():
    """With the setting, the 20 steps fault in fewer pages than one activation per step (measured:
    1,054-2,078). glibc's default has a dynamic threshold whose state decides whether it faults (29,314
    in one measurement, 1,064 in another), so the control that shows the count can fail pins the
    mmap threshold at 128 KiB: every activation is mapped and faulted in anew."""
    tuned = page_faults("1")
    control = page_faults("0", mmap_threshold="131072")
    assert tuned[0] == "True" and control[0] == "False"
    assert tuned[1] < ONE_ACTIVATION_PER_STEP < control[1], (tuned, control)


def test_every_cli_run_applies_it_first(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append(1))
    assert cli.main(["no-such-app"]) == cli.USAGE_ERROR
    assert calls == [1]
