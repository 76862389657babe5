"""The server's log: one line per record, in one format, for recsql's lines and gunicorn's.

    text (default)  2026-12-06 04:22:10,458 INFO [5861] recsql.serve: invocations model=model ...
    json            {"time": "2026-12-06T04:22:10.458Z", "level": "INFO", "logger": "recsql.serve",
                     "message": "invocations model=model ...", "pid": 5861, "model": "model", ...}

Every record, the master's and the workers', goes to the root logger's one handler on
stderr. gunicorn's own lines (start, worker booted, timed out, killed, exited) go there
too, instead of through a handler and format of its own.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
import time
from functools import lru_cache
from typing import Any

from gunicorn.glogging import Logger

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
_FIELD = re.compile(r"(\w+)=(%[-#0 +]*\d*(?:\.\d+)?[sdif])")


def level_name(level: str) -> str:
    """`INFO`, `info` or `20` -> `INFO` (SAGEMAKER_CONTAINER_LOG_LEVEL may be a number)."""
    return logging.getLevelName(int(level)) if level.isdigit() else level.upper()


def configure(level: str, log_format: str = "text") -> None:
    """Send every record to stderr in `log_format`, from the records at `level` up."""
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"line": formatter},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line"}},
            "root": {"level": level_name(level), "handlers": ["stderr"]},
        }
    )
    # The formats use none of these: skip the stack walk and the look-ups each record would
    # make (the logging docs' "Optimization"). The process id stays: every line carries it.
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = False
    logging.logProcesses = True
    logging.logAsyncioTasks = False  # Python >= 3.12


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger, message, pid, the traceback if any,
    and the `key=%s` fields of the message (the request line's model, status, rows, null, ms
    and inference_id) as keys of their own, so that log readers need no parser."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        args = record.args
        if args and isinstance(args, tuple) and isinstance(record.msg, str):
            fields = _fields(record.msg)
            if len(fields) == len(args):
                for (name, spec), value in zip(fields, args, strict=True):
                    doc.setdefault(name, float(spec % value) if spec[-1] == "f" else value)
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str)


@lru_cache(maxsize=256)
def _fields(message: str) -> tuple[tuple[str, str], ...]:
    """`key=%d` pairs of a message format, when its every argument has a key."""
    fields = tuple(_FIELD.findall(message))
    return fields if len(fields) == message.count("%") - 2 * message.count("%%") else ()


class GunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger with no handler of its own (run it with errorlog None): its lines
    propagate to the root logger's handler, in the server's one format. (gunicorn's
    `logconfig_dict` would do the same, but also builds an access-log record per request.)"""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self.error_log.propagate = True
