"""certify: the black box stays query-only, every mode trains, and the CLI certifies end to end."""

import contextlib
import fcntl
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deepzero_apps.blackbox import BlackBoxClassifier, BlackBoxError
from deepzero_apps.blackbox.losses import DenoiserLoss, ImageQueries, WhiteBox, stability
from deepzero_apps.cli import main
from deepzero_apps.engine import CGE, FirstOrder, StagedObjective
from deepzero_apps.errors import RunError
from deepzero_apps.models import create_model
from deepzero_apps.rundir import LOCK, lock_run_dir
from deepzero_apps.smoothing import load_certification
from deepzero_apps.tasks.certify.data import NoisyInputs
from deepzero_apps.tasks.certify.zoae import AEObjective, autoencoder, latent_estimator
from deepzero_apps.trainer import Trainer

TINY = [
    "data.train_limit=64", "data.test_limit=40", "eval_limit=40", "classifier.epochs=1", "pretrain.epochs=1",
    "zo_ae_ds.ae_epochs=1", "zo_ae_ds.latent_channels=1", "denoiser.depth=3", "denoiser.width=4", "epochs=20",
    "batch_size=8", "query_budget=1500", "sparsity.q=4", "sparsity.samples_per_class=2", "certify.limit=4",
    "certify.n0=8", "certify.n=32", "progress=false",
]  # fmt: skip
STAGES = ("classifier", "pretrain", "zo_ae_ds")


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> SimpleNamespace:
    """One `method=deepzero` run of TINY that trains the classifier and the denoiser's pretraining into
    module-wide stage caches, with its stdout. Tests that only read finished stages point their
    `<stage>.cache_dir` here (a stage is a function of its configuration, which they do not change), so each
    trains once per test process; ZO-AE-DS's autoencoder is trained by the first zo_ae_ds run that uses it."""
    root = tmp_path_factory.mktemp("certify_stages")
    cache = {k: f"{k}.cache_dir={root / 'cache' / k}" for k in STAGES}
    run_dir, out = root / "deepzero", io.StringIO()
    with contextlib.redirect_stdout(out):  # the console log handler is bound to sys.stdout during the run
        assert main(["certify", f"hydra.run.dir={run_dir}", *TINY, *cache.values(), "method=deepzero"]) == 0
    return SimpleNamespace(cache=cache, dir=root / "cache", run_dir=run_dir, out=out.getvalue())


