"""The batched evaluator and each of its fast paths against the reference loop, in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepzero_apps.engine import (
    CGE,
    RGE,
    BatchedEvaluator,
    ReferenceEvaluator,
    StagedObjective,
    frozen_running_stats,
)
from deepzero_apps.engine.fastpaths import Leaf, grouped_batchnorm
from deepzero_apps.models import correction_net, create_model, dncnn

ATOL = 1e-10




def ce(out, b):
    return F.cross_entropy(out, b[1])


def mse(out, b):
    return F.mse_loss(out, b[1])


def images(n, c, hw, classes=10):
    return torch.randn(n, c, hw, hw, dtype=torch.float64), torch.randint(0, classes, (n,))


def losses(model, b, coords=None, evaluator=None, loss=ce, step=5e-3):
    """coordinate_losses after one base query, inside the estimators' frozen-statistics context."""
    obj = StagedObjective(model, loss)
    ev = evaluator or ReferenceEvaluator()
    coords = torch.arange(obj.coords.dim) if coords is None else coords
    with torch.no_grad():
        _, ctx = ev.base(obj, b)
        with frozen_running_stats(model):
            return ev.coordinate_losses(obj, b, ctx, coords, step)


def assert_matches_reference(model, b, coords=None, loss=ce, **kw):
    model = model.double()
    want = losses(copy.deepcopy(model), b, coords, loss=loss)
    got = losses(model, b, coords, BatchedEvaluator(**kw), loss=loss)
    assert torch.allclose(got, want, rtol=0, atol=ATOL), (got - want).abs().max()


def per_tensor_sample(model, per=3):
    """A few random coordinates of every parameter tensor (all stages, every kind of layer)."""
    out, start = [], 0
    for p in model.parameters():
        out.append(start + torch.randperm(p.numel())[:per])
        start += p.numel()
    return torch.cat(out)


def test_mlp():
    assert_matches_reference(
        create_model("mlp", in_features=16, num_classes=5, hidden=(6, 4)), images(8, 1, 4, 5)
    )


@pytest.mark.parametrize("depth, channels_last", [(2, False), (2, True), (4, True)])
def test_small_cnn_with_batchnorm(depth, channels_last):
    """Depth 4 on 8x8 inputs pools down to 1x1, where its max pool is skipped."""
    model = create_model("small_cnn", depth=depth, in_channels=1, num_classes=10, channels=6)
    assert_matches_reference(model, images(8, 1, 8), channels_last=channels_last)


def test_resnet20_sampled_coordinates():
    model = create_model("resnet20")
    coords = torch.cat([per_tensor_sample(model, 3), torch.randint(0, 269_722, (100,))])
    assert_matches_reference(model, images(2, 3, 32), coords)


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_chunk_sizes_agree(chunk):
    model = create_model("small_cnn", depth=2, in_channels=1, num_classes=10).double()
    b = images(8, 1, 8)
    auto = losses(copy.deepcopy(model), b, evaluator=BatchedEvaluator())
    got = losses(model, b, evaluator=BatchedEvaluator(chunk=chunk))
    assert torch.allclose(got, auto, rtol=0, atol=1e-12)


def test_small_memory_budget_is_still_exact():
    model = create_model("small_cnn", depth=2, in_channels=1, num_classes=10)
    assert_matches_reference(model, images(8, 1, 8), per_tensor_sample(model, 20), max_batch_bytes=1)


def test_running_stats_untouched_and_weights_restored():
    model = create_model("resnet20").double()
    b = images(2, 3, 32)
    obj, ev = StagedObjective(model, ce), BatchedEvaluator()
    with torch.no_grad():
        _, ctx = ev.base(obj, b)
        before = copy.deepcopy(model.state_dict())
        ev.coordinate_losses(obj, b, ctx, per_tensor_sample(model, 2), 5e-3)  # no frozen_running_stats here
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# Each fast path on a model built so that it is the one under test.


def stage(*layers):
    return nn.Sequential(*layers)


def head(c, classes=3):
    return stage(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


class Scale(nn.Module):
    """A leaf with a parameter and no closed form: its coordinates are rerun leaf by leaf."""

    def __init__(self, c):
        super().__init__()
        self.s = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1) ** 2


@pytest.mark.parametrize(
    "name, model",
    [
        ("conv weight/bias through BN, ReLU, max pool, then a mixing conv", lambda: nn.Sequential(
            stage(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)),
            stage(nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.Tanh()), head(5))),
        ("conv geometry: stride, dilation, circular padding, groups", lambda: nn.Sequential(
            stage(nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, padding_mode="circular"), nn.ReLU()),
            stage(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU()),
            stage(nn.Conv2d(4, 3, 2, stride=2, padding_mode="reflect", padding=1), nn.GELU()), head(3))),
        ("last linear layer in closed form, linear into linear", lambda: nn.Sequential(
            stage(nn.Flatten(), nn.Linear(32, 6), nn.BatchNorm1d(6), nn.Sigmoid()), nn.Linear(6, 3))),
        ("opaque leaf rerun, and a stage whose forward is unknown", lambda: nn.Sequential(
            stage(nn.Conv2d(2, 3, 3, padding=1), Scale(3), nn.ReLU()),
            dncnn(channels=3, depth=2, width=4)[0], head(7))),
    ],
)  # fmt: skip
def test_fast_path(name, model):
    assert_matches_reference(model(), images(6, 2, 4, 3))


