"""Paired exact sign tests of two certify runs over the same images, at several radii.

    python results/certify/paired_radii.py results/certify/budget/sigma0.25_500images/{fo_ds_300000_stabmse,mse}

An image counts at radius r when it is certified correctly with radius >= r; the test runs over the
images counted by one run and not the other.
"""

from __future__ import annotations

import sys
from pathlib import Path

from scipy.stats import binomtest

from deepzero_apps.smoothing import load_certification

RADII = (0.0, 0.25, 0.5)


def counted(run: Path, radius: float) -> dict[int, bool]:
    return {r.idx: bool(r.correct) and r.radius >= radius for r in load_certification(run / "certify.tsv")}


def main(a: Path, b: Path) -> None:
    print("| r | images | A | B | only A / only B | p (sign test) |\n|---:|---:|---:|---:|---:|---:|")
    for radius in RADII:
        x, y = counted(a, radius), counted(b, radius)
        assert x.keys() == y.keys(), "the runs certified different images"
        only_a, only_b = sum(x[i] and not y[i] for i in x), sum(y[i] and not x[i] for i in x)
        p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
        print(f"| {radius} | {len(x)} | {sum(x.values()) / len(x):.1%} | {sum(y.values()) / len(y):.1%} | "
              f"{only_a} / {only_b} | {p:.2g} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
