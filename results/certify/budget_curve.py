"""Issue #16 item 5: does fine-tuning through the black box pay, and from what query budget?

Runs `deepzero-task certify experiment=certify_budget_curve` for every (sigma, budget, mode) and the
MSE-only start per sigma, sharing the cached classifier, denoiser and autoencoder stages; then tabulates
certified accuracy at r = 0.25 and a paired exact sign test of each run against MSE-only over the same
certified images (those certified at r >= 0.25 by one run and not the other).

    python results/certify/budget_curve.py --data-root /tmp/cifar10 --root runs/certify_budget --run
    python results/certify/budget_curve.py --smoke --root /tmp/budget_smoke --run   # digits, minutes

Finished runs (a summary.json) are skipped, so an interrupted sweep continues. `--set KEY=VALUE ...`
adds overrides to the fine-tuning runs (not to the MSE-only start they are compared with) and `--tag`
names them apart, e.g. Stab+MSE fine-tuning: `--set mse_weight=1 --tag stabmse` writes
`<mode>_<budget>_stabmse/`. `--seed S` reruns everything, stages included, with another seed: give it its
own `--root`. Writes `<root>/budget_curve[_<tag>].md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from deepzero_apps.checkpoint import atomic_write_json, atomic_write_text
from deepzero_apps.smoothing import certified_by_image, paired_sign_test

RADIUS = 0.25
FULL = {"sigmas": (0.25, 0.5), "budgets": (100_000, 300_000, 1_000_000, 3_000_000),
        "modes": ("deepzero", "zo_ae_ds", "fo_ds")}
SMOKE = {"sigmas": (0.25,), "budgets": (1_500, 3_000), "modes": ("deepzero", "zo_ae_ds", "fo_ds")}
SMOKE_OVERRIDES = [
    "data.train_limit=64", "data.test_limit=40", "eval_limit=40", "classifier.epochs=1", "pretrain.epochs=1",
    "zo_ae_ds.ae_epochs=2", "zo_ae_ds.latent_channels=1", "denoiser.depth=3", "denoiser.width=4", "epochs=50",
    "sparsity.q=4", "sparsity.samples_per_class=2", "certify.limit=10", "certify.n0=8", "certify.n=32",
]  # fmt: skip


def runs(plan: dict) -> list[tuple[str, float, int]]:
    """(mode, sigma, budget) for every run; budget 0 is the MSE-only start."""
    out = [("mse", s, 0) for s in plan["sigmas"]]
    return out + [(m, s, b) for s in plan["sigmas"] for b in plan["budgets"] for m in plan["modes"]]


def run_dir(root: Path, mode: str, sigma: float, budget: int, tag: str = "") -> Path:
    return root / f"sigma{sigma}" / (mode if mode == "mse" else f"{mode}_{budget}" + (f"_{tag}" if tag else ""))


def command(root: Path, mode: str, sigma: float, budget: int, smoke: bool, data_root: str | None, tag: str = "",
            extra: tuple[str, ...] = (), seed: int | None = None) -> list[str]:
    cache = root / f"sigma{sigma}" / "cache"
    base = SMOKE_OVERRIDES if smoke else ["experiment=certify_budget_curve", f"data.root={data_root}"]
    return ["deepzero-task", "certify", *base, f"method={mode}", f"sigma={sigma}", "progress=false", "threads=1",
            f"classifier.cache_dir={root / 'classifier'}", f"pretrain.cache_dir={cache / 'pretrain'}",
            f"zo_ae_ds.cache_dir={cache / 'autoencoder'}", f"hydra.run.dir={run_dir(root, mode, sigma, budget, tag)}",
            *([f"query_budget={budget}"] if budget else []), *([f"seed={seed}"] if seed is not None else []),
            *(extra if mode != "mse" else ())]


def certified(path: Path) -> dict[str, bool]:
    """Certified correctly at r >= RADIUS, by image id (image_ids.py adds the ids to older tables)."""
    return certified_by_image(path / "certify.tsv", RADIUS)


def report(root: Path, plan: dict, tag: str = "") -> list[dict]:
    rows = []
    for mode, sigma, budget in runs(plan):
        d = run_dir(root, mode, sigma, budget, tag)
        if not (d / "summary.json").exists():
            continue
        ours, start = certified(d), certified(run_dir(root, "mse", sigma, 0))
        only_ours, only_start, p = paired_sign_test(ours, start)
        summary = json.loads((d / "summary.json").read_text())
        rows.append({"sigma": sigma, "mode": mode, "budget": budget, "train_queries": summary["train"]["queries"],
                     "images": len(ours), "certified_at_r": sum(ours.values()) / len(ours),
                     "mse_certified_at_r": sum(start.values()) / len(start), "only_this": only_ours,
                     "only_mse": only_start, "sign_test_p": p})
    lines = [f"| sigma | mode | budget | train queries | certified at r = {RADIUS} | MSE-only | only this / only MSE | p (sign test) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['sigma']} | {r['mode']} | {r['budget']:,} | {r['train_queries']:,} | {r['certified_at_r']:.1%} | "
              f"{r['mse_certified_at_r']:.1%} | {r['only_this']} / {r['only_mse']} | {r['sign_test_p']:.3g} |" for r in rows]
    name = "budget_curve" + (f"_{tag}" if tag else "")
    atomic_write_text(root / f"{name}.md", "\n".join(lines) + "\n")
    atomic_write_json(root / f"{name}.json", rows)
    print("\n".join(lines))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--data-root", help="an ImageFolder CIFAR-10 tree (unpack_cifar10.py)")
    parser.add_argument("--smoke", action="store_true", help="digits, tiny budgets: checks the pipeline only")
    parser.add_argument("--run", action="store_true", help="run the missing runs before reporting")
    parser.add_argument("--sigmas", type=float, nargs="+", help="a subset of the plan's noise levels")
    parser.add_argument("--budgets", type=int, nargs="+", help="a subset of the plan's query budgets")
    parser.add_argument("--modes", nargs="+", help="a subset of the plan's fine-tuning modes")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for the fine-tuning runs")
    parser.add_argument("--tag", default="", help="names the runs made with --set (their directory suffix)")
    parser.add_argument("--seed", type=int, help="seed of every run, the MSE-only start and the cached stages included "
                        "(it also draws the certified images): give each seed its own --root")
    args = parser.parse_args()
    plan = dict(SMOKE if args.smoke else FULL)
    plan.update({k: tuple(v) for k, v in [("sigmas", args.sigmas), ("budgets", args.budgets), ("modes", args.modes)] if v})
    if not args.smoke and not args.data_root:
        parser.error("--data-root is required without --smoke")
    if bool(args.set) != bool(args.tag):
        parser.error("--set and --tag go together: runs with other overrides need their own directories")
    if args.run:
        for mode, sigma, budget in runs(plan):
            if not (run_dir(args.root, mode, sigma, budget, args.tag) / "summary.json").exists():
                cmd = command(args.root, mode, sigma, budget, args.smoke, args.data_root, args.tag, tuple(args.set),
                              args.seed)
                print("+", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
    report(args.root, plan, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
