"""Issue #25 items 3-4: does the SOL correction hold on conditions it was not trained on?

For a problem (a protocol of configs/pde/experiment/ plus train / validation / test condition sets) and
seeds S, runs (skipping any run that already has an eval.json, so an interrupted sweep continues)

    src                  the uncorrected solver (deterministic: one run)
    non/seed_S           supervised one-step pairs, 30 epochs
    non_more/seed_S      compute-matched NON: NON/seed_S trained 30 more epochs (at least ZO-SOL's wall time)
    zo_sol/seed_S        ZO-SOL warm-started from non/seed_S, the protocol's query budget
    fo_sol_lr<LR>/seed_S FO-SOL from non/seed_S through the torch twin, as many steps, one run per learning rate

and writes ROOT/PROBLEM/table.md: per test-condition group and cell, held-out MAE mean ± sd over seeds and
per seed; FO-SOL at the learning rate with the lowest validation MAE (mean over seeds; the validation
simulations are at the training conditions); and paired Wilcoxon signed-rank tests over seeds x test
simulations of ZO-SOL against NON and compute-matched NON.

    python results/pde/generalization.py burgers --root runs/pde_generalization           # run, then tabulate
    python results/pde/generalization.py burgers --root results/pde/generalization --report-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from scipy.stats import wilcoxon

PROBLEMS: dict[str, dict] = {
    # Trained at nu 0.1 (the protocol's training and validation condition), tested at 0.1, 0.03 and 0.3:
    # 12 test simulations, the list cycled over them (4 per viscosity).
    "burgers": {
        "experiment": "pde_burgers", "zo_budget": 20250, "zo": [], "fo_lrs": ["0.002", "0.0005", "0.0001"],
        "conditions": ["data.val_sims=4", "data.test_sims=12", "solver.conditions.test.nu=[0.1,0.03,0.3]"],
        "group": "nu",
    },
    # Trained on Re 100-1000, tested inside, above (1500-3000) and below (40-90) the range.
    "wake": {
        "experiment": "pde_wake", "zo_budget": 13600, "zo": ["optimizer.lr=0.001"], "fo_lrs": ["0.001", "0.0003", "0.0001"],
        "conditions": ["data.val_sims=4", "data.test_sims=12",
                       "solver.conditions.test.re=[{range:[100,1000],scale:log},{range:[1500,3000],scale:log},"
                       "{range:[40,90],scale:log}]"],
        "group": "re",
    },
}  # fmt: skip
PRIORITY = ["src", "non", "zo_sol", "non_more", "fo_sol"]


def cells(problem: dict, seed: int, root: Path) -> list[tuple[str, list[str]]]:
    """(run directory relative to root, method overrides) for one seed, in dependency order."""
    non = f"init_from={root / 'non' / f'seed_{seed}'}"
    nonx = ["method=non", "epochs=30", "batch_size=16"]
    out = [("src", ["method=src"])] if seed == 0 else []
    out += [(f"non/seed_{seed}", nonx), (f"non_more/seed_{seed}", [*nonx, non]),
            (f"zo_sol/seed_{seed}", ["method=zo_sol", "scheduler=constant", f"query_budget={problem['zo_budget']}",
                                     *problem["zo"], non])]
    steps = problem["zo_budget"] // 135  # FO-SOL: as many steps as ZO-SOL takes (one query per FO step)
    out += [(f"fo_sol_lr{lr}/seed_{seed}", ["method=fo_sol", "scheduler=constant", f"query_budget={steps}",
                                            f"optimizer.lr={lr}", non]) for lr in problem["fo_lrs"]]
    return out


def command(problem: dict, overrides: list[str], seed: int, out: Path, cache: Path) -> list[str]:
    return ["deepzero-task", "pde", f"experiment={problem['experiment']}", *problem["conditions"], *overrides,
            f"seed={seed}", "progress=false", "threads=1", f"data.cache_dir={cache}", f"hydra.run.dir={out}"]


def run_all(name: str, root: Path, seeds: list[int]) -> None:
    problem = PROBLEMS[name]
    todo = [(seed, cell, o) for seed in seeds for cell, o in cells(problem, seed, root)]
    for seed, cell, overrides in sorted(todo, key=lambda r: PRIORITY.index(r[1].split("/")[0].split("_lr")[0])):
        out = root / cell
        if not (out / "eval.json").exists():
            cmd = command(problem, overrides, seed, out, root.parent / "cache")
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


def load(root: Path) -> dict[str, list[dict]]:
    """cell -> eval.json of each seed (sorted by seed); src -> its one run."""
    runs = {p.parent.name: [json.loads(p.read_text())] for p in root.glob("*/eval.json")}
    for p in sorted(root.glob("*/seed_*/eval.json")):
        runs.setdefault(p.parent.parent.name, []).append(json.loads(p.read_text()))
    return runs


def fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{mean:.4f}{spread} ({' / '.join(f'{v:.4f}' for v in values)})"


def table(root: Path, key: str) -> str:
    runs = load(root)
    fo = sorted(c for c in runs if c.startswith("fo_sol_lr"))
    val = {c: statistics.mean(r["mae_val"] for r in runs[c]) for c in fo}
    best = min(val, key=val.get) if val else None
    lines = [f"Validation MAE (mean over seeds; {key} of the training conditions) of FO-SOL per learning rate: "
             + ", ".join(f"{c.removeprefix('fo_sol_lr')}: {v:.4f}" for c, v in val.items())
             + (f"; chosen: {best.removeprefix('fo_sol_lr')}" if best else ""), ""]
    order = [("src", "SRC"), ("non", "NON"), ("non_more", "NON, compute-matched"), ("zo_sol", "ZO-SOL from NON")]
    order += [(best, f"FO-SOL from NON (lr {best.removeprefix('fo_sol_lr')}, chosen on validation)")] if best else []
    sims = runs["src"][0]["simulations"]["test"]
    spec = runs["src"][0]["conditions"]["test"][key]
    items = spec if isinstance(spec, list) else [spec]  # a list is cycled: simulation i has item i mod n
    labels = [f"{i['range'][0]:g}-{i['range'][1]:g}" if isinstance(i, dict) else f"{i:g}" for i in items]
    lines += [f"| {key} (test) | sims | " + " | ".join(label for _, label in order) + " |",
              "|---|---|" + "---|" * len(order)]
    tests = []
    for n, g in enumerate(labels):
        idx = [i for i in range(len(sims)) if i % len(items) == n]
        row = []
        for cell, _ in order:
            rs = runs.get(cell, [])
            row.append(fmt([statistics.mean(r["mae_per_sim"][i] for i in idx) for r in rs]) if rs else "not run")
        lines.append(f"| {g} | {len(idx)} | " + " | ".join(row) + " |")
        for other in ("non", "non_more"):
            if runs.get("zo_sol") and runs.get(other):
                pairs = [(z["mae_per_sim"][i], o["mae_per_sim"][i]) for z, o in zip(runs["zo_sol"], runs[other])
                         for i in idx]
                below = sum(z < o for z, o in pairs)
                p = wilcoxon([z for z, _ in pairs], [o for _, o in pairs]).pvalue
                gain = statistics.mean((o - z) / o for z, o in pairs)
                tests.append(f"- {key} {g}: ZO-SOL below {other.replace('_', ' ')} in {below} of {len(pairs)} "
                             f"(seed, simulation) pairs, mean relative gain {100 * gain:.1f} %, Wilcoxon p = {p:.2g}")
    walls = {c: [r["train"].get("wall_s") for r in runs[c]] for c in ("non", "non_more", "zo_sol") if c in runs}
    lines += ["", "Paired tests (seeds x test simulations, two-sided Wilcoxon signed-rank):", *tests, "",
              "Training wall time per run (s): " + "; ".join(
                  f"{c}: {' / '.join(f'{w:.0f}' for w in ws if w is not None)}" for c, ws in walls.items())]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", choices=sorted(PROBLEMS))
    parser.add_argument("--root", type=Path, default=Path("runs/pde_generalization"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs, run nothing")
    args = parser.parse_args()
    root = args.root / args.problem
    if not args.report_only:
        run_all(args.problem, root, args.seeds)
    text = table(root, PROBLEMS[args.problem]["group"])
    (root / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
