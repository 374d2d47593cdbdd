"""The estimators against ground truth (autograd, float64) and every evaluator against the reference loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepzero_apps.engine import CGE, RGE, FirstOrder, ShardedEvaluator, StagedObjective
from deepzero_apps.errors import ConfigError

EVALUATORS = ["reference", "reuse", "batched", "sharded"]  # sharded: one process, around batched


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)),
    ).double()


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh()),
        nn.Sequential(nn.Linear(6, 5), nn.Tanh()),
        nn.Linear(5, 5),
    ).double()


def batch(n=8):
    return torch.randn(n, 1, 4, 4, dtype=torch.float64), torch.randint(0, 5, (n,))


def objective(model):
    return StagedObjective(model, lambda out, b: F.cross_entropy(out, b[1]))


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def autograd_grad(model, b):
    obj = objective(model)
    FirstOrder().estimate(obj, b)
    return grads(model)


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_cge_matches_autograd(make, scheme):
    model, b = make(), batch()
    truth = autograd_grad(copy.deepcopy(model), b)
    CGE(mu=1e-6, scheme=scheme).estimate(objective(model), b)
    g = grads(model)
    assert F.cosine_similarity(g, truth, dim=0) >= 0.999
    tol = 1e-4 if scheme == "forward" else 1e-7
    assert torch.allclose(g, truth, atol=tol * truth.abs().max(), rtol=0)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_feature_reuse_equals_reference_with_batchnorm(scheme):
    model, b = tiny_cnn(), batch()
    ref_model = copy.deepcopy(model)
    CGE(mu=5e-3, scheme=scheme, evaluator="reuse").estimate(objective(model), b)
    CGE(mu=5e-3, scheme=scheme, evaluator="reference").estimate(objective(ref_model), b)
    assert torch.allclose(grads(model), grads(ref_model), rtol=0, atol=1e-10)


def test_sparse_cge_is_reference_on_coords_and_zero_elsewhere():
    model, b = tiny_cnn(), batch()
    obj = objective(model)
    coords = torch.randperm(obj.coords.dim)[:25]
    dense_model = copy.deepcopy(model)
    CGE(evaluator="reference").estimate(objective(dense_model), b)
    CGE().estimate(obj, b, coords)
    g, dense = grads(model), grads(dense_model)
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask[coords] = True
    assert torch.allclose(g[mask], dense[mask], rtol=0, atol=1e-10)
    assert (g[~mask] == 0).all()


def test_queries_restore_weights_and_leave_running_stats_to_the_base_query():
    model, b = tiny_cnn(), batch()
    one_forward = copy.deepcopy(model)
    with torch.no_grad():
        one_forward(b[0])  # what a single training forward does to the statistics
    before = copy.deepcopy(model.state_dict())
    CGE().estimate(objective(model), b)
    RGE(q=5).estimate(objective(copy.deepcopy(one_forward)), b)
    after = model.state_dict()
    for k, v in after.items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, one_forward.state_dict()[k]), k
        else:
            assert torch.equal(v, before[k]), k


def test_query_accounting():
    model, b = tiny_cnn(), batch()
    obj = objective(model)
    CGE(scheme="forward").estimate(obj, b)
    assert obj.counter.queries == obj.coords.dim + 1
    assert obj.counter.forward_equivalents < obj.counter.queries  # reuse runs partial forwards
    obj2 = objective(copy.deepcopy(model))
    CGE(scheme="central", evaluator="reference").estimate(obj2, b)
    assert obj2.counter.queries == 2 * obj2.coords.dim + 1
    assert obj2.counter.forward_equivalents == obj2.counter.queries


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
def test_seed_replay_rge_equals_stored_directions(distribution):
    model, b = tiny_cnn(), batch()
    twin = copy.deepcopy(model)
    RGE(q=7, distribution=distribution, seed_replay=True, seed=3).estimate(objective(model), b, step=11)
    RGE(q=7, distribution=distribution, seed_replay=False, seed=3).estimate(objective(twin), b, step=11)
    assert torch.allclose(grads(model), grads(twin), rtol=1e-12, atol=1e-14)
    assert grads(model).abs().sum() > 0


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
def test_rge_scaling_is_unbiased_on_a_linear_loss(distribution):
    """For f(theta) = a . theta the forward difference is exact, so E[g] = a only if phi is right."""
    lin = nn.Linear(6, 1, bias=False).double()
    a = torch.randn(6, dtype=torch.float64)
    obj = StagedObjective(nn.Sequential(lin), lambda out, b: (lin.weight.view(-1) * a).sum())
    RGE(q=20000, distribution=distribution, seed=1).estimate(obj, (torch.zeros(1, 6, dtype=torch.float64),))
    assert torch.allclose(lin.weight.grad.view(-1), a, atol=0.05 * a.norm())


def test_rge_with_q_equal_d_points_along_gradient():
    model, b = tiny_mlp(), batch()
    truth = autograd_grad(copy.deepcopy(model), b)
    obj = objective(model)
    RGE(q=4 * obj.coords.dim, mu=1e-6, seed=0).estimate(obj, b)
    assert F.cosine_similarity(grads(model), truth, dim=0) > 0.75


def test_sparse_rge_is_zero_outside_coords():
    model, b = tiny_cnn(), batch()
    obj = objective(model)
    coords = torch.arange(10, 30)
    RGE(q=3).estimate(obj, b, coords)
    g = grads(model)
    assert (g[:10] == 0).all() and (g[30:] == 0).all() and (g[10:30] != 0).any()


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="mu must be > 0, got -1"):
        CGE(mu=-1)
    with pytest.raises(ValueError, match="unknown evaluator 'fast'"):
        CGE(evaluator="fast")
    with pytest.raises(ValueError, match="q must be >= 1"):
        RGE(q=0)


# Tied weights: a parameter used by several stages belongs to the first, queries restart there.


def tied_across_stages() -> nn.Sequential:
    """Layers 3 and 5 share one weight (stages 3 and 5)."""
    m = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
        nn.Linear(6, 5),
    ).double()
    m[5].weight = m[3].weight
    return m


def tied_conv_across_stages() -> nn.Sequential:
    """One conv module used as stage 1 and stage 3, BatchNorm between (the conv fast paths)."""
    conv = nn.Conv2d(3, 3, 3, padding=1)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()), conv, nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()),
        conv, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5)),
    ).double()


def tied_in_one_stage() -> nn.Sequential:
    lin = nn.Linear(6, 6)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh()), nn.Sequential(lin, nn.Tanh(), lin), nn.Linear(6, 5)
    ).double()


def assert_reference_and_autograd(model, b, evaluator):
    """`evaluator`'s CGE equals the reference loop (float64 rounding) and, at small mu, autograd (cosine)."""
    truth = autograd_grad(copy.deepcopy(model), b)
    ref, near = copy.deepcopy(model), copy.deepcopy(model)
    CGE(mu=5e-3, evaluator="reference").estimate(objective(ref), b)
    CGE(mu=5e-3, evaluator=make_evaluator_named(evaluator)).estimate(objective(model), b)
    assert torch.allclose(grads(model), grads(ref), rtol=0, atol=1e-10)
    CGE(mu=1e-6, evaluator=make_evaluator_named(evaluator)).estimate(objective(near), b)
    assert F.cosine_similarity(grads(near), truth, dim=0) >= 0.999


