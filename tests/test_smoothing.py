"""Randomized smoothing: Clopper-Pearson bound, certify/predict against closed forms, tables and plots."""

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from deepzero_apps.blackbox import BlackBoxClassifier
from deepzero_apps.smoothing import (
    ABSTAIN,
    CertifyRow,
    Smoothed,
    certified_accuracy,
    certified_by_image,
    certify_dataset,
    clopper_pearson_lower,
    clopper_pearson_lower_array,
    load_certification,
    paired_sign_test,
    plot_certified_accuracy,
    resumable_certification,
)


class Scripted:
    """Fake base classifier: ignores the images and returns the labels of a fixed script in order.

    ``certify`` draws its n0 selection samples, then its n estimation samples, so a script of
    ``n0 + n`` labels fixes both counts exactly.
    """

    def __init__(self, *segments: tuple[int, int]) -> None:
        self.labels = torch.cat([torch.full((count,), label) for label, count in segments])
        self.pos = 0
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(z.shape))
        out = self.labels[self.pos : self.pos + len(z)]
        self.pos += len(z)
        return out


def _linear(w: torch.Tensor, b: float):
    """Half-space classifier: class 1 where w.z + b > 0, else class 0."""
    return lambda z: (z.flatten(1) @ w.flatten() + b > 0).long()


# --- Clopper-Pearson ---------------------------------------------------------------------------

CASES = [
    (1, 1, 0.001),
    (5, 10, 0.05),
    (920, 1000, 0.001),
    (99_990, 100_000, 0.001),
    (7, 7, 0.01),
    (3, 50, 0.2),
]


@pytest.mark.parametrize(("k", "n", "alpha"), CASES)
def test_clopper_pearson_matches_scipy_and_definition(k: int, n: int, alpha: float) -> None:
    lower = clopper_pearson_lower(k, n, alpha)
    assert lower == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-12)
    # One-sided (1 - alpha) lower bound == lower end of the two-sided exact CI at level 1 - 2 alpha.
    ci = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    assert lower == pytest.approx(ci.low, rel=1e-9)
    # Definition: the largest p with P(Bin(n, p) >= k) <= alpha.
    assert binom.sf(k - 1, n, lower) == pytest.approx(alpha, rel=1e-6)
    assert 0.0 < lower < k / n or (k == n and lower == pytest.approx(alpha ** (1 / n)))


def test_clopper_pearson_zero_successes_and_validation() -> None:
    assert clopper_pearson_lower(0, 100, 0.001) == 0.0
    for bad in [(-1, 10, 0.1), (11, 10, 0.1), (0, 0, 0.1), (1, 10, 0.0), (1, 10, 1.0)]:
        with pytest.raises(ValueError):
            clopper_pearson_lower(*bad)


def test_clopper_pearson_vectorized() -> None:
    ks = np.array([0, 1, 50, 100])
    got = clopper_pearson_lower_array(ks, 100, 0.01)
    assert got.shape == (4,)
    np.testing.assert_allclose(got, [clopper_pearson_lower(int(k), 100, 0.01) for k in ks], rtol=0)


# --- certify / predict with exactly known counts ---------------------------------------------------


def test_certify_radius_exact_closed_form() -> None:
    n0, n, n_a, alpha, sigma = 100, 1000, 920, 0.001, 0.5
    base = Scripted((0, 40), (2, 60), (2, n_a), (1, n - n_a))
    x = torch.zeros(3, 4, 4)
    prediction, radius = Smoothed(base, num_classes=3, sigma=sigma).certify(x, n0, n, alpha, batch_size=64)
    assert prediction == 2
    assert radius == pytest.approx(sigma * norm.ppf(beta.ppf(alpha, n_a, n - n_a + 1)), rel=1e-12)
    # Noisy copies of the single image are sent in chunks of at most batch_size.
    assert all(shape[1:] == (3, 4, 4) and shape[0] <= 64 for shape in base.shapes)
    assert sum(shape[0] for shape in base.shapes) == n0 + n


