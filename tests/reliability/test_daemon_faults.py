"""The daemon's own files and doors, broken from outside: a corrupt state.sqlite, a socket another
daemon answers on, TLS files missing, swapped or unmatched, a token others can read, and
--on-job-end commands that would run for ever. Each is one sentence, never a traceback, and
nothing is deleted or left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loradrop.testing import free_port, make_dataset, pid_alive, wait_for

pytestmark = pytest.mark.timeout(240)


def _daemon(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`loradrop daemon` expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "loradrop", "daemon", "--home", str(home), "--workers", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_sentence(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("loradrop: ")]
    assert len(line) == 1 and all(w in line[0] for w in words), result.stderr


@pytest.mark.parametrize("damage", ["random bytes", "cut short"])
def test_a_corrupt_state_file_is_one_sentence_kept_aside_and_a_fresh_start_works(home, daemons, damage):
    """Random bytes or a truncated state.sqlite made the daemon exit with a traceback."""
    d = daemons(home, "--workers", "0", "--quiet-seconds", "3600")
    make_dataset(home / "inbox" / "cats")
    with d.client() as c:
        for i in range(30):
            c.submit("cats", name=f"job{i}")
    assert d.stop() == 0
    database = home / "state.sqlite"
    whole = database.read_bytes()
    bad = os.urandom(len(whole)) if damage == "random bytes" else whole[: len(whole) // 2]
    database.write_bytes(bad)

    result = _daemon(home)
    _one_sentence(result, str(database), "is not a readable job database", "moved aside", "starts afresh")
    (aside,) = home.glob("state.sqlite.bad-*")
    assert aside.read_bytes() == bad, "the bad file is kept, whole"
    again = daemons(home, "--workers", "0")
    with again.client() as c:
        assert c.jobs() == [] and c.status().pid == again.pid


def test_listening_on_another_live_daemons_socket_is_refused(home, daemons, tmp_path):
    """--listen at another daemon's socket took it over: the first stayed alive and unreachable."""
    first = daemons(home, "--workers", "0")
    result = _daemon(tmp_path / "second", "--listen", f"unix:{home / 'daemon.sock'}")
    _one_sentence(result, "another daemon is listening on", str(home / "daemon.sock"))
    with first.client() as c:
        assert c.status().pid == first.pid
    first.kill()  # a dead daemon's socket may be taken
    second = daemons(
        tmp_path / "second",
        "--workers",
        "0",
        "--listen",
        f"unix:{home / 'daemon.sock'}",
        connect=f"unix:{home / 'daemon.sock'}",
    )
    with second.client() as c:
        assert c.status().pid == second.pid


def test_tls_files_that_are_missing_swapped_or_unmatched_are_one_sentence_each(home, tls, tmp_path):
    """A missing file was a traceback; a swapped or unmatched pair said "in use, or not allowed"."""
    cert, key, token = tls
    other_key = tmp_path / "other-key.pem"
    subprocess.run(
        ["openssl", "genrsa", "-out", str(other_key), "2048"], check=True, capture_output=True, timeout=60
    )
    listen = ["--listen", f"localhost:{free_port()}"]
    cases = [
        ((tmp_path / "nope.pem", key, token), ["--tls-cert", "nope.pem cannot be read"]),
        ((cert, tmp_path / "nope.pem", token), ["--tls-key", "nope.pem cannot be read"]),
        ((key, cert, token), ["holds a private key", "swap them"]),
        (
            (cert, other_key, token),
            ["do not make a working pair", "the key does not belong to the certificate"],
        ),
        ((token, key, token), ["is not a PEM certificate"]),
        ((cert, key, tmp_path / "no-token"), ["cannot read the token file", "no-token"]),
    ]
    for (c, k, t), words in cases:
        result = _daemon(home, *listen, "--tls-cert", str(c), "--tls-key", str(k), "--token-file", str(t))
        _one_sentence(result, *words)


def test_a_client_given_missing_tls_or_token_files_says_which_option_in_one_sentence(home, tmp_path):
    """Reading them was a FileNotFoundError traceback from the client's constructor."""
    for option in ("--tls-ca", "--token-file"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "loradrop",
                "status",
                "--connect",
                f"localhost:{free_port()}",
                option,
                str(tmp_path / "gone.pem"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        _one_sentence(result, f"cannot read {option}", "gone.pem")


def test_a_token_file_others_can_read_is_warned_about(home, tls_daemon, tls):
    cert, key, token = tls
    token.chmod(0o644)
    d = tls_daemon()
    with d.client() as c:
        c.status()
    warning = (
        f"the token file {token} can be read by other users (mode 0644); make it private: chmod 600 {token}"
    )
    assert warning in d.log() and warning in (home / "daemon.log").read_text()


def test_job_end_commands_are_bounded_in_time_and_end_with_the_daemon(home, daemons, tmp_path):
    """--on-job-end commands outlived the daemon, and ran for as long as they liked."""
    pids = tmp_path / "pids"
    hook = f"echo $$ >> {pids}; exec sleep 600"
    make_dataset(home / "inbox" / "cats")

    def started(n: int) -> int:
        found = wait_for(
            lambda: (
                pids.exists() and len(listed := [int(p) for p in pids.read_text().split()]) >= n and listed
            ),
            timeout=30,
            what=f"{n} job-end commands",
        )
        return found[n - 1]

    d = daemons(
        home, "--workers", "0", "--quiet-seconds", "3600", "--on-job-end", hook, "--on-job-end-seconds", "3"
    )
    with d.client() as c:
        c.cancel(c.submit("cats", name="one").id)
        first = started(1)
        wait_for(lambda: not pid_alive(first), timeout=20, what="the command to be ended after its 3 s")
        wait_for(
            lambda: "ran past 3 s and was ended" in (home / "daemon.log").read_text(),
            timeout=10,
            what="the log to say so",
        )
    assert d.stop() == 0

    d = daemons(home, "--workers", "0", "--quiet-seconds", "3600", "--on-job-end", hook)  # 300 s to run
    with d.client() as c:
        c.cancel(c.submit("cats", name="two").id)
        second = started(2)
        assert pid_alive(second)
    assert d.stop() == 0
    assert not pid_alive(second), "a job-end command outlived its daemon"
