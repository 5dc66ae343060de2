"""Start the real server as a subprocess on 127.0.0.1 with a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


@dataclass
class ServerHandle:
    """A running ``kvforge serve`` process."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: str

    def log(self) -> str:
        return Path(self.log_path).read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(tmp_path, *flags: str, timeout: float = 180.0) -> ServerHandle:
    port = free_port()
    log_path = str(tmp_path / f"server-{port}.log")
    command = [
        sys.executable,
        "-m",
        "kvforge.entrypoints.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-cache-memory",
        "192MiB",
        *flags,
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KVFORGE_LOG_LEVEL": "INFO"},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{Path(log_path).read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return ServerHandle(process, url, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not become healthy:\n{Path(log_path).read_text()}")


def stop_server(handle: ServerHandle) -> None:
    if handle.process.poll() is None:
        handle.process.send_signal(signal.SIGINT)
        try:
            handle.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            handle.process.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[ServerHandle]:
    """The default server: embedded model, aliases, small request-size limit for the 413 test."""
    handle = start_server(
        tmp_path_factory.mktemp("server"),
        "--served-model-name",
        "smollm",
        "smol-alias",
        "--max-model-len",
        "1024",
        "--max-request-bytes",
        "200KiB",
    )
    yield handle
    stop_server(handle)


@pytest.fixture(scope="session")
def guarded(tmp_path_factory) -> Iterator[ServerHandle]:
    """A server with an API key, CORS origins, a one-request queue and short read timeouts."""
    handle = start_server(
        tmp_path_factory.mktemp("guarded"),
        "--api-key",
        "s3cret",
        "--max-queued-requests",
        "1",
        "--max-num-seqs",
        "1",
        "--allowed-origins",
        "http://ok.example",
        "--timeout-header-read",
        "2",
    )
    yield handle
    stop_server(handle)
