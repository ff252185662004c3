"""Why a request is refused. The server turns each into its gRPC status code, with the message as is."""

from __future__ import annotations

from loradrop.errors import UserError


class RequestError(UserError):
    """The request is malformed (INVALID_ARGUMENT)."""


class Refused(RequestError):
    """The request names something it may not touch (PERMISSION_DENIED)."""


class NotFound(RequestError):
    """The job or file it names does not exist (NOT_FOUND)."""


class Conflict(RequestError):
    """The request does not fit the job's state (FAILED_PRECONDITION)."""


class Unavailable(RequestError):
    """The daemon cannot do it now, for example while stopping (UNAVAILABLE)."""


class Busy(RequestError):
    """The daemon serves as many of these as it can now (RESOURCE_EXHAUSTED)."""


class DiskFull(Busy):
    """The disk under the daemon's home is full (RESOURCE_EXHAUSTED)."""


class BadStore(UserError):
    """state.sqlite is not a readable job database; the daemon does not start on it."""
