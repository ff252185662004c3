"""Ending the TUI when its terminal goes away: an ssh connection drops, a terminal window or tmux pane
closes, and no SIGHUP ends the process (it has no controlling terminal, or SIGHUP is ignored).

Textual does not notice by itself: its input thread (textual/drivers/linux_driver.py) skips the empty
read of a hung-up terminal and selects again at once, so the app would live on, spinning a core.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time

from textual.app import App

GONE = "loradrop: the terminal went away; the TUI exits."
SHUTDOWN_GRACE = 1.5  # seconds Textual gets to end the app before the process ends itself


def exit_when_terminal_gone(app: App) -> None:
    """Watch the terminal on stdin, stdout and stderr in a thread; when it hangs up, exit `app`."""
    fds = [
        stream.fileno()
        for stream in (sys.__stdin__, sys.__stdout__, sys.__stderr__)
        if stream is not None and stream.isatty()
    ]
    if fds:
        threading.Thread(target=_watch, args=(app, fds), name="terminal-gone", daemon=True).start()


def _watch(app: App, fds: list[int]) -> None:
    hangup = select.poll()
    for fd in fds:
        hangup.register(fd, 0)  # no events asked for: poll wakes on a hang-up (or error) only, not on keys
    gone = [fd for fd, _ in hangup.poll()]
    # Writes to a hung-up terminal fail (EIO): Textual's writer thread would die with a traceback and
    # its last writes, those that restore the terminal on exit, would pile up. /dev/null takes them.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in gone:
        os.dup2(null, fd)
    os.close(null)
    # Textual's shutdown can still hang: had its writer thread written to the terminal before /dev/null
    # took its place, the thread died, and the writes that restore the terminal fill its queue and block
    # (the SIGCONT sent with the SIGHUP makes Textual write a whole new start at once).
    threading.Thread(target=_end_after, args=(SHUTDOWN_GRACE,), name="terminal-gone-end", daemon=True).start()
    app.call_from_thread(app.exit, return_code=1, message=GONE)


def _end_after(seconds: float) -> None:
    time.sleep(seconds)
    os.write(2, f"{GONE}\n".encode())
    os._exit(1)  # nothing is left to show or restore: end as the SIGHUP it did not get would have
