#!/usr/bin/env python3
"""Plot test accuracy against parameter count for FO / CGE / RGE runs (the paper's CGE-vs-RGE figure).

usage: plot_cge_vs_rge.py RUN_DIR [RUN_DIR ...] --out figure.png [--table table.md]
Each RUN_DIR is searched recursively for summary.json files written by `deepzero-task classify`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

LABELS = {"FirstOrder": "FO", "CGE": "CGE", "RGE": "RGE"}


def collect(dirs: list[Path]) -> dict[str, dict[int, float]]:
    """method -> {parameter count: test accuracy} (mean over seeds)."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for d in dirs:
        for path in sorted(d.rglob("summary.json")):
            s = json.loads(path.read_text())
            acc[LABELS.get(s["estimator"], s["estimator"])][s["parameters"]].append(s["eval"]["test_acc"])
    return {m: {p: sum(v) / len(v) for p, v in sorted(by_p.items())} for m, by_p in acc.items()}


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
        ax.plot(list(points), [100 * a for a in points.values()], marker="o", label=method)
    ax.set(xlabel="parameters", ylabel="test accuracy (%)", xscale="log", title="FO vs CGE vs RGE (q = d)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    if args.table:
        params = sorted({p for pts in curves.values() for p in pts})
        rows = ["| method | " + " | ".join(f"{p:,}" for p in params) + " |", "|---" * (len(params) + 1) + "|"]
        for method, points in sorted(curves.items()):
            rows.append(f"| {method} | " + " | ".join(f"{100 * points[p]:.2f}" if p in points else "" for p in params) + " |")
        args.table.write_text("\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
