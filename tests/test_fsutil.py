"""Atomic writes: the real name appears only complete; leftovers of killed writers are swept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loradrop.fsutil import atomic_path, atomic_write_text, process_running, sweep_partials
from loradrop.testing import dead_pid, wait_for


def test_a_failed_write_leaves_neither_the_name_nor_a_temporary(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(target, "whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_the_temporary_names_its_writer(tmp_path):
    with atomic_path(tmp_path / "a.safetensors") as tmp:
        assert tmp.name.startswith(f".a.safetensors.{os.getpid()}.") and tmp.name.endswith(".partial")
        assert sweep_partials(tmp_path) == []  # this process is still writing it


def test_sweep_removes_only_what_dead_writers_left(tmp_path):
    nested = tmp_path / "job" / "samples"
    nested.mkdir(parents=True)
    dead = [
        nested / f".s.png.{dead_pid()}.k2j_x.partial",
        tmp_path / f".a.safetensors.{dead_pid()}.abc.partial",
    ]
    alive = tmp_path / f".b.safetensors.{os.getpid()}.abc.partial"
    others = [tmp_path / ".a.safetensors.abc.partial", tmp_path / "notes.partial", tmp_path / "a.safetensors"]
    for p in (*dead, alive, *others):
        p.write_text("x")
    assert sorted(sweep_partials(tmp_path)) == sorted(dead)
    assert all(p.exists() for p in (alive, *others)) and not any(p.exists() for p in dead)


def test_a_zombie_writer_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not reaped until wait()
    try:
        wait_for(lambda: not process_running(child.pid), what="the child to exit")
        assert process_running(os.getpid())
    finally:
        child.wait()
