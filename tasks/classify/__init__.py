"""`deepzero-task classify`: image classification trained through loss queries.

    app.py      ClassifyConfig, the staged objective and the run
"""

from .app import APP, ClassifyConfig, run

__all__ = ["APP", "ClassifyConfig", "run"]