def test_residual_blocks_and_eval_mode_batchnorm():
    model = create_model("resnet20").double().eval()
    assert_matches_reference(model, images(3, 3, 8), per_tensor_sample(model, 2))


def test_correction_net_residual_with_circular_padding():
    model = correction_net(2, 2, width=4, blocks=1, kernel_size=3, padding_mode="circular")
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    assert_matches_reference(model, (x, torch.randn_like(x)), loss=mse)


def test_dncnn_opaque_stages_keep_batchnorm_grouped():
    model = dncnn(channels=1, depth=4, width=3)
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    assert_matches_reference(model, (x, torch.randn_like(x)), loss=mse, chunk=4)


def test_shared_parameters_fall_back_to_the_reuse_loop():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(
        stage(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()), stage(conv, nn.ReLU(), conv), head(3)
    )
    assert_matches_reference(model, images(4, 1, 4, 3))


def test_stage_with_a_hook_is_run_opaque():
    model = create_model("small_cnn", depth=2, in_channels=1, num_classes=10).double()
    model[1].register_forward_hook(lambda m, i, out: out * 2)  # the tree of stage 1 cannot see this
    b, ev = images(4, 1, 8), BatchedEvaluator()
    obj = StagedObjective(model, ce)
    want = losses(copy.deepcopy(model), b)
    with torch.no_grad(), frozen_running_stats(model):
        got = ev.coordinate_losses(obj, b, ev.base(obj, b)[1], torch.arange(obj.coords.dim), 5e-3)
    assert torch.allclose(got, want, rtol=0, atol=ATOL)
    trees = ev.plan(obj).trees
    assert isinstance(trees[1], Leaf) and trees[1].module is model[1] and not isinstance(trees[0], Leaf)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd_two_pass", "no_grad_native_per_group"])
def test_grouped_batchnorm_equals_separate_forwards(grad):
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0), bn.bias.normal_()
    x = torch.randn(4 * 5, 3, 2, 2, dtype=torch.float64)
    want = torch.cat([F.batch_norm(g, None, None, bn.weight, bn.bias, True) for g in x.split(5)]).detach()
    for fmt in (torch.contiguous_format, torch.channels_last):
        with grouped_batchnorm(bn, batch_size=5), torch.set_grad_enabled(grad):
            got = bn(x.contiguous(memory_format=fmt))
        assert got.requires_grad == grad
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert bn.num_batches_tracked == 0 and torch.equal(bn.running_mean, torch.zeros(3))


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_cge_with_batched_equals_reference(scheme):
    model = create_model("small_cnn", depth=2, in_channels=1, num_classes=10).double()
    twin, b, coords = copy.deepcopy(model), images(8, 1, 8), per_tensor_sample(model, 10)
    o1, o2 = StagedObjective(model, ce), StagedObjective(twin, ce)
    nchw = BatchedEvaluator(channels_last=False)  # the reuse loop's layout: bit-identical base queries
    CGE(scheme=scheme, evaluator=nchw).estimate(o1, b, coords)
    CGE(scheme=scheme, evaluator="reuse").estimate(o2, b, coords)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-7)
    assert o1.counter.queries == o2.counter.queries  # same query accounting as the reuse loop
    assert o1.counter.forward_equivalents == pytest.approx(o2.counter.forward_equivalents)
    assert all(torch.equal(u, v) for u, v in zip(model.state_dict().values(), twin.state_dict().values()))


def test_rge_runs_through_the_batched_context():
    model = create_model("small_cnn", depth=1, in_channels=1, num_classes=10).double()
    twin, b = copy.deepcopy(model), images(8, 1, 8)
    RGE(q=3, evaluator=BatchedEvaluator(channels_last=False)).estimate(StagedObjective(model, ce), b)
    RGE(q=3, evaluator="reuse").estimate(StagedObjective(twin, ce), b)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference():
    model = create_model("resnet20").double().cuda()
    x, y = images(2, 3, 32)
    assert_matches_reference(model, (x.cuda(), y.cuda()), per_tensor_sample(model, 2).cuda())


def avgpool_cnn() -> nn.Sequential:
    """A one-channel input, then average pooling of the changed channels (a mean that rounds)."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.AvgPool2d(2)),
        nn.Sequential(nn.Conv2d(5, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1)),
        nn.Sequential(nn.Flatten(), nn.Linear(6, 10)),
    )


@pytest.mark.parametrize("train", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize(
    "make, channels", [(lambda: create_model("resnet20"), 3), (avgpool_cnn, 1)], ids=["resnet20", "avgpool_cnn"]
)
def test_a_zero_step_reproduces_the_base_loss_bit_for_bit_in_float32(make, channels, train):
    """Every query's loss is compared with the base query's, so at the base point they must round
    alike: a query path that runs another layout or kernel than the base forward (NHWC queries
    against an NCHW base, a one-channel BatchNorm or average pool summing in another order) adds its
    offset / mu to every coordinate. In float32, where that offset shows."""
    torch.manual_seed(0)
    model = make().train(train)
    b = (torch.randn(8, channels, 16, 16), torch.randint(0, 10, (8,)))
    coords = per_tensor_sample(model, per=2)
    for chunk in (1, 3):
        obj = StagedObjective(model, ce)
        ev = BatchedEvaluator(chunk=chunk)
        with torch.no_grad():
            f0, ctx = ev.base(obj, b)
            with frozen_running_stats(model):
                got = ev.coordinate_losses(obj, b, ctx, coords, 0.0)
        assert torch.equal(got, torch.full_like(got, float(f0))), (got - float(f0)).abs().max()
