"""Run the app under gunicorn: one master, N workers, keep-alive, graceful SIGTERM.

The startup model is loaded here in the master, before gunicorn forks, so
every worker (and every replacement worker) shares the loaded arrays and
/ping is healthy from a worker's first request. Workers are gevent by
default: sync workers close every connection, which halves throughput for
clients that keep connections alive (Aurora, the SageMaker front end).

Keep-alive connections stay with the worker that accepted them, and every
worker is woken for each new connection: left alone, the first awake takes a
whole burst (8 clients connecting at once all landed on one of two workers).
So a worker accepts only while it holds no more open connections than the
least loaded one (`ConnectionShares`); the listening socket, port and SIGTERM
drain stay gunicorn's.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.app.base import BaseApplication
from gunicorn.workers.ggevent import GeventWorker

from serve import logs
from serve.app import create_app
from serve.config import MB, ServeConfig
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


class ConnectionShares:
    """Open connections per worker slot, in memory the master shares with the workers it forks.

    The master gives each worker a free slot before forking it and marks a dead worker's
    slot full until its replacement starts; a worker publishes its own count and accepts
    while `may_accept`, i.e. while no worker holds fewer connections than it does.
    """

    GONE = 2**31 - 1  # a dead worker's slot: never the least loaded

    def __init__(self, workers: int) -> None:
        self.counts = multiprocessing.RawArray(ctypes.c_int32, workers)
        self.counts[:] = [self.GONE] * workers

    def free_slot(self, taken: set[int]) -> int:
        return next(i for i in range(len(self.counts)) if i not in taken)

    def may_accept(self, slot: int, open_connections: int) -> bool:
        self.counts[slot] = open_connections
        return open_connections <= min(self.counts)


def _assign_slot(shares: ConnectionShares) -> Any:
    def pre_fork(server: Any, worker: Any) -> None:  # in the master, before each fork
        worker.shares = shares
        worker.slot = shares.free_slot({w.slot for w in server.WORKERS.values()})
        shares.counts[worker.slot] = 0

    return pre_fork


def _release_slot(server: Any, worker: Any) -> None:  # in the master, when a worker exits
    worker.shares.counts[worker.slot] = ConnectionShares.GONE


def _share_cores(workers: int) -> Any:
    """Each worker's BLAS gets its share of the cores: OpenBLAS would start a thread per
    core in every worker, and its spinning threads took the cores the other workers' requests
    needed (top-K at 8 connections ran slower than at 1)."""
    threads = max(1, (os.cpu_count() or 1) // workers)

    def post_fork(server: Any, worker: Any) -> None:  # in the worker, after the fork
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)

    return post_fork


class _BalancedServer(StreamServer):  # type: ignore[misc]
    """gevent's StreamServer that re-checks its worker's share after each accept."""

    def __init__(self, *args: Any, worker: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker = worker
        self.max_accept = 1  # one connection per wake-up, then the share is checked

    def do_handle(self, *args: Any) -> None:
        super().do_handle(*args)
        self.worker.balance()


class DrainingGeventWorker(GeventWorker):  # type: ignore[misc]
    """gevent worker that closes idle keep-alive connections on SIGTERM.

    The stock worker waits, during a graceful stop, for every connection's
    handler, including handlers merely waiting for a next request on an idle
    keep-alive connection, so any client that keeps connections open (the
    SageMaker front end does) makes every shutdown last the full graceful
    timeout. Busy connections finish their request (gunicorn then closes
    them); idle ones are shut at once.

    It also takes only its share of new connections (see `ConnectionShares`),
    sets TCP_NODELAY on each, and yields after every request so that one
    connection with requests queued up cannot hold the worker from the others.
    """

    def init_process(self) -> None:
        self._connections: dict[Any, bool] = {}  # socket -> busy
        super().init_process()

    def run(self) -> None:
        """gunicorn's gevent loop, with servers that keep this worker to its share."""
        self._servers = []
        for sock in self.sockets:
            sock.setblocking(1)
            server = _BalancedServer(
                sock,
                handle=partial(self.handle, sock),
                spawn=Pool(self.worker_connections),
                worker=self,
            )
            server.start()
            self._servers.append(server)
        gevent.spawn(self._rebalance)
        while self.alive:
            self.notify()
            gevent.sleep(1.0)
        for server in self._servers:
            server.close()  # stop accepting; the open connections finish (see handle_exit)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while any(len(s.pool) for s in self._servers) and time.monotonic() < deadline:
            self.notify()
            gevent.sleep(0.1)
        for server in self._servers:
            server.stop(timeout=1)

    def balance(self) -> None:
        """Accept new connections only while no worker holds fewer than this one."""
        if not self.alive or not hasattr(self, "shares"):
            return
        open_connections = sum(len(s.pool) for s in self._servers)
        accept = self.shares.may_accept(self.slot, open_connections)
        for server in self._servers:
            if accept:
                server.start_accepting()
            else:
                server.stop_accepting()

    def _rebalance(self) -> None:  # other workers' counts change too
        while self.alive:
            self.balance()
            gevent.sleep(REBALANCE_SECONDS)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        if client.family in (socket.AF_INET, socket.AF_INET6):
            # gunicorn writes the headers and the body in two sends: with Nagle on, the body
            # waited for the client's delayed ACK (40 ms stalls in the p99)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        # Let the other connections' requests in before this connection's next one: when
        # that one is already waiting, reading it does not yield, and a busy connection
        # kept the worker while the others waited (top-K stalls of a second at 8 clients).
        gevent.sleep(0)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        gevent.spawn(self._close_idle_connections)

    def _close_idle_connections(self) -> None:
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


