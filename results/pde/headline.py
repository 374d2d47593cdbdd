"""The headline table of results/pde/README.md, rebuilt from the committed per-run files:

    python results/pde/headline.py          # reads results/pde/seeds/<problem>/<cell>/seed_<k>/eval.json

Held-out MAE per problem and cell, mean ± sd over seeds (SRC is deterministic: one run); n/a where a
cell was not run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).parent / "seeds"
PROBLEMS = {
    "burgers": "Burgers 64->16, nu 0.1 (`pde_burgers`)",
    "wake": "wake 128x256->16x32, Re 100-1000 (`pde_wake`)",
    "burgers_nu0.03": "Burgers 96->24, nu 0.03 (trained and tested there)",
    "phiflow_wake": "PhiFlow wake 64x128->16x32, Re 100-1000 (`pde_phiflow_wake`; SOL 30 steps)",
}
CELLS = {"src": "SRC", "non": "NON", "zo_sol": "ZO-SOL from NON", "zo_sol_scratch": "ZO-SOL from scratch",
         "fo_sol": "FO-SOL from NON", "fo_sol_scratch": "FO-SOL from scratch"}


def cell(root: Path) -> str:
    maes = [json.loads(p.read_text())["mae"] for p in sorted(root.glob("eval.json")) + sorted(root.glob("seed_*/eval.json"))]
    if not maes:
        return "n/a"
    return f"{statistics.mean(maes):.4f}" + (f" ± {statistics.stdev(maes):.4f}" if len(maes) > 1 else "")


def main() -> None:
    print("| problem | " + " | ".join(CELLS.values()) + " |")
    print("|---|" + "---|" * len(CELLS))
    for problem, title in PROBLEMS.items():
        print(f"| {title} | " + " | ".join(cell(ROOT / problem / c) for c in CELLS) + " |")


if __name__ == "__main__":
    main()
