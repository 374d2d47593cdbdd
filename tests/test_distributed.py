"""Sharded CGE: 2 gloo ranks and 1 process take bit-identical optimizer steps."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from deepzero_apps.engine import (
    CGE,
    BatchedEvaluator,
    ShardedEvaluator,
    StagedObjective,
    init_distributed,
    make_evaluator,
    rank,
    world_size,
)
from deepzero_apps.models import create_model

STEPS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: extra threads only contend; the spawned ranks use one thread each too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ce(out, b):
    return F.cross_entropy(out, b[1])


def initial_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", depth=2, in_channels=1, num_classes=10, channels=6).double()


def train(inner: str, chunk: int | None = None, sharded: bool = True) -> dict[str, torch.Tensor]:
    """3 SGD steps of CGE on a small CNN, fixed seed and batch."""
    model = initial_model()
    g = torch.Generator().manual_seed(1)
    b = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    evaluator = BatchedEvaluator(chunk=chunk) if inner == "batched" else make_evaluator(inner)
    if sharded:
        evaluator = ShardedEvaluator(evaluator)
    obj, est = StagedObjective(model, ce), CGE(mu=5e-3, evaluator=evaluator)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(STEPS):
        opt.zero_grad()
        est.estimate(obj, b, step=step)
        opt.step()
    return model.state_dict()


# The reuse loop and the batched evaluator inside the shards (a fixed chunk: a timed one may pick
# another K per run, which changes float rounding).
CONFIGS = (("reuse", None), ("batched", 4))


def _worker(r: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    init_distributed()
    try:
        assert (rank(), world_size()) == (r, world)
        for inner, chunk in CONFIGS:
            torch.save(train(inner, chunk), os.path.join(out, f"{inner}{r}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for inner, chunk in CONFIGS:
        ranks = [torch.load(tmp_path / f"{inner}{r}.pt") for r in range(2)]
        single = train(inner, chunk)
        assert_identical(ranks[0], ranks[1])
        assert_identical(ranks[0], single)
        assert not torch.equal(single["0.0.weight"], initial_model().state_dict()["0.0.weight"])


def test_single_process_is_the_inner_evaluator():
    assert world_size() == 1
    assert_identical(train("batched", 4), train("batched", 4, sharded=False))


def test_cuts_balance_measured_cost():
    """Two tensors, the second 3x as expensive per coordinate: the cut lands where time is equal."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 10, bias=False), torch.nn.Linear(10, 10, bias=False))
    obj = StagedObjective(model, lambda out, b: out.sum())
    ev = ShardedEvaluator("reuse")
    ev.seconds = {"0.weight": 1.0, "1.weight": 3.0}
    cuts = ev.cuts(obj, torch.arange(200), 2)
    assert cuts.tolist() == [0, 133, 200]  # 100 * 1 + 33 * 3 ~ 67 * 3
    ev.seconds = {"0.weight": 2.0}  # untimed tensors are predicted from stage_cost, scaled to the timed
    assert ev.cost(obj).tolist() == [2.0, 2.0 * obj.stage_cost(1) / obj.stage_cost(0)]
