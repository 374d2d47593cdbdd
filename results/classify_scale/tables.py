#!/usr/bin/env python3
"""Rebuild results/classify_scale's tables and curves from the committed per-run files (issue #29).

Each run folder per_run/<cell>/seed<S>/ holds config.yaml (the composed config), summary.json, metrics.jsonl
(train lines every 20 steps, an `eval` line every 100 steps on the fixed 1,000-image test subset) and
full_test.json (the final weights on all 10,000 test images, `scripts/sparsity_full_test.py`, with one 0/1
character per image in the test tree's sorted order). Cells are recognised from the config, not folder names.

Writes tables.md (accuracy per cell, paired comparisons by seed and by image, queries to accuracy) and
curves.png (subset accuracy against steps and against queries). Needs no data and no run.

usage: python results/classify_scale/tables.py [--runs results/classify_scale/per_run] [--out results/classify_scale]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml
from matplotlib.figure import Figure
from scipy.stats import ttest_rel

from deepzero_apps.smoothing import paired_sign_test

HERE = Path(__file__).resolve().parent
ORDER = ["FO", "FO masked 90%", "ZO dense", "ZO-GraSP 90%", "random 90%", "uniform 90%", "ZO-GraSP 95%"]
COMPARISONS = [  # (a, b, the question it answers)
    ("ZO-GraSP 90%", "FO", "how far is sparse ZO from FO at the same steps?"),
    ("ZO-GraSP 90%", "FO masked 90%", "is the ZO estimate on the sparse set as good as the true gradient there?"),
    ("ZO-GraSP 90%", "random 90%", "does ZO-GraSP beat random layer ratios?"),
    ("ZO-GraSP 90%", "uniform 90%", "does ZO-GraSP beat uniform layer ratios?"),
    ("ZO-GraSP 95%", "ZO-GraSP 90%", "what does going from 90 % to 95 % sparsity cost?"),
    ("ZO-GraSP 90%", "ZO dense", "does sparse CGE stay within 1-2 points of dense CGE?"),
    ("ZO dense", "FO", "does dense CGE reach FO at the same steps?"),
]
THRESHOLDS = [0.30, 0.40, 0.45]


def cell_of(cfg: dict) -> str:
    sp = cfg["sparsity"]
    if cfg["mode"] == "fo":  # a sparse setting masks FO's gradient to the same coordinate sets as ZO's
        return "FO" if sp["method"] == "dense" else f"FO masked {round(100 * sp['sparsity'])}%"
    if sp["method"] == "dense":
        return "ZO dense"
    name = {"zo_grasp": "ZO-GraSP", "random": "random", "uniform": "uniform"}[sp["method"]]
    return f"{name} {round(100 * sp['sparsity'])}%"


def load_run(path: Path) -> dict:
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    summary = json.loads((path / "summary.json").read_text())
    full = json.loads((path / "full_test.json").read_text())
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r.get("kind") == "eval"]
    return {
        "cell": cell_of(cfg),
        "seed": cfg["seed"],
        "acc": full["test_acc"],
        "correct": full["correct"],
        "queries": summary["queries"],
        "steps": summary["steps"],
        "wall_s": summary["wall_s"],
        "q_step": summary["queries"] / summary["steps"],
        "curve": [(r["step"], r["queries"], r["eval"]["test_acc"]) for r in evals],
    }


def mean_sd(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    v = [scale * a for a in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (n=1)"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f} (n={len(v)})"


def accuracy_table(cells: dict[str, dict[int, dict]]) -> list[str]:
    out = ["| cell | full test accuracy %, mean ± sd | per seed (0, 1, 2) | subset accuracy at step 1,000 % | "
           "queries per step | queries per run | wall time per run, s |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for name in ORDER:
        runs = cells.get(name)
        if not runs:
            out.append(f"| {name} | not run | | | | | |")
            continue
        seeds = sorted(runs)
        per_seed = ", ".join(f"s{s} {100 * runs[s]['acc']:.2f}" for s in seeds)
        subset = mean_sd([runs[s]["curve"][-1][2] for s in seeds], digits=1)
        q_step = statistics.mean(runs[s]["q_step"] for s in seeds)
        queries = statistics.mean(runs[s]["queries"] for s in seeds)
        walls = ", ".join(f"{runs[s]['wall_s']:.0f}" for s in seeds)
        out.append(f"| {name} | {mean_sd([runs[s]['acc'] for s in seeds])} | {per_seed} | {subset} | "
                   f"{q_step:,.0f} | {queries:,.0f} | {walls} |")
    return out


def mcnemar(a: str, b: str) -> tuple[int, int, float]:
    """Images only `a` / only `b` gets right ('0'/'1' per test image, in the same order), and the exact
    two-sided sign test on them."""
    return paired_sign_test(*({i: x == "1" for i, x in enumerate(s)} for s in (a, b)))


def comparison_table(cells: dict[str, dict[int, dict]]) -> list[str]:
    out = ["| a | b | question | seeds | a − b per seed, points | mean ± sd | paired t-test p (seeds) | "
           "only a / only b right of 10,000 images, per seed (sign-test p) |",
           "|---|---|---|---|---|---:|---:|---|"]
    for a, b, question in COMPARISONS:
        seeds = sorted(set(cells.get(a, {})) & set(cells.get(b, {})))
        if not seeds:
            missing = " and ".join(c for c in (a, b) if not cells.get(c))
            out.append(f"| {a} | {b} | {question} | none | {missing} not run | | | |")
            continue
        ra, rb = cells[a], cells[b]
        diffs = [100 * (ra[s]["acc"] - rb[s]["acc"]) for s in seeds]
        per_seed = ", ".join(f"s{s} {d:+.2f}" for s, d in zip(seeds, diffs))
        spread = f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}" if len(seeds) > 1 else f"{diffs[0]:+.2f}"
        p = ttest_rel([ra[s]["acc"] for s in seeds], [rb[s]["acc"] for s in seeds]).pvalue if len(seeds) > 2 else None
        images = "; ".join(
            f"s{s} {oa} / {ob} ({pv:.3g})" for s in seeds for oa, ob, pv in [mcnemar(ra[s]["correct"], rb[s]["correct"])]
        )
        out.append(f"| {a} | {b} | {question} | {', '.join(map(str, seeds))} | {per_seed} | {spread} | "
                   f"{'n < 3' if p is None else f'{p:.3g}'} | {images} |")
    return out


def first_reaching(curve: list[tuple[int, int, float]], threshold: float) -> tuple[int, int] | None:
    return next(((step, q) for step, q, acc in curve if acc >= threshold), None)


def queries_table(cells: dict[str, dict[int, dict]]) -> list[str]:
    head = " | ".join(f"first eval ≥ {100 * t:.0f} %: step (queries)" for t in THRESHOLDS)
    out = [f"| cell | {head} |", "|---|" + "---|" * len(THRESHOLDS)]
    for name in ORDER:
        runs = cells.get(name)
        if not runs:
            continue
        row = []
        for t in THRESHOLDS:
            hits = [first_reaching(runs[s]["curve"], t) for s in sorted(runs)]
            row.append(", ".join("never" if h is None else f"{h[0]} ({h[1]:,})" for h in hits))
        out.append(f"| {name} | " + " | ".join(row) + " |")
    return out


def plot(cells: dict[str, dict[int, dict]], path: Path) -> None:
    fig = Figure(figsize=(11, 4.2))
    by_steps, by_queries = fig.subplots(1, 2)
    for i, name in enumerate(n for n in ORDER if n in cells):
        color = f"C{i}"
        for k, s in enumerate(sorted(cells[name])):
            steps, queries, acc = zip(*cells[name][s]["curve"])
            label = name if k == 0 else None
            by_steps.plot(steps, [100 * a for a in acc], color=color, alpha=0.8, label=label, marker=".")
            by_queries.plot(queries, [100 * a for a in acc], color=color, alpha=0.8, label=label, marker=".")
    by_steps.set(xlabel="training step (batch 32)", ylabel="test accuracy on the 1,000-image subset, %",
                 title="against steps (one line per seed)")
    by_queries.set(xscale="log", xlabel="queries (loss evaluations of a batch)", title="against queries")
    for ax in (by_steps, by_queries):
        ax.grid(alpha=0.3)
    by_steps.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=HERE / "per_run")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    cells: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(p.parent for p in args.runs.glob("*/seed*/summary.json")):
        run = load_run(path)
        cells[run["cell"]][run["seed"]] = run
    text = [
        "# results/classify_scale tables (written by tables.py from per_run/; do not edit)", "",
        "## Final weights on all 10,000 CIFAR-10 test images", "", *accuracy_table(cells), "",
        "## Paired comparisons (by seed; and by image, per seed)", "", *comparison_table(cells), "",
        "## Queries to accuracy (1,000-image test subset, evaluated every 100 steps)", "", *queries_table(cells), "",
    ]
    (args.out / "tables.md").write_text("\n".join(text))
    plot(cells, args.out / "curves.png")
    print("\n".join(text))


if __name__ == "__main__":
    main()
