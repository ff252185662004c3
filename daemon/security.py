"""What a request may touch, what a name may contain, and who may call at all.

Paths are resolved (symlinks followed) before they are checked, so a link inside the inbox that
points at /etc is as outside as /etc itself.
"""

from __future__ import annotations

import hmac
import os
import re
import socket
import ssl
import stat
from pathlib import Path
from typing import Iterator

import grpc

from loradrop.errors import UserError

from .errors import Refused, RequestError
from .pipe import printable

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
        raise RequestError(
            f"{what} {text!r} cannot be resolved ({getattr(e, 'strerror', None) or e})."
        ) from None
    if not any(inside(resolved, root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise Refused(f"{what} {text!r} is outside the daemon's folders ({allowed}); put it inside them.")
    return resolved


def refuse_links_out(folder: Path, root: Path) -> None:
    """Refuse a dataset with links that lead out of `root`: checked when the job is queued,
    and again by the worker just before it reads the folder (a link may be added in between).
    Hard links count too (as uploads refuse them): a file with a name outside the folder."""
    if folder.is_symlink() and not _resolves_inside(folder, root):
        # Never walked: an entry linking to / would have the whole tree read, and named.
        raise Refused(
            f"{printable(folder.name)} is a symlink pointing outside the inbox, or nowhere; move or copy the folder itself in instead."
        )
    symlinks, hardlinks = links_out_of(folder, root)
    if symlinks:
        raise Refused(
            f"{folder} has symlinks pointing outside the inbox, or nowhere ({printable(', '.join(symlinks))}); copy the files in instead."
        )
    if hardlinks:
        raise Refused(
            f"{folder} has hard links to files outside it ({printable(', '.join(hardlinks))}); copy the files in instead."
        )


def links_out_of(folder: Path, root: Path, most: int = 3) -> tuple[list[str], list[str]]:
    """Up to `most` symlinks under `folder` that resolve outside `root` or nowhere (a loop), and
    up to `most` files with hard links outside `folder`: (symlinks, hard links), as paths
    relative to `folder`. The walk stops at the `most`-th link out."""
    symlinks: list[str] = []
    shared: dict[
        tuple[int, int], list
    ] = {}  # files with several names: [names seen here, links in all, a name]
    for entry in tree(folder):
        try:
            if entry.is_symlink():
                if not _resolves_inside(Path(entry.path), root):
                    symlinks.append(os.path.relpath(entry.path, folder))
                    if len(symlinks) >= most:
                        break
                continue
            st = entry.stat(follow_symlinks=False)
        except OSError:  # removed meanwhile
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            seen = shared.setdefault(
                (st.st_dev, st.st_ino), [0, st.st_nlink, os.path.relpath(entry.path, folder)]
            )
            seen[0] += 1
    hardlinks = [name for count, links, name in shared.values() if count < links]
    return symlinks, sorted(hardlinks)[:most]


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


# ---------------------------------------------------------------------------- transport


def read_token(path: str | os.PathLike, warn=None) -> str:
    """The token in `path`; `warn` hears, in one sentence, when other users may read it."""
    try:
        with open(path) as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            token = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"cannot read the token file {path} ({getattr(e, 'strerror', None) or e}); give a readable file with one token."
        ) from None
    if len(token) < 16:
        raise UserError(
            f"the token in {path} is shorter than 16 characters; use a long random one (for example: openssl rand -hex 32)."
        )
    if mode & 0o077 and warn is not None:
        warn(
            f"the token file {path} can be read by other users (mode {mode:04o}); make it private: chmod 600 {path}"
        )
    return token


def check_tls(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """The key and certificate, read and checked to belong together before gRPC sees them (it
    only says "in use, or not allowed" of any fault): one sentence for each way they can fail."""
    texts = {}
    for what, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            texts[what] = path.read_bytes()
        except OSError as e:
            raise UserError(
                f"{what} {path} cannot be read ({e.strerror}); give the PEM file's path."
            ) from None
    if b"PRIVATE KEY-----" in texts["--tls-cert"] and b"CERTIFICATE-----" in texts["--tls-key"]:
        raise UserError(
            f"--tls-cert {cert} holds a private key and --tls-key {key} a certificate; swap them."
        )
    if b"-----BEGIN CERTIFICATE-----" not in texts["--tls-cert"]:
        raise UserError(
            f"--tls-cert {cert} is not a PEM certificate (no BEGIN CERTIFICATE line); give the certificate file."
        )
    if b"PRIVATE KEY-----" not in texts["--tls-key"]:
        raise UserError(
            f"--tls-key {key} is not a PEM private key (no BEGIN ... PRIVATE KEY line); give the key file."
        )
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        why = (
            "the key does not belong to the certificate"
            if "MISMATCH" in str(e).upper()
            else f"OpenSSL cannot load them: {e.reason or e}"
        )
        raise UserError(
            f"--tls-cert {cert} and --tls-key {key} do not make a working pair ({why}); give a certificate and its own key."
        ) from None
    return texts["--tls-key"], texts["--tls-cert"]


def refuse_live_socket(path: Path) -> None:
    """Refuse to take over a unix socket that a running daemon answers on (unlinking it would
    leave that daemon alive and unreachable); a socket nobody listens on is a dead one's."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise UserError(f"{path} exists and is not a socket; choose another --listen path.")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return  # left by a daemon that died
        except OSError:
            return
    raise UserError(f"another daemon is listening on {path}; stop it first, or choose another --listen.")


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
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong token; pass the daemon's token (authorization: Bearer TOKEN).",
        )

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
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request to {method} is not a valid message; use the daemon's .proto.",
                    )
                return behavior(request, context)

        return _like(handler, checked, deserialize)


_MALFORMED = object()


def _parsed(requests, method: str):
    for request in requests:
        if request is _MALFORMED:
            raise RequestError(
                f"a message streamed to {method} is not a valid message; use the daemon's .proto."
            )
        yield request


def _like(handler: grpc.RpcMethodHandler, behavior, deserializer) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` (streaming or not, each way) running `behavior`."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer
    )