def problem() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A fixed classifier, a tiny DnCNN in eval mode (as the task fine-tunes it) and one batch of 8x8 images."""
    classifier = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4)).eval()
    denoiser = create_model("dncnn", channels=1, depth=3, width=4).eval()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        target = classifier(x).argmax(1)
    return classifier, denoiser, (x, target)


def test_blackbox_refuses_gradients_in_the_task_path():
    classifier, denoiser, batch = problem()
    blackbox = BlackBoxClassifier(classifier)
    objective = StagedObjective(denoiser, DenoiserLoss(blackbox, "logits", 0.0, 1.0), inputs=NoisyInputs(0.25, 0))
    objective.counter = ImageQueries([blackbox])
    with pytest.raises(BlackBoxError, match="query-only"):
        FirstOrder().estimate(objective, batch)
    before = blackbox.queries
    CGE().estimate(objective, batch)  # queries only: fine
    assert objective.counter.queries - before == (objective.coords.dim + 1) * len(batch[0])


def test_noise_is_fixed_within_a_step_and_replayed_on_resume():
    noisy, batch = NoisyInputs(0.5, 3), (torch.zeros(2, 1, 4, 4), torch.zeros(2))
    first = noisy(batch)
    assert noisy(batch) is first
    state = noisy.state_dict()
    second = noisy((batch[0], batch[1]))
    assert not torch.equal(first, second)
    replay = NoisyInputs(0.5, 3)
    replay.load_state_dict(state)
    assert torch.equal(replay((batch[0], batch[1])), second)


def _train(objective, estimator, batch, steps: int, lr: float = 0.03) -> tuple[float, float]:
    params = [b.param for b in objective.coords.blocks]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        start = float(objective.loss(batch))
    for step in range(steps):
        opt.zero_grad()
        estimator.estimate(objective, batch, step=step)
        opt.step()
    with torch.no_grad():
        return start, float(objective.loss(batch))


@pytest.mark.parametrize("mode", ["deepzero", "zo_ae_ds_cge", "zo_ae_ds_rge", "fo_ds"])
def test_each_mode_decreases_its_loss(mode):
    torch.manual_seed(0)
    classifier, denoiser, batch = problem()
    noisy = NoisyInputs(0.25, 0)
    if mode == "fo_ds":
        objective = StagedObjective(denoiser, DenoiserLoss(WhiteBox(classifier, "logits"), "logits", 1.0, 1.0), noisy)
        estimator = FirstOrder()
    elif mode == "deepzero":
        objective = StagedObjective(denoiser, DenoiserLoss(BlackBoxClassifier(classifier), "logits", 1.0, 1.0), noisy)
        estimator = CGE()
    else:
        blackbox = BlackBoxClassifier(classifier)
        encoder, decoder = autoencoder(1, 2, 4)

        def per_image(z, target):
            return stability(blackbox(decoder(z)), target, "logits", reduction="none")

        objective = AEObjective(denoiser, encoder, decoder, per_image, noisy, 1.0, latent_estimator(mode[-3:], 8, 5e-3, 0))
        estimator = FirstOrder()  # ZO through the black box (a zo_function), exact elsewhere
    start, end = _train(objective, estimator, batch, steps=15 if mode == "deepzero" else 40)
    assert end < 0.9 * start, (start, end)


def test_latent_cge_matches_autograd_of_the_latent_loss():
    torch.manual_seed(0)
    classifier, denoiser, batch = problem()
    encoder, decoder = autoencoder(1, 2, 4)
    model = nn.Sequential(decoder, classifier).double()
    objective = AEObjective(
        denoiser.double(), encoder.double(), decoder,
        lambda z, t: stability(model(z), t, "logits", reduction="none"), NoisyInputs(0.25, 0), 0.0, CGE(mu=1e-6),
    )  # fmt: skip
    z = torch.randn(8, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(stability(model(z), batch[1], "logits"), z)[0]
    estimate = torch.autograd.grad(objective.latent(z, batch[1]).mean(), z)[0]
    assert torch.allclose(estimate, exact, atol=1e-5)
    assert objective.counter.queries == z[0].numel() + 1


def test_stability_from_probabilities_equals_logits_and_labels_are_refused():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0])
    assert torch.isclose(stability(logits.softmax(1), target, "probs"), stability(logits, target, "logits"))
    with pytest.raises(ValueError, match="needs logits or probs"):
        stability(logits.argmax(1), target, "label")


def test_denoising_metrics_use_a_class_balanced_test_subset(tmp_path, monkeypatch):
    # An image folder's test set is sorted by class: its first eval_limit images would be one or two classes.
    import deepzero_apps.tasks.certify.app as certify_app

    seen = []
    real = certify_app.denoising_metrics

    def spy(pipeline, blackbox, x, y, *args):
        seen.append(y.clone())
        return real(pipeline, blackbox, x, y, *args)

    monkeypatch.setattr(certify_app, "denoising_metrics", spy)
    cache = [f"{k}.cache_dir={tmp_path / 'cache' / k}" for k in ("classifier", "pretrain", "zo_ae_ds")]
    args = [*TINY, *cache, "method=mse", "eval_limit=20", "certify.limit=1", "certify.n=8"]
    assert main(["certify", f"hydra.run.dir={tmp_path / 'run'}", *args]) == 0
    assert seen and all(torch.bincount(y, minlength=10).tolist() == [2] * 10 for y in seen)


# No fo_ds at 700: at 8 images a step, 100 already stops it mid-training as 700 would (fo_ds has no first
# step that cannot fit, the branch the ZO methods' 100 checks).
@pytest.mark.parametrize(
    ("method", "budget"),
    [("deepzero", 100), ("deepzero", 700), ("zo_ae_ds", 100), ("zo_ae_ds", 700), ("fo_ds", 100)],
)
def test_query_budget_is_never_exceeded_not_even_by_the_first_step(tmp_path, capsys, stages, method, budget):
    # 64 training images are labelled first (64 queries); a ZO step costs (queries per step) x 8 images, known
    # before it runs, so a step that would cross the budget is not taken, the first one included.
    args = [*TINY, *stages.cache.values(), f"method={method}", f"query_budget={budget}"]
    args += ["certify.limit=1", "certify.n=8"]
    code = main(["certify", f"hydra.run.dir={tmp_path / 'run'}", *args])
    if method == "deepzero" and budget == 100:  # ZO-GraSP scoring (200 images) cannot fit: refused before sending
        err = capsys.readouterr().err
        assert code == 1 and "would exceed its query limit of 100" in err and "nothing was sent" in err, err
        return
    assert code == 0
    train = json.loads((tmp_path / "run" / "summary.json").read_text())["train"]
    assert train["stopped"] == "query budget" and 64 <= train["queries"] <= budget, train


def test_cli_trains_certifies_and_compares_every_mode(tmp_path, capsys, stages):
    runs = []
    for mode in ("deepzero", "zo_ae_ds", "fo_ds", "mse"):
        run_dir = stages.run_dir if mode == "deepzero" else tmp_path / mode  # the stages' run: deepzero's
        if mode != "deepzero":
            args = [*TINY, *stages.cache.values(), f"method={mode}"]
            assert main(["certify", f"hydra.run.dir={run_dir}", *args]) == 0
        for name in ("certify.tsv", "certified_accuracy.json", "certified_accuracy.png", "summary.json"):
            assert (run_dir / name).exists(), (mode, name)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert set(summary["certify"]["certified_accuracy"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
        assert summary["certify"]["examples"] == 4
        if mode in ("deepzero", "zo_ae_ds"):
            assert summary["train"]["stopped"] == "query budget" and 0 < summary["train"]["queries"] <= 1500
        if mode == "zo_ae_ds":
            ae = summary["train"]["autoencoder"]
            assert ae["heldout_recon_mse"] > 0 and {"noisy_acc", "mse"} <= set(ae["pipeline"]) & set(ae["denoiser"])
            assert (run_dir / "learning_curve.png").exists()
        runs.append(str(run_dir))
    assert (stages.run_dir / "ratios.json").exists()
    assert "certify done: method=mse" in capsys.readouterr().out
    out = tmp_path / "compare"
    assert main(["certify", f"hydra.run.dir={out}", f"compare=[{','.join(runs)}]"]) == 0
    for name in ("compare.png", "compare.csv", "compare.md"):
        assert (out / name).exists(), name
    assert len((out / "compare.csv").read_text().splitlines()) == 5


@pytest.mark.parametrize(("method", "params", "trained", "first_stage"), [
    ("deepzero", "finetune.params=last", {"2.layer.weight"}, 2),
    ("fo_ds", "finetune.params=norm", {"1.layer.1.weight", "1.layer.1.bias"}, 1),
    ("deepzero", "finetune.params=adapter", {"3.conv.weight", "3.conv.bias"}, 3),
])
def test_finetune_params_trains_only_the_subset_and_reports_its_cost_first(
    tmp_path, capsys, stages, method, params, trained, first_stage
):
    cache = [stages.cache[k] for k in ("classifier", "pretrain")]
    run = tmp_path / "run"
    assert main(["certify", f"hydra.run.dir={run}", *TINY, *cache, f"method={method}", params, "sparsity=dense",
                 "certify.limit=1", "certify.n=8"]) == 0
    pretrained = torch.load(stages.dir / "pretrain" / "checkpoint.pt", weights_only=False)["model"]
    tuned = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    changed = {k for k, v in tuned.items() if k not in pretrained or not torch.equal(v, pretrained[k])}
    assert changed - {k for k in changed if "running_" in k or "num_batches" in k} == trained
    cost = json.loads((run / "summary.json").read_text())["train"]["finetune"]
    assert cost["tensors"] == sorted(trained, key=list(tuned).index)
    assert cost["trainable"] == sum(tuned[k].numel() for k in trained) and cost["of"] > cost["trainable"]
    per_step = 1 if method == "fo_ds" else cost["trainable"] + 1
    assert cost["queries_per_step"] == per_step and cost["images_per_step"] == 8 * per_step
    assert cost["first_stage"] == first_stage  # the stages before it run once per step
    lines = capsys.readouterr().out.splitlines()
    report = next(i for i, m in enumerate(lines) if f"{cost['trainable']:,} of {cost['of']:,} parameters trainable "
                  f"(from stage {first_stage} of" in m)
    assert report < next(i for i, m in enumerate(lines) if m.startswith(f"fine-tuning ({method}): epoch 1/20"))  # before fine-tuning


def test_cached_stage_with_another_configuration_is_refused(tmp_path, capsys, stages):
    shutil.copytree(stages.dir / "pretrain", tmp_path / "pretrain")  # a finished stage of TINY
    # sigma is no part of the classifier's stage: only the denoiser's pretraining is refused
    cache = [stages.cache["classifier"], f"pretrain.cache_dir={tmp_path / 'pretrain'}"]
    assert main(["certify", f"hydra.run.dir={tmp_path / 'b'}", *TINY, *cache, "method=mse", "sigma=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another configuration" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("method=zo", "method='zo'"),
        ("method=fo_ds classifier.output=label", "classifier.output=label gives none"),
        ("method=deepzero classifier.output=label", "method=deepzero trains on the black box's scores"),
        ("method=zo_ae_ds classifier.output=label", "or method=mse to certify with labels only"),
        ("classifier=http classifier.url=ftp://x", "classifier.url=http(s)://"),
        ("classifier=http classifier.url=http://127.0.0.1:9 method=fo_ds", "classifier=http can only be queried"),
        ("classifier=torchscript classifier.path=/nonexistent.pt", "'/nonexistent.pt' does not exist"),
        ("classifier=callable", "classifier.target=IMPORT.PATH"),
        ("classifier.timeout=0", "classifier.timeout=0.0 must be a positive"),
        ("zo_ae_ds.holdout=1", "zo_ae_ds.holdout=1.0 must be in (0, 1)"),
        ("sparsity.method=grasp", "gradients through the black box"),
        ("sigma=0", "sigma=0.0 must be > 0"),
        ("classifier.output=soft", "classifier.output='soft'"),
        ("finetune.params=bogus", "finetune.params='bogus' must be one of all, last, norm, adapter"),
        ("finetune.params=[nope.*] classifier.epochs=1 pretrain.epochs=1 data.train_limit=20 data.test_limit=20 "
         "eval_limit=10", "finetune.params: parameter pattern 'nope.*' matches none"),
        ("finetune.params=last finetune.last=0", "finetune.last=0 must be >= 1"),
        ("method=zo_ae_ds finetune.params=norm", "zo_ae_ds trains the denoiser and encoder first-order"),
    ],
)
def test_bad_configuration_is_one_line_exit_2(tmp_path, capsys, override, needle):
    assert main(["certify", f"hydra.run.dir={tmp_path}", *override.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_resolved_secrets_never_reach_run_files(tmp_path, capsys, monkeypatch):
    """`${oc.env:...}` values are used but never written: stage.json keeps the interpolation and a hash."""
    secret = "s3cr3t-7f9a2c"
    monkeypatch.setenv("DZ_TEST_SECRET", secret)
    overrides = [*TINY, "method=mse", "data.root=${oc.env:DZ_TEST_SECRET}",
                 "classifier.headers={Authorization:'Bearer ${oc.env:DZ_TEST_SECRET}'}"]
    assert main(["certify", f"hydra.run.dir={tmp_path / 'run'}", *overrides]) == 0
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "stage.json" for p in files)
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, leaked
    stamp = json.loads((tmp_path / "run" / "pretrain" / "stage.json").read_text())
    assert stamp["data"]["root"] == "${oc.env:DZ_TEST_SECRET}"
    monkeypatch.setenv("DZ_TEST_SECRET", "another-value")  # a changed value still invalidates the cache
    assert main(["certify", f"hydra.run.dir={tmp_path / 'run'}", *overrides]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_autoencoder_stops_when_held_out_reconstruction_stops_improving_and_keeps_the_best():
    from omegaconf import OmegaConf

    from deepzero_apps.tasks.certify.stages import _fit_autoencoder

    cfg = OmegaConf.create({"seed": 0, "sigma": 0.25, "device": "cpu", "pretrain": {"batch_size": 16, "lr": 1e-2},
                            "zo_ae_ds": {"holdout": 0.25, "patience": 2, "ae_epochs": 40}})
    encoder, decoder = autoencoder(1, 2, 4)
    ae = nn.Sequential(encoder, decoder)
    x = torch.rand(64, 1, 8, 8)
    report = _fit_autoencoder(cfg, x, nn.Identity(), ae)
    history = report["history"]
    best = min(history)
    assert report["heldout_recon_mse"] == best and report["best_epoch"] == history.index(best) + 1
    assert report["heldout_images"] == 16
    if report["stopped"] == "no improvement":  # it stopped `patience` epochs after its best
        assert len(history) == report["best_epoch"] + 2 and min(history[-2:]) >= best
    frozen = OmegaConf.merge(cfg, {"pretrain": {"lr": 0.0}, "zo_ae_ds": {"patience": 1}})
    still = _fit_autoencoder(frozen, x, nn.Identity(), nn.Sequential(*autoencoder(1, 2, 4)))
    assert still["epochs"] == 2 and still["stopped"] == "no improvement"  # lr 0: nothing improves after epoch 1


def test_finished_stages_are_released_for_concurrent_runs_to_share(tmp_path, monkeypatch):
    """A cached classifier, denoiser or autoencoder is locked only while it trains: a second run may
    read it while the first is still fine-tuning (it was refused as 'in use by another run')."""
    cache = {k: tmp_path / "cache" / k for k in ("classifier", "pretrain", "zo_ae_ds")}
    free_when_training_starts: dict[str, bool] = {}

    def lockable(directory: Path) -> bool:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    real_fit = Trainer.fit

    def fit(self):
        if Path(self.out_dir).resolve() == (tmp_path / "run").resolve():  # the fine-tuning itself: every stage is done by now
            free_when_training_starts.update({k: lockable(d) for k, d in cache.items()})
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    overrides = [f"{k}.cache_dir={d}" for k, d in cache.items()]
    overrides += ["epochs=1", "certify.limit=1", "certify.n=8"]  # what matters happens before fine-tuning
    assert main(["certify", f"hydra.run.dir={tmp_path / 'run'}", *TINY, *overrides, "method=zo_ae_ds"]) == 0
    assert free_when_training_starts == {"classifier": True, "pretrain": True, "zo_ae_ds": True}


def test_a_stage_in_use_by_another_run_is_waited_for_not_refused(tmp_path, monkeypatch, capsys):
    """Two runs started together on the same caches: the second waits while the first trains or reads
    back a stage (it was refused 'in use by another run'), then reuses it."""
    import deepzero_apps.rundir as rundir

    cache = {k: tmp_path / "cache" / k for k in ("classifier", "pretrain", "zo_ae_ds")}
    held = {}
    for directory in cache.values():  # "another run" holds every stage's lock
        directory.mkdir(parents=True)
        held[directory.resolve()] = fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242\n", 0)
    waited = []
    announce = rundir._announce_wait

    def announce_then_let_go(directory, holder):
        announce(directory, holder)
        waited.append(Path(directory).resolve())
        os.close(held.pop(Path(directory).resolve()))  # the other run finishes with it

    monkeypatch.setattr(rundir, "_announce_wait", announce_then_let_go)
    overrides = [f"{k}.cache_dir={d}" for k, d in cache.items()]
    overrides += ["epochs=1", "certify.limit=1", "certify.n=8"]  # the waits happen before fine-tuning
    assert main(["certify", f"hydra.run.dir={tmp_path / 'run'}", *TINY, *overrides, "method=zo_ae_ds"]) == 0
    assert waited == [d.resolve() for d in cache.values()] and not held
    out = capsys.readouterr().out
    assert f"waiting for {cache['classifier']}: in use by another run (PID 4242)" in out, out


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("kind", ["classify_run", "other_stage"])
def test_a_cache_dir_that_is_not_a_stage_of_its_kind_is_refused_untouched(tmp_path, capsys, stages, kind):
    """classifier.cache_dir at a classify run resumed it and overwrote its checkpoint, summary and
    metrics (and wrote stage.json even when the load failed)."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    if kind == "classify_run":
        for name in ("checkpoint.pt", "summary.json", "metrics.jsonl", "run_config.yaml"):
            (foreign / name).write_bytes(f"{name} of a classify run\n".encode())
        overrides = [f"classifier.cache_dir={foreign}"]
    else:  # a classifier stage given as the denoiser pretraining's cache (the classifier's own is shared)
        (foreign / "stage.json").write_text(json.dumps({"stage": "classifier", "seed": 0}))
        overrides = [stages.cache["classifier"], f"pretrain.cache_dir={foreign}"]
    before = _snapshot(foreign)
    assert main(["certify", f"hydra.run.dir={tmp_path / 'run'}", *TINY, *overrides, "method=mse"]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused untouched" in err and str(foreign) in err and len(err.splitlines()) == 1, err
    assert _snapshot(foreign) == before  # no stage.json, no .lock, nothing rewritten


def test_a_stage_written_before_the_batchnorm_fix_is_not_reused(tmp_path, capsys, stages):
    """Stages trained before revision 2 ran from their second epoch with BatchNorm frozen: retrain, don't reuse."""
    cache = [f"{k}.cache_dir={tmp_path / 'cache' / k}" for k in ("classifier", "pretrain")]
    for k in ("classifier", "pretrain"):  # finished stages of TINY, as this code writes them
        shutil.copytree(stages.dir / k, tmp_path / "cache" / k)
    stamp_file = tmp_path / "cache" / "classifier" / "stage.json"
    stamp = json.loads(stamp_file.read_text())
    assert stamp.pop("revision") == 2
    stamp_file.write_text(json.dumps(stamp))  # as the code before the fix wrote it
    capsys.readouterr()
    assert main(["certify", f"hydra.run.dir={tmp_path / 'b'}", *TINY, *cache, "method=mse"]) == 2
    err = capsys.readouterr().err.strip()
    assert "before stage revision 2" in err and "delete it to train it again" in err and len(err.splitlines()) == 1


def test_a_stage_cache_equal_to_the_runs_own_directory_is_refused(tmp_path, capsys, stages):
    """The stage took the run's own lock and dropped it mid-run: a second run could then write into it."""
    run_dir = tmp_path / "run"
    cache = [stages.cache["classifier"], f"pretrain.cache_dir={run_dir}"]
    assert main(["certify", f"hydra.run.dir={run_dir}", *TINY, *cache, "method=mse"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cache_dir {run_dir} is this run's own directory" in err
    assert len(err.splitlines()) == 1 and not (run_dir / "checkpoint.pt").exists()


def _cross_wait(own: Path, other: Path, ready: Path, peer: Path, out: Path) -> None:
    """A run of its own (a forked process): hold `own`, then wait for `other`; writes what it got to `out`."""
    sys.stdout = open(out, "w", buffering=1)  # the process ends with it
    lock_run_dir(own)
    ready.touch()
    while not peer.exists():
        time.sleep(0.02)
    try:
        lock_run_dir(other, wait=True)
    except RunError as exc:
        print(exc, flush=True)
        sys.exit(1)
    print("acquired", flush=True)


def test_two_runs_waiting_for_each_others_directories_do_not_wait_forever(tmp_path):
    """Caches that cross-reference each other: each run holds one directory and waits for the other's.
    The two runs are processes forked from this one (their own locks, no interpreter start-up each)."""
    a, b = tmp_path / "a", tmp_path / "b"
    fork = multiprocessing.get_context("fork")
    ready = {d: tmp_path / f"{d.name}.ready" for d in (a, b)}
    out = {d: tmp_path / f"{d.name}.out" for d in (a, b)}
    procs = [
        fork.Process(target=_cross_wait, args=(own, other, ready[own], ready[other], out[own]))
        for own, other in ((a, b), (b, a))
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    outs = [out[d].read_text().strip() for d in (a, b)]
    codes = sorted(p.exitcode for p in procs)
    assert codes == [0, 1], outs  # one sees the cycle and gives up; the other then gets the lock
    line = next(o for o, p in zip(outs, procs) if p.exitcode == 1).splitlines()[-1]  # after "waiting for ..."
    assert line.startswith("deadlock: waiting for") and "held by this run" in line
    assert any(o.endswith("acquired") for o in outs)


def test_waiting_for_a_stage_gives_up_after_its_timeout(tmp_path):
    from deepzero_apps.errors import RunError
    from deepzero_apps.rundir import lock_run_dir

    stage = tmp_path / "stage"
    stage.mkdir()
    fd = os.open(stage / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242\n", 0)
        with pytest.raises(RunError, match=r"gave up waiting for .*stage after 0.5 s \(held by PID 4242\)"):
            lock_run_dir(stage, wait=True, timeout=0.5)
    finally:
        os.close(fd)


def test_each_training_phase_labels_its_epoch_lines(stages):
    """The classifier, the denoiser's pretraining and the fine-tuning each print `<phase>: epoch i/n`
    (the stages' deepzero run trains all three)."""
    epochs = [line.split(" loss=")[0] for line in stages.out.splitlines() if " loss=" in line]
    assert epochs[:2] == ["classifier: epoch 1/1", "denoiser pretraining: epoch 1/1"], epochs
    assert epochs[2].startswith("fine-tuning (deepzero): epoch 1/20"), epochs


def test_certify_tsv_names_each_image_so_tables_of_other_subsets_pair_by_image(tmp_path, stages):
    cache = [stages.cache[k] for k in ("classifier", "pretrain")]
    tables = {}
    for limit in (4, 8):
        run = tmp_path / f"limit{limit}"
        assert main(["certify", f"hydra.run.dir={run}", *TINY, *cache, "method=mse", f"certify.limit={limit}"]) == 0
        tables[limit] = load_certification(run / "certify.tsv")
    small, large = ({r.image: r for r in tables[k]} for k in (4, 8))
    assert len(small) == 4 and len(large) == 8 and set(small) < set(large)
    assert [r.image for r in tables[4]] != [r.image for r in tables[8]][:4]  # rows are not images
    assert all(small[i].label == large[i].label for i in small)
    old = tmp_path / "old.tsv"  # a table written before the image column still reads
    old.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.3\t1\t0.5\n")
    assert load_certification(old)[0].image == ""


def _classifier_stage(tmp_path, train_x, train_y, test_x, test_y, epochs: int, batch_size: int):
    """certify's stage 1 (classifier=train, small_cnn with BatchNorm) on in-memory 8x8 images."""
    from omegaconf import OmegaConf

    from deepzero_apps.data import DataBundle, LabeledTensorDataset
    from deepzero_apps.tasks.certify.stages import build_classifier

    cfg = OmegaConf.create({
        "classifier": {"kind": "train", "output": "logits", "checkpoint": None, "cache_dir": str(tmp_path / "clf"),
                       "epochs": epochs, "batch_size": batch_size, "lr": 0.05},
        "model": {"_target_": "deepzero_apps.models.create_model", "name": "small_cnn", "depth": 2, "channels": 4},
        "data": {"name": "synthetic"}, "seed": 0, "device": "cpu", "eval_batch_size": 100, "log_every": 10,
        "progress": False,
    })  # fmt: skip
    data = DataBundle(LabeledTensorDataset(train_x, train_y), LabeledTensorDataset(test_x, test_y), 10, 1, 8, 8)
    norm = (torch.tensor([0.5]), torch.tensor([0.25]))
    return build_classifier(cfg, data, norm, tmp_path / "run")


def test_classifier_stage_trains_in_train_mode_after_each_epochs_evaluation(tmp_path):
    # Regression: the epoch-end test accuracy left the classifier in eval mode, so from the second epoch on it
    # trained with BatchNorm frozen at the first epoch's statistics (CIFAR-10, lr 0.05: 10 % from epoch 2).
    # In train mode every step updates the running statistics once: epochs x steps per epoch in all.
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8, generator=g), torch.arange(32) % 10
    classifier, _ = _classifier_stage(tmp_path, x, y, x[:10], y[:10], epochs=3, batch_size=8)
    counts = {int(m.num_batches_tracked) for m in classifier.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {3 * 4}, counts
    assert not classifier.training  # what the stage hands on is the black box, in eval mode


def test_classifier_accuracy_keeps_the_models_mode():
    from deepzero_apps.data import LabeledTensorDataset
    from deepzero_apps.tasks.certify.stages import accuracy

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    data = LabeledTensorDataset(torch.rand(4, 1, 5, 5), torch.zeros(4, dtype=torch.long))
    for training in (True, False):
        model.train(training)
        accuracy(model, data, 2, "cpu")
        assert all(m.training == training for m in model.modules())


def test_trainer_evaluation_leaves_every_modules_mode_as_it_was(tmp_path):
    # Any evaluate callback may switch the model to eval mode; the steps after it run in the modes set before.
    from deepzero_apps.data import LabeledTensorDataset
    from deepzero_apps.trainer import TrainerConfig

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 3))
    model[1].eval()  # a deliberately frozen layer stays frozen
    seen = []

    def loss(out, batch):
        seen.append([m.training for m in model])
        return nn.functional.cross_entropy(out, batch[1])

    def evaluate():
        model.eval()
        return {"test_acc": 0.0}

    data = LabeledTensorDataset(torch.rand(4, 1, 5, 5), torch.arange(4) % 3)
    objective = StagedObjective(model, loss, inputs=lambda b: b[0])
    trainer = Trainer(objective, FirstOrder(), torch.optim.SGD(model.parameters(), lr=0.01), data, evaluate, tmp_path,
                      TrainerConfig(epochs=2, batch_size=4, progress=False))
    trainer.fit()
    assert seen and all(modes == [True, False, True, True] for modes in seen), seen


def test_a_classifier_stage_at_chance_warns(tmp_path, caplog):
    # Every test image is the same: the classifier answers one class for all of them, exactly 1 in 10 right.
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 8, 8, generator=g), torch.arange(20) % 10
    test_x = torch.zeros(20, 1, 8, 8)
    with caplog.at_level("WARNING"):
        _, info = _classifier_stage(tmp_path, x, y, test_x, y, epochs=1, batch_size=10)
    assert info["test_acc"] == pytest.approx(0.1)
    lines = [r.getMessage() for r in caplog.records if "at chance" in r.getMessage()]
    assert len(lines) == 1 and "test accuracy 10.00% on 20 images" in lines[0], caplog.text


def test_near_chance_is_three_standard_deviations_above_one_over_the_classes():
    from deepzero_apps.tasks.certify.stages import near_chance

    assert near_chance(0.1, 10, 2000) and near_chance(0.115, 10, 2000)  # chance + 3 sd = 0.120 on 2,000 images
    assert not near_chance(0.13, 10, 2000) and not near_chance(0.6085, 10, 2000)
    assert near_chance(0.25, 10, 20) and not near_chance(0.55, 2, 2000)
