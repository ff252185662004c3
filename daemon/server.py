"""The daemon process: its home, the job store, the inbox watcher, the workers and the gRPC
server, started in that order and stopped in the reverse one.

This process never imports torch (tests check it): everything that needs it runs in a spawned
worker. Stopping (SIGTERM, SIGINT) is clean: the running job is interrupted at a step boundary
(or between two denoising steps of a sample) and queued again, to resume from its last checkpoint
on the next start; a second signal kills the workers that are still busy.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loradrop.errors import UserError
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc

from .config import DaemonConfig
from .events import EventLog
from .home import HomeLock
from .hooks import JobEndCommand
from .intake import Intake
from .limits import RPC_THREADS
from .security import MalformedRequests, TokenInterceptor, check_tls, read_token, refuse_live_socket
from .service import Service
from .store import Store
from .supervisor import Supervisor
from .watcher import InboxWatcher

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Loradrop"].full_name
MAX_MESSAGE = 64 << 20  # previews at full size can pass gRPC's 4 MB default


class Daemon:
    def __init__(self, config: DaemonConfig):
        config.check()
        self.config = config
        self.home = config.home.create()
        self._stop = threading.Event()

    def start(self) -> None:
        self.lock = HomeLock(self.home)
        self._log_to_file()
        self.store = Store(self.home.database)
        self.hooks = (
            JobEndCommand(self.config.on_job_end, self.store, self.home.log, self.config.hook_seconds)
            if self.config.on_job_end
            else None
        )
        self.events = EventLog(self.store, on_end=self.hooks)
        self.supervisor = Supervisor(self.home, self.config, self.events)
        self.intake = Intake(self.home, self.config, self.events, wake=self.supervisor.wake)
        self.watcher = InboxWatcher(self.home.inbox, self.config.quiet_seconds, self.intake)
        self.service = Service(
            self.home, self.config, self.events, self.intake, self.supervisor, self.watcher
        )
        self.server = self._grpc_server()  # binds now: a taken port fails before any worker starts
        try:
            self.supervisor.start()
            self.watcher.start()
            self.server.start()
            if self.config.listen.unix:
                os.chmod(self.config.listen.unix, 0o600)
        except BaseException:
            self.supervisor.stop(grace=0)  # no worker outlives a daemon that failed to start
            raise
        log.info(
            "daemon %d listening on %s; drop dataset folders into %s",
            os.getpid(),
            self.config.listen.grpc_address,
            self.home.inbox,
        )

    def _grpc_server(self) -> grpc.Server:
        interceptors = []
        token = read_token(self.config.token_file, warn=log.warning) if self.config.token_file else None
        if token:
            interceptors.append(TokenInterceptor(token))
        interceptors.append(MalformedRequests())
        server = grpc.server(
            ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
            ],
        )
        rpc.add_LoradropServicer_to_server(self.service, server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )

        listen = self.config.listen
        if listen.unix:
            listen.unix.parent.mkdir(parents=True, exist_ok=True)
            refuse_live_socket(listen.unix)  # another home's daemon may answer there: never take its socket
            listen.unix.unlink(missing_ok=True)  # left by a daemon that died
        try:
            if self.config.tls_cert:
                key, cert = check_tls(self.config.tls_cert, self.config.tls_key)
                server.add_secure_port(listen.grpc_address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                server.add_insecure_port(listen.grpc_address)
        except RuntimeError:
            raise UserError(
                f"cannot listen on {listen.grpc_address} (in use, or not allowed); choose another --listen."
            ) from None
        return server

    def _log_to_file(self) -> None:
        handler = logging.FileHandler(self.home.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("loradrop")
        root.addHandler(handler)
        root.setLevel(logging.INFO)

    def request_stop(self, *_args) -> None:
        supervisor = getattr(self, "supervisor", None)
        if (
            self._stop.is_set() and supervisor is not None
        ):  # a second signal while stopping: do not wait for the workers
            log.warning("asked to stop again: workers still busy are killed now")
            supervisor.hurry()
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    def stop(self) -> None:
        self.service.stopping = True
        self.server.stop(grace=2).wait()
        self.watcher.stop()
        self.supervisor.stop()
        if self.hooks is not None:
            self.hooks.stop()  # --on-job-end commands end with the daemon
        self.store.close()
        if self.config.listen.unix:
            self.config.listen.unix.unlink(missing_ok=True)
        self.lock.release()
        log.info("daemon %d stopped", os.getpid())


def serve(config: DaemonConfig) -> None:
    """Run a daemon until SIGTERM or SIGINT."""
    os.umask(0o077)  # everything the daemon writes is private to its user
    daemon = Daemon(config)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    daemon.start()
    try:
        daemon.wait()
    finally:
        daemon.stop()
