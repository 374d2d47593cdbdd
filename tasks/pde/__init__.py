"""`deepzero-task pde`: Solver-in-the-Loop error correction through a black-box solver.

    app.py      the command: methods (src, non, zo_sol, fo_sol), rollouts, evaluation, compare
    config.py   PdeConfig, the schema
    data.py     source/reference solver pairs, cached reference simulations, train/test seeds
    __main__.py ``python -m deepzero_apps.tasks.pde compare OUT.png RUN_DIR...``
"""

from .app import APP, run

__all__ = ["APP", "run"]
