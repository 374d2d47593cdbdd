import pytest
import torch
from servers import digits_model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny ops (extra threads only contend, badly on a loaded
    machine); spawned ranks set one thread each themselves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_model_file(tmp_path_factory):
    """One TorchScript digits classifier per test process, for the tests that serve or query it."""
    return digits_model(tmp_path_factory.mktemp("model") / "digits.pt")
