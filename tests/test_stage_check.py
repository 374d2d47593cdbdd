"""Feature reuse cannot be fooled: by a term of forward that contributes nothing (or less than
rounding) at the starting point, or by a parameter that a stage reads without registering it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_engine import (
    EVALUATORS,
    assert_reference_and_autograd,
    autograd_grad,
    batch,
    grads,
    make_evaluator_named,
    objective,
)
from torch import nn

from deepzero_apps.engine import CGE, RGE, FirstOrder, StagedObjective
from deepzero_apps.errors import ConfigError


class Mid(nn.Module):
    """The middle stage; `correct=False` forgets the gated branch that forward adds."""

    def __init__(self, gate: float, zero_branch: bool, scale: float, correct: bool):
        super().__init__()
        self.b, self.branch = nn.Linear(6, 6), nn.Linear(6, 6)
        self.gate = nn.Parameter(torch.tensor(gate))
        if zero_branch:
            nn.init.zeros_(self.branch.weight)
            nn.init.zeros_(self.branch.bias)
        self.scale, self.correct = scale, correct

    def extra(self, h):
        return self.scale * self.gate * self.branch(h)

    def forward(self, h):
        return torch.tanh(self.b(h)) + (self.extra(h) if self.correct else 0)


class GatedBranch(nn.Module):
    """c(tanh(b(h)) + scale * gate * branch(h)): a ReZero-style gate, a zero-initialised branch or a
    tiny one all make the branch contribute nothing (or less than rounding) at initialisation."""

    def __init__(self, gate=1.0, zero_branch=False, scale=1.0, correct=False):
        super().__init__()
        self.a, self.c = nn.Linear(16, 6), nn.Linear(6, 5)
        self.mid = Mid(gate, zero_branch, scale, correct)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.c(torch.tanh(self.mid.b(h)) + self.mid.extra(h))

    def stages(self):
        return [nn.Sequential(nn.Flatten(), self.a), self.mid, self.c]


HIDDEN = {
    "gate at 0": dict(gate=0.0),
    "zero-initialised branch": dict(zero_branch=True),
    "tiny gate float32": dict(gate=1e-5, dtype=torch.float32),
    "tiny gate float64": dict(gate=1e-9),
    "tiny constant scale float32": dict(scale=1e-4, dtype=torch.float32),
    "tiny constant scale float64": dict(scale=1e-9),
}


def hidden(case, correct=False):
    kw = dict(HIDDEN[case])
    dtype = kw.pop("dtype", torch.float64)
    return GatedBranch(correct=correct, **kw).to(dtype)


def batch_of(model):
    x, y = batch()
    return x.to(next(model.parameters()).dtype), y


@pytest.mark.parametrize("case", HIDDEN)
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_a_branch_that_contributes_nothing_at_the_start_is_refused(case, evaluator):
    model = hidden(case)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="3 stages of GatedBranch do not compose to its forward") as e:
        CGE(evaluator=make_evaluator_named(evaluator)).estimate(objective(model), batch_of(model))
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("estimator", [FirstOrder, lambda: RGE(q=3)])
def test_every_estimator_is_checked(estimator):
    with pytest.raises(ConfigError, match="random perturbation of the parameters"):
        estimator().estimate(objective(hidden("gate at 0")), batch())


def test_the_change_of_one_parameter_names_it():
    model = hidden("tiny constant scale float32")
    with pytest.raises(ConfigError, match=r"when parameter 'mid\.(gate|branch\.weight)' changes"):
        CGE().estimate(objective(model), batch_of(model))


@pytest.mark.parametrize("case", [c for c in HIDDEN if "float32" not in c])
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_the_same_models_with_correct_stages_train_exactly(case, evaluator):
    model, b = hidden(case, correct=True), batch()
    truth = autograd_grad(copy.deepcopy(model), b)
    CGE(mu=1e-6, evaluator=make_evaluator_named(evaluator)).estimate(objective(model), b)
    assert F.cosine_similarity(grads(model), truth, dim=0) >= 0.999


@pytest.mark.parametrize("case", [c for c in HIDDEN if "float32" in c])
def test_correct_float32_stages_are_not_refused(case):
    model = hidden(case, correct=True)
    obj = objective(model)
    obj.loss(batch_of(model))
    assert not obj._unchecked


# Ownership by use: a stage may read a parameter that another stage (or no stage) registers.


class ReadsByAttribute(nn.Module):
    """tanh(lin(tanh(a(x)))) with `lin` held as a plain attribute (not registered here)."""

    def __init__(self, a, lin):
        super().__init__()
        self.a = a
        object.__setattr__(self, "lin", lin)

    def forward(self, x):
        return torch.tanh(self.lin(torch.tanh(self.a(x.flatten(1)))))


class ReadsFunctionally(nn.Module):
    """The same through a functional call on a weight reached through a plain list."""

    def __init__(self, a, lin):
        super().__init__()
        self.a, self.others = a, [lin]

    def forward(self, x):
        return torch.tanh(F.linear(torch.tanh(self.a(x.flatten(1))), self.others[0].weight))


class ReadsAgain(nn.Module):
    """Multiplies by a parameter of another module of the same stage."""

    def __init__(self, lin):
        super().__init__()
        object.__setattr__(self, "lin", lin)

    def forward(self, h):
        return h * self.lin.bias


class ReadsAlias(nn.Module):
    def __init__(self, a, weight):
        super().__init__()
        self.a, self.weight = a, weight

    def forward(self, x):
        return torch.tanh(F.linear(torch.tanh(self.a(x.flatten(1))), self.weight))


class Borrowing(nn.Module):
    """`lin` is registered in stage 2 only, but `how` says who else reads it."""

    def __init__(self, how):
        super().__init__()
        f64 = dict(dtype=torch.float64)  # before the alias below is taken
        self.a, self.lin, self.mid = nn.Linear(16, 6, **f64), nn.Linear(6, 6, **f64), nn.Linear(6, 6, **f64)
        self.c = nn.Linear(6, 5, **f64)
        if how == "attribute":
            self.first = ReadsByAttribute(self.a, self.lin)
        elif how == "alias":  # another tensor over the weight's storage: no record can see this read
            self.first = ReadsAlias(self.a, self.lin.weight.data)
        elif how == "functional":
            self.first = ReadsFunctionally(self.a, self.lin)
        else:  # its own stage reads lin.bias again after lin
            self.first = nn.Sequential(nn.Flatten(), self.a, nn.Tanh())
        self.last = nn.Sequential(self.lin, ReadsAgain(self.lin)) if how == "own stage" else self.lin

    def stages(self):
        return [self.first, nn.Sequential(self.mid, nn.Tanh()), nn.Sequential(self.last, nn.Tanh()), self.c]

    def forward(self, x):
        for s in self.stages():
            x = s(x)
        return x


BORROWS = ["attribute", "functional", "own stage"]


@pytest.mark.parametrize("how", BORROWS)
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_a_parameter_read_outside_its_module_equals_the_reference_and_autograd(how, evaluator):
    model, b = Borrowing(how), batch()
    assert_reference_and_autograd(model, b, evaluator)


@pytest.mark.parametrize("how", ["attribute", "functional"])
def test_the_owner_is_the_first_stage_that_reads(how):
    obj = objective(Borrowing(how))
    obj.loss(batch())
    assert obj.coords.block("lin.weight").stage == 0


class Tempered(nn.Module):
    """forward divides by a temperature that no stage reads."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(16, 6), nn.Linear(6, 5)
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.c(torch.tanh(self.a(x.flatten(1)))) / self.temperature

    def stages(self):
        return [nn.Sequential(nn.Flatten(), self.a, nn.Tanh()), self.c]


