"""The committed gRPC stubs are exactly what grpcio-tools makes from the repository's .proto."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
PROTO_ROOT = PACKAGE.parents[1] / "proto" / "proto"


def test_committed_stubs_match_the_proto():
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}", "paramserver/v1/paramserver.proto"],
            check=True,
            cwd=PROTO_ROOT,
        )
        for name in ("paramserver_pb2.py", "paramserver_pb2_grpc.py", "paramserver_pb2.pyi"):
            fresh = Path(out) / "paramserver" / "v1" / name
            committed = PACKAGE / "paramserver" / "v1" / name
            assert filecmp.cmp(fresh, committed, shallow=False), (
                f"{committed} is stale: regenerate with client/python/generate-stubs.sh"
            )