def test_certify_abstains_below_one_half() -> None:
    n0, n, alpha = 100, 1000, 0.001
    # 540/1000 looks like a majority but its lower bound is below 1/2.
    assert clopper_pearson_lower(540, n, alpha) < 0.5
    base = Scripted((1, n0), (1, 540), (0, n - 540))
    assert Smoothed(base, 2, 0.25).certify(torch.zeros(1, 2, 2), n0, n, alpha) == (ABSTAIN, 0.0)


def test_certify_uses_selection_guess_not_estimation_majority() -> None:
    # Selection says class 0; the estimation samples are mostly class 1, so class 0 is not certified.
    base = Scripted((0, 10), (1, 900), (0, 100))
    assert Smoothed(base, 2, 0.25).certify(torch.zeros(1, 1, 1), 10, 1000, 0.001) == (ABSTAIN, 0.0)


def test_predict_binomial_test() -> None:
    x = torch.zeros(1, 1, 1)
    assert Smoothed(Scripted((1, 200)), 3, 0.25).predict(x, 200, 0.001) == 1
    assert Smoothed(Scripted((0, 100), (1, 100)), 3, 0.25).predict(x, 200, 0.001) == ABSTAIN
    # 60 vs 40 of 100: two-sided p-value ~0.057, so commit at alpha = 0.1 but abstain at 0.05.
    assert Smoothed(Scripted((2, 60), (0, 40)), 3, 0.25).predict(x, 100, 0.1) == 2
    assert Smoothed(Scripted((2, 60), (0, 40)), 3, 0.25).predict(x, 100, 0.05) == ABSTAIN


def test_bad_base_classifier_output_is_reported() -> None:
    x = torch.zeros(1, 1, 1)
    with pytest.raises(ValueError, match="integer labels"):
        Smoothed(lambda z: torch.zeros(len(z), 2), 2, 0.25).sample_counts(x, 10)
    with pytest.raises(ValueError, match="outside"):
        Smoothed(lambda z: torch.full((len(z),), 5), 2, 0.25).sample_counts(x, 10)


# --- linear classifier: Cohen's closed form ---------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "b", "x"),
    [
        (torch.tensor([2.0]), -1.0, torch.tensor([[[0.8]]])),  # 1-pixel image, distance 0.3
        (torch.tensor([1.0, -2.0, 0.5, 2.0]), 0.2, torch.tensor([[[0.1, -0.1], [0.0, 0.05]]])),
    ],
)
def test_linear_classifier_radius_approaches_distance(w: torch.Tensor, b: float, x: torch.Tensor) -> None:
    sigma, n, alpha = 0.5, 100_000, 0.001
    margin = float(w @ x.flatten() + b)
    distance = abs(margin) / float(w.norm())
    smoothed = Smoothed(_linear(w, b), num_classes=2, sigma=sigma, seed=3)
    counts = smoothed.sample_counts(x, n, batch_size=n)
    # The smoothed class probability of a half-space is exactly Phi(distance / sigma).
    assert counts[int(margin > 0)] / n == pytest.approx(norm.cdf(distance / sigma), abs=0.01)
    prediction, radius = smoothed.certify(x, 100, n, alpha, batch_size=n)
    assert prediction == int(margin > 0)
    assert distance - 0.02 < radius < distance


def test_noise_is_reproducible_and_seeded() -> None:
    x = torch.tensor([[[0.05]]])
    smoothed = Smoothed(_linear(torch.tensor([1.0]), 0.0), 2, 1.0, seed=11)
    first = smoothed.sample_counts(x, 500)
    assert np.array_equal(first, smoothed.sample_counts(x, 500))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert np.array_equal(smoothed.sample_counts(x, 500, 64, g1), smoothed.sample_counts(x, 500, 64, g2))
    assert not np.array_equal(
        smoothed.sample_counts(x, 500, 64, g1), smoothed.sample_counts(x, 500, 64, g2.manual_seed(2))
    )


