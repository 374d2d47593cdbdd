"""zo_function: black-box VJPs against analytic gradients and autograd (float64), counted queries."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special
from torch import nn

from deepzero_apps.engine import CGE, RGE, QueryCounter, zo_function
from deepzero_apps.errors import RunError


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0))


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_scipy_erf_matches_its_analytic_derivative(scheme):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64)
    f = zo_function(special.erf, CGE(mu=1e-6, scheme=scheme), numpy=True)
    (w * f(x)).sum().backward()
    exact = w * 2 / math.sqrt(math.pi) * torch.exp(-x.detach() ** 2)
    assert cosine(x.grad, exact) >= 0.999
    assert torch.allclose(x.grad, exact, atol=1e-5 if scheme == "forward" else 1e-8)
    assert f.counter.queries == (1 if scheme == "forward" else 2) * x.numel() + 1


def test_per_sample_logsumexp_costs_d_plus_one_queries_for_any_batch():
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    f = zo_function(lambda a: special.logsumexp(a, axis=1), CGE(mu=1e-7, scheme="central"), per_sample=True, numpy=True)
    f(x).mean().backward()
    assert torch.allclose(x.grad, x.detach().softmax(1) / len(x), atol=1e-9)
    assert f.counter.queries == 2 * 5 + 1 == f.queries_per_call(5)


def blackbox_net() -> tuple[nn.Module, nn.Module, nn.Module]:
    """A white-box encoder, a 'black box' (here a torch module, so autograd can check) and a head."""
    torch.manual_seed(0)
    return (nn.Linear(6, 4).double(), nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double(), nn.Linear(3, 2).double())


@pytest.mark.parametrize("per_sample", [False, True])
def test_parameter_gradients_through_the_black_box_match_autograd(per_sample):
    enc, box, head = blackbox_net()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 2, (8,))
    F.cross_entropy(head(box(enc(x))), y).backward()
    exact = [p.grad.clone() for p in (*enc.parameters(), *head.parameters())]
    for m in (enc, box, head):
        m.zero_grad(set_to_none=True)
    f = zo_function(box, CGE(mu=1e-6, scheme="central"), per_sample=per_sample)
    F.cross_entropy(head(f(enc(x))), y).backward()
    for got, want in zip((p.grad for p in (*enc.parameters(), *head.parameters())), exact):
        assert cosine(got, want) >= 0.999
        assert torch.allclose(got, want, atol=1e-8)
    assert all(p.grad is None for p in box.parameters()), "the black box is only queried"


@pytest.mark.parametrize("per_sample", [False, True])
def test_chunked_queries_equal_one_query_per_call(per_sample):
    enc, box, _ = blackbox_net()
    x = torch.randn(5, 6, dtype=torch.float64)
    w = torch.randn(5, 3, dtype=torch.float64)
    results = []
    for chunk in (1, 3):
        calls = []
        f = zo_function(
            lambda a, calls=calls: calls.append(1) or box(a), CGE(mu=1e-4), per_sample=per_sample, chunk=chunk
        )
        z = enc(x).detach().requires_grad_()
        (w * f(z)).sum().backward()
        results.append((z.grad, f.counter.queries, len(calls)))
    (g1, q1, c1), (g3, q3, c3) = results
    assert torch.allclose(g1, g3, rtol=1e-12, atol=1e-14)
    assert q1 == q3 and c3 < c1


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
def test_rge_vjp_is_unbiased_on_a_linear_box(distribution):
    """fn linear: the forward difference is exact, so the mean of the estimate is v A^T only if the
    directions and phi are right (per sample: each row its own directions)."""
    a = torch.randn(5, 3, dtype=torch.float64)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, dtype=torch.float64)
    f = zo_function(lambda z: z @ a, RGE(q=20000, distribution=distribution, seed=1), per_sample=True)
    (v * f(x)).sum().backward()
    assert torch.allclose(x.grad, v @ a.T, atol=0.05 * (v @ a.T).norm())
    assert f.counter.queries == 20000 + 1


def test_rge_directions_replay_from_step_and_seed():
    x = torch.randn(3, 4, dtype=torch.float64)

    def grad(rge: RGE, f=None, step=None) -> torch.Tensor:
        f = f or zo_function(torch.sin, rge)
        z = x.clone().requires_grad_()
        f(z, step=step).sum().backward()
        return z.grad

    stored = grad(RGE(q=5, seed=2), step=7)
    assert torch.equal(grad(RGE(q=5, seed=2, seed_replay=True), step=7), stored)
    assert not torch.equal(grad(RGE(q=5, seed=2), step=8), stored)
    f = zo_function(torch.sin, RGE(q=5, seed=2))
    first, second = grad(None, f), grad(None, f)  # default step: the call count
    assert not torch.equal(first, second)
    resumed = zo_function(torch.sin, RGE(q=5, seed=2))
    resumed.load_state_dict({"calls": 1})
    assert torch.equal(grad(None, resumed), second) and resumed.state_dict() == {"calls": 2}


def test_extra_args_dtype_device_and_a_shared_counter():
    counter = QueryCounter()
    target = np.array([0.5, -1.0])
    f = zo_function(lambda a, t: ((a - t) ** 2).sum(1), per_sample=True, numpy=True, counter=counter)
    x = torch.zeros(3, 2, requires_grad=True)  # float32 in, numpy float64 out: float32 back
    y = f(x, target)
    assert y.dtype == torch.float32 and y.shape == (3,)
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.allclose(x.grad, torch.tensor(-2 * target, dtype=torch.float32).expand(3, 2), atol=1e-2)
    assert counter.queries == 3 and counter.forward_equivalents == 3.0


def test_bad_black_boxes_and_estimators_are_named():
    calls = []

    def shrinking(a):
        calls.append(1)
        return a[: 3 - len(calls)] if len(calls) > 1 else a

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RunError, match=r"black box returned shape \(1,\) at a perturbed input, expected \(3,\)"):
        zo_function(shrinking)(x).sum().backward()
    with pytest.raises(TypeError, match="CGE or RGE"):
        zo_function(torch.sin, estimator="cge")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        zo_function(torch.sin, chunk=0)
