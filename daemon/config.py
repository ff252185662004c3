"""The daemon's settings, checked once at start: where it listens and how it guards that door."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from loradrop.errors import UserError

from .home import Home


@dataclass(frozen=True)
class Listen:
    """`unix:PATH` or `HOST:PORT` (IPv6 as `[::1]:PORT`)."""

    unix: Path | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> "Listen":
        if text.startswith("unix:"):
            path = text[len("unix:") :].removeprefix("//")
            if not path:
                raise UserError("--listen unix: needs a socket path, for example unix:/run/loradrop.sock.")
            return cls(unix=Path(path).expanduser().absolute())
        host, sep, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(
                f"--listen {text!r} is neither unix:PATH nor HOST:PORT (for example 127.0.0.1:50051)."
            )
        return cls(host=host, port=int(port))

    @property
    def grpc_address(self) -> str:
        if self.unix:
            return f"unix:{self.unix}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class DaemonConfig:
    home: Home
    listen: Listen
    model: str | None = None  # default base checkpoint; None: the tiny twin
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    insecure_loopback: bool = False
    quiet_seconds: float = 10.0
    on_job_end: str | None = None
    max_retries: int = 1
    workers: int | None = None  # None: one per visible GPU, one on a CPU machine
    heartbeat_seconds: float = 60.0  # a worker silent this long is frozen, and is killed
    idle_seconds: float = 60.0  # an upload sending nothing (a download read by no one) this long is ended
    hook_seconds: float = 300.0  # the most an --on-job-end command may run
    captioner: str | None = (
        None  # captions images that lack one, for jobs whose loradrop.toml names no caption_model
    )
    captioner_kind: str | None = None  # "tagger" or "vlm"; None: told by the folder's files
    ray: str | None = (
        None  # a Ray cluster's address ("auto": the one this machine joined); None: local workers
    )
    ray_resource: str = "GPU"  # the resource one worker holds (a custom one stands in for GPUs in tests)
    ray_transfer: str = "auto"  # "auto": nodes that see the home work in it; "always": every node gets a copy

    def check(self) -> None:
        """Refuse settings that would open the daemon to the network unguarded."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("--tls-cert and --tls-key go together; give both.")
        if self.quiet_seconds < 0 or self.max_retries < 0 or (self.workers is not None and self.workers < 0):
            raise UserError("--quiet-seconds, --max-retries and --workers must be 0 or more.")
        if self.ray_transfer not in ("auto", "always"):
            raise UserError(f"--ray-transfer is auto or always, not {self.ray_transfer!r}.")
        if min(self.heartbeat_seconds, self.idle_seconds, self.hook_seconds) <= 0:
            raise UserError(
                "--heartbeat-seconds, --idle-seconds and --on-job-end-seconds must be more than 0."
            )
        if self.listen.unix:
            if len(str(self.listen.unix)) > 100:
                raise UserError(
                    f"the socket path {self.listen.unix} is too long for a unix socket (over 100 characters); use a shorter --home or --listen."
                )
            return
        if self.insecure_loopback:
            if not self.listen.is_loopback:
                raise UserError(
                    f"--insecure-loopback only allows a loopback address, not {self.listen.host}; use TLS and a token (--tls-cert, --tls-key, --token-file)."
                )
            return
        if not (self.tls_cert and self.token_file):
            raise UserError(
                f"listening on {self.listen.grpc_address} needs TLS and a token (--tls-cert, --tls-key, --token-file); "
                "for a loopback-only daemon without them, add --insecure-loopback."
            )
