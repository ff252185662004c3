"""The TUI's figures, measured on `loradrop tui` running in a pseudo-terminal (80x24):

  start → first frame   from spawning the process to its first full screen (the footer drawn),
                        median of --runs; again with --load busy processes beside it, as on
                        a server that trains (the TUI niced like them)                target < 1 s
  key latency           while a job's log streams 1,000 lines a second: from writing a key
                        (switching to the samples tab) to the screen drawing its answer,
                        p50 / p95 / max over --keys presses                         target < 100 ms
  montage CPU           the TUI's CPU time per second of wall time while the montage plays
                        (8 frames of 256 px, 4 a second), halfcell and sixel         lower is better

    python bench/tui_bench.py [--runs 5] [--keys 30] [--rate 1000] [--load 2] [--image-protocol auto] [--first-frame-only]

The first frame is measured against a real daemon (no workers). For the rest, a small gRPC server
speaking the daemon's API stands in for one: one running job whose StreamEvents sends log lines
at --rate (on the job's stream, and on the whole-daemon stream unless it asks for other kinds
only, as the daemon does), or one done job with samples (no training job logs 1,000 lines a
second, and the montage needs no training). The pseudo-terminal answers the Device Attributes
query like a VT220 without sixel, so `auto` costs what it costs in a terminal.
"""

from __future__ import annotations

import argparse
import fcntl
import io
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import row, write_rows  # noqa: E402
from loradrop.proto.client import Client, ClientError
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc

COLUMNS, ROWS, CELL = 80, 24, (10, 20)
DA1_QUERY, DA1_ANSWER = b"\x1b[c", b"\x1b[?62;22c"  # a VT220 with colour, no sixel


class Terminal:
    """A program in a pseudo-terminal; everything it writes is kept with arrival times. It answers
    the Device Attributes query after `rtt` seconds (a terminal at the far end of ssh)."""

    rtt = 0.0

    def __init__(self, command: list[str]):
        self.master, slave = pty.openpty()
        fcntl.ioctl(
            slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, COLUMNS * CELL[0], ROWS * CELL[1])
        )
        env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor"}
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
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
                threading.Timer(self.rtt, os.write, (self.master, DA1_ANSWER)).start()
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

    def cpu_seconds(self) -> float:
        """User and system CPU time the program has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        os.close(self.master)


def tui(connect: str, protocol: str, nice: int = 0) -> list[str]:
    return [
        *(["nice", "-n", str(nice)] if nice else []),
        sys.executable,
        "-m",
        "loradrop",
        "tui",
        "--connect",
        connect,
        "--image-protocol",
        protocol,
    ]


# ---------------------------------------------------------------------------- first frame


def first_frame(connect: str, protocol: str, nice: int = 0) -> float:
    term = Terminal(tui(connect, protocol, nice))
    try:
        return term.wait_for(b"quit") - term.started  # the footer: the last thing of the first frame
    finally:
        term.close()


def loaded_first_frames(connect: str, protocol: str, runs: int, load: int) -> list[float]:
    """First frames while `load` processes keep a core busy each (niced 10, the TUI too: a
    training job and a login shell on the same server get the same share)."""
    burners = [
        subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", "while True: pass"]) for _ in range(load)
    ]
    try:
        time.sleep(0.5)
        return sorted(first_frame(connect, protocol, nice=10) for _ in range(runs))
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


# ---------------------------------------------------------------------------- a chatty daemon


class Chatty(rpc.LoradropServicer):
    """One running job that logs `rate` lines a second, forever; or, with `samples`, one done job
    with that many samples of one prompt (a picture each: GetSample draws it at the size asked)."""

    def __init__(self, rate: float, samples: int = 0):
        self.rate, self.samples = rate, samples
        state = pb.DONE if samples else pb.RUNNING
        self.job = pb.Job(
            id="0001-chatty",
            number=1,
            name="chatty",
            state=state,
            progress=pb.Progress(stage="train", done=1, total=80),
        )
        self.started = time.monotonic()

    def Status(self, request, context):
        return pb.StatusReply(version="bench", inbox="/bench/inbox", last_event_seq=0)

    def ListJobs(self, request, context):
        return pb.ListJobsReply(jobs=[self.job])

    def GetJob(self, request, context):
        return self.job

    def ListArtifacts(self, request, context):
        return pb.ListArtifactsReply()

    def GetSample(self, request, context):
        step = int(Path(request.path).stem.split("-")[1])
        size = request.max_size or 256
        image = Image.new("RGB", (size, size), (30 * step % 256, 90, 200))
        image.paste((250, 250 - 25 * step % 256, 40), (size // 4, size // 4, size // 2 + 6 * step, size // 2))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return pb.Image(
            path=request.path,
            png=buffer.getvalue(),
            width=size,
            height=size,
            original_width=256,
            original_height=256,
        )

    def StreamEvents(self, request, context):
        seq = request.since
        if self.samples:  # the done job's samples, then its stream ends as a done job's does
            if request.job_id and not request.kinds:
                for step in range(1, self.samples + 1):
                    if step > seq:
                        sample = pb.SampleReady(
                            path=f"/bench/samples/step-{step}.png",
                            step=step,
                            prompt_index=0,
                            prompt="a bench thing",
                        )
                        yield pb.Event(
                            seq=step,
                            global_seq=step,
                            job_id=self.job.id,
                            time=time.time(),
                            kind="sample",
                            sample=sample,
                        )
                return
            while request.follow and context.is_active():  # the daemon's stream: quiet, and open
                time.sleep(0.05)
            return
        if request.kinds and "log" not in request.kinds:  # filtered as the daemon filters: no log lines
            while context.is_active():
                time.sleep(0.05)
            return
        while context.is_active():
            due = int((time.monotonic() - self.started) * self.rate)
            while seq < due:
                seq += 1
                yield pb.Event(
                    seq=seq,
                    global_seq=seq,
                    job_id=self.job.id,
                    time=time.time(),
                    kind="log",
                    log=pb.LogLine(level="info", text=f"line {seq}: {'x' * 40}"),
                )
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


def montage_cpu(connect: str, protocol: str, seconds: float = 6.0) -> float:
    """The TUI's CPU seconds per second while the montage plays (after its frames have arrived)."""
    term = Terminal(tui(connect, protocol))
    try:
        term.wait_for(b"chatty")
        term.press(b"\r")
        term.wait_for(b"files")
        term.press(b"g")
        term.wait_for(b"newest")
        term.press(b" ")
        term.wait_for(b"montage")
        time.sleep(2)  # every frame fetched and drawn once
        before, at = term.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        return (term.cpu_seconds() - before) / (time.monotonic() - at)
    finally:
        term.close()


