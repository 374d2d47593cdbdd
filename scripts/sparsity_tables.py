#!/usr/bin/env python3
"""Rebuild results/sparsity's tables and plot from the committed per-run files.

Each run folder (RUNS/<name>/) holds summary.json, metrics.jsonl, config.yaml (the run's composed config),
full_test.json (scripts/sparsity_full_test.py) and, for sparse runs, ratios.json. Cells are recognised from the
config, not from folder names. Writes tables.md (scorer ablation, sparsity sweep, resampling, references; mean ±
sd over seeds and paired differences by seed) and sweep.png (test accuracy against queries).

usage: sparsity_tables.py RESULTS/sparsity/per_run --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml
from matplotlib.figure import Figure


def load_run(path: Path) -> dict:
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    summary = json.loads((path / "summary.json").read_text())
    epochs = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r.get("kind") == "epoch"]
    full = path / "full_test.json"
    first, last = epochs[0], epochs[-1]
    steps = last["step"] - first["step"]
    return {
        "cell": cell_of(cfg),
        "seed": cfg["seed"],
        "acc": json.loads(full.read_text())["test_acc"] if full.exists() else None,
        "queries": summary["queries"],
        "steps": summary["steps"],
        "q_step": last["queries_per_step"],
        # forward-equivalents of one training step (epochs 2..n: the first epoch's record also holds the scoring)
        "fe_step": (last["forward_equivalents"] - first["forward_equivalents"]) / steps if steps else 0.0,
        "curve": [(r["queries"], r["eval"]["test_acc"]) for r in epochs],
        "ratios": json.loads((path / "ratios.json").read_text())["ratios"] if (path / "ratios.json").exists() else {},
    }


def cell_of(cfg: dict) -> tuple:
    """(mode, method, sparsity, mask_interval): the identity of a table cell."""
    sp = cfg["sparsity"]
    if cfg["mode"] == "fo":
        return ("fo", "dense", 0.0, None)
    if sp["method"] == "dense":
        return ("zo", "dense", 0.0, None)
    return ("zo", sp["method"], sp["sparsity"], sp["mask_interval"])


def pct(values: list[float]) -> str:
    v = [100 * a for a in values]
    if len(v) == 1:
        return f"{v[0]:.2f} (n=1)"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} (n={len(v)})"


def paired(runs: dict, cell: tuple, ref: tuple) -> str:
    """Mean ± sd over seeds of (cell − ref) accuracy, in points, on the seeds both have."""
    a = {r["seed"]: r["acc"] for r in runs.get(cell, []) if r["acc"] is not None}
    b = {r["seed"]: r["acc"] for r in runs.get(ref, []) if r["acc"] is not None}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "–"
    d = [100 * (a[s] - b[s]) for s in seeds]
    sd = f" ± {statistics.stdev(d):.2f}" if len(d) > 1 else ""
    return f"{statistics.mean(d):+.2f}{sd} (seeds {','.join(map(str, seeds))})"


def rows(runs: dict, cells: list[tuple[str, tuple]], ref: tuple | None, ref_name: str) -> list[str]:
    head = "| cell | test acc % (10,000 images) | queries / step | fwd-equiv / step | queries (run) |"
    sep = "|---|---|---|---|---|"
    if ref is not None:
        head, sep = head + f" paired Δ vs {ref_name} (points) |", sep + "---|"
    out = [head, sep]
    for label, cell in cells:
        rs = [r for r in runs.get(cell, []) if r["acc"] is not None]
        if not rs:
            out.append(f"| {label} | not run |" + " |" * (3 + (ref is not None)))
            continue
        line = (f"| {label} | {pct([r['acc'] for r in rs])} | {rs[0]['q_step']:,.0f} | "
                f"{statistics.mean(r['fe_step'] for r in rs):,.0f} | {statistics.mean(r['queries'] for r in rs):,.0f} |")
        if ref is not None:
            line += f" {'–' if cell == ref else paired(runs, cell, ref)} |"
        out.append(line)
    return out


def ratio_rows(runs: dict, cells: list[tuple[str, tuple]]) -> list[str]:
    """One row per scorer: the fraction of each conv/linear weight whose gradient is skipped."""
    layers = next((list(r["ratios"]) for _, c in cells for r in runs.get(c, []) if r["ratios"]), [])
    out = ["| scorer | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for label, cell in cells:
        rs = [r for r in runs.get(cell, []) if r["ratios"]]
        if rs:
            out.append(f"| {label} | " + " | ".join(f"{statistics.mean(r['ratios'][n] for r in rs):.3f}" for n in layers) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for path in sorted(p.parent for p in args.runs.glob("*/summary.json")):
        r = load_run(path)
        runs[r["cell"]].append(r)
    zo = lambda m, s=0.9, i=5: ("zo", m, s, i)  # noqa: E731
    fo, dense = ("fo", "dense", 0.0, None), ("zo", "dense", 0.0, None)
    tables = {
        "Scorer ablation at 90 % sparsity (mask redrawn every 5 epochs)": (
            [("ZO-GraSP", zo("zo_grasp")), ("GraSP (first-order)", zo("grasp")), ("random ratios", zo("random")),
             ("uniform 90 % per layer", zo("uniform"))], zo("zo_grasp"), "ZO-GraSP"),
        "ZO-GraSP sparsity sweep (mask redrawn every 5 epochs)": (
            [("dense CGE (0 %)", dense), ("80 %", zo("zo_grasp", 0.8)), ("90 %", zo("zo_grasp")),
             ("95 %", zo("zo_grasp", 0.95)), ("99 %", zo("zo_grasp", 0.99))], zo("zo_grasp"), "90 %"),
        "Resampling at 90 % (ZO-GraSP ratios)": (
            [("every epoch (mask_interval=1)", zo("zo_grasp", 0.9, 1)), ("every 5 epochs", zo("zo_grasp")),
             ("fixed (mask_interval=null)", zo("zo_grasp", 0.9, None))], zo("zo_grasp", 0.9, None), "fixed"),
        "References": ([("first-order SGD", fo), ("dense CGE", dense)], None, ""),
    }
    lines = []
    for title, (cells, ref, ref_name) in tables.items():
        lines += [f"### {title}", "", *rows(runs, cells, ref, ref_name), ""]
    lines += ["### Layer-wise pruning ratios at 90 % (mean over seeds)", "",
              *ratio_rows(runs, tables["Scorer ablation at 90 % sparsity (mask redrawn every 5 epochs)"][0]), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tables.md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(runs, [("dense CGE", dense), *[(f"ZO-GraSP {int(100 * s)} %", zo("zo_grasp", s)) for s in (0.8, 0.9, 0.95, 0.99)]],
         args.out / "sweep.png")


def plot(runs: dict, cells: list[tuple[str, tuple]], out: Path) -> None:
    """Per-epoch accuracy on the 100-image subset (mean over seeds) against queries; final 10,000-image points."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, cell in cells:
        rs = runs.get(cell, [])
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        qs = [statistics.mean(r["curve"][i][0] for r in rs) for i in range(n)]
        accs = [100 * statistics.mean(r["curve"][i][1] for r in rs) for i in range(n)]
        (line,) = ax.plot(qs, accs, marker=".", alpha=0.6, label=f"{label} (n={len(rs)})")
        final = [r["acc"] for r in rs if r["acc"] is not None]
        if final:
            ax.errorbar(qs[-1], 100 * statistics.mean(final), yerr=100 * statistics.stdev(final) if len(final) > 1 else 0,
                        fmt="s", color=line.get_color(), capsize=3)
    ax.axhline(10, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("loss queries (cumulative, ZO-GraSP scoring included)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("depth-3 small CNN, CIFAR-10 (64-image train subset), 40 steps\n"
                 "lines: 100-image test subset per epoch; squares: final weights on all 10,000 (± sd)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