def test_through_black_box_composition() -> None:
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        linear.bias.zero_()
    bb = BlackBoxClassifier(nn.Sequential(nn.Flatten(), linear), output="label", num_classes=2, batch_size=50)
    denoiser = nn.Identity()
    smoothed = Smoothed(lambda z: bb(denoiser(z)), num_classes=2, sigma=0.25)
    prediction, radius = smoothed.certify(
        torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), 20, 200, 0.001, batch_size=100
    )
    assert prediction == 0 and radius > 0.3
    assert bb.queries == 220


# --- tables, accuracy and plots ------------------------------------------------------------------------

HAND_TABLE = [
    CertifyRow(0, 0, 0, 0.6, 1, 0.1),
    CertifyRow(1, 1, 1, 0.1, 1, 0.1),
    CertifyRow(2, 2, ABSTAIN, 0.0, 0, 0.1),
    CertifyRow(3, 3, 0, 0.9, 0, 0.1),  # wrong, with a large radius: never counts
    CertifyRow(4, 4, 4, 0.25, 1, 0.1),  # radius exactly at the threshold counts
]


def test_certified_accuracy_hand_table() -> None:
    assert certified_accuracy(HAND_TABLE) == {0.0: 0.6, 0.25: 0.4, 0.5: 0.2, 0.75: 0.0, 1.0: 0.0}
    assert certified_accuracy(HAND_TABLE, radii=[0.1]) == {0.1: 0.6}
    with pytest.raises(ValueError):
        certified_accuracy([])


def _dataset() -> list[tuple[torch.Tensor, int]]:
    xs = [0.6, -0.4, 0.02, 0.3, -0.9, 0.15]
    return [(torch.tensor([[[v]]]), int(v > 0) if i != 3 else 0) for i, v in enumerate(xs)]


def _smoothed() -> Smoothed:
    return Smoothed(_linear(torch.tensor([1.0]), 0.0), num_classes=2, sigma=0.25)


def test_certify_dataset_csv_round_trip(tmp_path) -> None:
    out = tmp_path / "sub" / "cert.tsv"
    rows = certify_dataset(_smoothed(), _dataset(), out_csv=out, n0=20, n=400, alpha=0.01, progress=False)
    assert [r.idx for r in rows] == list(range(6))
    assert rows[0].predict == 1 and rows[0].radius > 0.4 and rows[0].correct == 1
    assert rows[2].predict == ABSTAIN and rows[2].radius == 0.0  # 0.02 from the boundary
    assert rows[3].correct == 0  # mislabeled example
    assert out.read_text().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime\timage"  # Cohen's columns + the image id
    assert [r.image for r in rows] == [str(i) for i in range(6)]  # no ids given: the position
    assert load_certification(out) == rows
    assert certified_accuracy(out) == certified_accuracy(rows)
    assert not (tmp_path / "sub" / "cert.tsv.partial").exists()
    comma = tmp_path / "comma.csv"
    comma.write_text("idx,label,predict,radius,correct,time\n0,1,1,0.5,1,0.2\n")
    assert load_certification(comma) == [CertifyRow(0, 1, 1, 0.5, 1, 0.2)]


def test_certify_dataset_is_reproducible_per_example(tmp_path) -> None:
    kwargs = {"n0": 20, "n": 300, "alpha": 0.01, "progress": False, "seed": 5}
    full = certify_dataset(_smoothed(), _dataset(), out_csv=tmp_path / "a.tsv", **kwargs)
    sub = certify_dataset(
        _smoothed(), _dataset(), out_csv=tmp_path / "b.tsv", skip=2, max_examples=2, **kwargs
    )
    assert [r.idx for r in sub] == [0, 2]
    assert [(r.predict, r.radius) for r in sub] == [(full[i].predict, full[i].radius) for i in (0, 2)]


