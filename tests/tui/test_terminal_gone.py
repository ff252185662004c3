"""`loradrop tui` whose terminal goes away (ssh drops, the window closes) while no SIGHUP ends it
must exit at once, not live on spinning a core in Textual's input thread (tui/terminal_gone.py)."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

from loradrop.tui.terminal_gone import GONE

COLUMNS, ROWS = 100, 30
EXITS_WITHIN = 3.0  # seconds after the terminal went away
CPU_AT_MOST = 0.5  # seconds of CPU meanwhile; the spinning input thread takes a whole core


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_tui(controlling: bool, stderr: Path) -> tuple[int, int]:
    """`loradrop tui` on a new pty, waiting for a daemon that is not there; returns (pid, master fd).
    `controlling`: in a session of its own with the pty as its controlling terminal and SIGHUP
    ignored (as under nohup), else with the pty only as stdin and stdout, stderr a file (as seen
    on the GPU server). Either way it is its own process group, so that it can be killed whole."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    command = [sys.executable, "-m", "loradrop", "tui", "--connect", "unix:/nonexistent.sock"]
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(ROWS)}
    pid = os.fork()
    if pid == 0:  # the child: only async-signal-safe calls before exec
        try:
            os.close(master)
            if controlling:
                os.setsid()
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            else:
                os.setpgid(0, 0)
            os.dup2(slave, 0)
            os.dup2(slave, 1)
            os.dup2(slave if controlling else os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.close(slave)
            os.execve(command[0], command, env)
        finally:
            os._exit(127)
    os.close(slave)
    return pid, master


def wait_drawn(master: int, stderr: Path, timeout: float = 20) -> None:
    """Until the footer is drawn (on the pty or in the stderr file); the pty is drained meanwhile."""
    seen, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            seen += os.read(master, 65536)
        if b"quit" in seen or (stderr.exists() and b"quit" in stderr.read_bytes()):
            return
    raise AssertionError(f"the TUI drew no footer within {timeout} s; the pty showed {seen[-500:]!r}")


VARIANTS = {"controlling-terminal-sighup-ignored": True, "pty-as-stdin-only": False}


@pytest.mark.parametrize("controlling", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_tui_exits_when_its_terminal_goes_away(controlling, tmp_path):
    stderr = tmp_path / "stderr"
    pid, master = start_tui(controlling, stderr)
    status = None
    try:
        wait_drawn(master, stderr)
        time.sleep(0.5)  # settled: its connection attempts are under way
        before = cpu_seconds(pid)
        os.close(master)  # the terminal goes away
        master = None
        gone = time.monotonic()
        while status is None and time.monotonic() - gone < EXITS_WITHIN:
            time.sleep(0.05)
            done, code, usage = os.wait4(pid, os.WNOHANG)
            status = (code, usage) if done else None
        took = time.monotonic() - gone
        if status is None:
            used = cpu_seconds(pid) - before
            pytest.fail(f"the TUI runs on {took:.1f} s after its terminal went away, using {used:.1f} s CPU")
        code, usage = status
        used = usage.ru_utime + usage.ru_stime - before
        assert used <= CPU_AT_MOST, f"the TUI used {used:.2f} s of CPU in the {took:.1f} s it took to exit"
        assert not os.WIFSIGNALED(code), f"the TUI was killed by signal {os.WTERMSIG(code)}"
        if not controlling:  # stderr outlived the terminal: from the first frame on it says why, no more
            drawing = stderr.read_bytes().split(b"\x1b[?1049h", 1)[-1]  # from entering the alternate screen
            assert b"Traceback" not in drawing
            assert drawing.rstrip().endswith(GONE.encode())
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # nothing of its process group is left
    finally:
        if master is not None:
            os.close(master)
        if status is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
