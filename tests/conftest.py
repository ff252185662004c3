"""Shared fixtures: the tiny twin, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the tests' caches (twin, latents, hashes) out of the user's home."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    from loradrop.engine.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-sdxl.safetensors")


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    """The twin loaded in fp32. Tests must not change its weights (use copies for that)."""
    from loradrop.engine.models.sdxl import load_sdxl

    return load_sdxl(tiny_path)


@pytest.fixture
def home():
    """A fresh daemon home with a short path (a unix socket path must stay under ~100 characters)."""
    import subprocess
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ld-", dir="/tmp"))
    yield root / "home"
    subprocess.run(
        ["rm", "-rf", str(root)], check=False
    )  # shutil.rmtree recurses: some tests nest folders 1,500 deep


@pytest.fixture
def daemons():
    """Start daemons with `daemons(home, *args)`; every one still running is killed at the end."""
    from loradrop.testing import Daemon

    started = []

    def start(home: Path, *args: str, wait: bool = True, **kwargs):
        d = Daemon(home, *args, **kwargs)
        started.append(d)
        return d.start(wait)

    yield start
    for d in started:
        if d.process and d.process.poll() is None:
            d.kill()


@pytest.fixture
def tls_daemon(home, daemons, tls):
    """`tls_daemon()` starts a daemon with no workers on a free TCP port, with TLS and a token
    (the `tls` files), and a client set to reach it (`d.connect`, the certificate and the token)."""
    from loradrop.testing import free_port

    cert, key, token = tls

    def start():
        port = free_port()
        listen = [
            "--listen",
            f"localhost:{port}",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--token-file",
            str(token),
        ]
        return daemons(
            home,
            "--workers",
            "0",
            *listen,
            connect=f"localhost:{port}",
            client_args={"tls_ca": cert, "token_file": token},
        )

    return start


@pytest.fixture
def tls(tmp_path):
    """A self-signed certificate for localhost, its key, and a token file, for TCP daemons."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key, token = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "token"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    token.write_text(os.urandom(24).hex() + "\n")
    return cert, key, token
