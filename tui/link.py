"""The TUI's connection to the daemon: a shared client for calls, and followed event streams that
survive a daemon restart.

Each `EventFeed` owns its own channel, so closing it ends a stream blocked in a read at once (the
app's exit never waits on a quiet stream). A stream that breaks, or ends while the daemon stops,
is opened again after the last event seen: nothing is missed and nothing comes twice. Every retry
uses a new channel, because a gRPC channel that lost its server backs off for up to two minutes
before it tries again, while a new one connects at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import grpc

from loradrop.proto.client import TERMINAL, Client, ClientError
from loradrop.proto.v1 import loradrop_pb2 as pb

# A stream that breaks with these is retried; any other error is the request's fault and final.
RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


@dataclass(frozen=True)
class Target:
    """Where the daemon is and how to authenticate: enough to open a new client at any time."""

    address: str | None = None
    token_file: str | None = None
    tls_ca: str | None = None

    def client(self) -> Client:
        return Client(self.address, token_file=self.token_file, tls_ca=self.tls_ca)


class Link:
    """The client the screens call through; `renew` swaps in a fresh channel after a restart."""

    def __init__(self, target: Target):
        self.target = target
        self._lock = threading.Lock()
        self._client = target.client()

    @property
    def client(self) -> Client:
        with self._lock:
            return self._client

    @property
    def address(self) -> str:
        return self._client.target

    def renew(self) -> None:
        with self._lock:
            old, self._client = self._client, self.target.client()
        old.close()

    def close(self) -> None:
        self.client.close()


class EventFeed:
    """One followed `StreamEvents` (a job's, or the whole daemon's with `job_id=""`), run by `run`
    in a thread until the job ends or `stop` is called.

    `deliver(event)` gets each event once, in order; `link_changed(up, detail)` tells when the daemon
    went away ("reconnecting") and when it answers again."""

    def __init__(
        self,
        target: Target,
        job_id: str = "",
        since: int = 0,
        *,
        kinds: tuple[str, ...] = (),
        retry_delay: float = 0.2,
        max_delay: float = 2.0,
    ):
        self.target, self.job_id, self.since, self.kinds = target, job_id, since, kinds
        self.retry_delay, self.max_delay = retry_delay, max_delay
        self._stopped = threading.Event()
        self._client: Client | None = None
        self._lock = threading.Lock()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            if self._client is not None:
                self._client.close()  # a read blocked on this channel returns CANCELLED now

    def run(self, deliver: Callable[[pb.Event], None], link_changed: Callable[[bool, str], None]) -> None:
        delay, down = self.retry_delay, False
        while True:
            client = self._open()
            if client is None:
                return
            ended = False
            try:
                for event in client.events(
                    self.job_id, self.since, follow=True, reconnect=False, kinds=self.kinds
                ):
                    if down:
                        down, delay = False, self.retry_delay
                        link_changed(True, "")
                    number = event.seq if self.job_id else event.global_seq
                    if number <= self.since:
                        continue  # never twice, whatever the server does
                    self.since = number
                    ended = bool(self.job_id) and event.HasField("state") and event.state.state in TERMINAL
                    deliver(event)
                if ended or (self.job_id and self._job_ended(client)):
                    return
                detail = "the daemon closed the stream"  # it is stopping; a new one comes back
            except ClientError as e:
                if self.stopped or e.code not in RETRY_CODES:
                    return  # stopped, or a request the daemon refuses (no such job): retrying will not help
                detail = str(e)
            except ValueError:
                if self.stopped:
                    return  # `stop` closed the channel before the call began
                raise
            finally:
                client.close()
            if self.stopped:
                return
            if not down:
                down = True
                link_changed(False, detail)
            self._stopped.wait(delay)
            delay = min(delay * 2, self.max_delay)
            if self._answers():
                down, delay = False, self.retry_delay
                link_changed(True, "")

    def _open(self) -> Client | None:
        """A new client, held so `stop` can close it; None once stopped (under the lock, so a
        client opened concurrently with `stop` is never left blocking)."""
        with self._lock:
            if self.stopped:
                return None
            self._client = self.target.client()
            return self._client

    def _answers(self) -> bool:
        """True when the daemon answers a Status call (the stream then resumes)."""
        client = self._open()
        if client is None:
            return False
        try:
            client.status()
            return True
        except ClientError:
            return False
        finally:
            client.close()

    def _job_ended(self, client: Client) -> bool:
        try:
            return client.job(self.job_id).state in TERMINAL
        except ClientError:
            return False
