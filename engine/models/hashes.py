"""The model hashes kohya records (ss_sd_model_hash, ss_new_sd_model_hash), cached per file.

The full-file sha256 of a 7 GB checkpoint takes seconds, so it is computed once per file
(keyed by path, size and mtime) and remembered in the user's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from loradrop.fsutil import atomic_write_text


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loradrop" / "model-hashes.json"


def model_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(legacy, sha256): the legacy hash is sha256 of 64 KiB at offset 1 MiB, first 8 hex
    digits, as A1111 and kohya print it; the second is the sha256 of the whole file."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return tuple(cache[key])  # type: ignore[return-value]
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        full = hashlib.sha256()
        while chunk := f.read(16 * 1024 * 1024):
            full.update(chunk)
    cache[key] = [legacy, full.hexdigest()]
    atomic_write_text(cache_path, json.dumps(cache))
    return legacy, full.hexdigest()
