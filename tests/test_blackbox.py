"""BlackBoxClassifier: query-only contract, outputs, accounting and fault handling."""

import threading

import pytest
import torch
from torch import nn

from deepzero_apps.blackbox import BlackBoxClassifier, BlackBoxError, QueryLedger
from deepzero_apps.blackbox.ledger import LEDGER


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.Dropout(0.5))


def _batch(n: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("batch_size", [1, 3, 1024])
def test_outputs_match_wrapped_model(batch_size: int) -> None:
    model, x = _model(), _batch()
    model.train()
    expected = model.eval()(x).detach()
    model.train()  # the wrapper must put it back in eval mode (dropout off)
    logits = BlackBoxClassifier(model, batch_size=batch_size)(x)
    torch.testing.assert_close(logits, expected)
    probs = BlackBoxClassifier(model, output="probs", batch_size=batch_size)(x)
    torch.testing.assert_close(probs, expected.softmax(dim=1))
    labels = BlackBoxClassifier(model, output="label", batch_size=batch_size)(x)
    assert labels.dtype == torch.long and labels.shape == (7,)
    assert torch.equal(labels, expected.argmax(dim=1))
    assert not model.training


def test_input_requiring_grad_is_refused() -> None:
    bb = BlackBoxClassifier(_model(), name="victim")
    with pytest.raises(BlackBoxError, match="black box 'victim' is query-only"):
        bb(_batch().requires_grad_())
    assert bb.queries == 0


def test_output_never_requires_grad() -> None:
    model = _model()
    assert all(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        for output in ("logits", "probs", "label"):
            out = BlackBoxClassifier(model, output=output)(_batch())
            assert not out.requires_grad and out.grad_fn is None


def test_output_detached_even_if_callable_enables_grad() -> None:
    w = torch.randn(48, 5, requires_grad=True)

    def leaky(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return x.flatten(1) @ w

    out = BlackBoxClassifier(leaky)(_batch())
    assert not out.requires_grad


def test_not_a_module_and_model_not_public() -> None:
    model = _model()
    bb = BlackBoxClassifier(model)
    assert not isinstance(bb, nn.Module)
    assert not hasattr(bb, "parameters")
    assert all(value is not model for key, value in vars(bb).items() if not key.startswith("_"))
    holder = nn.Module()
    holder.bb = bb
    assert list(holder.parameters()) == []
    assert "Linear" not in repr(bb)


def test_counters_and_state_dict() -> None:
    bb = BlackBoxClassifier(_model(), batch_size=3)
    bb(_batch(7))
    bb(_batch(2))
    assert (bb.queries, bb.calls) == (9, 2)
    state = bb.state_dict()
    bb.reset_counters()
    assert (bb.queries, bb.calls) == (0, 0)
    bb.load_state_dict(state)
    assert bb.state_dict() == {"queries": 9, "calls": 2}
    with pytest.raises(KeyError):
        bb.load_state_dict({"queries": 1})


def test_callable_exception_is_wrapped_in_one_line() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("server said\nno")

    with pytest.raises(BlackBoxError, match=r"^black box 'api' failed: ValueError: server said no$") as info:
        BlackBoxClassifier(broken, name="api")(_batch())
    assert isinstance(info.value.__cause__, ValueError)


def test_non_finite_output_is_an_error() -> None:
    def nan_model(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 5)
        out[1, 2] = float("nan")
        out[3, 0] = float("inf")
        return out

    with pytest.raises(BlackBoxError, match="black box 'nanny' returned NaN/inf logits for 2 of 7"):
        BlackBoxClassifier(nan_model, name="nanny")(_batch())


@pytest.mark.parametrize(
    ("fn", "num_classes"),
    [
        (lambda x: torch.zeros(x.shape[0] + 1, 5), None),  # wrong N
        (lambda x: torch.zeros(x.shape[0], 4), 5),  # wrong number of classes
        (lambda x: torch.zeros(x.shape[0]), None),  # not 2-D
        (lambda x: torch.zeros(x.shape[0], 5, dtype=torch.long), None),  # not logits
        (lambda x: [[0.0] * 5] * x.shape[0], None),  # not a tensor
    ],
)
def test_wrong_output_is_an_error(fn, num_classes) -> None:
    with pytest.raises(BlackBoxError, match="black box 'shape' returned"):
        BlackBoxClassifier(fn, num_classes=num_classes, name="shape")(_batch())


def test_num_classes_locked_after_first_output() -> None:
    sizes = iter([5, 4])
    bb = BlackBoxClassifier(lambda x: torch.zeros(x.shape[0], next(sizes)), name="drift")
    bb(_batch())
    assert bb.num_classes == 5
    with pytest.raises(BlackBoxError, match=r"expected \(7, 5\)"):
        bb(_batch())


def test_timeout() -> None:
    release = threading.Event()

    def slow(x: torch.Tensor) -> torch.Tensor:
        release.wait(5.0)
        return torch.zeros(x.shape[0], 5)

    bb = BlackBoxClassifier(slow, name="slowpoke", timeout=0.05)
    try:
        with pytest.raises(BlackBoxError, match="black box 'slowpoke' timed out after 0.05 s"):
            bb(_batch())
    finally:
        release.set()
    fast = BlackBoxClassifier(_model(), timeout=5.0, output="label")
    assert fast(_batch()).shape == (7,)


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_wrapped_callable_runs_without_grad(timeout: float | None) -> None:
    grad_enabled = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        grad_enabled.append(torch.is_grad_enabled())
        return torch.zeros(x.shape[0], 5)

    with torch.enable_grad():
        BlackBoxClassifier(spy, timeout=timeout)(_batch())
    assert grad_enabled == [False]


def test_label_and_probability_black_boxes_are_reduced_and_validated() -> None:
    model, x = _model().eval(), _batch()
    logits = model(x).detach()
    labels = BlackBoxClassifier(lambda z: model(z).argmax(1), output="label", provides="label", num_classes=5)(x)
    assert torch.equal(labels, logits.argmax(1))
    probs_box = BlackBoxClassifier(lambda z: model(z).softmax(1), output="label", provides="probs")
    assert torch.equal(probs_box(x), logits.argmax(1))
    with pytest.raises(ValueError, match="returns label; output=probs cannot be computed from it"):
        BlackBoxClassifier(model, output="probs", provides="label")
    with pytest.raises(BlackBoxError, match="labels outside"):
        BlackBoxClassifier(lambda z: torch.full((len(z),), 5), output="label", provides="label", num_classes=5)(x)
    with pytest.raises(BlackBoxError, match="expected integer labels of shape"):
        BlackBoxClassifier(lambda z: torch.zeros(len(z)), output="label", provides="label")(x)
    with pytest.raises(BlackBoxError, match="negative or do not sum to 1"):
        BlackBoxClassifier(lambda z: torch.ones(len(z), 5), output="probs", provides="probs")(x)


def test_a_hung_black_box_times_out_in_a_daemon_thread() -> None:
    release = threading.Event()
    bb = BlackBoxClassifier(lambda z: release.wait(30), name="stuck", timeout=0.05)
    try:
        with pytest.raises(BlackBoxError, match="black box 'stuck' timed out"):
            bb(_batch())
        assert all(t.daemon for t in threading.enumerate() if t.name == "blackbox stuck")
    finally:
        release.set()


class _Remote:
    """A paid black box that answers its first `answers` calls and then fails, counting answered images."""

    def __init__(self, answers: int) -> None:
        self.answers, self.images = answers, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.answers == 0:
            raise ConnectionError("server gone")
        self.answers -= 1
        self.images += len(x)
        return torch.zeros(len(x), 5)


def test_a_query_ledger_charges_what_was_sent_refunds_failures_and_restores_counts(tmp_path) -> None:
    box = BlackBoxClassifier(_Remote(answers=2), batch_size=4)
    box.charge_to(QueryLedger(tmp_path), "train")
    box(_batch(8))  # two chunks of 4, both answered
    with pytest.raises(BlackBoxError, match="server gone"):
        box(_batch(3))
    assert QueryLedger(tmp_path).paid("train") == 8 and QueryLedger(tmp_path).paid("eval") == 0
    with (tmp_path / LEDGER).open("a") as f:
        f.write("train 99")  # a line a kill cut short: never sent, never read
    again = BlackBoxClassifier(_Remote(answers=1))
    again.charge_to(QueryLedger(tmp_path), "train")
    assert again.queries == 8
    again.load_state_dict({"queries": 4, "calls": 1})  # a checkpoint older than the last paid images
    assert again.queries == 8
    again(_batch(2))
    assert QueryLedger(tmp_path).paid("train") == again.queries == 10
    assert (tmp_path / LEDGER).read_text().splitlines()[-2:] == ["train 99 torn", "train 2"]