REBALANCE_SECONDS = 0.01  # how often a worker re-reads the others' connection counts
_WORKER_CLASSES = {"gevent": f"{__name__}.DrainingGeventWorker"}


def build_dataplane(config: ServeConfig) -> DataPlane:
    """Registry (with the startup model(s) loaded), metrics, data capture and dataplane."""
    registry = ModelRegistry(config)
    registry.load_default()
    metrics_dir = Path(config.state_dir) / "metrics" if config.state_dir else None
    if metrics_dir is not None:
        metrics_dir.mkdir(parents=True, exist_ok=True)
    capture = None
    if config.capture_dir is not None:
        from serve.capture import Capture

        capture = Capture(
            config.capture_dir,
            config.model_name,
            config.capture_percent,
            max_file_bytes=int(config.capture_max_file_mb * MB),
            max_total_bytes=int(config.capture_max_mb * MB),
        )
    return DataPlane(config, registry, Metrics(metrics_dir), capture)


def _close_capture(dataplane: DataPlane) -> Any:
    def worker_exit(server: Any, worker: Any) -> None:  # in the worker, as it exits
        dataplane.capture.close()

    return worker_exit


def gunicorn_options(config: ServeConfig, dataplane: DataPlane | None = None) -> dict[str, Any]:
    options = {
        "bind": f"{config.host}:{config.port}",
        "workers": config.workers,
        "worker_class": _WORKER_CLASSES.get(config.worker_class, config.worker_class),
        "timeout": config.timeout,
        "graceful_timeout": config.graceful_timeout,
        "keepalive": config.keepalive,
        "worker_connections": 1000,
        "accesslog": None,  # the dataplane logs one line per invocation itself
        "errorlog": None,  # gunicorn's lines go through the server's handler (serve/logs.py)
        "logger_class": logs.GunicornLogger,
        "loglevel": logs.level_name(config.log_level).lower(),
        "proc_name": "recsql-serve",
        "control_socket_disable": True,  # several servers per host (tests) must not clash
    }
    options["post_fork"] = _share_cores(config.workers)
    if dataplane is not None and dataplane.capture is not None:
        options["worker_exit"] = _close_capture(dataplane)  # flush what was captured
    if config.workers > 1 and config.worker_class == "gevent":
        shares = ConnectionShares(config.workers)
        options["pre_fork"] = _assign_slot(shares)
        options["child_exit"] = _release_slot
    if Path("/dev/shm").is_dir():
        options["worker_tmp_dir"] = "/dev/shm"  # heartbeat files off slow container disks
    return options


def run(config: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests get `graceful_timeout` to finish."""
    own_state = config.state_dir is None
    if own_state:
        config = replace(config, state_dir=Path(tempfile.mkdtemp(prefix="recsql-serve-")))
    try:
        logs.configure(config.log_level, config.log_format)
        dataplane = build_dataplane(config)
        app = create_app(dataplane)
        # Everything loaded so far lives as long as the server: keep it out of the cyclic
        # collector's full passes in the workers (whose writes to it would also undo the
        # copy-on-write sharing of the fork). Hand it back at exit, so that the last
        # collection frees it: DuckDB's bindings report what is still alive then as leaked
        # (100+ lines from every process).
        gc.freeze()
        atexit.register(gc.unfreeze)
        log.info(
            "serving on http://%s:%d with %d %s worker(s)",
            config.host,
            config.port,
            config.workers,
            config.worker_class,
        )
        _Gunicorn(app, gunicorn_options(config, dataplane)).run()
    finally:
        if own_state:
            shutil.rmtree(config.state_dir, ignore_errors=True)
    return 0
