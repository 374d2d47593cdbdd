"""Remote black boxes: certify through a real `deepzero-task serve` process (FastAPI + uvicorn) on 127.0.0.1.

Against the in-process black box (same TorchScript file, same seed) the certified table is the same;
the server's request log counts exactly the images the run was charged for, also across server
deaths and SIGKILLs of the run; a server killed mid-run stops the run with one line.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from servers import Server, cli, free_port

from deepzero_apps.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

RUN = [
    "data.train_limit=64", "data.test_limit=40", "eval_limit=40", "pretrain.epochs=1", "denoiser.depth=3",
    "denoiser.width=4", "epochs=50", "batch_size=8", "query_budget=2500", "sparsity.q=4",
    "sparsity.samples_per_class=2", "certify.limit=6", "certify.n0=8", "certify.n=64", "progress=false",
    "estimator.evaluator=reuse", "checkpoint_every=1", "log_every=1", "method=deepzero",
]  # fmt: skip


@pytest.fixture(scope="module")
def _server(digits_model_file, tmp_path_factory):
    s = Server(digits_model_file, free_port(), tmp_path_factory.mktemp("serve") / "requests.jsonl").start()
    yield s
    s.kill()


@pytest.fixture
def server(_server):
    """One server process for the module (each start costs ~4 s of CPU): tests run one at a time in a
    process and count the log's rows from `server.mark()` on; a test that kills it starts it again
    on the same port, and so does this fixture if a failed test left it dead."""
    if _server.proc.poll() is not None:
        _server.start()
    return _server


@pytest.fixture(scope="module")
def runs(digits_model_file, _server, tmp_path_factory):
    """One in-process run and one through the server (uninterrupted), sharing the pretrained denoiser;
    the server's rows for the second."""
    root = tmp_path_factory.mktemp("runs")
    cache = f"pretrain.cache_dir={root / 'pretrain'}"
    assert (
        main(
            [
                "certify",
                f"hydra.run.dir={root / 'local'}",
                *RUN,
                cache,
                "classifier=torchscript",
                f"classifier.path={digits_model_file}",
            ]
        )
        == 0
    )
    server = _server if _server.proc.poll() is None else _server.start()
    since = server.mark()
    assert main(["certify", *http_run(root / "http", cache, server.url)]) == 0
    return root, cache, server.rows(since), server.url


def http_run(run_dir: Path, cache: str, url: str) -> list[str]:
    """The certify arguments of a run in `run_dir` against the server at `url`."""
    return [
        f"hydra.run.dir={run_dir}",
        *RUN,
        cache,
        "classifier=http",
        f"classifier.url={url}",
        "classifier.max_batch=1024",
    ]


def table(run_dir: Path) -> list[list[str]]:
    """The certified rows without their wall time."""
    rows = [line.split("\t") for line in (run_dir / "certify.tsv").read_text().splitlines()]
    keep = [i for i, h in enumerate(rows[0]) if h != "time"]
    return [[r[i] for i in keep] for r in rows]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_http_black_box_certifies_like_the_in_process_one_and_the_server_counts_the_budget(runs):
    root, _, served, url = runs
    local, http = summary(root / "local"), summary(root / "http")
    assert table(root / "http") == table(root / "local")
    assert http["certify"]["certified_accuracy"] == local["certify"]["certified_accuracy"]
    # the budget is checked before a step
    assert 0 < http["train"]["queries"] == local["train"]["queries"] <= 2500
    assert http["train"]["http"]["retries"] == http["train"]["http"]["retried_images"] == 0
    assert http["http"]["requests"] == len(served) and http["http"]["retries"] == 0
    charged = http["train"]["queries"] + http["eval_queries"] + http["certify"]["queries"]
    assert sum(r["images"] for r in served if r["status"] == 200) == charged
    assert http["classifier"] == {"kind": "http", "output": "logits", "source": url}


