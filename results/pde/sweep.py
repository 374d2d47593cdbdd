"""Issue #14 item 6: the PDE table over seeds, with ZO-SOL from scratch and warm-started from NON.

For one problem (a protocol of configs/pde/experiment/ plus condition overrides) and seeds S, runs

    src                       the uncorrected solver (deterministic: one run)
    non/seed_S                supervised one-step pairs, 30 epochs
    zo_sol/seed_S             ZO-SOL warm-started from non/seed_S, a fixed query budget
    zo_sol_scratch/seed_S     ZO-SOL from the zero-output net (= SRC), the same budget
    fo_sol/seed_S             FO-SOL through the torch twin from non/seed_S, the same number of steps
    fo_sol_scratch/seed_S     FO-SOL from scratch (solvers with a twin)

every SOL run logging its held-out MAE every `eval_every` steps (the learning curves). Finished runs
(an eval.json) are skipped, so an interrupted sweep continues. Then writes ROOT/PROBLEM/table.md
(mean ± sd over seeds per cell, via seed_table.py) and ROOT/PROBLEM/learning_curves.png.

    python results/pde/sweep.py burgers --root runs/pde_seeds --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).parent))
from seed_table import table  # noqa: E402

# Each problem: its protocol, condition overrides, ZO-SOL's budget (150 steps x 135 queries, or 101 x 135
# on the wake grids as in results/pde/README.md), its extra ZO-SOL overrides, and whether a twin exists.
PROBLEMS: dict[str, dict] = {
    "burgers": {"experiment": "pde_burgers", "conditions": [], "zo_budget": 20250, "zo": [], "twin": True},
    "wake": {"experiment": "pde_wake", "conditions": [], "zo_budget": 13600, "zo": ["optimizer.lr=0.001"],
             "twin": True},  # solvers/wake_torch.py; the committed wake runs predate it (no FO-SOL)
    # PhiFlow's numpy backend costs ~0.2 s per solver call whatever the grid: a 100-step ZO-SOL run took 20
    # minutes here, so this protocol stops SOL at 30 steps (30 x 135 queries).
    "phiflow_wake": {"experiment": "pde_phiflow_wake", "conditions": [], "zo_budget": 4050,
                     "zo": ["optimizer.lr=0.001"], "twin": True},
    # Conditions not used for tuning: the Burgers protocol at a third of the viscosity on a 96 -> 24 grid.
    "burgers_nu0.03": {"experiment": "pde_burgers", "zo_budget": 20250, "zo": [], "twin": True, "conditions": [
        *(f"solver.conditions.{split}.nu=0.03" for split in ("train", "validation", "test")),
        "solver.reference.resolution=[96,96]", "solver.source.resolution=[24,24]"]},
    # ... and the wake protocol at Reynolds numbers 1500-3000 (trained and tested there).
    "wake_re1500-3000": {"experiment": "pde_wake", "zo_budget": 13600, "zo": ["optimizer.lr=0.001"], "twin": True,
                         "conditions": [f"solver.conditions.{split}.re=[{{range:[1500,3000],scale:log}}]"
                                        for split in ("train", "validation", "test")]},
}  # fmt: skip
EVAL_EVERY = 10


def cells(problem: dict, seed: int, root: Path) -> list[tuple[str, list[str]]]:
    """(run directory relative to root, method overrides) in dependency order for one seed."""
    non = str(root / "non" / f"seed_{seed}")
    curve = f"eval_every={EVAL_EVERY}"  # SOL runs only: NON's 30 epochs log an evaluation each already
    zo = ["method=zo_sol", "scheduler=constant", f"query_budget={problem['zo_budget']}", curve, *problem["zo"]]
    steps = problem["zo_budget"] // 135  # FO-SOL: as many steps as ZO-SOL takes (one query per FO step)
    fo = ["method=fo_sol", "scheduler=constant", f"query_budget={steps}", curve]
    out = [("src", ["method=src"])] if seed == 0 else []
    out += [(f"non/seed_{seed}", ["method=non", "epochs=30", "batch_size=16"]),
            (f"zo_sol/seed_{seed}", [*zo, f"init_from={non}"]),
            (f"zo_sol_scratch/seed_{seed}", zo)]
    if problem["twin"]:
        out += [(f"fo_sol/seed_{seed}", [*fo, f"init_from={non}"]), (f"fo_sol_scratch/seed_{seed}", fo)]
    return out


# Cell by cell over the seeds, cheapest and most needed first (NON before the runs warm-started from it),
# so a sweep cut short has every seed of the cells it reached.
PRIORITY = ["src", "non", "zo_sol", "fo_sol", "fo_sol_scratch", "zo_sol_scratch"]


def run_all(name: str, root: Path, seeds: list[int]) -> None:
    problem = PROBLEMS[name]
    todo = [(seed, cell, overrides) for seed in seeds for cell, overrides in cells(problem, seed, root)]
    for seed, cell, overrides in sorted(todo, key=lambda run: PRIORITY.index(run[1].split("/")[0])):
        out = root / cell
        if (out / "eval.json").exists():
            continue
        cmd = ["deepzero-task", "pde", f"experiment={problem['experiment']}", *problem["conditions"],
               *overrides, f"seed={seed}", "progress=false", "threads=1",
               f"data.cache_dir={root.parent / 'cache'}", f"hydra.run.dir={out}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def learning_curves(root: Path, png: Path) -> None:
    """Held-out MAE against training steps, mean over seeds (band: min-max), one line per SOL cell."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    src = json.loads((root / "src" / "eval.json").read_text())["mae"]
    ax.axhline(src, color="grey", ls=":", label="SRC")
    for cell in ("non", "zo_sol", "zo_sol_scratch", "fo_sol", "fo_sol_scratch"):
        curves = []
        for metrics in sorted(root.glob(f"{cell}/seed_*/metrics.jsonl")):
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            curves.append({r["step"]: r["eval"]["test_mae"] for r in rows if r["kind"] == "eval"})
        if cell == "non":  # NON's curve is its end point: where the warm-started runs begin
            finals = [json.loads(p.read_text())["mae"] for p in root.glob("non/seed_*/eval.json")]
            ax.axhline(statistics.mean(finals), color="black", ls="--", label="NON")
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        values = [[c[s] for c in curves] for s in steps]
        line = ax.plot(steps, [statistics.mean(v) for v in values], label=f"{cell} ({len(curves)} seeds)")[0]
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2,
                        color=line.get_color())
    ax.set(xlabel="training step", ylabel="held-out MAE", title=root.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", choices=sorted(PROBLEMS))
    parser.add_argument("--root", type=Path, default=Path("runs/pde_seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs, run nothing")
    args = parser.parse_args()
    root = args.root / args.problem
    if not args.report_only:
        run_all(args.problem, root, args.seeds)
    text = table(root)
    (root / "table.md").write_text(text + "\n")
    learning_curves(root, root / "learning_curves.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
