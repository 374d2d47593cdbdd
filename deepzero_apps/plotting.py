"""Learning curves from a run's metrics.jsonl (matplotlib, no display needed).

matplotlib is imported when a curve is drawn, not with the module: it is a third of the CLI's
start-up time, which every run, rank and test subprocess pays.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import atomic_write


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records of a metrics.jsonl (missing file: none)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: drop it, the checkpoint decides
            continue
    return records


def plot_learning_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Training loss per logged step (left) and every evaluation metric per epoch (right)."""
    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_loss, ax_eval = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    for key in sorted({k for r in epochs for k in r.get("eval", {})}):
        ax_eval.plot([r["epoch"] for r in epochs], [r["eval"].get(key) for r in epochs], marker="o", label=key)
    ax_eval.set(xlabel="epoch", title="evaluation")
    if epochs:
        ax_eval.legend()
    fig.suptitle(title)
    # Fixed margins that fit these labels: tight_layout renders the figure once more to measure them
    # (half of the plot's ~0.2 s, which every run pays at its end).
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.86, wspace=0.2)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))  # a kill never leaves half a PNG
