"""The shared adapter layer: one rule for reusing saved pruning ratios, one TrainerConfig mapping,
and certify running the sparsity it is asked for."""

import json

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from deepzero_apps.adapter import RATIOS, build_sampler, trainer_config
from deepzero_apps.cli import main
from deepzero_apps.config import SparsityConfig
from deepzero_apps.engine import StagedObjective
from deepzero_apps.models import create_model
from deepzero_apps.tasks.classify import ClassifyConfig
from deepzero_apps.trainer import TrainerConfig


def cfg(sparsity: float, resume: bool = False, method: str = "zo_grasp"):
    sp = SparsityConfig(method=method, sparsity=sparsity, q=2, samples_per_class=2)
    return OmegaConf.create({"sparsity": OmegaConf.structured(sp), "seed": 0, "resume": resume})


def objective():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return StagedObjective(model, lambda out, batch: F.cross_entropy(out, batch[1]))


def examples():
    return torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])


def sampler(tmp_path, config):
    obj = objective()
    before = obj.counter.queries
    s = build_sampler(config, obj, tmp_path, "tiny", F.cross_entropy, examples)
    return s, obj.counter.queries - before


def test_saved_ratios_of_other_settings_are_rescored(tmp_path):
    """A 0.9 file in the run dir and 0.5 asked: scored again (queries spent), file rewritten."""
    s90, scoring = sampler(tmp_path, cfg(0.9))
    assert scoring == 2 * (2 + 1)  # ZO-GraSP: 2 (q + 1) queries
    s50, scoring = sampler(tmp_path, cfg(0.5, resume=True))
    assert scoring > 0 and s50.num_coords > s90.num_coords
    assert json.loads((tmp_path / RATIOS).read_text())["meta"]["sparsity"] == 0.5


def test_saved_ratios_are_reused_only_on_resume_with_the_same_settings(tmp_path):
    first, _ = sampler(tmp_path, cfg(0.9))
    again, scoring = sampler(tmp_path, cfg(0.9, resume=True))
    assert scoring == 0 and again.ratios == first.ratios
    _, scoring = sampler(tmp_path, cfg(0.9, resume=False))
    assert scoring > 0  # a fresh run scores its own model


def test_dense_needs_no_sampler_and_random_no_queries(tmp_path):
    assert sampler(tmp_path, cfg(0.0, method="dense"))[0] is None
    s, scoring = sampler(tmp_path, cfg(0.9, method="random"))
    assert scoring == 0 and s.num_coords < objective().coords.dim


def test_trainer_config_takes_every_shared_field():
    typed = ClassifyConfig(epochs=3, batch_size=7, query_budget=99, on_nonfinite="skip", progress=False)
    tc = trainer_config(typed, resume=True)
    assert tc == TrainerConfig(epochs=3, batch_size=7, query_budget=99, on_nonfinite="skip", progress=False,
                               resume=True)


TINY = [
    "data.train_limit=64", "data.test_limit=40", "eval_limit=40", "classifier.epochs=1", "pretrain.epochs=1",
    "denoiser.depth=3", "denoiser.width=4", "epochs=1", "batch_size=8", "query_budget=null", "finetune_limit=16",
    "sparsity.q=4", "sparsity.samples_per_class=2", "certify.limit=2", "certify.n0=8", "certify.n=16",
    "progress=false",
]  # fmt: skip


def test_certify_runs_the_sparsity_asked_for(tmp_path, capsys):
    """Queries per step: dense CGE over all d denoiser coordinates, random fewer; images count (batch 8)."""
    d = sum(p.numel() for p in create_model("dncnn", channels=1, depth=3, width=4).parameters())
    cache = [f"{k}.cache_dir={tmp_path / 'cache' / k}" for k in ("classifier", "pretrain")]
    per_step = {}
    for choice in ("dense", "random"):
        out = tmp_path / choice
        assert main(["certify", f"hydra.run.dir={out}", *TINY, *cache, f"sparsity={choice}"]) == 0
        (epoch,) = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
        per_step[choice] = epoch["queries_per_step"]
        assert (out / RATIOS).exists() == (choice == "random")
        if choice == "dense":
            assert f"{d} of {d} parameters trainable (every stage), {d + 1} queries of the batch per step" \
                in capsys.readouterr().out
    tensors = len(list(create_model("dncnn", channels=1, depth=3, width=4).parameters()))
    # the batched evaluator's first step also probes the tensors (does the loss read one again?): a few queries each
    assert (d + 1) * 8 <= per_step["dense"] <= (d + 1 + 2 * tensors) * 8
    assert per_step["random"] < per_step["dense"] / 2
