"""How the API says no: each of the daemon's errors becomes a gRPC status code with its one
sentence, for plain and streaming methods alike; anything unexpected is logged and said as INTERNAL."""

from __future__ import annotations

import errno
import functools
import inspect
import logging
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from loradrop.errors import UserError

from .errors import Busy, Conflict, NotFound, Refused, Unavailable
from .pipe import printable
from .worker_slot import CallFailed

log = logging.getLogger(__name__)

_ERROR_CODES = [  # most specific first
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Refused, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (UserError, grpc.StatusCode.INVALID_ARGUMENT),
]


def answers(method):
    """Turn the daemon's errors into status codes, for plain and streaming methods alike."""

    def fail(e: Exception, context) -> None:
        if isinstance(e, CallFailed):
            code = (
                grpc.StatusCode.INVALID_ARGUMENT
                if e.user
                else grpc.StatusCode.RESOURCE_EXHAUSTED
                if e.space
                else grpc.StatusCode.INTERNAL
            )
            context.abort(code, printable(str(e)))
        if isinstance(e, FutureTimeout):
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{method.__name__} took too long; the worker is still busy with it.",
            )
        for kind, code in _ERROR_CODES:
            if isinstance(e, kind):
                context.abort(code, printable(str(e)))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                printable(
                    f"disk full: no space left on the disk under {e.filename or 'the home'}; free some and ask again."
                ),
            )
        log.exception("%s failed", method.__name__)
        context.abort(
            grpc.StatusCode.INTERNAL,
            printable(
                f"{method.__name__} failed inside the daemon ({type(e).__name__}: {e}); see daemon.log."
            ),
        )

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as e:
                if isinstance(e, grpc.RpcError):
                    raise
                if context.is_active():  # else the client is gone: nobody to tell
                    fail(e, context)

        return streaming

    @functools.wraps(method)
    def plain(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            if isinstance(e, grpc.RpcError):
                raise
            fail(e, context)

    return plain
