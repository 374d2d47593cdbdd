"""Sharded CGE and RGE: 2 gloo ranks and 1 process take bit-identical optimizer steps."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from deepzero_apps.engine import (
    CGE,
    RGE,
    BatchedEvaluator,
    ShardedEvaluator,
    StagedObjective,
    init_distributed,
    make_evaluator,
    on_rank0,
    rank,
    world_size,
)
from deepzero_apps.errors import ConfigError
from deepzero_apps.models import create_model

STEPS = 3




def ce(out, b):
    return F.cross_entropy(out, b[1])


def initial_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", depth=2, in_channels=1, num_classes=10, channels=6).double()


def train(config: str, sharded: bool = True) -> dict[str, torch.Tensor]:
    """3 SGD steps of one estimator configuration on a small CNN, fixed seed and batch; the state
    dict plus the query count under "queries"."""
    model = initial_model()
    g = torch.Generator().manual_seed(1)
    b = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    obj = StagedObjective(model, ce)
    ran = []  # losses this process computed itself (the counter holds the total over ranks)
    loss_fn = obj.loss_fn
    obj.loss_fn = lambda *a: ran.append(1) or loss_fn(*a)
    if config == "rge":  # directions dealt over the ranks
        est = RGE(q=7, mu=5e-3, evaluator=ShardedEvaluator("reuse"), seed=3)
    else:
        # The batched evaluator with a fixed chunk: a timed one may pick another K per run, which
        # changes float rounding.
        evaluator = BatchedEvaluator(chunk=4) if config == "batched" else make_evaluator(config)
        est = CGE(mu=5e-3, evaluator=ShardedEvaluator(evaluator) if sharded else evaluator)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(STEPS):
        opt.zero_grad()
        est.estimate(obj, b, step=step)
        opt.step()
    return {**model.state_dict(), "queries": torch.tensor(obj.counter.queries), "ran": torch.tensor(len(ran))}


CONFIGS = ("reuse", "batched", "rge")


def _worker(r: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        assert (rank(), world_size()) == (r, world)
        for config in CONFIGS:
            torch.save(train(config), os.path.join(out, f"{config}{r}.pt"))
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
    """Same parameters and the same (total) query count on every rank as in one process."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for config in CONFIGS:
        ranks = [torch.load(tmp_path / f"{config}{r}.pt") for r in range(2)]
        single = train(config)
        ran = [int(r.pop("ran")) for r in (*ranks, single)]
        assert 0 < ran[0] < ran[2] and 0 < ran[1] < ran[2], f"{config}: queries not split {ran}"
        assert_identical(ranks[0], ranks[1])
        assert_identical(ranks[0], single)
        assert not torch.equal(single["0.0.weight"], initial_model().state_dict()["0.0.weight"])


def test_single_process_is_the_inner_evaluator():
    assert world_size() == 1
    assert_identical(train("batched"), train("batched", sharded=False))


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


def _rank0_fails(r: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    init_distributed("cpu", timeout=60)
    try:
        assert on_rank0(lambda: rank() + 10) == 10  # rank 0's result on every rank
        try:
            on_rank0(lambda: (_ for _ in ()).throw(ConfigError(f"only rank {rank()} ran this")))
        except ConfigError as exc:
            with open(os.path.join(out, f"{r}.txt"), "w") as f:
                f.write(str(exc))
    finally:
        dist.destroy_process_group()


def test_a_failure_on_rank_0_is_raised_on_every_rank(tmp_path):
    """on_rank0: rank 0's exception (type and message) reaches the other ranks instead of leaving
    them waiting at the next collective."""
    mp.spawn(_rank0_fails, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"{r}.txt").read_text() for r in range(2)] == ["only rank 0 ran this"] * 2
