"""`deepzero-task serve`: a local classifier behind the HTTP wire format (the reference server).

    app.py      ServeConfig, the FastAPI app, request log, the run
"""

from .app import APP, ServeConfig, run

__all__ = ["APP", "ServeConfig", "run"]
