import os

import pytest
import torch
from servers import digits_model

# One thread per test process and per process a test starts: `-n auto` already runs one test process per
# core, and idle OpenMP threads spin-waiting on a core the other process needs cost the suite ~10 % of
# its wall time. Exported before any test starts a process, so every CLI run, server and torchrun
# worker inherits it.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits_model_file(tmp_path_factory):
    """One TorchScript digits classifier per test process, for the tests that serve or query it."""
    return digits_model(tmp_path_factory.mktemp("model") / "digits.pt")