# ---------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="starts to time")
    parser.add_argument("--keys", type=int, default=30, help="key presses to time")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="log lines per second while keys are timed"
    )
    parser.add_argument(
        "--rtt",
        type=float,
        default=0.0,
        metavar="MS",
        help="the terminal answers queries this late, as over ssh (default: 0)",
    )
    parser.add_argument(
        "--load",
        type=int,
        default=2,
        help="busy processes beside the TUI for the loaded first frame (default: 2, a core each; 0: skip it)",
    )
    parser.add_argument(
        "--image-protocol", default="auto", help="as `loradrop tui --image-protocol` (default: auto)"
    )
    parser.add_argument("--json", type=Path, help="also write the result rows as JSON here")
    parser.add_argument(
        "--first-frame-only", action="store_true", help="measure the first frame (alone and loaded) and stop"
    )
    args = parser.parse_args()
    Terminal.rtt = args.rtt / 1000

    root = Path(tempfile.mkdtemp(prefix="ld-tui-bench-", dir="/tmp"))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "loradrop", "daemon", "--home", str(root / "home"), "--workers", "0"],
        stdout=open(root / "daemon.out", "wb"),
        stderr=subprocess.STDOUT,
    )
    chatty = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servers = [chatty]
    try:
        connect = f"unix:{root / 'home' / 'daemon.sock'}"
        deadline = time.monotonic() + 60
        while not _answers(connect):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"the daemon did not start: {(root / 'daemon.out').read_text()}")
            time.sleep(0.1)
        starts = sorted(first_frame(connect, args.image_protocol) for _ in range(args.runs))
        loaded = loaded_first_frames(connect, args.image_protocol, args.runs, args.load) if args.load else []
        if args.first_frame_only:
            write_rows(first_frame_report(args, starts, loaded), args.json)
            return 0

        rpc.add_LoradropServicer_to_server(Chatty(args.rate), chatty)
        chatty_socket = f"unix:{root / 'chatty.sock'}"
        chatty.add_insecure_port(chatty_socket)
        chatty.start()
        latencies = sorted(1000 * x for x in key_latency(chatty_socket, args.image_protocol, args.keys))

        album = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        servers.append(album)
        rpc.add_LoradropServicer_to_server(Chatty(0, samples=8), album)
        album_socket = f"unix:{root / 'album.sock'}"
        album.add_insecure_port(album_socket)
        album.start()
        montage = {protocol: montage_cpu(album_socket, protocol) for protocol in ("halfcell", "sixel")}

        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        rows = first_frame_report(args, starts, loaded)
        print(
            f"key latency           p50 {statistics.median(latencies):.1f} ms, p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms over {len(latencies)} keys at {args.rate:g} log lines/s (target < 100 ms)"
        )
        print(
            "montage CPU           "
            + ", ".join(f"{protocol} {100 * share:.0f}% of a core" for protocol, share in montage.items())
            + " while it plays"
        )
        rows.append(
            row(
                f"TUI key latency p95 at {args.rate:g} lines/s",
                p95,
                "ms",
                "< 100 ms",
                statistics.median(latencies),
                "p50",
            )
        )
        rows += [
            row(f"TUI montage playing, {protocol}", 100 * share, "% of a core", "lower")
            for protocol, share in montage.items()
        ]
        write_rows(rows, args.json)
    finally:
        for server in servers:
            server.stop(0)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        shutil.rmtree(root, ignore_errors=True)
    return 0


def first_frame_report(args, starts: list[float], loaded: list[float]) -> list[dict]:
    """Print the first-frame figures; their result rows."""
    print(
        f"start → first frame   median {statistics.median(starts):.3f} s, max {starts[-1]:.3f} s over {len(starts)} starts (target < 1 s; --image-protocol {args.image_protocol}, rtt {args.rtt:g} ms)"
    )
    rows = [row("TUI start → first frame (median)", statistics.median(starts), "s", "< 1 s")]
    if loaded:
        print(
            f"  with {args.load} busy    median {statistics.median(loaded):.3f} s, max {loaded[-1]:.3f} s over {len(loaded)} starts"
        )
        rows.append(
            row(
                f"TUI start → first frame beside {args.load} busy processes (median)",
                statistics.median(loaded),
                "s",
                "< 1 s",
            )
        )
    return rows


def _answers(connect: str) -> bool:
    try:
        with Client(connect) as c:
            c.status()
        return True
    except ClientError:
        return False


if __name__ == "__main__":
    sys.exit(main())
