#!/usr/bin/env python3
"""results/certify/README.md's headline table, from the committed per-run certify.tsv files only.

Every paired comparison at r = 0.25 that the README draws a conclusion from: each fine-tuning run of
the budget curve against the MSE-only start of its sigma (the same 200 images), and the 1M-image
runs on the 300 images of the 500-image set that are not among the curve's 200 (they played no part
in choosing the setting). Pairs are matched by image id (`smoothing.certified_by_image`); p is the
exact two-sided sign test, and `p x m` its Bonferroni bound over all m rows, applied to the negative
findings as to the positive ones.

    python results/certify/headline.py     # writes results/certify/headline.md and headline.json
"""

from __future__ import annotations

from pathlib import Path

from deepzero_apps.checkpoint import atomic_write_json, atomic_write_text
from deepzero_apps.smoothing import certified_by_image, paired_sign_test

HERE = Path(__file__).parent
BUDGET = HERE / "budget"
RADIUS = 0.25
FRESH = [("fo_ds_1000000_stabmse", "mse"), ("deepzero_1000000_stabmse", "mse"),
         ("deepzero_1000000_stabmse", "fo_ds_1000000_stabmse"), ("fo_ds_300000_stabmse", "mse")]


def compare(a: Path, b: Path, exclude: set[str] = frozenset(), radius: float = RADIUS) -> dict:
    ca, cb = ({i: c for i, c in certified_by_image(d / "certify.tsv", radius).items() if i not in exclude}
              for d in (a, b))
    only_a, only_b, p = paired_sign_test(ca, cb)
    return {"images": len(ca), "certified_a": sum(ca.values()), "certified_b": sum(cb.values()),
            "only_a": only_a, "only_b": only_b, "p": p}


def main() -> None:
    rows = []
    for sigma in ("0.25", "0.5"):
        root = BUDGET / f"sigma{sigma}"
        for run in sorted(d for d in root.iterdir() if (d / "certify.tsv").exists() and d.name != "mse"):
            rows.append({"sigma": sigma, "a": run.name, "b": "mse", "images_used": "the curve's 200",
                         **compare(run, root / "mse")})
    curve = set(certified_by_image(BUDGET / "sigma0.25" / "mse" / "certify.tsv", 0.0))
    for a, b in FRESH:
        root = BUDGET / "sigma0.25_500images"
        rows.append({"sigma": "0.25", "a": a, "b": b, "images_used": "300 fresh (500 minus the curve's 200)",
                     **compare(root / a, root / b, curve)})
    m = len(rows)
    for r in rows:
        r["p_bonferroni"] = min(1.0, r["p"] * m)
    lines = [f"| sigma | run (a) | against (b) | images | certified a / b at r = {RADIUS} | only a / only b | p | p x {m} |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        bold = "**" if r["p_bonferroni"] < 0.05 else ""
        lines.append(f"| {r['sigma']} | {r['a']} | {r['b']} | {r['images_used']} | "
                     f"{r['certified_a'] / r['images']:.1%} / {r['certified_b'] / r['images']:.1%} | "
                     f"{r['only_a']} / {r['only_b']} | {r['p']:.3g} | {bold}{r['p_bonferroni']:.3g}{bold} |")
    atomic_write_text(HERE / "headline.md", "\n".join(lines) + "\n")
    atomic_write_json(HERE / "headline.json", rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
