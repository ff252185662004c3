"""The TUI's two figures, measured on `loradrop tui` running in a pseudo-terminal (80x24):

  start → first frame   from spawning the process to its first full screen (the footer drawn),
                        median of --runs                                           target < 1 s
  key latency           while a job's log streams 1,000 lines a second: from writing a key
                        (switching to the samples tab) to the screen drawing its answer,
                        p50 / p95 / max over --keys presses                         target < 100 ms

    python bench/tui_bench.py [--runs 5] [--keys 30] [--rate 1000] [--image-protocol auto]

The first frame is measured against a real daemon (no workers). For the latency, no training
job logs 1,000 lines a second, so a small gRPC server speaking the daemon's API stands in for it:
one running job whose StreamEvents sends log lines at --rate (on the job's stream, and on the
whole-daemon stream unless it asks for other kinds only, as the daemon does). The pseudo-terminal
answers the Device Attributes query like a VT220 without sixel, so `auto` costs what it costs in
a terminal.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import row, write_rows  # noqa: E402
from loradrop.proto.client import Client, ClientError
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc

COLUMNS, ROWS, CELL = 80, 24, (10, 20)
DA1_QUERY, DA1_ANSWER = b"\x1b[c", b"\x1b[?62;22c"  # a VT220 with colour, no sixel


class Terminal:
    """A program in a pseudo-terminal; everything it writes is kept with arrival times."""

    def __init__(self, command: list[str]):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, COLUMNS * CELL[0], ROWS * CELL[1]))
        env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor"}
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.output = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if not ready:
                if self.process.poll() is not None:
                    return
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if DA1_QUERY in data:
                os.write(self.master, DA1_ANSWER)
            with self._lock:
                self.output += data

    def mark(self) -> int:
        with self._lock:
            return len(self.output)

    def wait_for(self, text: bytes, since: int = 0, timeout: float = 30) -> float:
        """Seconds (monotonic clock) at which `text` first appeared after offset `since`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.output.find(text, since) >= 0:
                    return time.monotonic()
            time.sleep(0.001)
        raise SystemExit(f"timed out waiting for {text!r} on the screen")

    def press(self, key: bytes) -> float:
        at = time.monotonic()
        os.write(self.master, key)
        return at

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        os.close(self.master)


def tui(connect: str, protocol: str) -> list[str]:
    return [sys.executable, "-m", "loradrop", "tui", "--connect", connect, "--image-protocol", protocol]


# ---------------------------------------------------------------------------- first frame


def first_frame(connect: str, protocol: str) -> float:
    term = Terminal(tui(connect, protocol))
    try:
        return term.wait_for(b"quit") - term.started  # the footer: the last thing of the first frame
    finally:
        term.close()


# ---------------------------------------------------------------------------- a chatty daemon


class Chatty(rpc.LoradropServicer):
    """One running job that logs `rate` lines a second, forever."""

    def __init__(self, rate: float):
        self.rate = rate
        self.job = pb.Job(id="0001-chatty", number=1, name="chatty", state=pb.RUNNING, progress=pb.Progress(stage="train", done=1, total=80))
        self.started = time.monotonic()

    def Status(self, request, context):
        return pb.StatusReply(version="bench", inbox="/bench/inbox", last_event_seq=0)

    def ListJobs(self, request, context):
        return pb.ListJobsReply(jobs=[self.job])

    def GetJob(self, request, context):
        return self.job

    def ListArtifacts(self, request, context):
        return pb.ListArtifactsReply()

    def StreamEvents(self, request, context):
        seq = request.since
        if request.kinds and "log" not in request.kinds:  # filtered as the daemon filters: no log lines
            while context.is_active():
                time.sleep(0.05)
            return
        while context.is_active():
            due = int((time.monotonic() - self.started) * self.rate)
            while seq < due:
                seq += 1
                yield pb.Event(seq=seq, global_seq=seq, job_id=self.job.id, time=time.time(), kind="log", log=pb.LogLine(level="info", text=f"line {seq}: {'x' * 40}"))
            time.sleep(0.005)


def key_latency(connect: str, protocol: str, keys: int) -> list[float]:
    term = Terminal(tui(connect, protocol))
    try:
        term.wait_for(b"chatty")
        term.press(b"\r")  # open the job: its log starts streaming
        term.wait_for(b"line ")
        time.sleep(2)
        latencies = []
        for _ in range(keys):
            since = term.mark()
            pressed = term.press(b"g")  # the samples tab answers with its empty-gallery text
            latencies.append(term.wait_for(b"no samples yet", since) - pressed)
            term.press(b"l")  # back to the streaming log
            time.sleep(0.3)
        return latencies
    finally:
        term.close()


# ---------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="starts to time")
    parser.add_argument("--keys", type=int, default=30, help="key presses to time")
    parser.add_argument("--rate", type=float, default=1000.0, help="log lines per second while keys are timed")
    parser.add_argument("--image-protocol", default="auto", help="as `loradrop tui --image-protocol` (default: auto)")
    parser.add_argument("--json", type=Path, help="also write the result rows as JSON here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ld-tui-bench-", dir="/tmp"))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "loradrop", "daemon", "--home", str(root / "home"), "--workers", "0"],
        stdout=open(root / "daemon.out", "wb"), stderr=subprocess.STDOUT,
    )
    chatty = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    try:
        connect = f"unix:{root / 'home' / 'daemon.sock'}"
        deadline = time.monotonic() + 60
        while not _answers(connect):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"the daemon did not start: {(root / 'daemon.out').read_text()}")
            time.sleep(0.1)
        starts = sorted(first_frame(connect, args.image_protocol) for _ in range(args.runs))

        rpc.add_LoradropServicer_to_server(Chatty(args.rate), chatty)
        chatty_socket = f"unix:{root / 'chatty.sock'}"
        chatty.add_insecure_port(chatty_socket)
        chatty.start()
        latencies = sorted(1000 * x for x in key_latency(chatty_socket, args.image_protocol, args.keys))

        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        print(f"start → first frame   median {statistics.median(starts):.3f} s, max {starts[-1]:.3f} s over {len(starts)} starts (target < 1 s; --image-protocol {args.image_protocol})")
        print(f"key latency           p50 {statistics.median(latencies):.1f} ms, p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms over {len(latencies)} keys at {args.rate:g} log lines/s (target < 100 ms)")
        write_rows([
            row("TUI start → first frame (median)", statistics.median(starts), "s", "< 1 s"),
            row(f"TUI key latency p95 at {args.rate:g} lines/s", p95, "ms", "< 100 ms", statistics.median(latencies), "p50"),
        ], args.json)
    finally:
        chatty.stop(0)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _answers(connect: str) -> bool:
    try:
        with Client(connect) as c:
            c.status()
        return True
    except ClientError:
        return False


if __name__ == "__main__":
    sys.exit(main())