def test_crash_keeps_previous_csv_and_partial_rows(tmp_path) -> None:
    out = tmp_path / "cert.tsv"
    out.write_text("previous results\n")

    def crashing():
        yield from _dataset()[:2]
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        certify_dataset(_smoothed(), crashing(), out_csv=out, n0=10, n=100, progress=False)
    assert out.read_text() == "previous results\n"
    partial = (tmp_path / "cert.tsv.partial").read_text().splitlines()
    assert len(partial) == 3 and partial[1].startswith("0\t1\t")


def test_plot_certified_accuracy(tmp_path) -> None:
    path = tmp_path / "curve.png"
    csv_path = tmp_path / "rows.tsv"
    certify_dataset(_smoothed(), _dataset()[:2], out_csv=csv_path, n0=10, n=100, progress=False)
    plot_certified_accuracy({"hand": HAND_TABLE, "from csv": csv_path}, path, title="modes")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_certified_accuracy({"hand": HAND_TABLE}, tmp_path / "b.png", max_radius=2.0)
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_an_interrupted_certification_keeps_its_rows_and_queries_only_the_rest(tmp_path) -> None:
    """A resume re-certified (and re-bought) every example; the finished rows are now kept."""
    kwargs = {"n0": 20, "n": 300, "alpha": 0.01, "progress": False, "seed": 5}
    full = certify_dataset(_smoothed(), _dataset(), out_csv=tmp_path / "full.tsv", **kwargs)

    out = tmp_path / "cert.tsv"
    lines = (tmp_path / "full.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "cert.tsv.partial").write_text("".join(lines[:3]) + lines[3][:7])  # 2 rows, then killed mid-line
    done = resumable_certification(out)
    assert done == full[:2]
    calls = []
    base = _linear(torch.tensor([1.0]), 0.0)
    smoothed = Smoothed(lambda z: calls.append(len(z)) or base(z), num_classes=2, sigma=0.25)
    rows = certify_dataset(smoothed, _dataset(), out_csv=out, done=done, batch_size=1000, **kwargs)
    assert [(r.idx, r.predict, r.radius) for r in rows] == [(r.idx, r.predict, r.radius) for r in full]
    assert sum(calls) == 4 * (20 + 300)  # only the four examples not finished before
    assert load_certification(out) == rows
    with pytest.raises(ValueError, match="not the same certification"):
        certify_dataset(_smoothed(), _dataset()[1:], out_csv=tmp_path / "other.tsv", done=done, **kwargs)


def test_paired_sign_test_pairs_tables_by_image_not_by_row(tmp_path) -> None:
    """Two tables of the same images in other row orders (as subsets of different sizes give): the
    discordant counts and McNemar's exact p come from matching ids; by position they would differ."""
    a = [CertifyRow(i, 0, 0, r, 1, 0.1, f"img{i}") for i, r in enumerate((0.5, 0.5, 0.5, 0.1, 0.5, 0.5))]
    b = [CertifyRow(i, 0, 0, r, 1, 0.1, f"img{i}") for i, r in enumerate((0.1, 0.1, 0.1, 0.5, 0.1, 0.5))]
    b_shuffled = [b[i] for i in (5, 3, 0, 4, 1, 2)]
    only_a, only_b, p = paired_sign_test(certified_by_image(a, 0.25), certified_by_image(b_shuffled, 0.25))
    assert (only_a, only_b) == (4, 1) and p == binomtest(4, 5).pvalue
    assert paired_sign_test({"x": True}, {"x": True}) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="certify different images"):
        paired_sign_test(certified_by_image(a, 0.25), certified_by_image(b[:5], 0.25))
    old = tmp_path / "old.tsv"
    old.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0.2\n")
    with pytest.raises(ValueError, match=r"old\.tsv names no images .*image_ids\.py"):
        certified_by_image(old, 0.25)
    with pytest.raises(ValueError, match="names an image twice"):
        certified_by_image([a[0], a[0]], 0.25)
