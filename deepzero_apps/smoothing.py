"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter, ICML 2019).

The certified-defense application puts a denoiser, trained with zeroth-order methods, in front of a
query-only classifier. Smoothing the composition ``g(x) = argmax_c P(f(x + eps) = c)``, with
``eps ~ N(0, sigma^2 I)``, gives an L2 robustness certificate of radius ``sigma * Phi^-1(pA)`` that
needs only label queries, hence works through a black box. This module follows Cohen's reference
code (``core.py``: ``predict`` / ``certify``; ``certify.py``: the per-example table) and adds the
certified-accuracy curve used to compare denoiser training modes.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.stats import beta, binomtest, norm
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "ABSTAIN",
    "CertifyRow",
    "Smoothed",
    "certified_accuracy",
    "certify_dataset",
    "clopper_pearson_lower",
    "clopper_pearson_lower_array",
    "load_certification",
    "plot_certified_accuracy",
    "resumable_certification",
]

ABSTAIN = -1
"""Prediction returned when the smoothed classifier cannot commit to a class at the requested alpha."""

_DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def clopper_pearson_lower_array(k: ArrayLike, n: ArrayLike, alpha: float) -> np.ndarray:
    """Vectorized one-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion.

    The bound ``p`` solves ``P(Bin(n, p) >= k) = alpha``, i.e. ``Beta(alpha; k, n - k + 1)``, and is 0
    when ``k == 0``. Equal to Cohen's ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k_arr = np.asarray(k)
    n_arr = np.asarray(n)
    if np.any(n_arr < 1) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ValueError("need 0 <= k <= n and n >= 1")
    k_f, n_f = np.broadcast_arrays(k_arr.astype(float), n_arr.astype(float))
    positive = k_f > 0
    bound = np.zeros(k_f.shape)
    bound[positive] = beta.ppf(alpha, k_f[positive], n_f[positive] - k_f[positive] + 1)
    return bound


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` lower confidence bound on ``p`` from ``k`` successes in ``n`` trials."""
    return float(clopper_pearson_lower_array(k, n, alpha))


class Smoothed:
    """Smoothed classifier ``g`` built on a base classifier that only has to return top-1 labels.

    Args:
        base_classifier: maps an ``(N, *x.shape)`` float batch to a ``(N,)`` integer label tensor,
            e.g. ``lambda z: blackbox(denoiser(z))`` with ``BlackBoxClassifier(output="label")``.
        num_classes: number of classes of the base classifier.
        sigma: standard deviation of the Gaussian noise; also the scale of certified radii.
        seed: seeds the noise generator whenever a method is called without an explicit one, so that
            every call is reproducible.
    """

    def __init__(
        self, base_classifier: Callable[[Tensor], Tensor], num_classes: int, sigma: float, *, seed: int = 0
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma
        self.seed = seed

    def _generator(self, x: Tensor, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        return torch.Generator(device=x.device).manual_seed(self.seed)

    def sample_counts(
        self, x: Tensor, num: int, batch_size: int = 1000, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """Count the base classifier's labels on ``num`` noisy copies of the single example ``x``.

        Noise is drawn from ``generator`` (on the generator's device, then moved to ``x``'s), so a
        seeded generator makes the counts reproducible. Returns an int64 array of ``num_classes``.
        """
        if num < 0 or batch_size < 1:
            raise ValueError(f"need num >= 0 and batch_size >= 1, got num={num}, batch_size={batch_size}")
        gen = self._generator(x, generator)
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        remaining = num
        with torch.no_grad():
            while remaining > 0:
                this_batch = min(batch_size, remaining)
                remaining -= this_batch
                shape = (this_batch, *x.shape)
                noise = torch.randn(shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
                labels = self.base_classifier(x.unsqueeze(0) + self.sigma * noise)
                counts += self._count(labels, this_batch)
        return counts.numpy()

    def _count(self, labels: Tensor, expected: int) -> Tensor:
        """Validate a batch of top-1 labels and histogram it."""
        if not isinstance(labels, Tensor) or labels.shape != (expected,) or labels.is_floating_point():
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(
                f"base classifier must return integer labels of shape ({expected},), got {got}"
                + (f" of dtype {labels.dtype}" if isinstance(labels, Tensor) else "")
            )
        labels = labels.long().cpu()
        if expected and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"base classifier returned labels outside [0, {self.num_classes})")
        return torch.bincount(labels, minlength=self.num_classes)

    def predict(
        self,
        x: Tensor,
        n: int,
        alpha: float,
        batch_size: int = 1000,
        generator: torch.Generator | None = None,
    ) -> int:
        """Monte Carlo prediction of ``g(x)``; returns :data:`ABSTAIN` unless the top class wins a
        two-sided binomial test against the runner-up at level ``alpha`` (Cohen's ``PREDICT``), which
        bounds the probability of returning a class other than ``g(x)`` by ``alpha``.
        """
        counts = self.sample_counts(x, n, batch_size, generator)
        top2 = np.argsort(counts, kind="stable")[::-1][:2]
        count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
        if count1 == 0 or binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])

    def certify(
        self,
        x: Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int = 1000,
        generator: torch.Generator | None = None,
    ) -> tuple[int, float]:
        """Cohen's ``CERTIFY``: returns ``(class, L2 radius)`` or ``(ABSTAIN, 0.0)``.

        The class is guessed from ``n0`` selection samples, then its probability is lower-bounded from
        ``n`` fresh estimation samples (separate draws, so the guess does not bias the bound). With
        probability at least ``1 - alpha`` a returned class is robust within the returned radius.
        """
        gen = self._generator(x, generator)
        guess = int(np.argmax(self.sample_counts(x, n0, batch_size, gen)))
        n_a = int(self.sample_counts(x, n, batch_size, gen)[guess])
        p_a_lower = clopper_pearson_lower(n_a, n, alpha)
        if p_a_lower < 0.5:
            return ABSTAIN, 0.0
        return guess, float(self.sigma * norm.ppf(p_a_lower))


@dataclass(frozen=True)
class CertifyRow:
    """One line of a certification table; ``time`` is wall-clock seconds spent certifying it.

    ``idx`` is the row's position in the certified subset (it seeds the row's noise); ``image`` names the
    image itself (a dataset path or index, see `data.image_ids`), so tables of different subsets pair
    by image; tables written before it existed read as ``""``.
    """

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float
    image: str = ""


_COLUMNS = tuple(f.name for f in fields(CertifyRow))
Rows = Sequence[CertifyRow] | str | os.PathLike


def _example_generator(seed: int, idx: int, device: torch.device) -> torch.Generator:
    """Noise generator depending on (seed, idx) only, so any example's result can be reproduced alone."""
    (state,) = np.random.SeedSequence([seed, idx]).generate_state(1, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state))


