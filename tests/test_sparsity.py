"""Sparse gradients: LPR from pruning-at-init scores, the coordinate sampler, and the LPR artifact."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from deepzero_apps.engine import (
    CGE,
    DenseSampler,
    SparseCoordinateSampler,
    StagedObjective,
    compute_ratios,
    grasp_scores,
    layer_ratios,
    load_ratios,
    prunable_weights,
    random_scores,
    save_ratios,
    uniform_ratios,
    zo_grasp_scores,
)


def tiny_cnn(dtype=torch.float64) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)),
    ).to(dtype)


def labelled(n_per_class=2, classes=5, shape=(1, 4, 4), dtype=torch.float64):
    y = torch.arange(classes).repeat(n_per_class)
    return torch.randn(len(y), *shape, dtype=dtype), y


def objective(model):
    return StagedObjective(model, lambda out, b: F.cross_entropy(out, b[1]))


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def pruned_fraction(ratios, sizes):
    return sum(ratios[n] * sizes[n] for n in ratios) / sum(sizes.values())


# ---------------------------------------------------------------- layer-wise pruning ratios


@pytest.mark.parametrize("ordering", ["magnitude", "signed"])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.5, 0.9, 0.999])
def test_layer_ratios_reproduce_the_global_sparsity(ordering, sparsity):
    sizes = {"a": 27, "b": 1000, "c": 333, "d": 5}
    scores = {n: torch.randn(k) * (i + 1) for i, (n, k) in enumerate(sizes.items())}
    ratios = layer_ratios(scores, sparsity, ordering)
    total = sum(sizes.values())
    assert abs(pruned_fraction(ratios, sizes) - sparsity) <= 0.5 / total
    assert all(0.0 <= r <= 1.0 for r in ratios.values())


def test_orderings_keep_the_largest_magnitudes_or_the_lowest_signed_scores():
    scores = {
        "neg": torch.tensor([-10.0, -9.0]),
        "small": torch.tensor([0.1, 0.2]),
        "pos": torch.tensor([5.0, 6.0]),
    }
    assert layer_ratios(scores, 1 / 3, "magnitude") == {"neg": 0.0, "small": 1.0, "pos": 0.0}
    assert layer_ratios(scores, 1 / 3, "signed") == {"neg": 0.0, "small": 0.0, "pos": 1.0}


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_is_an_error(bad):
    with pytest.raises(ValueError, match=rf"sparsity must be in \[0, 1\), got {bad}"):
        layer_ratios({"a": torch.randn(4)}, bad)
    with pytest.raises(ValueError, match="sparsity must be in"):
        compute_ratios("random", tiny_cnn(), sparsity=bad)
    with pytest.raises(ValueError, match="unknown ordering 'top'"):
        layer_ratios({"a": torch.randn(4)}, 0.5, "top")


def test_only_conv_and_linear_weights_are_scored():
    model = tiny_cnn()
    assert list(prunable_weights(model)) == ["0.0.weight", "1.0.weight", "2.2.weight"]
    ratios = compute_ratios("random", model, sparsity=0.5, seed=3)
    assert list(ratios) == list(prunable_weights(model))
    assert all(
        torch.equal(a, b) for a, b in zip(random_scores(model, 3).values(), random_scores(model, 3).values())
    )


@pytest.mark.parametrize("sparsity", [0.0, 0.8, 0.9, 0.99])
def test_uniform_gives_every_layer_the_global_ratio_without_scoring(sparsity):
    model = tiny_cnn()
    ratios = compute_ratios("uniform", model, sparsity=sparsity)  # no loss, no data: nothing is scored
    assert ratios == uniform_ratios(model, sparsity) == {n: sparsity for n in prunable_weights(model)}
    obj = objective(model)
    sampler = SparseCoordinateSampler(obj.coords, ratios, dense_unscored=False)
    assert sampler.sizes == {
        b.name: round((1 - sparsity) * b.numel) if b.name in ratios else 0 for b in obj.coords.blocks
    }
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        uniform_ratios(model, 1.0)


# ---------------------------------------------------------------- coordinate sampler


def sampler_setup(**kw):
    model = tiny_cnn()
    obj = objective(model)
    ratios = {"0.0.weight": 0.5, "1.0.weight": 0.75, "2.2.weight": 0.9}
    return model, obj, SparseCoordinateSampler(obj.coords, ratios, **kw)


def test_sampled_sets_have_the_lpr_sizes_and_stay_in_their_tensors():
    _, obj, sampler = sampler_setup(mask_interval=3, seed=1)
    coords = sampler.coords(0)
    assert torch.equal(coords, coords.sort().values) and len(coords.unique()) == len(coords)
    assert len(coords) == sampler.num_coords
    for b in obj.coords.blocks:
        inside = coords[(coords >= b.start) & (coords < b.stop)]
        expected = round((1 - sampler.ratios[b.name]) * b.numel) if b.name in sampler.ratios else b.numel
        assert len(inside) == expected == sampler.sizes[b.name], b.name
    assert coords.min() >= 0 and coords.max() < obj.coords.dim


def test_sets_are_fixed_within_an_interval_and_redrawn_at_the_next():
    _, obj, sampler = sampler_setup(mask_interval=3, seed=1)
    e0, e2, e3, e5 = (sampler.coords(e) for e in (0, 2, 3, 5))
    assert torch.equal(e0, e2) and torch.equal(e3, e5) and not torch.equal(e0, e3)
    # a pure function of (seed, epoch // interval): a fresh sampler resumed at epoch 4 agrees
    resumed = SparseCoordinateSampler.from_state_dict(obj.coords, sampler.state_dict())
    assert torch.equal(resumed.coords(4), e3)
    other_seed = SparseCoordinateSampler(obj.coords, sampler.ratios, mask_interval=3, seed=2)
    assert not torch.equal(other_seed.coords(0), e0)
    every_epoch = SparseCoordinateSampler(obj.coords, sampler.ratios, mask_interval=1, seed=1)
    assert not torch.equal(every_epoch.coords(0), every_epoch.coords(1))


def test_a_fixed_mask_is_the_first_set_for_every_epoch_and_survives_resume():
    _, obj, fixed = sampler_setup(mask_interval=None, seed=1)
    _, _, every5 = sampler_setup(mask_interval=5, seed=1)
    first = fixed.coords(0)
    assert torch.equal(first, every5.coords(0))  # the same draw as a resampled run's first interval
    assert all(torch.equal(fixed.coords(e), first) for e in (1, 4, 5, 17, 1000))
    assert not torch.equal(every5.coords(5), first)
    state = fixed.state_dict()
    assert state["mask_interval"] is None
    assert torch.equal(SparseCoordinateSampler.from_state_dict(obj.coords, state).coords(42), first)


def test_dense_unscored_includes_or_drops_tensors_without_a_ratio():
    _, obj, dense = sampler_setup(dense_unscored=True)
    _, _, only_scored = sampler_setup(dense_unscored=False)
    view = obj.coords
    unscored = [b for b in view.blocks if b.name not in dense.ratios]
    assert {b.name for b in unscored} == {
        "0.0.bias",
        "0.1.weight",
        "0.1.bias",
        "1.1.weight",
        "1.1.bias",
        "2.2.bias",
    }
    with_all, scored = dense.coords(0), only_scored.coords(0)
    for b in unscored:
        assert torch.equal(
            with_all[(with_all >= b.start) & (with_all < b.stop)], torch.arange(b.start, b.stop)
        )
        assert not ((scored >= b.start) & (scored < b.stop)).any()
    assert dense.num_coords - only_scored.num_coords == sum(b.numel for b in unscored)


def test_sampler_rejects_names_outside_the_view():
    obj = objective(tiny_cnn())
    with pytest.raises(ValueError, match="not trainable coordinates: conv9.weight"):
        SparseCoordinateSampler(obj.coords, {"conv9.weight": 0.5})
    with pytest.raises(ValueError, match="mask_interval must be >= 1"):
        SparseCoordinateSampler(obj.coords, {}, mask_interval=0)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_queries_per_step_is_what_sparse_cge_spends(scheme):
    model, obj, sampler = sampler_setup()
    CGE(scheme=scheme).estimate(obj, labelled(), sampler.coords(0))
    assert obj.counter.queries == sampler.queries_per_step(scheme)
    dense_obj = objective(copy.deepcopy(model))
    dense = DenseSampler(dense_obj.coords)
    assert dense.coords(0) is None
    CGE(scheme=scheme).estimate(dense_obj, labelled(), dense.coords(0))
    assert dense_obj.counter.queries == dense.queries_per_step(scheme)


def test_sparse_cge_is_the_reference_on_sampled_coords_and_zero_elsewhere():
    model, obj, sampler = sampler_setup(seed=4)
    b = labelled()
    ref_model = copy.deepcopy(model)
    CGE(evaluator="reference").estimate(objective(ref_model), b)
    coords = sampler.coords(0)
    CGE().estimate(obj, b, coords)
    g, ref = grads(model), grads(ref_model)
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask[coords] = True
    assert torch.allclose(g[mask], ref[mask], rtol=0, atol=1e-10)
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()


# ---------------------------------------------------------------- GraSP scores


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scorer", ["zo_grasp", "grasp"])
def test_scoring_leaves_weights_buffers_grads_and_mode_bit_identical(training, scorer):
    model = tiny_cnn(torch.float32).train(training)
    with torch.no_grad():
        model(labelled(dtype=torch.float32)[0])  # non-trivial running statistics
    model[2][2].weight.grad = torch.ones_like(model[2][2].weight)
    before = copy.deepcopy(model.state_dict())
    data = labelled(dtype=torch.float32)
    if scorer == "zo_grasp":
        scores = zo_grasp_scores(model, F.cross_entropy, data, q=4, samples_per_class=2)
    else:
        scores = grasp_scores(model, F.cross_entropy, data, samples_per_class=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.training == training for m in model.modules())
    assert torch.equal(model[2][2].weight.grad, torch.ones_like(model[2][2].weight))
    assert model[0][0].weight.grad is None
    assert list(scores) == list(prunable_weights(model))


def test_zo_grasp_tends_to_fo_grasp_when_q_exceeds_the_dimension():
    """With q >> d the shared-direction RGE projector is ~I, so the ZO Hessian-gradient product is Hg."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    data = labelled(n_per_class=4, classes=3, shape=(4,))
    fo = grasp_scores(model, F.cross_entropy, data, samples_per_class=4)
    zo = zo_grasp_scores(model, F.cross_entropy, data, q=3000, mu=1e-4, samples_per_class=4, seed=1)
    fo_flat, zo_flat = (torch.cat([v.flatten() for v in s.values()]) for s in (fo, zo))
    assert F.cosine_similarity(fo_flat, zo_flat, dim=0) > 0.9


