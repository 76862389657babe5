"""One error hierarchy for recsql; serve/ maps it to HTTP in one place."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, else its type's name: what a
    one-line error or a log line quotes of it."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class RecsqlError(Exception):
    """A failure with a one-line message meant for the user, and an HTTP status."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class BadRequest(RecsqlError):
    status = 400


class ModelNotFound(RecsqlError):
    status = 404


class NotAcceptable(RecsqlError):
    status = 406


class Conflict(RecsqlError):
    status = 409


class PayloadTooLarge(RecsqlError):
    status = 413


class UnsupportedContentType(RecsqlError):
    status = 415


class InsufficientStorage(RecsqlError):
    status = 507


class ArtifactError(RecsqlError):
    """A model directory or archive that cannot be read (or must not be)."""

    status = 400


class DataError(RecsqlError):
    """Input data (event files, CSV tables) that cannot be used as given."""

    status = 400