def make_evaluator_named(name):
    return ShardedEvaluator("batched") if name == "sharded" else name


@pytest.mark.parametrize("make", [tied_across_stages, tied_conv_across_stages, tied_in_one_stage])
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_tied_weights_equal_the_reference_loop_and_autograd(make, evaluator):
    model, b = make(), batch()
    assert_reference_and_autograd(model, b, evaluator)


def test_tied_parameter_belongs_to_its_first_stage():
    """Owners are found by running the stages at the first query."""
    obj, conv = objective(tied_across_stages()), objective(tied_conv_across_stages())
    obj.loss(batch())
    conv.loss(batch())
    assert obj.coords.block("3.weight").stage == 3
    assert conv.coords.block("1.weight").stage == 1


# The stage list must compose to forward; the engine checks on the first query.


class SkipAcrossStages(nn.Module):
    """forward adds a skip connection that the stage list leaves out."""

    def __init__(self, with_skip_in_stages: bool = False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 6), nn.Linear(6, 6), nn.Linear(6, 5)
        self.with_skip_in_stages = with_skip_in_stages

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.c(torch.tanh(self.b(h)) + h)

    def stages(self):
        if self.with_skip_in_stages:
            return [nn.Sequential(nn.Flatten(), self.a), Residual(nn.Sequential(self.b, nn.Tanh())), self.c]
        return [nn.Sequential(nn.Flatten(), self.a), nn.Sequential(self.b, nn.Tanh()), self.c]


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x) + x


