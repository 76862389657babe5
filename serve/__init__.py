"""The inference server: SageMaker-compatible HTTP in front of any recsql model.

Public surface: `ServeConfig`/`from_env` (settings), `DataPlane`/`Invocation`
(the plain request handler), `create_app` (Flask routes), `run` (gunicorn),
and `ServableModel`/`ADAPTERS` (the model contract and its per-kind adapters).
"""

from serve.app import create_app
from serve.config import ServeConfig, from_env
from serve.handlers import DataPlane, Invocation, Reply
from serve.models import ADAPTERS, ServableModel
from serve.server import build_dataplane, run

__all__ = [
    "ADAPTERS",
    "DataPlane",
    "Invocation",
    "Reply",
    "ServableModel",
    "ServeConfig",
    "build_dataplane",
    "create_app",
    "from_env",
    "run",
]
