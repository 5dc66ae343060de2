"""Typed errors. The server maps each class to an HTTP status code."""

from __future__ import annotations


class KVForgeError(Exception):
    """Base class of every error kvforge raises on purpose."""

    http_status: int = 500


class InvalidRequestError(KVForgeError, ValueError):
    """A request or parameter is invalid (HTTP 400)."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens do not fit in the model's context (HTTP 400)."""


class AuthenticationError(KVForgeError):
    """Missing or wrong credentials (HTTP 401)."""

    http_status = 401


class ModelNotFoundError(KVForgeError):
    """The named model or model file does not exist (HTTP 404)."""

    http_status = 404


class UnsupportedModelError(KVForgeError):
    """The checkpoint uses an architecture or format kvforge cannot run."""

    http_status = 400


class ModelFileError(KVForgeError):
    """A model file is corrupt, truncated or malformed (HTTP 400); ``str()`` is one line,
    ``"<path>: <what is wrong>"``."""

    http_status = 400

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {' '.join(problem.split())}")
        self.path = str(path)
        self.problem = problem

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # pickled by parallel workers
        return type(self), (self.path, self.problem)


class QueueFullError(KVForgeError):
    """Too many requests wait for admission (HTTP 429)."""

    http_status = 429


class RequestFailedError(KVForgeError):
    """One request failed inside the engine; the engine and other requests go on (HTTP 500)."""

    http_status = 500


class EngineDeadError(KVForgeError):
    """The engine loop is not running, or a parallel worker died (HTTP 503)."""

    http_status = 503