def test_server_killed_mid_run_stops_in_one_line_and_resume_loses_nothing(runs, server):
    root, cache, _, _ = runs
    since = server.mark()
    run_dir = root / "killed"
    args = http_run(run_dir, cache, server.url)
    cmd = cli("certify", *args, "classifier.retries=1", "classifier.backoff=0.05")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while (
            not (run_dir / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        server.kill()
        _, err = proc.communicate(timeout=300)
    finally:
        server.kill()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert f"black box at {server.url} failed after 2 attempts; last error: Connect" in line, err
    assert "Traceback" not in err
    server.start()  # the same port and request log
    assert main(["certify", *args, "resume=true"]) == 0
    assert _charged(run_dir) == paid(run_dir)  # the failed requests were refunded
    # The server logs an answer just before sending it: a SIGKILL between the two leaves one answered
    # request the run never received (nor paid for) and asks again on resume. No client can tell it apart
    # from a request the server never saw, so that one request, and nothing else, may be logged twice.
    killed_rows = server.rows(since)[: server.first_row - since]
    unreceived = server.images(since) - _charged(run_dir)
    assert unreceived == 0 or (unreceived == killed_rows[-1]["images"] and killed_rows[-1]["status"] == 200)
    done, reference = summary(run_dir)["train"]["queries"], summary(root / "http")["train"]["queries"]
    assert reference <= done <= 2500  # images answered in the step the server died in stay counted
    if done == reference:  # none were: the run ends as if nothing had happened
        assert table(run_dir) == table(root / "http")


def paid(run_dir: Path, account: str | None = None) -> int:
    """Images in the run's query ledger (every account by default)."""
    ledger = run_dir / "queries.ledger"
    assert ledger.is_file(), f"no query ledger in {run_dir}"
    return sum(
        int(images)
        for name, images in (line.split() for line in ledger.read_text().splitlines())
        if account in (None, name)
    )


def checkpointed(run_dir: Path) -> int:
    """The fine-tuning black box's image count in the run's last checkpoint (0 before the first)."""
    path = run_dir / "checkpoint.pt"
    return int(torch.load(path, weights_only=True)["extra"]["blackbox"]["queries"]) if path.exists() else 0


def _kill_settled(cmd: list[str], ready, server: Server, since: int, run_dir: Path) -> None:
    """Start the run and SIGKILL it once `ready()` holds, stopped (SIGSTOP) at a moment when no request
    is in flight: the server has answered (in its rows from `since` on) every image in the run's ledger,
    so counts compare exactly."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not ready():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        while True:
            proc.send_signal(signal.SIGSTOP)
            for _ in range(20):  # a request sent just before the stop is answered meanwhile
                if server.images(since) == paid(run_dir):
                    return
                time.sleep(0.005)
            proc.send_signal(signal.SIGCONT)  # stopped between its ledger line and sending: let it go on
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.communicate()


def _charged(run_dir: Path) -> int:
    """Every image the finished run reports it paid: fine-tuning (labels, scoring, steps), evaluations, certification."""
    done = summary(run_dir)
    return done["train"]["queries"] + done["eval_queries"] + done["certify"]["queries"]


def test_a_run_killed_while_certifying_buys_nothing_twice_on_resume(runs, server):
    """A resume used to label the training images again and certify every image again, uncounted
    (84,552 images at the server vs 62,384 in the summary): now the finished rows are kept and the
    images of the one being certified when the run died are counted as spent."""
    root, cache, served, _ = runs
    uninterrupted = sum(r["images"] for r in served if r["status"] == 200)
    since = server.mark()
    run_dir = root / "twice"
    args = http_run(run_dir, cache, server.url)
    partial = run_dir / "certify.tsv.partial"
    example = 8 + 64  # certify.n0 + certify.n

    def mid_image() -> bool:  # two images certified, the third one partly
        rows = len(partial.read_text().splitlines()) - 1 if partial.exists() else 0
        return rows >= 2 and paid(run_dir, "certify") > rows * example

    _kill_settled(cli("certify", *args), mid_image, server, since, run_dir)
    lost = paid(run_dir, "certify") - (len(partial.read_text().splitlines()) - 1) * example
    assert 0 < lost <= example
    assert main(["certify", *args, "resume=true"]) == 0
    bought = server.images(since)
    assert table(run_dir) == table(root / "http")
    done, reference = summary(run_dir), summary(root / "http")
    assert done["train"]["queries"] == reference["train"]["queries"] <= 2500
    assert done["certify"]["queries"] == reference["certify"]["queries"] + lost  # paid, so counted
    assert bought == _charged(run_dir) == paid(run_dir) == uninterrupted + lost


def test_kills_mid_step_and_mid_certification_leave_the_server_count_equal_to_the_runs(runs, server):
    """The images of a fine-tuning step cut short after the last checkpoint used to be bought again
    on resume, uncounted (server 3,568 images vs summary 2,696): now they are counted as spent, the
    budget included, across a kill in each phase."""
    root, cache, _, _ = runs
    since = server.mark()
    run_dir = root / "steps"
    args = http_run(run_dir, cache, server.url)
    cmd = cli("certify", *args)
    partial = run_dir / "certify.tsv.partial"
    _kill_settled(
        cmd,
        lambda: checkpointed(run_dir) > 0 and paid(run_dir, "train") > checkpointed(run_dir),
        server,
        since,
        run_dir,
    )
    assert paid(run_dir, "train") > checkpointed(run_dir)  # a step's images bought after the checkpoint
    _kill_settled(
        [*cmd, "resume=true"],
        lambda: partial.exists() and paid(run_dir, "certify") > 0,
        server,
        since,
        run_dir,
    )
    assert main(["certify", *args, "resume=true"]) == 0
    bought = server.images(since)
    done = summary(run_dir)
    assert done["train"]["queries"] <= 2500 and done["certify"]["examples"] == 6
    assert bought == _charged(run_dir) == paid(run_dir)