def test_a_parameter_no_stage_uses_is_named():
    obj = StagedObjective(Tempered().double(), lambda out, b: F.cross_entropy(out, b[1]))
    match = "trainable parameter 'temperature' is used by none of the 2 stages"
    with pytest.raises(ConfigError, match=match) as e:
        CGE().estimate(obj, batch())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_a_read_no_record_can_see_is_refused_by_the_check(evaluator):
    estimator = CGE(evaluator=make_evaluator_named(evaluator))
    match = "'lin.weight' changes the input of stage 1"
    with pytest.raises(ConfigError, match=match) as e:
        estimator.estimate(objective(Borrowing("alias")), batch())
    assert "\n" not in str(e.value)


# Stages that write into their input: the cached input must stay what the base query saw.


class Doubles(nn.Module):
    def forward(self, h):
        return h.mul_(2)


def writes_into_its_input(first: nn.Module) -> nn.Sequential:
    """Stage 1 starts with an in-place op on the input it is given (cached by feature reuse)."""
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 6)), nn.Sequential(first, nn.Tanh(), nn.Linear(6, 6)), nn.Linear(6, 5)
    ).double()


@pytest.mark.parametrize("first", [Doubles, lambda: nn.ReLU(inplace=True)], ids=["mul_", "relu_"])
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_a_stage_that_writes_into_its_input_equals_the_reference_and_autograd(first, evaluator):
    model, b = writes_into_its_input(first()), batch()
    x0 = b[0].clone()
    assert_reference_and_autograd(model, b, evaluator)
    assert torch.equal(b[0], x0)
