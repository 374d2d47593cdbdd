#!/usr/bin/env python3
"""Plot test accuracy against parameter count for FO / CGE / RGE runs (the paper's CGE-vs-RGE figure).

usage: plot_cge_vs_rge.py RUN_DIR [RUN_DIR ...] --out figure.png [--table table.md]
Each RUN_DIR is searched recursively for summary.json files written by `deepzero-task classify`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

LABELS = {"FirstOrder": "FO", "CGE": "CGE", "RGE": "RGE"}


def collect(dirs: list[Path]) -> dict[str, dict[int, list[float]]]:
    """method -> {parameter count: test accuracies, one per run (seed)}."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for d in dirs:
        for path in sorted(d.rglob("summary.json")):
            s = json.loads(path.read_text())
            acc[LABELS.get(s["estimator"], s["estimator"])][s["parameters"]].append(s["eval"]["test_acc"])
    return {m: dict(sorted(by_p.items())) for m, by_p in acc.items()}


def cell(runs: list[float]) -> str:
    """Mean test accuracy in %, with the standard deviation over seeds when there are several."""
    pct = [100 * a for a in runs]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f} (n={len(pct)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", type=Path, help="also write a markdown table")
    args = ap.parse_args()
    curves = collect(args.runs)
    if not curves:
        raise SystemExit(f"no summary.json under {', '.join(map(str, args.runs))}")
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for method, points in sorted(curves.items()):
        runs = list(points.values())
        ax.errorbar(
            list(points),
            [100 * statistics.mean(r) for r in runs],
            yerr=[100 * statistics.stdev(r) if len(r) > 1 else 0.0 for r in runs],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set(xlabel="parameters", ylabel="test accuracy (%)", xscale="log", title="FO vs CGE vs RGE (q = d)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    if args.table:
        params = sorted({p for pts in curves.values() for p in pts})
        rows = ["| method | " + " | ".join(f"{p:,}" for p in params) + " |", "|---" * (len(params) + 1) + "|"]
        for method, points in sorted(curves.items()):
            rows.append(f"| {method} | " + " | ".join(cell(points[p]) if p in points else "" for p in params) + " |")
        args.table.write_text("\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
