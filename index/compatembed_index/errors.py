"""Typed errors of the index service.

Every error a caller can cause is an :class:`IndexServiceError` subclass that carries its HTTP status
and a stable name. The HTTP layer maps them in one place (``{"error": name, "message": ...}`` with the
status), the HTTP client looks the name up in :data:`ERROR_TYPES` and re-raises the same class, and the
CLI prints the message on one line and exits with status 2. Anything else is a bug and keeps its
traceback (HTTP 500).
"""

from __future__ import annotations


class IndexServiceError(Exception):
    """Base class of errors caused by input or by the state the caller asked about, not by a bug."""

    status_code: int = 400

    @classmethod
    def name(cls) -> str:
        """The stable error name sent over HTTP (the class name)."""
        return cls.__name__


class InvalidInputError(IndexServiceError):
    """A request is malformed: NaN/Inf, ragged or non-numeric arrays, bad k, duplicate ids in a batch."""


class DimensionMismatchError(InvalidInputError):
    """Vectors do not have the dimension of the model version they claim to come from."""


class ConfigError(IndexServiceError):
    """A collection or service setting is unknown or inconsistent (bad factory string, bad option)."""


class ManifestError(IndexServiceError):
    """A model version directory is missing files, fails its checksums or breaks the contract."""

    status_code = 422


class ForbiddenError(IndexServiceError):
    """A file outside the directory it must come from (an image or report path that escapes its root)."""

    status_code = 403


class UnsupportedMediaTypeError(IndexServiceError):
    """A file the web page asked for is not an image of a type it serves (PNG, JPEG, GIF, WebP, BMP)."""

    status_code = 415


class NotFoundError(IndexServiceError):
    """A collection, alias, version or item does not exist."""

    status_code = 404


class CollectionNotFoundError(NotFoundError):
    """No collection (or alias) of that name exists."""


class VersionNotFoundError(NotFoundError):
    """No model version of that id is registered."""


class ItemNotFoundError(NotFoundError):
    """An id named by the request is not in the collection."""


class ConflictError(IndexServiceError):
    """The request clashes with existing state (a name already taken, an id already present)."""

    status_code = 409


class DuplicateIdError(ConflictError):
    """An id is already in the collection and the request did not ask to upsert it."""


class NoRouteError(IndexServiceError):
    """No registered chain of compatibility edges connects the query's version to a segment."""

    status_code = 409


class LimitExceededError(IndexServiceError):
    """A request is larger than a configured limit (k, batch, queries × k, body or response size)."""

    status_code = 413


class RequestTimeoutError(IndexServiceError):
    """The request body did not arrive in full within the configured time (``body_timeout_seconds``)."""

    status_code = 408


class UnauthorizedError(IndexServiceError):
    """A write was sent without the configured API key."""

    status_code = 401


class DataDirLockedError(ConflictError):
    """Another process owns the data directory (one writer process per directory)."""


class SnapshotError(IndexServiceError):
    """A snapshot file is missing, truncated or fails its checksum (reported, then rebuilt)."""

    status_code = 500


class NotReadyError(IndexServiceError):
    """The service is still loading its collections."""

    status_code = 503


def _all_subclasses(cls: type) -> list[type]:
    out: list[type] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


ERROR_TYPES: dict[str, type[IndexServiceError]] = {
    c.name(): c for c in [IndexServiceError, *_all_subclasses(IndexServiceError)]
}
"""Error name → class, for clients that re-raise the server's errors."""
