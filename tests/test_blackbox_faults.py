"""A user's black box that raises, answers NaN/inf or the wrong shape, or hangs stops certify with one
line naming it (exit 1), and the three ways in (callable, TorchScript, labels only) run end to end."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn

from deepzero_apps.cli import main

TINY = [
    "data.train_limit=40", "data.test_limit=20", "eval_limit=20", "pretrain.epochs=1", "denoiser.depth=3",
    "denoiser.width=4", "certify.limit=2", "certify.n0=4", "certify.n=16", "progress=false", "method=mse",
]  # fmt: skip
_release = threading.Event()


class Digits(nn.Module):
    """A fixed 8x8 digits classifier ([0, 1] images -> 10 logits) that can be told to misbehave."""

    def __init__(self, fault: str = "none", scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.fault, self.scale = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), fault, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fault == "raise":
            raise RuntimeError("model exploded")
        if self.fault == "hang":
            _release.wait(60)
        logits = self.scale * self.net(x)
        if self.fault == "nonfinite":
            return logits * float("nan")
        if self.fault == "shape":
            return logits[:, :3]
        return logits


def plain_function(x: torch.Tensor) -> torch.Tensor:
    """A classifier that is a plain function, passed with classifier.kwargs={_partial_:true}."""
    return Digits()(x)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return f"pretrain.cache_dir={tmp_path_factory.mktemp('pretrain')}"


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        ("raise", "black box 'classifier' failed: RuntimeError: model exploded"),
        ("nonfinite", "black box 'classifier' returned NaN/inf logits"),
        ("shape", "black box 'classifier' returned shape (20, 3) for a batch of 20, expected (20, 10)"),
        ("hang", "black box 'classifier' timed out after 0.5 s"),
    ],
)
def test_faulty_black_box_stops_the_run_in_one_line(tmp_path, capsys, cache, fault, needle):
    _release.clear()
    try:
        code = main(["certify", f"hydra.run.dir={tmp_path}", *TINY, cache, "classifier=callable",
                     f"classifier.target={__name__}.Digits", f"classifier.kwargs={{fault:{fault}}}",
                     "classifier.timeout=0.5"])
    finally:
        _release.set()
    err = capsys.readouterr().err.strip()
    assert code == 1 and needle in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "way",
    [
        [f"classifier=callable classifier.target={__name__}.Digits classifier.kwargs={{scale:2.0}}"],
        [f"classifier=callable classifier.target={__name__}.plain_function classifier.kwargs={{_partial_:true}}"],
        ["classifier=torchscript", "classifier.output=label"],
    ],
    ids=["callable-kwargs", "plain-function", "torchscript-labels-only"],
)
def test_own_classifier_certifies(tmp_path, cache, way):
    overrides = " ".join(way).split()
    if "classifier=torchscript" in overrides:
        path = tmp_path / "model.pt"
        torch.jit.trace(Digits(), torch.rand(1, 1, 8, 8)).save(str(path))
        overrides.append(f"classifier.path={path}")
    assert main(["certify", f"hydra.run.dir={tmp_path / 'run'}", *TINY, cache, *overrides]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["certify"]["examples"] == 2 and summary["classifier"]["kind"] in ("callable", "torchscript")
