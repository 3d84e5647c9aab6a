"""Errors of the serving runtime and the one table that maps them to HTTP status.

Every module of the runtime raises these; only ``server.py`` turns them into
responses (through :data:`STATUS_BY_ERROR`), always as ``{"error": "..."}``.
Startup errors (storage, loading) make ``__main__`` exit with a clear message.

Hierarchy::

    RuntimeServingError
    ├── InvalidInput          400  malformed body, bad tensor, wrong shape / datatype
    ├── ModelNotFound         404  unknown model name or version
    ├── NotEnabled            404  a route the deployment did not turn on (explanations)
    ├── PayloadTooLarge       413  body over the configured limit
    ├── ServiceUnavailable    503  model not loaded / warmed up yet, or draining
    │   └── Overloaded        503  the batch queue is full (items or wait): Retry-After
    ├── DeadlineExceeded      504  the request's own deadline passed while it was queued
    ├── InferenceFailed       500  the model raised on a request that passed validation
    │                              (a model that breaks on valid input is the server's
    │                              failure: canary analysis must see it as an error)
    └── StartupError               never served: the process exits
        ├── ConfigError            bad flags / environment
        ├── StorageError           the model could not be fetched
        │   └── ChecksumMismatch   the fetched bytes are not the ones promised
        └── ModelLoadError         the file could not be turned into a model
"""

from __future__ import annotations

__all__ = [
    "STATUS_BY_ERROR",
    "ChecksumMismatch",
    "ConfigError",
    "DeadlineExceeded",
    "InferenceFailed",
    "InvalidInput",
    "ModelLoadError",
    "ModelNotFound",
    "NotEnabled",
    "Overloaded",
    "PayloadTooLarge",
    "RuntimeServingError",
    "ServiceUnavailable",
    "StartupError",
    "StorageError",
    "status_for",
]


class RuntimeServingError(Exception):
    """Base of every error the runtime raises on purpose."""


class InvalidInput(RuntimeServingError):
    """The request is malformed or does not match the model's inputs."""


class ModelNotFound(RuntimeServingError):
    """No model (or version) of that name is served here."""


class NotEnabled(RuntimeServingError):
    """The route exists, but this model's deployment did not turn it on."""


class PayloadTooLarge(RuntimeServingError):
    """The request body is over the configured limit."""


class ServiceUnavailable(RuntimeServingError):
    """The model is not ready yet, or the server is draining."""


class Overloaded(ServiceUnavailable):
    """The batch queue is at its bound: come back in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(RuntimeServingError):
    """The request's deadline passed before the model could take it."""


class InferenceFailed(RuntimeServingError):
    """The model failed for a reason the request is not known to cause."""


class StartupError(RuntimeServingError):
    """The runtime cannot start serving; the process exits."""


class ConfigError(StartupError):
    """A flag or environment variable is missing or invalid."""


class StorageError(StartupError):
    """The model could not be fetched from its URI."""


class ChecksumMismatch(StorageError):
    """The fetched model does not have the expected sha256."""


class ModelLoadError(StartupError):
    """The fetched file could not be loaded as the declared format."""


#: The one place that decides the HTTP status of an error (most specific first).
STATUS_BY_ERROR: tuple[tuple[type[Exception], int], ...] = (
    (InvalidInput, 400),
    (ModelNotFound, 404),
    (NotEnabled, 404),
    (PayloadTooLarge, 413),
    (ServiceUnavailable, 503),
    (DeadlineExceeded, 504),
    (InferenceFailed, 500),
)


def status_for(error: Exception) -> int:
    """The HTTP status for ``error``: 500 for anything not in the table."""
    for error_type, status in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return status
    return 500
