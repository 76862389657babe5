"""Which models this server holds, kept consistent across gunicorn workers.

The startup model (`--model-dir`) is loaded once in the gunicorn master and
shared by every worker through fork. Models added through `/models` are
recorded in one JSON file in the server's state folder; the worker that takes
`POST /models` loads the model (so 409/404/507 and load errors reach the
caller) and records it under an exclusive file lock, written by atomic
rename. Every other worker notices the change with one `os.stat` before each
request: it drops models the file no longer lists and loads new ones the
first time a request needs them. Readers never take the lock, so loading or
unloading one model never fails a request to another.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model.errors import (
    BadRequest,
    Conflict,
    InsufficientStorage,
    ModelNotFound,
    RecsqlError,
    first_line,
)
from model.variants import DEFAULT_VARIANT
from serve.config import MB, ServeConfig, VariantSpec
from serve.models import ServableModel
from serve.scripts import load_servable

RETRY_SECONDS = 2.0  # how often a missing startup model is looked for again

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,254}$")


class _ForkSafeLock:
    """A lock created afresh in each process, after gunicorn forks and gevent patches.

    A plain threading.Lock made in the master is a real OS lock in a gevent
    worker: a greenlet that yields while holding it (a user model_fn doing
    network I/O) would block every other greenlet of that worker for good.
    """

    def __init__(self) -> None:
        self._pid, self._lock = -1, threading.Lock()

    def __enter__(self) -> None:
        if self._pid != os.getpid():
            self._pid, self._lock = os.getpid(), threading.Lock()
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _Entries:
    """The registered models: name -> {"url", "bytes"}; in memory or in a shared file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory: dict[str, dict[str, Any]] = {}
        self._thread_lock = _ForkSafeLock()
        self._seen: tuple[int, int] | None = None
        self._cached: dict[str, dict[str, Any]] = {}

    def read(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return dict(self._memory)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._cached = None, {}
            return {}
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp != self._seen:
            try:
                self._cached = json.loads(self.path.read_text())["models"]
                self._seen = stamp
            except (OSError, ValueError, KeyError):
                log.exception("%s: unreadable model registry; keeping the last one", self.path)
        return dict(self._cached)

    def write(self, entries: dict[str, dict[str, Any]]) -> None:
        if self.path is None:
            self._memory = dict(entries)
            return
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"models": entries}))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self.path is None:
                yield
                return
            with open(self.path.with_suffix(".lock"), "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class ModelRegistry:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        state = config.state_dir
        self.entries = _Entries(Path(state) / "models.json" if state else None)
        self.default: ServableModel | None = None
        self.default_error: str | None = None
        self.local: dict[str, tuple[str, ServableModel]] = {}
        self._load_lock = _ForkSafeLock()
        self._last_try = float("-inf")
        self.variant_models: dict[str, ServableModel] = {}  # --variant/--shadow name -> model
        self.variant_errors: dict[str, str] = {}

    # ------------------------------------------------------------ startup model

    def load_default(self) -> None:
        """Load --model-dir (or the variants); a failure is kept (and logged) so /ping can
        report it, and the load is tried again (`_retry_default`) until it succeeds."""
        self._last_try = time.monotonic()
        for spec in self._variant_specs():
            if spec.name not in self.variant_models:
                self._load_variant(spec)
        if self.config.model_dir is None:
            return
        try:
            self.default = load_servable(
                self.config.model_dir, self.config.program, self.config.submit_dir
            )
            log.info(
                "model %r loaded from %s: %s",
                self.config.model_name,
                self.config.model_dir,
                json.dumps(self.default.describe(), default=str),
            )
        except Exception as exc:  # any failure must surface through /ping, not kill the server
            reason = first_line(exc)
            error = f"{self.config.model_dir}: {reason}"
            if error != self.default_error:  # once per distinct reason, not every retry
                log.error("model failed to load (retrying): %s", error, exc_info=True)
            self.default_error = error
        else:
            self.default_error = None

    def _variant_specs(self) -> tuple[VariantSpec, ...]:
        shadow = (self.config.shadow,) if self.config.shadow else ()
        return self.config.variants + shadow

    def _load_variant(self, spec: VariantSpec) -> None:
        try:
            # each variant reads its own code/ folder, not SAGEMAKER_SUBMIT_DIRECTORY
            self.variant_models[spec.name] = load_servable(spec.model_dir, self.config.program)
        except Exception as exc:  # reported by /ping, like the startup model
            reason = first_line(exc)
            error = f"variant {spec.name!r} from {spec.model_dir}: {reason}"
            if error != self.variant_errors.get(spec.name):
                log.error("model failed to load (retrying): %s", error, exc_info=True)
            self.variant_errors[spec.name] = error
        else:
            self.variant_errors.pop(spec.name, None)
            model = self.variant_models[spec.name]
            log.info(
                "variant %r (weight %g) loaded from %s: %s",
                spec.name,
                spec.weight,
                spec.model_dir,
                json.dumps(model.describe(), default=str),
            )

    def _retry_default(self) -> None:
        """A server may start before its model is there (compose, restarts): while the
        startup model is missing, /ping and requests try loading it again, at most once
        every RETRY_SECONDS per worker; /ping says 503 with the reason until then."""
        missing = len(self.variant_models) < len(self._variant_specs())
        if not missing and (self.default is not None or self.config.model_dir is None):
            return
        if time.monotonic() - self._last_try >= RETRY_SECONDS:
            self.load_default()

    def variant(self, name: str) -> ServableModel:
        """The model of a production or shadow variant (503 while it cannot be loaded)."""
        if not self.config.variants and name == DEFAULT_VARIANT:
            return self.get(None)[1]
        self._retry_default()
        model = self.variant_models.get(name)
        if model is None:
            reason = self.variant_errors.get(name, f"variant {name!r} not loaded yet")
            raise RecsqlError(f"model failed to load: {reason}", status=503)
        return model

    def ready(self) -> tuple[bool, str]:
        self._retry_default()
        if self.default_error:
            return False, f"model failed to load: {self.default_error}"
        if self.variant_errors:
            return False, f"model failed to load: {next(iter(self.variant_errors.values()))}"
        if self.config.model_dir is not None and self.default is None:
            return False, "model not loaded yet"
        if self.default is None and not self.config.multi_model and not self.config.variants:
            return False, "no model configured"
        return True, ""

    # ------------------------------------------------------------ lookup

    def names(self) -> list[tuple[str, str]]:
        """(name, url) of every model, startup model first."""
        out = []
        if self.config.model_dir is not None:
            out.append((self.config.model_name, str(self.config.model_dir)))
        out += [(name, e["url"]) for name, e in sorted(self.entries.read().items())]
        return out

    def get(self, name: str | None) -> tuple[str, ServableModel]:
        """The model for a request; `None` means the only (or startup) model."""
        entries = self.entries.read()
        for gone in [n for n in self.local if n not in entries]:
            self.local.pop(gone, None)
            log.info("model %r unloaded (registry changed)", gone)
        if name is None:
            if self.config.model_dir is not None:
                name = self.config.model_name
            elif len(entries) == 1:
                name = next(iter(entries))
            elif not entries:
                raise ModelNotFound("no model is loaded; load one with POST /models")
            else:
                raise BadRequest(
                    f"{len(entries)} models are loaded; name one with X-Amzn-SageMaker-Target-Model"
                )
        if name == self.config.model_name and self.config.model_dir is not None:
            self._retry_default()
            if self.default is None:
                ready, reason = self.ready()
                raise RecsqlError(reason or "model not loaded", status=503)
            return name, self.default
        if name in self.local and self.local[name][0] == entries.get(name, {}).get("url"):
            return name, self.local[name][1]
        if name not in entries:
            raise ModelNotFound(f"model {name!r} is not loaded")
        with self._load_lock:
            if name not in self.local:
                self.local[name] = (entries[name]["url"], self._load(name, entries[name]["url"]))
        return name, self.local[name][1]

    def has(self, name: str) -> bool:
        if name == self.config.model_name and self.config.model_dir is not None:
            return True
        return name in self.entries.read()

    # ------------------------------------------------------------ /models

    def add(self, name: str, url: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadRequest("model_name must be 1-255 letters, digits, '.', '_' or '-'")
        path = self._resolve(url)
        with self.entries.locked():
            entries = self.entries.read()
            if name in entries or (name == self.config.model_name and self.config.model_dir):
                raise Conflict(f"model {name!r} is already loaded")
            size = directory_bytes(path)
            self._check_memory(name, size, entries)
            model = self._load(name, str(path))
            entries[name] = {"url": str(path), "bytes": size}
            self.entries.write(entries)
            self.local[name] = (str(path), model)
        log.info("model %r loaded from %s (%.1f MB)", name, path, size / MB)

    def remove(self, name: str) -> None:
        if name == self.config.model_name and self.config.model_dir is not None:
            raise Conflict(f"model {name!r} was loaded at startup and cannot be unloaded")
        with self.entries.locked():
            entries = self.entries.read()
            if name not in entries:
                raise ModelNotFound(f"model {name!r} is not loaded")
            del entries[name]
            self.entries.write(entries)
            self.local.pop(name, None)
        log.info("model %r unloaded", name)

    def _resolve(self, url: str) -> Path:
        root = self.config.model_root
        if root is None:
            raise BadRequest("loading models is disabled: no model root (--model-root) is set")
        if not isinstance(url, str) or not url:
            raise BadRequest('"url" must be the path of a model directory')
        path = Path(url.removeprefix("file://"))
        path = (Path(root) / path if not path.is_absolute() else path).resolve()
        if not path.is_relative_to(Path(root).resolve()):
            raise BadRequest(f"url {url!r} is outside the model root {root}")
        if not path.is_dir():
            raise ModelNotFound(f"url {url!r}: no such model directory")
        return path

    def _check_memory(self, name: str, size: int, entries: dict[str, dict[str, Any]]) -> None:
        cap = self.config.max_models_mb
        held = sum(int(e.get("bytes", 0)) for e in entries.values())
        if cap is not None and held + size > cap * MB:
            raise InsufficientStorage(
                f"model {name!r} needs ~{size / MB:.1f} MB; {held / MB:.1f} of the"
                f" {cap:g} MB model memory cap are in use: unload a model first"
            )
        available = available_memory_bytes()
        need = size * self.config.workers + self.config.min_free_mb * MB
        if available is not None and available < need:
            raise InsufficientStorage(
                f"model {name!r} needs ~{size * self.config.workers / MB:.1f} MB across"
                f" {self.config.workers} workers; only {available / MB:.0f} MB are available"
            )

    def _load(self, name: str, url: str) -> ServableModel:
        try:
            return load_servable(Path(url))
        except MemoryError:
            raise InsufficientStorage(f"out of memory loading model {name!r}") from None
