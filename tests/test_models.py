"""Bundled models: parameter counts, shapes and the stage contract of the ZO engine."""

import warnings

import pytest
import torch
from torch import nn

from deepzero_apps.models import (
    correction_net,
    create_model,
    dncnn,
    list_models,
    mlp,
    register_model,
    resnet,
    resnet20,
    small_cnn,
)
from deepzero_apps.models.cnn import MaybeMaxPool2d
from deepzero_apps.models.correction import wrap_pad
from deepzero_apps.models.resnet import ShortcutA


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_stage_contract(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sequential of stages; each parameter in exactly one stage; stages pass one tensor and
    leave their cached input untouched."""
    assert isinstance(model, nn.Sequential)
    owners: dict[int, int] = {}
    for i, stage in enumerate(model.children()):
        for p in stage.parameters():
            assert id(p) not in owners, f"parameter shared by stages {owners[id(p)]} and {i}"
            owners[id(p)] = i
    assert len(owners) == len(list(model.parameters()))
    model.eval()
    with torch.no_grad():
        h = x
        for stage in model.children():
            before = h.clone()
            out = stage(h)
            assert isinstance(out, torch.Tensor)
            assert torch.equal(h, before), f"stage {type(stage).__name__} modified its input"
            h = out
        assert torch.allclose(h, model(x))
    return h


@pytest.mark.parametrize(("depth", "expected"), [(1, 730), (2, 3_700), (3, 6_670), (4, 9_640), (5, 12_610)])
def test_small_cnn_param_counts(depth, expected):
    model = small_cnn(depth)
    assert n_params(model) == expected
    assert len(model) == depth + 1  # one stage per conv block + head
    out = check_stage_contract(model, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_small_cnn_deep_on_digits_skips_pooling():
    model = small_cnn(5, in_channels=1, num_classes=10)
    out = check_stage_contract(model, torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10)
    with pytest.raises(ValueError, match="depth"):
        small_cnn(0)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 5, 7, 9), (2, 3, 1, 5), (2, 2, 3, 3), (4, 6, 6)])
def test_max_pool_fast_path_equals_max_pool2d(shape):
    """The no-grad CPU pool (max of strided views) gives max_pool2d's values, odd sizes included."""
    x = torch.randn(shape, dtype=torch.float64)
    expected = x if min(shape[-2:]) < 2 else nn.functional.max_pool2d(x, 2)
    with torch.no_grad():
        assert torch.equal(MaybeMaxPool2d()(x), expected)


@pytest.mark.parametrize("grad", [True, False])
def test_small_cnn_scripts_and_traces_in_either_grad_mode(grad):
    """torch.jit.script and trace work without torch.no_grad() (deepzero-task export scripts a run's model)."""
    model, x = small_cnn(4, in_channels=1, num_classes=10).eval(), torch.rand(5, 1, 8, 8)  # pools 8 -> 4 -> 2 -> 1, then skips
    with torch.no_grad():
        expected = model(x)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and the tracer's shape-check warnings
        for exported in (torch.jit.script(model), torch.jit.trace(model, x)):
            torch.testing.assert_close(exported(x), expected)
            torch.testing.assert_close(exported(x[:2]), expected[:2])  # another batch size


def test_resnet20_param_count_and_stages():
    model = resnet20()
    assert n_params(model) == 269_722
    assert len(model) == 1 + 9 + 1  # stem, 9 BasicBlocks, head
    out = check_stage_contract(model, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("depth", [32, 44, 56])
def test_deeper_resnets_stage_count(depth):
    model = create_model(f"resnet{depth}", num_classes=7)
    assert len(model) == 2 + (depth - 2) // 2
    assert model[-1][-1].out_features == 7


def test_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet(21)


def test_option_a_shortcut_has_no_parameters():
    shortcut = ShortcutA(16, 32)
    assert n_params(shortcut) == 0
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0
    shortcuts = [m for m in resnet20().modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2 and all(n_params(s) == 0 for s in shortcuts)


def test_mlp_stages():
    model = mlp(64, 10, hidden=(32, 16))
    assert len(model) == 3
    assert check_stage_contract(model, torch.randn(4, 1, 8, 8)).shape == (4, 10)
    linear = mlp(64, 10, hidden=())
    assert len(linear) == 1 and n_params(linear) == 650
    assert linear(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def reference_dncnn(channels: int, depth: int, width: int) -> nn.Sequential:
    """Plain DnCNN body (noise predictor), as in the denoised-smoothing code."""
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=True), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width, eps=1e-4, momentum=0.95),
            nn.ReLU(),
        ]
    layers.append(nn.Conv2d(width, channels, 3, padding=1, bias=False))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("train_mode", [False, True])
def test_dncnn_staged_matches_reference(train_mode):
    torch.manual_seed(0)
    model = dncnn(channels=3, depth=5, width=8)
    ref = reference_dncnn(3, 5, 8)
    staged = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    plain = [m for m in ref.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    assert len(staged) == len(plain)
    for a, b in zip(staged, plain, strict=True):
        b.load_state_dict(a.state_dict())
    # Non-trivial BN statistics so eval mode is tested too.
    for a, b in zip(staged, plain, strict=True):
        if isinstance(a, nn.BatchNorm2d):
            stats = torch.rand_like(a.running_var) + 0.5, torch.randn_like(a.running_mean)
            for m in (a, b):
                m.running_var.copy_(stats[0])
                m.running_mean.copy_(stats[1])
    model.train(train_mode)
    ref.train(train_mode)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), x - ref(x), atol=1e-5)
    assert n_params(model) == n_params(ref)
    assert len(model) == 5


