"""`deepzero-task` under real torchrun processes (gloo, CPU, one thread each, 127.0.0.1 only): a
worker killed mid-run is restarted by torchrun and resumes from the last checkpoint, ending equal
to an uninterrupted single process; two torchrun agents ("nodes") on one host equal one process;
and a rendezvous nobody reaches, ranks with different configs, or a run directory one rank does not
see (the last two with the ranks started as torchrun starts them, without an agent) each end in one
line, within a bounded time."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deepzero_apps.checkpoint import load_checkpoint
from deepzero_apps.cli import main

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
CLASSIFY = [
    "model.depth=1", "data.train_limit=256", "data.test_limit=64", "batch_size=64", "progress=false",
    "estimator.evaluator=reuse", "log_every=1",
]  # fmt: skip
PDE = [
    "method=zo_sol", "solver.reference.resolution=[16,16]", "solver.source.resolution=[8,8]", "data.train_sims=2",
    "data.test_sims=1", "data.steps=4", "unroll=2", "model.width=2", "model.kernel_size=3", "batch_size=2",
    "progress=false", "estimator.evaluator=reuse", "log_every=1",
]  # fmt: skip
TIMEOUT = 600  # seconds any one launch may take on a loaded 2-core host before the test fails


def rank_env(rank: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank `rank` of 2 (one per node) with its store at 127.0.0.1:`port`."""
    return {**ENV, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single(app: str, overrides: list[str], run_dir: Path) -> Path:
    """An uninterrupted single-process run in this test process (one thread, as every test process):
    the reference the ranks must equal, without paying another interpreter's start-up."""
    assert main([app, *overrides, f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall times."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("wall_s", None)
        out.append(record)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Same parameters (bit for bit), query counts, step and metrics rows."""
    sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert (sa["global_step"], sa["queries"]) == (sb["global_step"], sb["queries"])
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert rows(a) == rows(b)


def workers(agent: int) -> dict[int, int]:
    """RANK -> PID of the worker processes a torchrun agent started."""
    out = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                out[rank] = int(pid)
    return out


def kill_mid_run(agent: subprocess.Popen, runs: Path, rank: int, total_steps: int) -> int:
    """SIGKILL worker `rank` once a checkpoint short of the end is on disk; returns its step."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert agent.poll() is None, "torchrun ended before a checkpoint was written"
        assert time.monotonic() < deadline, "no checkpoint written"
        found = list(runs.glob("*/checkpoint.pt")) if runs.exists() else []
        if found:
            step = load_checkpoint(found[0])["global_step"]
            if step > 0:
                assert step < total_steps, "the run ended before the kill"
                os.kill(workers(agent.pid)[rank], signal.SIGKILL)
                return step
        time.sleep(0.01)


def assert_unlocked(run_dir: Path) -> None:
    with open(run_dir / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a process still holds the run


# ---- 1. a lost worker: torchrun restarts the group, the run resumes ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "app, overrides, steps, victim",
    [
        ("classify", [*CLASSIFY, "epochs=2", "checkpoint_every=2"], 8, 1),  # 256 / 64 = 4 steps per epoch
        ("pde", [*PDE, "epochs=2", "checkpoint_every=1"], 6, 0),  # 2 sims x 3 windows / 2 = 3 steps per epoch
    ],
)
def test_killed_worker_is_restarted_and_resumes_to_the_uninterrupted_result(tmp_path, app, overrides, steps, victim):
    """kill -9 of one worker (rank 1 for classify, rank 0, the writer, for pde) after a checkpoint:
    torchrun --max-restarts 1 restarts both ranks, which resume from that checkpoint in the same
    (default, timestamped) run directory without resume=true; parameters, query count and every
    metrics row equal an uninterrupted single process."""
    if app == "pde":
        overrides = [*overrides, f"data.cache_dir={tmp_path / 'cache'}"]
    cwd = tmp_path / "ranks"
    cwd.mkdir()
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "-m", "deepzero_apps.cli", app, *overrides]  # fmt: skip
    agent = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed_at = kill_mid_run(agent, cwd / "runs" / app, victim, steps)
        out, err = agent.communicate(timeout=TIMEOUT)
    finally:
        agent.kill()
    assert agent.returncode == 0, err[-3000:]
    (run_dir,) = (cwd / "runs" / app).iterdir()  # the restart kept the first attempt's directory
    assert "torchrun restart 1: resuming" in out, out
    resumed = re.search(r"resuming from \S+ at epoch \d+, step (\d+)", out)
    assert resumed and int(resumed.group(1)) >= killed_at, out
    assert (run_dir / ".hydra" / "resume-1").is_dir()  # an ordinary resume's files
    assert_unlocked(run_dir)
    assert_same_run(run_dir, single(app, overrides, tmp_path / "single"))


# ---- 2. two torchrun agents ("nodes") on one host ----------------------------------------------------


def readme_multinode_command() -> str:
    """The multi-node torchrun command of the README's distributed section."""
    text = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"^torchrun --nnodes 2 .*$", text, flags=re.M)
    return command


@pytest.mark.slow
def test_two_nodes_on_one_host_equal_one_process(tmp_path):
    """The README's two-node command, run twice on 127.0.0.1 (NODE_RANK 0 and 1, one process each,
    c10d rendezvous): one run directory, and the result equals a single process."""
    port, cwd = free_port(), tmp_path / "nodes"
    cwd.mkdir()
    agents = []
    for node in (0, 1):
        line = readme_multinode_command().replace("$HOST:29500", f"127.0.0.1:{port}")
        line = line.replace("$NODE_RANK", str(node)).replace("$NPROC_PER_NODE", "1")
        line = line.replace("$OVERRIDES", shlex.join([*CLASSIFY, "epochs=1"]))
        assert "$" not in line, line
        cmd = shlex.split(line)
        agents.append(subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=TIMEOUT))
    finally:
        for agent in agents:
            agent.kill()
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    assert sum(out.count("classify done") for out, _ in outputs) == 1, "only rank 0 prints"
    (run_dir,) = (cwd / "runs" / "classify").iterdir()
    assert_same_run(run_dir, single("classify", [*CLASSIFY, "epochs=1"], tmp_path / "single"))


