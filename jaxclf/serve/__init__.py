"""Serve a trained model over HTTP: `python -m jaxclf.serve --workdir RUN [--port 8000]` (see __main__.py).

model.py: the one interface the server has to a model; batcher.py: dynamic batching onto
compiled batch shapes; app.py: the Starlette app (API, errors, page); metrics.py: Prometheus;
process.py: the server as a child process on a free port (tests, benchmarks).
"""

from jaxclf.serve.app import ApiError, ServeSettings, create_app
from jaxclf.serve.model import ServedModel, from_loaded

__all__ = ["ApiError", "ServeSettings", "ServedModel", "create_app", "from_loaded"]
