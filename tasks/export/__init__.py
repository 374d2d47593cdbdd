"""`deepzero-task export`: a classify run as one TorchScript or `torch.export` file ([0, 1] images -> logits).

    app.py      ExportConfig, the run
"""

from .app import APP, ExportConfig, run

__all__ = ["APP", "ExportConfig", "run"]