def test_zo_grasp_agrees_with_fo_grasp_on_resnet20_layer_ratios():
    """The paper's claim at init: ZO-GraSP's LPR ranks layers like GraSP's (q=192, mu=5e-3).

    16x16 inputs (ResNet-20 is fully convolutional up to its global pooling) keep every layer and cost a
    quarter of 32x32; Spearman's rho was 0.90-0.93 on data seeds 1-3 at 16x16, 0.88-0.92 at 32x32."""
    models = pytest.importorskip("deepzero_apps.models.resnet", reason="ResNet-20 not in this checkout yet")

    model = models.resnet20()
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(20, 3, 16, 16, generator=gen), torch.arange(10).repeat_interleave(2)
    fo = layer_ratios(grasp_scores(model, F.cross_entropy, data, samples_per_class=2), 0.9)
    zo = layer_ratios(zo_grasp_scores(model, F.cross_entropy, data, samples_per_class=2), 0.9)
    assert list(fo) == list(zo) and len(fo) == 20
    rho = spearmanr(list(fo.values()), list(zo.values()))[0]
    assert rho >= 0.8, rho


def test_balanced_batch_needs_enough_examples_per_class():
    x, y = labelled(n_per_class=2)
    with pytest.raises(ValueError, match="class 0 has 2 examples, fewer than samples_per_class=3"):
        grasp_scores(tiny_cnn(), F.cross_entropy, (x, y), samples_per_class=3)


