"""Multi-seed table of `deepzero-task pde` runs: held-out MAE as mean ± sd over seeds, per method.

    python results/pde/seed_table.py runs/pde/phiflow_wake

reads every ROOT/<cell>/seed_<k>/eval.json (and ROOT/<cell>/eval.json of a deterministic cell such as
SRC; results/pde/sweep.py lays runs out so) and prints one markdown row per cell.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def table(root: Path) -> str:
    runs: dict[str, list[dict]] = {}
    for path in sorted(root.glob("*/eval.json")):  # deterministic cells (SRC): one run
        runs.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    for path in sorted(root.glob("*/seed_*/eval.json")):
        runs.setdefault(path.parent.parent.name, []).append(json.loads(path.read_text()))
    if not runs:
        raise SystemExit(f"no {root}/<method>/seed_<k>/eval.json found")
    lines = ["| method | seeds | held-out MAE (mean ± sd) | final-step MAE (mean ± sd) | held-out MAE per seed |",
             "|---|---|---|---|---|"]
    order = ["src", "non", "zo_sol", "zo_sol_scratch", "fo_sol", "fo_sol_scratch"]
    for method, results in sorted(runs.items(), key=lambda kv: (order + [kv[0]]).index(kv[0])):
        cells = []
        for values in ([r["mae"] for r in results], [r["mae_over_time"][-1] for r in results]):
            mean = statistics.mean(values)
            cells.append(f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}")
        per_seed = " / ".join(f"{r['mae']:.4f}" for r in results)
        lines.append(f"| {results[0]['label']} ({method}) | {len(results)} | {cells[0]} | {cells[1]} | {per_seed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(table(Path(sys.argv[1])))
