"""A classify run directory as a black box (`classifier=run`), its export, and the first-day path
classify -> serve -> certify over HTTP with real processes, as the README gives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from servers import cli, free_port, wait_until_healthy
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from deepzero_apps import configs
from deepzero_apps.blackbox.run_source import load_run
from deepzero_apps.cli import main
from deepzero_apps.tasks.export.app import load_exported

CLASSIFY = ["mode=fo", "epochs=1", "progress=false", "data.train_limit=64", "data.test_limit=40"]
CERTIFY = [
    "method=mse",
    "data.train_limit=32",
    "data.test_limit=40",
    "eval_limit=20",
    "pretrain.epochs=1",
    "denoiser.depth=3",
    "denoiser.width=4",
    "certify.limit=6",
    "certify.n0=8",
    "certify.n=64",
    "progress=false",
]
# every bundled model
BUNDLED = sorted(p.stem for p in (Path(configs.__file__).parent / "images" / "model").glob("*.yaml"))


def digits_pixels(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """classify's digits test split (seed 0) in [0, 1] pixels, as a user of the black box sends them."""
    d = load_digits()
    _, x, _, y = train_test_split(
        d.images.astype(np.float32) / 16.0, d.target, test_size=0.2, stratify=d.target, random_state=seed
    )
    return torch.from_numpy(x).unsqueeze(1), y


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny first-order classify run per bundled model (digits)."""
    root = tmp_path_factory.mktemp("classify")
    for name in BUNDLED:
        model = [f"model={name}", *(["model.hidden=[16]"] if name == "mlp" else [])]
        assert main(["classify", f"hydra.run.dir={root / name}", *CLASSIFY, *model]) == 0
    return {name: root / name for name in BUNDLED}


def test_a_run_takes_pixel_images_and_gives_the_accuracy_it_reported(tmp_path):
    # model.channels=8 is not the default width: it must come from the run's files
    assert (
        main(
            [
                "classify",
                f"hydra.run.dir={tmp_path}",
                "mode=fo",
                "epochs=1",
                "progress=false",
                "model.channels=8",
            ]
        )
        == 0
    )
    x, y = digits_pixels()
    with torch.no_grad():
        acc = float((load_run(tmp_path)(x).argmax(1).numpy() == y).mean())
    assert acc == json.loads((tmp_path / "summary.json").read_text())["eval"]["test_acc"]


# TorchScript (the default) for every bundled model; torch.export for one of each family (the deeper
# ResNets are the same blocks, and exporting them takes 6-14 s each here).
@pytest.mark.parametrize(
    "name, fmt",
    [(name, "torchscript") for name in BUNDLED]
    + [(name, "export") for name in ("small_cnn", "mlp", "resnet20")],
)
def test_every_bundled_model_exports_to_a_file_that_computes_the_run(runs, tmp_path, name, fmt):
    out = tmp_path / "model.bin"
    assert (
        main(
            [
                "export",
                f"run_dir={runs[name]}",
                f"format={fmt}",
                f"output={out}",
                f"hydra.run.dir={tmp_path / 'export'}",
            ]
        )
        == 0
    )
    module, x = load_exported(out, fmt), digits_pixels()[0][:37]  # a batch size it was not exported with
    with torch.no_grad():
        expected = load_run(runs[name])(x)
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module(x).detach(), expected, rtol=1e-5, atol=1e-5)  # with autograd on too


def test_serve_and_certify_accept_a_run_and_refuse_what_does_not_fit(runs, tmp_path, capsys):
    bad = [
        (["serve", "classifier=train"], "classifier=run classifier.run_dir=DIR"),
        (["certify", "classifier=run", f"classifier.run_dir={tmp_path / 'none'}"], "is not a directory"),
        (["certify", "classifier=run", f"classifier.run_dir={tmp_path}"], "has no input.json"),
        (
            [
                "certify",
                "classifier=run",
                f"classifier.run_dir={runs['small_cnn']}",
                "data.image_size=16",
                *CERTIFY,
            ],
            "takes (1, 8, 8) images of 10 classes (data=digits), but this data gives (1, 16, 16)",
        ),
        (["export", f"run_dir={runs['mlp']}", "format=onnx"], "format='onnx' is unknown"),
    ]
    for i, (argv, needle) in enumerate(bad):
        assert main([*argv, f"hydra.run.dir={tmp_path / str(i)}"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_classify_then_serve_then_certify_over_http_with_real_processes(tmp_path):
    """The README's first day: the server on 127.0.0.1 and the certify run over HTTP each a separate
    `deepzero-task` process. The classify run they are given runs in this process (what they read is its
    run directory; a classify process costs ~10 s of CPU here, and its process is tested where it is killed)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    classify = tmp_path / "classify"
    assert main(["classify", f"hydra.run.dir={classify}", *CLASSIFY]) == 0
    port = free_port()
    server = subprocess.Popen(
        cli(
            "serve",
            "classifier=run",
            f"classifier.run_dir={classify}",
            f"port={port}",
            f"hydra.run.dir={tmp_path / 'serve'}",
        ),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until_healthy(server, port, server.stderr.read)
        certify = subprocess.run(
            cli(
                "certify",
                "classifier=http",
                f"classifier.url=http://127.0.0.1:{port}/predict",
                *CERTIFY,
                f"hydra.run.dir={tmp_path / 'http'}",
            ),
            env=env,
            timeout=300,
            capture_output=True,
            text=True,
        )
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert certify.returncode == 0, certify.stderr
    # The same run loaded in process certifies the same table: what was served is the run's model.
    assert (
        main(
            [
                "certify",
                "classifier=run",
                f"classifier.run_dir={classify}",
                *CERTIFY,
                f"hydra.run.dir={tmp_path / 'local'}",
            ]
        )
        == 0
    )
    http, local = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("http", "local"))
    assert http["certify"]["certified_accuracy"] == local["certify"]["certified_accuracy"]
    assert http["train"]["eval"] == local["train"]["eval"]
    served = [json.loads(line) for line in (tmp_path / "serve" / "requests.jsonl").read_text().splitlines()]
    assert (
        sum(r["images"] for r in served if r["status"] == 200)
        == http["eval_queries"] + http["certify"]["queries"]
    )
