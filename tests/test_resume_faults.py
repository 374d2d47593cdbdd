"""Resume rules of `deepzero-task classify`, in process: an interruption (Ctrl-C) at any point of the
loop, then a resume, writes exactly the metrics and the parameters of an uninterrupted run; the
query budget holds across resumes; a resume with a different config is refused; non-finite updates
are never checkpointed; the batched evaluator's tuned chunk sizes survive a resume."""

import json
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import deepzero_apps.engine.batched as batched
import deepzero_apps.tasks.classify.app as classify
import deepzero_apps.trainer.loop as trainer_module
from deepzero_apps.checkpoint import load_checkpoint
from deepzero_apps.cli import main
from deepzero_apps.engine import CGE, RGE, FirstOrder, StagedObjective
from deepzero_apps.trainer import Trainer

TINY = ["data.train_limit=96", "data.test_limit=60", "batch_size=32", "progress=false", "threads=1"]
FAST = ["estimator=rge", "estimator.q=4", "sparsity=random", "sparsity.sparsity=0.5", "sparsity.mask_interval=1"]


def run(run_dir: Path, *overrides: str) -> int:
    return main(["classify", f"hydra.run.dir={run_dir}", *TINY, *overrides])


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field (the only one a resume may change)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def max_delta(a: Path, b: Path) -> float:
    pa, pb = params(a), params(b)
    return max(float((pa[k].double() - pb[k].double()).abs().max()) for k in pa if pa[k].is_floating_point())


def interrupt_on_call(monkeypatch, owner, name: str, at: int) -> None:
    """Raise KeyboardInterrupt (as Ctrl-C would) in the `at`-th call of owner.name."""
    real, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


# ---- interrupted anywhere, resumed: the metrics and parameters of an uninterrupted run -------------


COMMON = [*FAST, "epochs=3", "log_every=1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, one per checkpoint cadence."""
    out = {}
    for every in ("0", "1", "2"):
        d = tmp_path_factory.mktemp(f"straight{every}")
        assert run(d, *COMMON, f"checkpoint_every={every}") == 0
        out[every] = d
    return out


@pytest.mark.parametrize(
    ("every", "owner", "name", "at"),
    [
        ("2", Trainer, "_train_step", 5),  # mid-epoch, after the step-4 checkpoint
        ("1", classify, "evaluate", 1),  # during evaluation right after the epoch's last step was saved
        ("2", classify, "evaluate", 2),
        ("2", trainer_module, "save_checkpoint", 3),  # while writing the epoch-end checkpoint
        ("1", Trainer, "_log", 5),  # while logging
        ("0", Trainer, "_train_step", 2),  # before the first checkpoint: the rerun starts over
    ],
)
def test_interrupted_anywhere_then_resumed_writes_the_uninterrupted_metrics(
    tmp_path, capsys, monkeypatch, straight, every, owner, name, at
):
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, owner, name, at)
        assert run(tmp_path, *COMMON, f"checkpoint_every={every}") == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err, err
    assert run(tmp_path, *COMMON, f"checkpoint_every={every}", "resume=true") == 0
    assert rows(tmp_path) == rows(straight[every])
    assert max_delta(tmp_path, straight[every]) == 0


def test_resumed_epoch_row_counts_the_whole_epoch(tmp_path, monkeypatch, straight):
    """The issue's case: killed mid-epoch, the epoch's train_loss must still average all its steps."""
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, Trainer, "_train_step", 3)
        assert run(tmp_path, *COMMON, "checkpoint_every=1") == 130
    assert run(tmp_path, *COMMON, "checkpoint_every=1", "resume=true") == 0
    epochs = [r for r in rows(tmp_path) if r["kind"] == "epoch"]
    train = [r["loss"] for r in rows(tmp_path) if r["kind"] == "train"]
    assert epochs[0]["train_loss"] == pytest.approx(sum(train[:3]) / 3, rel=1e-12)
    assert [r["step"] for r in rows(tmp_path)] == sorted(r["step"] for r in rows(tmp_path))


# ---- query budget --------------------------------------------------------------------------------


def test_query_budget_holds_across_resumes(tmp_path, monkeypatch):
    budget = 23  # RGE q=4: 5 queries a step, so 4 steps (20) fit and a fifth would exceed
    common = [*COMMON, "checkpoint_every=1", f"query_budget={budget}"]
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, Trainer, "_train_step", 3)
        assert run(tmp_path, *common) == 130
    for _ in range(3):
        assert run(tmp_path, *common, "resume=true") == 0
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["queries"] == 20 and summary["stopped"] == "query budget"
    assert [r["step"] for r in rows(tmp_path) if r["kind"] == "epoch"] == [3, 4]  # one row for the stop
    assert run(tmp_path, *COMMON, "checkpoint_every=1", "query_budget=33", "resume=true") == 0  # a raised budget
    assert json.loads((tmp_path / "summary.json").read_text())["queries"] == 30


@pytest.mark.parametrize(
    "estimator",
    [
        CGE(mu=1e-3),
        CGE(mu=1e-3, scheme="central", evaluator="batched"),
        RGE(q=3),
        RGE(q=None, scheme="central"),
        FirstOrder(),
    ],
    ids=["cge", "cge-central-batched", "rge", "rge-qd-central", "fo"],
)
@pytest.mark.parametrize("sparse", [False, True])
def test_queries_per_step_is_the_counted_cost(estimator, sparse):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    objective = StagedObjective(model, lambda out, b: nn.functional.cross_entropy(out, b[1]))
    batch = (torch.randn(5, 4), torch.randint(0, 2, (5,)))
    coords = torch.tensor([0, 3, 7, 20]) if sparse else None
    predicted = estimator.queries_per_step(objective.coords.dim if coords is None else len(coords))
    estimator.estimate(objective, batch, coords)
    assert objective.counter.queries == predicted