def test_dncnn_default_shape_and_contract():
    model = dncnn()
    assert len(model) == 17
    out = check_stage_contract(model, torch.randn(1, 3, 12, 12))
    assert out.shape == (1, 3, 12, 12)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_correction_net_preserves_size(padding_mode):
    model = correction_net(2, 3, blocks=2, padding_mode=padding_mode)
    assert len(model) == 4  # input, 2 residual blocks, output
    out = check_stage_contract(model, torch.randn(2, 2, 10, 14))
    assert out.shape == (2, 3, 10, 14)


def test_correction_net_circular_is_translation_equivariant():
    model = correction_net(1, 1, width=4, blocks=1, padding_mode="circular").eval()
    x = torch.randn(1, 1, 12, 12)
    with torch.no_grad():
        shifted = model(torch.roll(x, shifts=(3, 5), dims=(2, 3)))
        assert torch.allclose(shifted, torch.roll(model(x), shifts=(3, 5), dims=(2, 3)), atol=1e-5)


@pytest.mark.parametrize("pad", [0, 1, 3, 4, 9])
def test_wrap_pad_equals_indexing_modulo_the_size(pad):
    """Slices and copies, also when the pad wraps more than once (pad > size 4)."""
    x = torch.randn(2, 3, 4, 5)
    for axis in (-2, -1):
        n = x.shape[axis]
        want = x.index_select(axis, torch.arange(-pad, n + pad) % n)
        assert torch.equal(wrap_pad(x, pad, axis), want)


def test_circular_conv_under_vmap_gathers_nothing():
    """Stacked ZO-SOL queries vmap the correction net: an index-based wrap became a gather there."""
    conv = correction_net(2, 2, width=3, blocks=0, kernel_size=5, padding_mode="circular")[0][0]
    x = torch.randn(6, 2, 2, 8, 8)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = torch.func.vmap(conv)(x)
    assert torch.allclose(out, conv(x.flatten(0, 1)).view_as(out), atol=1e-6)
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::gather", "aten::index_select", "aten::index"}, ops


def test_registry_lists_all_models():
    expected = {"mlp", "small_cnn", "resnet20", "resnet32", "resnet44", "resnet56", "dncnn", "correction_net"}
    assert expected <= set(list_models())
    assert n_params(create_model("small_cnn", depth=1)) == 730
    assert create_model("mlp", in_features=64, num_classes=10)(torch.randn(2, 64)).shape == (2, 10)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'xyz'; choose from: .*resnet20") as info:
        create_model("xyz")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(mlp)