ESTIMATORS = {
    "cge": lambda ev: CGE(evaluator=make_evaluator_named(ev)),
    "rge": lambda ev: RGE(q=3, evaluator=make_evaluator_named(ev)),
}


@pytest.mark.parametrize("estimator", ["cge", "rge"])
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_stages_that_skip_a_residual_add_are_refused(estimator, evaluator):
    model, b = SkipAcrossStages().double(), batch()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="3 stages of SkipAcrossStages do not compose to its forward") as e:
        ESTIMATORS[estimator](evaluator).estimate(objective(model), b)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_first_order_is_checked_too():
    with pytest.raises(ConfigError, match="do not compose"):
        FirstOrder().estimate(objective(SkipAcrossStages().double()), batch())


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_stages_that_compose_to_forward_train_forward(evaluator):
    model, b = SkipAcrossStages(with_skip_in_stages=True).double(), batch()
    truth = autograd_grad(copy.deepcopy(model), b)
    CGE(mu=1e-6, evaluator=make_evaluator_named(evaluator)).estimate(objective(model), b)
    assert F.cosine_similarity(grads(model), truth, dim=0) >= 0.999


def test_check_can_be_skipped():
    model = SkipAcrossStages().double()
    obj = StagedObjective(model, lambda out, b: F.cross_entropy(out, b[1]), check_stages=False)
    CGE().estimate(obj, batch())
    assert model.a.weight.grad.abs().sum() > 0


class DropoutNet(nn.Module):
    """A stochastic forward whose stages draw the same random numbers in the same order."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Dropout(0.5)), nn.Linear(6, 5)

    def forward(self, x):
        return self.c(self.a(x))

    def stages(self):
        return [self.a, self.c]


def test_a_stochastic_forward_passes_and_the_random_stream_is_untouched():
    b = batch()
    states = []
    for check in (True, False):
        torch.manual_seed(1)
        model = DropoutNet().double()
        obj = StagedObjective(model, lambda out, b: F.cross_entropy(out, b[1]), check_stages=check)
        FirstOrder().estimate(obj, b)
        states.append((torch.get_rng_state(), grads(model)))
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_a_loss_that_reads_parameters_itself(evaluator):
    """A weight penalty in the loss: the fast paths, which only change a layer's output, must not
    be used for the penalised parameters (the last linear layer's closed form included)."""
    model, b = tiny_cnn(), batch()

    def penalised(m):
        return lambda out, b: F.cross_entropy(out, b[1]) + m[2][2].weight.square().sum() + m[0][0].weight.square().sum()

    truth = copy.deepcopy(model)
    FirstOrder().estimate(StagedObjective(truth, penalised(truth)), b)
    ref = copy.deepcopy(model)
    CGE(mu=5e-3, evaluator="reference").estimate(StagedObjective(ref, penalised(ref)), b)
    CGE(mu=5e-3, evaluator=make_evaluator_named(evaluator)).estimate(StagedObjective(model, penalised(model)), b)
    assert torch.allclose(grads(model), grads(ref), rtol=0, atol=1e-10)
    assert F.cosine_similarity(grads(ref), grads(truth), dim=0) >= 0.999
