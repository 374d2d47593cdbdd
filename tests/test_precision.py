"""Queries run in full float32 precision whatever the caller set: autocast, TF32 and bf16 math would
round the perturbation itself (a silently wrong gradient); the caller's settings come back after."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepzero_apps.engine import CGE, RGE, FirstOrder, StagedObjective, full_precision, zo_function
from deepzero_apps.engine.precision import _precision_knobs
from deepzero_apps.errors import ConfigError


def settings() -> tuple:
    """Every setting `full_precision` touches, as the caller sees it (the legacy switches as None where
    torch refuses to read them after a mix of the legacy and per-backend APIs)."""
    knobs = tuple(k.fp32_precision for k in _precision_knobs())
    try:
        return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, knobs
    except RuntimeError:
        return None, None, knobs


@pytest.fixture
def restore_settings():
    """Put the process back as found (legacy switches first, then the per-backend ones)."""
    matmul, cudnn, knobs = settings()
    assert matmul is not None, "a test left the precision settings mixed"
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn
    for knob, value in zip(_precision_knobs(), knobs):
        knob.fp32_precision = value


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh()),
        nn.Sequential(nn.Linear(12, 8), nn.Tanh()),
        nn.Linear(8, 5),
    )  # float32: the dtype reduced-precision modes act on


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 5, (32,), generator=g)


def estimate(estimator, model, b) -> torch.Tensor:
    estimator.estimate(StagedObjective(model, lambda out, bb: F.cross_entropy(out, bb[1])), b)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


ESTIMATORS = {
    "cge": lambda: CGE(mu=1e-3, scheme="central"),
    "rge": lambda: RGE(q=20, mu=1e-3, seed=3),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimates_under_bf16_autocast_equal_the_float32_estimate(name):
    model, b = mlp(), batch()
    want = estimate(ESTIMATORS[name](), copy.deepcopy(model), b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = estimate(ESTIMATORS[name](), model, b)
        assert torch.is_autocast_enabled("cpu")  # the caller's autocast is back
    assert torch.equal(got, want)
    if name == "cge":  # and the float32 estimate is the gradient (bf16 queries give noise)
        truth = estimate(FirstOrder(), copy.deepcopy(model), b)
        assert F.cosine_similarity(got, truth, dim=0) >= 0.999


@pytest.mark.usefixtures("restore_settings")
def test_estimates_under_reduced_float32_math_equal_the_ieee_estimate():
    torch.manual_seed(0)  # 256 wide: oneDNN takes the bf16 path on CPUs that have it (small ones do not)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 5))
    b = batch()
    want = estimate(RGE(q=4, mu=1e-3), copy.deepcopy(model), b)
    torch.set_float32_matmul_precision("medium")  # bf16 matmuls where the backend has them
    for knob in _precision_knobs():
        knob.fp32_precision = "bf16" if knob is torch.backends.mkldnn.matmul else "tf32"
    before = settings()
    got = estimate(RGE(q=4, mu=1e-3), model, b)
    assert torch.equal(got, want)
    assert settings() == before


@pytest.mark.usefixtures("restore_settings")
@pytest.mark.parametrize("api", ["legacy", "per_backend"])
def test_full_precision_switches_every_reduced_mode_off_and_restores_it(api):
    if api == "legacy":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    else:
        if not _precision_knobs():
            pytest.skip("torch < 2.9 has no per-backend fp32_precision")
        for knob in _precision_knobs():
            knob.fp32_precision = "tf32"
    before = settings()
    with torch.autocast("cpu", dtype=torch.bfloat16), full_precision():
        assert not torch.is_autocast_enabled("cpu")
        assert all(k.fp32_precision in ("none", "ieee") for k in _precision_knobs())
        if api == "legacy":  # torch's own code still reads these: they stay readable inside
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cudnn.allow_tf32 is False
    assert settings() == before


@pytest.mark.usefixtures("restore_settings")
def test_the_settings_stay_ieee_until_the_last_concurrent_estimate_leaves():
    torch.set_float32_matmul_precision("high")
    entered, leave = threading.Event(), threading.Event()

    def other_estimate():
        with full_precision():
            entered.set()
            leave.wait(10)

    other = threading.Thread(target=other_estimate)
    with full_precision():
        other.start()
        assert entered.wait(10)
    assert torch.get_float32_matmul_precision() == "highest"  # the other thread is still inside
    leave.set()
    other.join(10)
    assert torch.get_float32_matmul_precision() == "high"


def test_zo_function_queries_ignore_the_callers_autocast():
    torch.manual_seed(0)
    box = nn.Sequential(nn.Linear(6, 4), nn.Tanh())
    x = torch.randn(5, 6)

    def vjp() -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        zo_function(box, CGE(mu=1e-3, scheme="central"))(xi).square().sum().backward()
        return xi.grad

    want = vjp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vjp()
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("restore_settings")
def test_cuda_conv_estimates_ignore_tf32():
    """cuDNN convolutions default to TF32 on Ampere and later: the estimate must not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).cuda()
    x, y = torch.randn(16, 3, 8, 8, device="cuda"), torch.randint(0, 5, (16,), device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    want = estimate(CGE(mu=1e-3), copy.deepcopy(model), (x, y))
    torch.backends.cudnn.allow_tf32 = True
    assert torch.equal(estimate(CGE(mu=1e-3), model, (x, y)), want)


@pytest.mark.parametrize(
    "dtype, mu, refused",
    [("bfloat16", 5e-3, True), ("float16", 1e-4, True), ("float16", 5e-3, False), ("float32", 1e-4, False)],
)
def test_a_mu_finer_than_16_bit_parameters_resolve_is_a_one_line_error(dtype, mu, refused):
    model, b = mlp().to(getattr(torch, dtype)), batch()
    b = (b[0].to(model[0][1].weight.dtype), b[1])
    for make in (lambda: CGE(mu=mu), lambda: RGE(q=2, mu=mu)):
        if not refused:
            estimate(make(), model, b)
            continue
        with pytest.raises(ConfigError) as err:
            estimate(make(), model, b)
        msg = str(err.value)
        assert "\n" not in msg and f"mu={mu:g}" in msg and "0.1.weight" in msg and dtype in msg, msg
        assert all(p.grad is None for p in model.parameters())  # refused before any query


def test_zo_function_refuses_a_mu_its_16_bit_input_cannot_resolve():
    f = zo_function(lambda a: a.square(), CGE(mu=1e-4))
    x = torch.full((3,), 0.5, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ConfigError, match=r"mu=0.0001 is too fine for the black box's input \(bfloat16"):
        f(x).sum().backward()
