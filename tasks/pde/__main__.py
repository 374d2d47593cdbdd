"""``python -m deepzero_apps.tasks.pde compare OUT.png RUN_DIR...``: tabulate and plot finished runs."""

import sys
from pathlib import Path

from .app import compare

if len(sys.argv) < 4 or sys.argv[1] != "compare":
    sys.exit("usage: python -m deepzero_apps.tasks.pde compare OUT.png RUN_DIR [RUN_DIR ...]")
print(compare(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]))
