"""What a request may touch, what a name may contain, and who may call at all.

Paths are resolved (symlinks followed) before they are checked, so a link inside the inbox that
points at /etc is as outside as /etc itself.
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path
from typing import Iterator

import grpc

from loradrop.errors import UserError

from .errors import Refused, RequestError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
NAME_MAX = 64


def safe_name(text: str, fallback: str = "lora") -> str:
    """A plain file name: letters, digits, `.`, `_`, `-`; no leading dot or dash; at most 64 characters."""
    name = _UNSAFE.sub("-", text).strip(".-")[:NAME_MAX].rstrip(".-")
    return name or fallback


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_inside(text: str, roots: list[Path], *, what: str, base: Path | None = None) -> Path:
    """The request's path resolved; refused unless it lies inside one of `roots`.

    A relative path is taken relative to `base` (default: the first root).
    """
    if not text:
        raise RequestError(f"the request names no {what}; give its path.")
    if "\0" in text:
        raise RequestError(f"the {what} path contains a NUL byte.")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base or roots[0]) / path
    try:
        resolved = path.resolve()
        resolved.exists()  # a name too long for the file system raises here, not in the caller
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python before 3.13)
        raise RequestError(f"{what} {text!r} cannot be resolved ({getattr(e, 'strerror', None) or e}).") from None
    if not any(inside(resolved, root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise Refused(f"{what} {text!r} is outside the daemon's folders ({allowed}); put it inside them.")
    return resolved


def refuse_links_out(folder: Path, root: Path) -> None:
    """Refuse a dataset with symlinks that lead out of `root`: checked when the job is queued,
    and again by the worker just before it reads the folder (a link may be added in between)."""
    bad = links_out_of(folder, root)
    if bad:
        raise Refused(f"{folder} has symlinks pointing outside the inbox, or nowhere ({printable(', '.join(bad[:3]))}); copy the files in instead.")


def links_out_of(folder: Path, root: Path) -> list[str]:
    """Symlinks under `folder` (the folder itself included) that resolve outside `root`, or
    nowhere (a loop)."""
    bad = [folder.name] if folder.is_symlink() and not _resolves_inside(folder, root) else []
    for entry in tree(folder):
        if entry.is_symlink() and not _resolves_inside(Path(entry.path), root):
            bad.append(os.path.relpath(entry.path, folder))
    return bad


def _resolves_inside(link: Path, root: Path) -> bool:
    try:
        return inside(link.resolve(), root)
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        return False


def tree(folder: str | os.PathLike) -> Iterator[os.DirEntry]:
    """Every entry below `folder`, without following symlinks and without recursion (os.walk
    recurses: a folder nested a thousand deep would end it with RecursionError); folders that
    cannot be listed are passed over."""
    stack = [os.fspath(folder)]
    while stack:
        try:
            with os.scandir(stack.pop()) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            yield entry
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
            except OSError:
                pass


def printable(text: str) -> str:
    """`text` with U+FFFD for what UTF-8 cannot spell: a file name that is not UTF-8 reaches
    Python as lone surrogates, which neither sqlite nor protobuf accepts."""
    return _SURROGATES.sub("\ufffd", text)


_SURROGATES = re.compile("[\ud800-\udfff]")


# ---------------------------------------------------------------------------- transport


def read_token(path: str | os.PathLike) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read the token file {path} ({e.strerror}); give a readable file with one token.") from None
    if len(token) < 16:
        raise UserError(f"the token in {path} is shorter than 16 characters; use a long random one (for example: openssl rand -hex 32).")
    return token


class TokenInterceptor(grpc.ServerInterceptor):
    """Every call, health and reflection included, must carry `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only says UNAUTHENTICATED."""

    def refuse(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token; pass the daemon's token (authorization: Bearer TOKEN).")

    return _like(handler, refuse, handler.request_deserializer)


class MalformedRequests(grpc.ServerInterceptor):
    """A request whose bytes do not parse as its message gets INVALID_ARGUMENT; left to grpc, it
    would be INTERNAL, as if the daemon had failed."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception:  # protobuf's DecodeError, whatever the bytes were
                return _MALFORMED

        if handler.request_streaming:
            behavior = handler.stream_unary or handler.stream_stream

            def checked(requests, context):
                return behavior(_parsed(requests, method), context)
        else:
            behavior = handler.unary_unary or handler.unary_stream

            def checked(request, context):
                if request is _MALFORMED:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request to {method} is not a valid message; use the daemon's .proto.")
                return behavior(request, context)

        return _like(handler, checked, deserialize)


_MALFORMED = object()


def _parsed(requests, method: str):
    for request in requests:
        if request is _MALFORMED:
            raise RequestError(f"a message streamed to {method} is not a valid message; use the daemon's .proto.")
        yield request


def _like(handler: grpc.RpcMethodHandler, behavior, deserializer) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` (streaming or not, each way) running `behavior`."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)