# ---- resume with a different configuration ---------------------------------------------------------


def test_resume_refuses_run_changing_differences(tmp_path, capsys):
    assert run(tmp_path, *FAST, "epochs=1") == 0
    original = (tmp_path / ".hydra" / "config.yaml").read_bytes()
    capsys.readouterr()
    for changed, needle in [
        ("batch_size=16", "batch_size: 32 -> 16"),
        ("seed=1", "seed: 0 -> 1"),
        ("scheduler=constant", "scheduler._target_"),
        ("sparsity.sparsity=0.9", "sparsity.sparsity: 0.5 -> 0.9"),
    ]:
        assert run(tmp_path, *FAST, "epochs=1", "resume=true", *changed.split()) == 2, changed
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "resume_allow_changes" in err, err
    # watching, cadence and budget may change; a deliberate change is allowed explicitly
    assert run(tmp_path, *FAST, "epochs=1", "resume=true", "log_every=3", "checkpoint_every=2", "query_budget=999") == 0
    assert run(tmp_path, *FAST, "epochs=1", "resume=true", "seed=1", "resume_allow_changes=true") == 0
    assert (tmp_path / ".hydra" / "config.yaml").read_bytes() == original
    assert (tmp_path / ".hydra" / "resume-1" / "config.yaml").exists()
    assert "seed: 0" in (tmp_path / "run_config.yaml").read_text()


def test_existing_run_without_resume_is_refused_before_hydra_writes(tmp_path, capsys):
    assert run(tmp_path, *FAST, "epochs=1") == 0
    original = (tmp_path / ".hydra" / "config.yaml").read_bytes()
    assert run(tmp_path, *FAST, "epochs=1", "batch_size=16") == 2
    assert "resume=true" in capsys.readouterr().err
    assert (tmp_path / ".hydra" / "config.yaml").read_bytes() == original


# ---- non-finite updates ------------------------------------------------------------------------------


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "override",
    ["optimizer.lr=nan", "optimizer.lr=1e30", "estimator=cge estimator.mu=1e-30"],
)
def test_non_finite_update_is_never_checkpointed(tmp_path, capsys, override):
    args = ["data.train_limit=64", "epochs=2", "checkpoint_every=1", *override.split()]
    if "estimator=cge" not in override:
        args = ["estimator=rge", "estimator.q=4", *args]
    assert run(tmp_path, *args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite" in err, err
    ckpt = tmp_path / "checkpoint.pt"
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        assert all_finite(state) and f"{ckpt} (step {state['global_step']})" in err, err
    else:
        assert "no checkpoint written" in err
    if override == "optimizer.lr=nan":  # nothing poisoned was kept: a sane resume trains
        assert run(tmp_path, *args[:-1], "optimizer.lr=0.05", "resume=true") == 0


def test_skip_restores_the_pre_step_state_and_limits_skips(tmp_path, capsys):
    base = ["estimator=rge", "estimator.q=4", "epochs=1"]
    assert run(tmp_path / "frozen", *base, "optimizer.lr=0") == 0
    assert run(tmp_path / "skipped", *base, "optimizer.lr=nan", "on_nonfinite=skip", "max_skipped_fraction=1") == 0
    frozen, skipped = params(tmp_path / "frozen"), params(tmp_path / "skipped")
    weights = [k for k in frozen if k.endswith(("weight", "bias"))]
    assert weights and all(torch.equal(frozen[k], skipped[k]) for k in weights)
    assert all_finite(load_checkpoint(tmp_path / "skipped" / "checkpoint.pt"))
    capsys.readouterr()
    assert run(tmp_path / "limited", *base, "optimizer.lr=nan", "on_nonfinite=skip", "max_skipped_fraction=0.5") == 1
    err = capsys.readouterr().err.strip()
    assert "2 of the run's 3 steps skipped" in err and "max_skipped_fraction=0.5" in err and len(err.splitlines()) == 1


# ---- batched evaluator: tuned chunk sizes survive a resume -----------------------------------------


@pytest.fixture
def fake_clock(monkeypatch):
    """A deterministic clock for the batched evaluator's chunk tuning (every call advances 1 s, so
    bigger chunks time faster per coordinate), so two runs tune the same way."""
    clock = types.SimpleNamespace(t=0.0)

    def perf_counter() -> float:
        clock.t += 1.0
        return clock.t

    monkeypatch.setattr(batched, "time", types.SimpleNamespace(perf_counter=perf_counter))


def test_batched_evaluator_resumes_bit_identical(tmp_path, monkeypatch, fake_clock):
    common = ["estimator=cge", "estimator.evaluator=batched", "epochs=2", "checkpoint_every=1", "log_every=1"]
    assert run(tmp_path / "straight", *common) == 0
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, Trainer, "_train_step", 3)
        assert run(tmp_path / "split", *common) == 130
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["evaluator"]["sites"]
    assert run(tmp_path / "split", *common, "resume=true") == 0
    assert max_delta(tmp_path / "straight", tmp_path / "split") == 0
    assert rows(tmp_path / "straight") == rows(tmp_path / "split")