# ---------------------------------------------------------------- LPR artifact


META = {"method": "grasp", "sparsity": 0.5, "ordering": "magnitude", "model": "tiny_cnn", "seed": 0}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_lpr_round_trip(tmp_path, suffix):
    model = tiny_cnn()
    ratios = compute_ratios("grasp", model, F.cross_entropy, labelled(), sparsity=0.5, samples_per_class=2)
    path = save_ratios(tmp_path / f"lpr{suffix}", ratios, META)
    loaded, meta = load_ratios(path, model)
    assert loaded == ratios and meta == META
    assert "1.0.weight" in path.read_text()  # readable by eye, layer by layer


def test_lpr_load_names_unknown_and_missing_layers(tmp_path):
    path = tmp_path / "lpr.json"
    path.write_text(
        json.dumps({"meta": META, "ratios": {"0.0.weight": 0.5, "1.0.weight": 0.5, "conv9.weight": 0.1}})
    )
    with pytest.raises(ValueError, match=r"unknown layers \[conv9.weight\], missing layers \[2.2.weight\]"):
        load_ratios(path, tiny_cnn())
    with pytest.raises(ValueError, match="LPR meta lacks seed"):
        save_ratios(tmp_path / "x.yaml", {}, {k: v for k, v in META.items() if k != "seed"})
    with pytest.raises(ValueError, match="must end in .json, .yaml or .yml"):
        save_ratios(tmp_path / "x.txt", {}, META)
