"""Run the app under gunicorn: one master, N workers, keep-alive, graceful SIGTERM.

The startup model is loaded here in the master, before gunicorn forks, so
every worker (and every replacement worker) shares the loaded arrays and
/ping is healthy from a worker's first request. Workers are gevent by
default: sync workers close every connection, which halves throughput for
clients that keep connections alive (Aurora, the SageMaker front end).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.ggevent import GeventWorker

from serve.app import create_app
from serve.config import ServeConfig
from serve.handlers import DataPlane
from serve.metrics import Metrics
from serve.registry import ModelRegistry

log = logging.getLogger(__name__)


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self._app, self._options = app, options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._app


class DrainingGeventWorker(GeventWorker):  # type: ignore[misc]
    """gevent worker that closes idle keep-alive connections on SIGTERM.

    The stock worker waits, during a graceful stop, for every connection's
    handler, including handlers merely waiting for a next request on an idle
    keep-alive connection, so any client that keeps connections open (the
    SageMaker front end does) makes every shutdown last the full graceful
    timeout. Busy connections finish their request (gunicorn then closes
    them); idle ones are shut at once.
    """

    def init_process(self) -> None:
        self._connections: dict[Any, bool] = {}  # socket -> busy
        super().init_process()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self._connections[client] = False
        try:
            super().handle(listener, client, addr)
        finally:
            self._connections.pop(client, None)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> None:
        self._connections[sock] = True
        try:
            super().handle_request(listener_name, req, sock, addr)
        finally:
            if sock in self._connections:
                self._connections[sock] = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        import gevent

        gevent.spawn(self._close_idle_connections)

    def _close_idle_connections(self) -> None:
        import socket

        import gevent

        while True:
            for sock, busy in list(self._connections.items()):
                if not busy:
                    try:
                        # Shut the OS socket under gevent's wrapper: the waiting reader then
                        # sees a clean EOF (gevent's own shutdown cancels it with EBADF,
                        # which gunicorn logs as an error).
                        getattr(sock, "_sock", sock).shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            gevent.sleep(0.1)


_WORKER_CLASSES = {"gevent": f"{__name__}.DrainingGeventWorker"}


def build_dataplane(config: ServeConfig) -> DataPlane:
    """Registry (with the startup model loaded), metrics and dataplane for a config."""
    registry = ModelRegistry(config)
    registry.load_default()
    metrics_dir = Path(config.state_dir) / "metrics" if config.state_dir else None
    if metrics_dir is not None:
        metrics_dir.mkdir(parents=True, exist_ok=True)
    return DataPlane(config, registry, Metrics(metrics_dir))


def gunicorn_options(config: ServeConfig) -> dict[str, Any]:
    level = config.log_level
    if level.isdigit():
        level = logging.getLevelName(int(level))
    options = {
        "bind": f"{config.host}:{config.port}",
        "workers": config.workers,
        "worker_class": _WORKER_CLASSES.get(config.worker_class, config.worker_class),
        "timeout": config.timeout,
        "graceful_timeout": config.graceful_timeout,
        "keepalive": config.keepalive,
        "worker_connections": 1000,
        "accesslog": None,  # the dataplane logs one line per invocation itself
        "errorlog": "-",
        "loglevel": str(level).lower(),
        "proc_name": "recsql-serve",
        "control_socket_disable": True,  # several servers per host (tests) must not clash
    }
    if Path("/dev/shm").is_dir():
        options["worker_tmp_dir"] = "/dev/shm"  # heartbeat files off slow container disks
    return options


def run(config: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests get `graceful_timeout` to finish."""
    own_state = config.state_dir is None
    if own_state:
        config = replace(config, state_dir=Path(tempfile.mkdtemp(prefix="recsql-serve-")))
    try:
        app = create_app(build_dataplane(config))
        log.info(
            "serving on http://%s:%d with %d %s worker(s)",
            config.host,
            config.port,
            config.workers,
            config.worker_class,
        )
        _Gunicorn(app, gunicorn_options(config)).run()
    finally:
        if own_state:
            shutil.rmtree(config.state_dir, ignore_errors=True)
    return 0
