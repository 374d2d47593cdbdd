"""Secrets of a remote black box never reach a file or the terminal: a certify run through a real
`deepzero-task serve` (with a literal token) with credentials in the URLs (userinfo, a literal query
value, a query from the environment) and a literal header; every file of both run directories and
everything both processes printed is searched for each secret."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from servers import Server, cli, free_port

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SECRETS = {
    "token": "tokSecret111",
    "env": "envSecret222",
    "query": "qrySecret333",
    "password": "pwdSecret444",
}
TINY = [
    "data.train_limit=40", "data.test_limit=20", "eval_limit=20", "pretrain.epochs=1", "denoiser.depth=3",
    "denoiser.width=4", "certify.limit=2", "certify.n0=4", "certify.n=16", "progress=false", "method=mse",
]  # fmt: skip


def test_no_secret_is_written_or_printed(tmp_path, digits_model_file):
    server = Server(
        digits_model_file, free_port(), tmp_path / "requests.jsonl", (f"token={SECRETS['token']}",)
    ).start()
    dead = free_port()  # a replica that refuses connections: the run retries on the live one
    urls = (
        f"['http://user:{SECRETS['password']}@127.0.0.1:{dead}/predict',"
        f"'http://127.0.0.1:{server.port}/predict?api_key=${{oc.env:DZ_TEST_KEY}}&x={SECRETS['query']}']"
    )
    run_dir = tmp_path / "run"
    cmd = cli(
        "certify",
        f"hydra.run.dir={run_dir}",
        *TINY,
        f"pretrain.cache_dir={tmp_path / 'pretrain'}",
        "classifier=http",
        f"classifier.url={urls}",
        f"classifier.headers={{Authorization: 'Bearer {SECRETS['token']}'}}",
        "classifier.backoff=0.05",
    )
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "DZ_TEST_KEY": SECRETS["env"]},
        )
    finally:
        server.kill()
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout + proc.stderr + server.out.read_text()
    files = [p for d in (run_dir, tmp_path / "pretrain", server.run_dir) for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "hydra.yaml" for p in files) and any(p.name == "run_config.yaml" for p in files)
    for name, secret in SECRETS.items():
        assert secret not in printed, name
        leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, (name, leaks)
    assert "HTTP Request" not in printed  # httpx's per-request lines
    http = json.loads((run_dir / "summary.json").read_text())["http"]
    # the dead replica's refusals are retries
    assert http["requests"] == len(server.rows()) + http["retries"] and http["retries"] >= 1
    assert "<redacted>" in (run_dir / "run_config.yaml").read_text()


def test_redaction_of_overrides_and_configs():
    from omegaconf import OmegaConf

    from deepzero_apps.redact import redact, redact_override

    assert redact_override("classifier.headers={A: x1, B: y2}") == "classifier.headers=<redacted>"
    assert (
        redact_override("classifier.url=['http://u:p@a/p?k=1,2&key=S','http://b/p?z=3']")
        == "classifier.url=['http://<redacted>@a/p?<redacted>','http://b/p?<redacted>']"
    )
    cfg = OmegaConf.create(
        {
            "token": "t",
            "classifier": {"headers": {"A": "x"}, "url": "https://h/p?k=${oc.env:K}"},
            "hydra": {"job": {"override_dirname": "seed=1,classifier.headers={A: x, B: y}"}},
        }
    )
    assert OmegaConf.to_container(redact(cfg)) == {
        "token": "<redacted>",
        "classifier": {"headers": {"A": "<redacted>"}, "url": "https://h/p?<redacted>"},
        "hydra": {"job": {"override_dirname": "<redacted>"}},
    }
    assert redact(redact(cfg)) == redact(cfg)
