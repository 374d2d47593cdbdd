"""Property tests of the CLI's config layer: any override list either composes or is a one-line
UsageError (exit 2), never another exception (a traceback)."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepzero_apps.cli import UsageError, check_overrides

# Each example is a Hydra composition (~0.2-0.4 s); the examples are drawn afresh on every run (no
# database), so the coverage adds up across CI runs while one run of the file stays ~20 s.
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

GROUPS = {
    "data": ["digits", "fake", "cifar10", "imagefolder"],
    "model": ["small_cnn", "mlp", "resnet20", "resnet56"],
    "estimator": ["cge", "rge", "rge_qd"],
    "optimizer": ["sgd", "adam"],
    "scheduler": ["cosine", "constant"],
    "sparsity": ["dense", "random", "zo_grasp", "grasp"],
    "experiment": ["cge_vs_rge"],
}

positive_int = st.integers(1, 10_000).map(str)
positive_float = st.floats(1e-6, 10.0).map(repr)
flag = st.sampled_from(["true", "false"])
optional_int = st.one_of(st.just("null"), positive_int)

# Keys of the classify config with values its schema accepts (warmup_epochs stays at 0 < epochs).
VALID = {
    "mode": st.sampled_from(["zo", "fo"]),
    "threads": st.one_of(st.just("null"), st.integers(1, os.cpu_count() or 1).map(str)),
    "epochs": positive_int,
    "batch_size": positive_int,
    "eval_batch_size": positive_int,
    "seed": st.integers(0, 2**31 - 1).map(str),
    "resume": flag,
    "progress": flag,
    "query_budget": optional_int,
    "checkpoint_every": st.integers(0, 100).map(str),
    "model.channels": positive_int,
    "log_every": positive_int,
    "on_nonfinite": st.sampled_from(["stop", "skip"]),
    "data.train_limit": optional_int,
    "data.test_limit": optional_int,
    "data.augment": flag,
    "sparsity.sparsity": st.floats(0.0, 0.99).map(repr),
    "sparsity.mask_interval": optional_int,
    "sparsity.ordering": st.sampled_from(["magnitude", "signed"]),
    "sparsity.dense_unscored": flag,
    "sparsity.mu": positive_float,
    "sparsity.q": positive_int,
    "estimator.mu": positive_float,
    "optimizer.lr": positive_float,
}


@st.composite
def valid_overrides(draw) -> list[str]:
    groups = draw(
        st.dictionaries(st.sampled_from(sorted(set(GROUPS) - {"experiment"})), st.none(), max_size=3)
    )
    overrides = [f"{g}={draw(st.sampled_from([o for o in GROUPS[g] if o != 'imagefolder']))}" for g in groups]
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=6)):
        if key == "model.channels" and any(o.startswith("model=") and o != "model=small_cnn" for o in overrides):
            continue  # only the small CNN has a `channels` key (others refuse it, rightly)
        overrides.append(f"{key}={draw(VALID[key])}")
    return overrides


def mutated(key: str) -> st.SearchStrategy[str]:
    """A real key, or a typo of it (dropped, doubled or swapped character, case, suffix)."""
    return st.integers(0, len(key) - 1).flatmap(
        lambda i: st.sampled_from(
            [
                key,
                key[:i] + key[i + 1 :],
                key[:i] + key[i] + key[i:],
                key[:i] + key[i + 1 : i + 2] + key[i] + key[i + 2 :],
                key.upper(),
                key + "_x",
            ]
        )
    )


KEYS = st.one_of(
    st.sampled_from(
        [
            *VALID,
            "warmup_epochs",
            "device",
            "data.name",
            "data.root",
            "sparsity.method",
            "sparsity.ratios",
            "model.name",
            "model.depth",
            "estimator.q",
            "sparsity.samples_per_class",
            "model.channels",
            "seed",
            "estimator._target_",
            "optimizer._target_",
            "scheduler._target_",
        ]
    ).flatmap(mutated),
    st.text("abcdefghij._", min_size=1, max_size=12),
)
TEXT = st.text(alphabet=st.sampled_from(list("az09 _-.=,'\"[]{}()$:/\\~+*@%")), max_size=12)
SCALAR = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "false", "inf", "-inf", "nan", "''", '""', "${seed}", "${nope}"]),
    TEXT,
)
SWEEP = st.sampled_from(
    [
        "1,2",
        "a,b",
        "range(0,0)",
        "range(1,4)",
        "choice(1,x)",
        "interval(0,1)",
        "glob(*)",
        "shuffle(1,2)",
        "sort(3,1)",
    ]
)
VALUE = st.one_of(SCALAR, SWEEP, st.lists(SCALAR, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"))
GROUP = st.tuples(st.sampled_from(sorted(GROUPS)), st.one_of(st.sampled_from(sum(GROUPS.values(), [])), TEXT))
PREFIX = st.sampled_from(["", "", "", "+", "++", "~"])


@st.composite
def any_overrides(draw) -> list[str]:
    overrides = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            group, option = draw(GROUP)
            overrides.append(f"{draw(PREFIX)}{group}={option}")
        else:
            overrides.append(f"{draw(PREFIX)}{draw(KEYS)}={draw(VALUE)}")
    return overrides


@settings(max_examples=40, **FUZZ)
@given(valid_overrides())
def test_valid_overrides_compose(overrides):
    check_overrides("classify", overrides)


@settings(max_examples=80, **FUZZ)
@given(any_overrides(), st.booleans())
def test_any_overrides_compose_or_fail_in_one_line(overrides, multirun):
    try:
        check_overrides("classify", overrides, multirun=multirun)
    except UsageError as exc:
        message = str(exc)
        assert message and "\n" not in message, message


# Issue #13 item 9, verbatim: inputs that were tracebacks; each is refused by composition + schema
# (the run-time ones, which need the data or the model, are end-to-end in tests/test_cli.py).
REFUSED = [
    ("classify", "model.channels=0"),
    ("classify", "seed=-1"),
    ("classify", "seed=99999999999999999999999"),
    ("classify", "device=cuda:abc"),
    ("classify", "sparsity=zo_grasp sparsity.samples_per_class=0"),
    ("classify", "sparsity=zo_grasp sparsity.q=0"),
    ("classify", "threads=1000"),
    ("classify", "+chekpoint_every=1"),
    ("pde", "data.cache_dir=/proc/nope"),
    ("certify", "sparsity=grasp"),
]


@pytest.mark.parametrize(("app", "overrides"), REFUSED)
def test_meaningless_values_are_refused_in_one_line(app, overrides):
    with pytest.raises(UsageError) as info:
        check_overrides(app, overrides.split())
    message = str(info.value)
    assert message and "\n" not in message and overrides.split()[-1].lstrip("+").split("=")[0] in message


@settings(max_examples=25, **FUZZ)
@given(st.sampled_from(REFUSED), valid_overrides())
def test_refused_values_stay_refused_among_valid_overrides(case, overrides):
    """Each refused input stays a one-line error whatever valid overrides come before it."""
    app, bad = case
    if app != "classify":
        return
    keys = {o.split("=")[0].lstrip("+") for o in bad.split()}
    overrides = [o for o in overrides if o.split("=")[0] not in keys and not o.startswith("sparsity=")]
    try:
        check_overrides(app, [*overrides, *bad.split()])
    except UsageError as exc:
        assert "\n" not in str(exc)
    else:
        raise AssertionError(f"accepted: {overrides + bad.split()}")
