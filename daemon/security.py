"""What a request may touch, what a name may contain, and who may call at all.

Paths are resolved (symlinks followed) before they are checked, so a link inside the inbox that
points at /etc is as outside as /etc itself.
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path

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
    resolved = path.resolve()
    if not any(inside(resolved, root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise Refused(f"{what} {text!r} is outside the daemon's folders ({allowed}); put it inside them.")
    return resolved


def links_out_of(folder: Path, root: Path) -> list[str]:
    """Symlinks under `folder` (the folder itself included) that resolve outside `root`."""
    bad = []
    if folder.is_symlink() and not inside(folder.resolve(), root):
        bad.append(folder.name)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if entry.is_symlink() and not inside(entry.resolve(), root):
                bad.append(str(entry.relative_to(folder)))
    return bad


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

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