def certify_dataset(
    smoothed: Smoothed,
    data: Iterable[tuple[Tensor, int | Tensor]],
    *,
    out_csv: str | os.PathLike,
    n0: int = 100,
    n: int = 10000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    skip: int = 1,
    max_examples: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    done: Sequence[CertifyRow] = (),
    ids: Sequence[str] | None = None,
) -> list[CertifyRow]:
    """Certify every ``skip``-th ``(x, label)`` example and write a tab-separated table to ``out_csv``.

    Columns are Cohen's ``idx label predict radius correct time`` (time in seconds) and ``image``,
    ``ids[idx]`` (default: ``idx``), which identifies the image across tables. Rows are
    appended and flushed to ``<out_csv>.partial`` as they come, so a crash keeps partial results
    there while any previous ``out_csv`` stays intact; the finished table replaces ``out_csv``
    atomically. Each example draws noise from a generator seeded by ``(seed, idx)``, so ``done`` (the
    rows of an interrupted run with the same settings, :func:`resumable_certification`) are kept
    instead of certified, and paid for, again: the first examples, in order, with the same labels
    (otherwise ``ValueError``).
    """
    if skip < 1:
        raise ValueError(f"skip must be >= 1, got {skip}")
    if ids is not None and hasattr(data, "__len__") and len(ids) != len(data):
        raise ValueError(f"{len(ids)} image ids for {len(data)} examples")
    out_path = Path(out_csv)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    total = None
    if hasattr(data, "__len__"):
        total = math.ceil(len(data) / skip)
        if max_examples is not None:
            total = min(total, max_examples)
    rows: list[CertifyRow] = []
    with open(partial, "w", newline="") as fh, tqdm(total=total, disable=not progress, desc="certify") as bar:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(_COLUMNS)
        fh.flush()
        for idx, (x, label) in enumerate(data):
            if max_examples is not None and len(rows) >= max_examples:
                break
            if idx % skip:
                continue
            label = int(label)
            if len(rows) < len(done):
                row = done[len(rows)]
                image = str(ids[idx]) if ids is not None else str(idx)
                if (row.idx, row.label, row.image or image) != (idx, label, image):
                    raise ValueError(f"{out_path}: a kept row is example {row.idx} (label {row.label}, image "
                                     f"{row.image or '?'}), this run's is {idx} (label {label}, image {image}); "
                                     "not the same certification")
                rows.append(row)
                writer.writerow(astuple(row))
                bar.update(1)
                continue
            x = x if device is None else x.to(device)
            start = time.perf_counter()
            gen = _example_generator(seed, idx, x.device)
            prediction, radius = smoothed.certify(x, n0, n, alpha, batch_size, gen)
            row = CertifyRow(
                idx, label, prediction, radius, int(prediction == label), time.perf_counter() - start,
                str(ids[idx]) if ids is not None else str(idx),
            )
            rows.append(row)
            writer.writerow(astuple(row))
            fh.flush()
            bar.update(1)
            bar.set_postfix(acc=f"{sum(r.correct for r in rows) / len(rows):.3f}")
        if len(rows) < len(done):
            raise ValueError(f"{out_path}: {len(done)} kept rows, but this certification has {len(rows)} examples")
        os.fsync(fh.fileno())
    os.replace(partial, out_path)
    return rows


