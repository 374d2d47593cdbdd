#!/usr/bin/env python3
"""Issue #26 item 2: does ZO fine-tuning of a *subset* of the denoiser pay? Tables and curves from the
committed files under results/certify/subsets/ alone (no run, no data).

Every DeepZero run fine-tunes one `finetune.params` subset (Stab+MSE, dense CGE) with a 100k / 300k / 1M
image budget and is paired, by image id, with the MSE-only denoiser it starts from (same seed, so the
same classifier, denoiser and certified images). Seeds 1 and 2 repeat the setting that seed 0's curve
pointed at; `seed0/sigma0.25_500images` certifies that setting and MSE-only on 500 images, of which the
300 outside seed 0's curve played no part in choosing it. p is the exact two-sided sign test on the
images only one of the two certifies at r = 0.25, and `p x m` its Bonferroni bound over the m rows of
this table; r = 0 (the smoothed classifier right, not abstaining) is a secondary column, uncorrected.

    python results/certify/subsets.py     # writes subsets/subsets.md, subsets.json and subsets.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from headline import compare  # results/certify/headline.py, beside this script  # noqa: E402
from paired import certified  # noqa: E402

from deepzero_apps.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402

ROOT = Path(__file__).parent / "subsets"
SIGMA = "sigma0.25"


def run_facts(run: Path) -> dict:
    """Steps, cost and training curve of one fine-tuning run (its summary.json and metrics.jsonl)."""
    train = json.loads((run / "summary.json").read_text())["train"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r.get("kind") == "train"]
    cost = train["finetune"]
    return {"params": cost["params"], "budget": int(run.name.split("_")[1]), "steps": train["steps"],
            "trainable": cost["trainable"], "images_per_step": cost["images_per_step"],
            "loss_first_100_steps": _mean([r["loss"] for r in steps if r["step"] <= 100]),
            "loss_last_100_steps": _mean([r["loss"] for r in steps if r["step"] > train["steps"] - 100]),
            "noisy_acc": train["eval"]["noisy_acc"], "wall_s": train["wall_s"],
            "curve": [(r["queries"], r["loss"]) for r in steps]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def row(seed: str, images_used: str, start: float, run: Path, mse: Path, exclude: set[str] = frozenset()) -> dict:
    """One fine-tuning run against its MSE-only start, over the same images less `exclude`."""
    return {"seed": seed, "images_used": images_used, "mse_noisy_acc": start, **run_facts(run),
            "r0.25": compare(run, mse, exclude), "r0": compare(run, mse, exclude, 0.0)}


def rows() -> list[dict]:
    out = []
    for seed_dir in sorted(ROOT.glob("seed*")):
        curve, fresh = seed_dir / SIGMA, seed_dir / f"{SIGMA}_500images"
        start = json.loads((curve / "mse" / "summary.json").read_text())["train"]["eval"]["noisy_acc"]
        done = [d for d in curve.iterdir() if d.name.startswith("deepzero_") and (d / "summary.json").exists()]
        found = [row(seed_dir.name, "the curve's 200", start, run, curve / "mse") for run in done]
        out += sorted(found, key=lambda r: (r["params"], r["budget"]))
        if fresh.is_dir():
            seen = set(certified(curve / "mse" / "certify.tsv", 0.0))
            out += [row(seed_dir.name, "300 fresh (500 minus the curve's 200)", start, run, fresh / "mse", seen)
                    for run in sorted(d for d in fresh.iterdir() if d.name.startswith("deepzero_"))]
    for r in out:
        r["r0.25"]["p_bonferroni"] = min(1.0, r["r0.25"]["p"] * len(out))
    return out


def table(found: list[dict]) -> str:
    m = len(found)
    lines = ["| seed | `finetune.params` | budget | images | steps | trainable | images per step | train loss, first / last 100 steps "
             "| noisy acc. (MSE-only) | certified at r = 0.25, this / MSE-only | only this / only MSE | p | p x "
             f"{m} | certified at r = 0 | p (r = 0) |",
             "|---|---|---:|---|---:|---:|---:|---|---|---|---:|---:|---:|---|---:|"]
    for r in found:
        a, z = r["r0.25"], r["r0"]
        bold = "**" if a["p_bonferroni"] < 0.05 else ""
        lines.append(
            f"| {r['seed']} | {r['params']} | {r['budget']:,} | {r['images_used']} | {r['steps']:,} | {r['trainable']:,} | "
            f"{r['images_per_step']:,} | {r['loss_first_100_steps']:.3f} / {r['loss_last_100_steps']:.3f} | "
            f"{r['noisy_acc']:.1%} ({r['mse_noisy_acc']:.1%}) | "
            f"{a['certified_a'] / a['images']:.1%} / {a['certified_b'] / a['images']:.1%} | {a['only_a']} / {a['only_b']} | "
            f"{a['p']:.3g} | {bold}{a['p_bonferroni']:.3g}{bold} | "
            f"{z['certified_a'] / z['images']:.1%} / {z['certified_b'] / z['images']:.1%} | {z['p']:.3g} |")
    return "\n".join(lines) + "\n"


def plot(found: list[dict], path: Path) -> None:
    """Training loss against images sent to the black box, seed 0's 1M-image runs (a smaller budget's run of
    the same seed is the same run stopped earlier), each a running mean over a tenth of its logged steps."""
    curves = [r for r in found if r["seed"] == "seed0" and r["images_used"] == "the curve's 200" and r["budget"] == 10**6]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in curves:
        q, loss = zip(*r["curve"])
        k = max(1, len(loss) // 10)
        smooth = [_mean(list(loss[max(0, i - k + 1) : i + 1])) for i in range(len(loss))]
        ax.plot(q, smooth, label=f"{r['params']} ({r['steps']:,} steps; running mean over {k * 10} steps)")
    ax.set(xscale="log", xlabel="images sent to the black box", ylabel="training loss (Stab + MSE)",
           title="DeepZero fine-tuning of denoiser subsets, 1M images, sigma 0.25, seed 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    found = rows()
    atomic_write_text(ROOT / "subsets.md", table(found))
    atomic_write_json(ROOT / "subsets.json", [{k: v for k, v in r.items() if k != "curve"} for r in found])
    plot(found, ROOT / "subsets.png")
    print(table(found))


if __name__ == "__main__":
    main()