# ---- 3. failures end in one line, within a bounded time ----------------------------------------------


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("deepzero-task classify: error:")]


@pytest.mark.slow
def test_a_rank_nobody_waits_for_ends_in_one_line_within_dist_timeout(tmp_path):
    """Rank 0 of 2 alone (rank 1 cannot reach it), and rank 1 of 2 alone (nothing to reach): each
    stops after dist_timeout with one line naming the address and the cause; nothing is written.
    The two cases run at the same time, on ports of their own."""
    start, procs = time.monotonic(), []
    nobody = socket.socket()  # rank 1's port: bound, never listening (refused), and no other test's to take
    nobody.bind(("127.0.0.1", 0))
    for rank, needle in ((0, "1/2 clients joined"), (1, "trying to connect")):
        port = free_port() if rank == 0 else nobody.getsockname()[1]
        cmd = [sys.executable, "-m", "deepzero_apps.cli", "classify", "dist_timeout=3", *CLASSIFY]
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=rank_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((rank, needle, port, proc))
    try:
        for rank, needle, port, proc in procs:
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 1, stderr[-3000:]
            (line,) = error_lines(stderr)
            assert f"rank {rank} of 2: the process group at 127.0.0.1:{port} did not form within 3 s" in line, line
            assert needle in line, line
    finally:  # a failed or hung case leaves no process behind
        for *_, proc in procs:
            proc.kill()
            proc.wait()
        nobody.close()
    assert time.monotonic() - start < 100
    assert not (tmp_path / "runs").exists()


def test_a_node_that_never_joins_ends_torchruns_rendezvous_within_join_timeout(tmp_path):
    """torchrun's own rendezvous (before any rank exists): node 0 of 2 alone gives up after
    --rdzv-conf join_timeout and exits non-zero, naming the rendezvous timeout."""
    line = readme_multinode_command().replace("$HOST:29500", f"127.0.0.1:{free_port()}")
    line = line.replace("$NODE_RANK", "0").replace("$NPROC_PER_NODE", "1").replace("$OVERRIDES", "")
    cmd = shlex.split(line.replace("--rdzv-backend", "--rdzv-conf join_timeout=3 --rdzv-backend"))
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 100
    assert proc.returncode != 0 and "RendezvousTimeoutError" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def two_ranks(per_rank: list[list[str]], cwds: list[Path]) -> list[tuple[int, str, str]]:
    """Ranks 0 and 1 of 2 started as torchrun starts its workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT
    in the environment; no agent, whose restarts the tests above cover), rank r with overrides
    per_rank[r] run from cwds[r]; returns (returncode, stdout, stderr) of each."""
    port, procs = free_port(), []
    for r, (overrides, cwd) in enumerate(zip(per_rank, cwds)):
        cwd.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "deepzero_apps.cli", "classify", *CLASSIFY, "dist_timeout=60", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=rank_env(r, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


@pytest.mark.slow
def test_ranks_with_different_overrides_end_in_one_line_naming_the_keys(tmp_path):
    results = two_ranks([["epochs=1"], ["epochs=2", "progress=true"]], [tmp_path, tmp_path])
    lines = [line for _, _, err in results for line in error_lines(err)]
    assert lines, results[0][2][-3000:]
    tail = "; launch every rank with the same overrides"
    assert all(line.endswith(f"epochs: 1 -> 2{tail}") for line in lines), lines
    assert all("rank 1's config differs from rank 0's (rank 0 -> rank 1)" in line for line in lines), lines
    assert not (tmp_path / "runs").exists()  # refused before anything is written


@pytest.mark.slow
def test_a_run_directory_one_rank_does_not_see_ends_in_one_line(tmp_path):
    """Each rank runs from its own directory, so the relative run directory is node-local."""
    results = two_ranks([["epochs=1"], ["epochs=1"]], [tmp_path / "node0", tmp_path / "node1"])
    lines = [line for _, _, err in results for line in error_lines(err)]
    assert lines and all("is not shared by every rank: rank 1 on " in line for line in lines), lines
    assert not list((tmp_path / "node0").glob("runs/classify/*/checkpoint.pt"))