def resumable_certification(out_csv: str | os.PathLike) -> list[CertifyRow]:
    """The rows an interrupted :func:`certify_dataset` left (``<out_csv>.partial``, else a finished
    ``out_csv``), without a torn last line; none if there is nothing readable."""
    out_path = Path(out_csv)
    for path in (out_path.with_name(out_path.name + ".partial"), out_path):
        if not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        complete = "".join(ln for ln in lines if ln.endswith("\n"))  # a kill mid-write leaves a torn line
        try:
            return _parse_rows(complete.splitlines(), path)
        except (ValueError, KeyError, TypeError):
            return []
    return []


def load_certification(path: str | os.PathLike) -> list[CertifyRow]:
    """Read a table written by :func:`certify_dataset` (tab- or comma-separated, with header)."""
    with open(path, newline="") as fh:
        return _parse_rows(fh.read().splitlines(), path)


def _parse_rows(lines: Sequence[str], path: str | os.PathLike) -> list[CertifyRow]:
    reader = csv.DictReader(lines, delimiter="\t" if lines and "\t" in lines[0] else ",")
    missing = set(_COLUMNS) - set(reader.fieldnames or ()) - {"image"}  # older tables have no image column
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return [
        CertifyRow(
            int(r["idx"]),
            int(r["label"]),
            int(r["predict"]),
            float(r["radius"]),
            int(r["correct"]),
            float(r["time"]),
            r.get("image") or "",
        )
        for r in reader
    ]


def _as_rows(rows_or_csv: Rows) -> Sequence[CertifyRow]:
    return load_certification(rows_or_csv) if isinstance(rows_or_csv, str | os.PathLike) else rows_or_csv


def _accuracy_curve(rows: Sequence[CertifyRow], radii: np.ndarray) -> np.ndarray:
    """Certified accuracy at each radius: fraction of rows correct (not abstained) with radius >= r."""
    if not rows:
        raise ValueError("no certification rows")
    predict = np.array([r.predict for r in rows])
    label = np.array([r.label for r in rows])
    radius = np.array([r.radius for r in rows], dtype=float)
    correct = (predict == label) & (predict != ABSTAIN)
    return (correct[None, :] & (radius[None, :] >= radii[:, None])).mean(axis=1)


def certified_accuracy(rows_or_csv: Rows, radii: Sequence[float] = _DEFAULT_RADII) -> dict[float, float]:
    """Certified accuracy at each radius: the headline numbers of randomized-smoothing papers.

    Correctness is recomputed from ``predict == label`` (abstentions never count), so at ``r = 0`` this
    is the clean accuracy of the smoothed classifier.
    """
    acc = _accuracy_curve(_as_rows(rows_or_csv), np.asarray(radii, dtype=float))
    return {float(r): float(a) for r, a in zip(radii, acc, strict=True)}


def certified_by_image(rows_or_csv: Rows, radius: float) -> dict[str, bool]:
    """Whether each image (by its id, the `image` column) is certified correctly at `radius` or more:
    paired comparisons must match tables by image, as rows of different subsets are other images."""
    rows = _as_rows(rows_or_csv)
    where = rows_or_csv if isinstance(rows_or_csv, str | os.PathLike) else "the table"
    if not all(r.image for r in rows):
        raise ValueError(f"{where} names no images (written before the image column): run results/certify/image_ids.py on it")
    table = {r.image: bool(r.correct) and r.radius >= radius for r in rows}
    if len(table) != len(rows):
        raise ValueError(f"{where} names an image twice")
    return table


def paired_sign_test(a: Mapping[Hashable, bool], b: Mapping[Hashable, bool]) -> tuple[int, int, float]:
    """Images certified by `a` only, by `b` only, and the two-sided exact sign test on those discordant
    images (McNemar's exact test): the paired test for two certifications of the same images."""
    if a.keys() != b.keys():
        raise ValueError(f"the two tables certify different images ({len(a.keys() ^ b.keys())} not in both)")
    only_a = sum(a[i] and not b[i] for i in a)
    only_b = sum(b[i] and not a[i] for i in a)
    return only_a, only_b, binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0


def plot_certified_accuracy(
    curves: Mapping[str, Rows],
    path: str | os.PathLike,
    max_radius: float | None = None,
    title: str | None = None,
) -> None:
    """Save a PNG of certified accuracy vs L2 radius, one line per mode, to compare denoiser training.

    ``max_radius`` defaults to slightly beyond the largest certified radius. Uses the Agg canvas
    directly, without pyplot, so the global matplotlib backend is left untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tables = {name: _as_rows(rows) for name, rows in curves.items()}
    if not tables:
        raise ValueError("no curves to plot")
    if max_radius is None:
        largest = max((r.radius for rows in tables.values() for r in rows), default=0.0)
        max_radius = 1.05 * largest if largest > 0 else 1.0
    grid = np.linspace(0.0, max_radius, 501)
    fig = Figure(figsize=(6, 4), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, rows in tables.items():
        ax.plot(grid, _accuracy_curve(rows, grid), label=name)
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", xlim=(0.0, max_radius), ylim=(0.0, 1.0))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
