"""Real `server` processes for the tests: the binaries `cargo build` made
(PS_SERVER_BIN / PS_WORKER_BIN override where they are)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List

import pytest

import paramserver as ps

ROOT = Path(__file__).resolve().parents[3]


def binary(name: str) -> Path:
    path = Path(os.environ.get(f"PS_{name.upper()}_BIN", ROOT / "target" / "debug" / name))
    if not path.exists():
        pytest.fail(f"{path} is not built: run `cargo build --workspace --bins` first (or set PS_{name.upper()}_BIN)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Shards:
    """`count` shard processes on loopback, stopped at the end of the test."""

    def __init__(self, count: int, extra: List[str], local: bool = False, checkpoints: bool = False):
        self.addrs = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        self.logs = tempfile.mkdtemp(prefix="ps-pytest-")
        self.local = local
        # Each shard's --checkpoint-dir, when it writes checkpoints.
        self.checkpoint_dirs = [os.path.join(self.logs, f"checkpoints-{index}") for index in range(count)] if checkpoints else []
        self.processes = []
        for index in range(count):
            log = open(os.path.join(self.logs, f"shard-{index}.log"), "w")
            args = [str(binary("server")), "--shard-index", str(index), "--shards", ",".join(self.addrs), "--metrics-addr", "off", *extra]
            if local:
                args += ["--local-dir", os.path.join(self.logs, f"shard-{index}")]
            if checkpoints:
                args += ["--checkpoint-dir", self.checkpoint_dirs[index]]
            self.processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        self.client().wait_ready(30)

    def client(self, **kwargs) -> ps.Client:
        return ps.Client(self.addrs, **kwargs)

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


@pytest.fixture
def shards() -> Iterator[Shards]:
    cluster = Shards(2, ["--lease", "5s"])
    yield cluster
    cluster.stop()


@pytest.fixture
def checkpointed_shards() -> Iterator[Shards]:
    """Two shards, each writing checkpoints to a directory of its own (`checkpoint_dirs`)."""
    cluster = Shards(2, ["--lease", "5s"], checkpoints=True)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["tcp", "local"])
def any_shards(request) -> Iterator[Shards]:
    """Two shards reached over TCP, then the same two serving a local channel
    (the client uses its memory segments and Unix socket)."""
    cluster = Shards(2, ["--lease", "5s"], local=request.param == "local")
    yield cluster
    cluster.stop()
