"""Trainable subsets (issue #26): the gradient on a subset is autograd's, every evaluator agrees with the
reference loop, frozen parameters stay untouched, stages before the first trainable one run once per
step, and sparsity scores only the subset."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from deepzero_apps.adapter import build_sampler
from deepzero_apps.engine import CGE, StagedObjective, in_subset, select_parameters
from deepzero_apps.models import ResidualAdapter, create_model

SUBSETS = {
    "last": ("last", 2),
    "norm": ("norm", 1),
    "pattern": (["1.layer.0.*", "3.*"], 1),
}


def problem(adapter: bool = False) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A float64 DnCNN (depth 4: stages 0..3) in eval mode, optionally followed by a residual adapter
    whose weights are moved off the identity (so every coordinate has a gradient), a classifier loss."""
    model = create_model("dncnn", channels=2, depth=4, width=3)
    if adapter:
        model = nn.Sequential(*model, ResidualAdapter(2, kernel_size=3))
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():  # BatchNorm statistics and affine parameters off their defaults
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
        if adapter:
            model[-1].conv.weight.normal_(0, 0.1), model[-1].conv.bias.normal_(0, 0.1)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double()
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64)
    return model, classifier, (x, torch.tensor([0, 1, 2, 0]))


def objective(model: nn.Module, classifier: nn.Module, names: list[str], calls: list[int] | None = None) -> StagedObjective:
    def loss(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if calls is not None:
            calls.append(len(out))
        return F.cross_entropy(classifier(out), batch[1])

    return StagedObjective(model, loss, trainable=in_subset(names))


def test_named_subsets_select_the_right_parameters_and_bad_ones_name_themselves():
    model = create_model("dncnn", channels=3, depth=4, width=8)
    names = [n for n, _ in model.named_parameters()]
    assert select_parameters(model, "all") == names
    assert select_parameters(model, "last") == ["3.layer.weight"]
    assert select_parameters(model, "last", 2) == ["2.layer.0.weight", "2.layer.1.weight", "2.layer.1.bias", "3.layer.weight"]
    assert select_parameters(model, "norm") == [n for n in names if ".layer.1." in n]  # the BatchNorm affines
    assert select_parameters(model, ["0.*", "3.layer.weight"]) == ["0.layer.0.weight", "0.layer.0.bias", "3.layer.weight"]
    with pytest.raises(ValueError, match="unknown parameter subset 'bogus'"):
        select_parameters(model, "bogus")
    with pytest.raises(ValueError, match="last=5 must be between 1 and the model's 4 stages"):
        select_parameters(model, "last", 5)
    with pytest.raises(ValueError, match="pattern '9.\\*' matches none"):
        select_parameters(model, ["0.*", "9.*"])
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(nn.Sequential(nn.Conv2d(1, 1, 1)), "norm")


def test_adapter_starts_as_the_identity():
    model, _, (x, _) = problem()
    adapted = nn.Sequential(*model, ResidualAdapter(2, kernel_size=3).double()).eval()
    assert torch.equal(adapted(x), model(x))
    with pytest.raises(ValueError, match="odd kernel_size"):
        ResidualAdapter(3, kernel_size=2)


@pytest.mark.parametrize("evaluator", ["reference", "reuse", "batched"])
@pytest.mark.parametrize("subset", [*SUBSETS, "adapter"])
def test_cge_on_a_subset_is_autograd_and_the_reference_loop_and_leaves_the_rest_frozen(subset, evaluator):
    model, classifier, batch = problem(adapter=subset == "adapter")
    if subset == "adapter":
        names = ["4.conv.weight", "4.conv.bias"]
    else:
        names = select_parameters(model, *SUBSETS[subset])
    params = dict(model.named_parameters())
    exact = torch.autograd.grad(F.cross_entropy(classifier(model(batch[0])), batch[1]), [params[n] for n in names])
    exact = torch.cat([g.flatten() for g in exact])
    before = {n: p.detach().clone() for n, p in params.items()}

    obj = objective(model, classifier, names)
    assert [b.name for b in obj.coords.blocks] == names
    CGE(mu=1e-6, scheme="central", evaluator=evaluator).estimate(obj, batch)
    estimate = torch.cat([b.param.grad.flatten() for b in obj.coords.blocks])
    assert F.cosine_similarity(estimate, exact, dim=0) >= 0.999
    assert torch.allclose(estimate, exact, atol=1e-6)

    reference = objective(model, classifier, names)
    for p in model.parameters():
        p.grad = None
    CGE(mu=1e-6, scheme="central", evaluator="reference").estimate(reference, batch)
    assert torch.allclose(estimate, torch.cat([b.param.grad.flatten() for b in reference.coords.blocks]), rtol=0, atol=1e-9)
    assert all(params[n].grad is None for n in params if n not in names)  # frozen: no gradient written
    assert all(torch.equal(p, before[n]) for n, p in params.items())  # and every weight restored


@pytest.mark.parametrize("evaluator", ["reuse", "batched"])
def test_stages_before_the_first_trainable_one_run_once_per_step(evaluator):
    model, classifier, batch = problem()
    runs = [0] * len(model)
    for i, stage in enumerate(model):
        stage.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    names = select_parameters(model, "last", 2)  # stages 2 and 3
    obj = objective(model, classifier, names)
    estimator = CGE(evaluator=evaluator)
    estimator.estimate(obj, batch, step=0)  # the first step also measures each stage's cost once
    for step in (1, 2):
        runs[:] = [0] * len(model)
        estimator.estimate(obj, batch, step=step)
        assert runs[0] == runs[1] == 1, (step, runs)  # the base query only
        assert runs[2] > 1


def test_batched_sends_the_loss_only_the_queries_it_counts():
    # The batched evaluator checked its trace of the last stage by calling the loss: one uncounted black-box
    # query per step. After the first step (which checks once per tensor whether the loss reads it), a step
    # calls the loss exactly queries_per_step times.
    model, classifier, batch = problem(adapter=True)
    calls: list[int] = []
    obj = objective(model, classifier, ["4.conv.weight", "4.conv.bias"], calls)
    estimator = CGE(evaluator="batched")
    estimator.estimate(obj, batch, step=0)
    calls.clear()
    estimator.estimate(obj, batch, step=1)
    assert len(calls) == estimator.queries_per_step(obj.coords.dim) == 2 * 2 * 3 * 3 + 2 + 1


@pytest.mark.parametrize("method", ["zo_grasp", "random"])
def test_sparsity_scores_only_the_trainable_subset(tmp_path, method):
    model, classifier, batch = problem()
    names = select_parameters(model, "last", 2)
    obj = objective(model, classifier, names)
    cfg = OmegaConf.create({"seed": 0, "resume": False, "sparsity": {
        "method": method, "sparsity": 0.5, "ordering": "magnitude", "ratios": None, "q": 4, "mu": 5e-3,
        "samples_per_class": 1, "mask_interval": 1, "dense_unscored": True}})
    sampler = build_sampler(cfg, obj, tmp_path, "dncnn", lambda out, y: F.cross_entropy(classifier(out), y),
                            lambda: batch)
    assert set(sampler.ratios) == {"2.layer.0.weight", "3.layer.weight"}
    coords = sampler.coords(0)
    assert coords.max() < obj.coords.dim and sampler.num_coords < obj.coords.dim
    saved = OmegaConf.load(tmp_path / "ratios.json")
    assert list(saved.meta.trainable) == ["2.layer.0.weight", "3.layer.weight"]
    norm = objective(model, classifier, select_parameters(model, "norm"))
    dense = build_sampler(cfg, norm, tmp_path / "norm", "dncnn", lambda out, y: F.cross_entropy(classifier(out), y),
                          lambda: batch)  # no conv/linear weight to score: every coordinate, as unscored tensors
    assert dense.num_coords == norm.coords.dim
