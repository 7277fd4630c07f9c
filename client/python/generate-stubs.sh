#!/usr/bin/env bash
# Regenerates the committed gRPC stubs from the repository's .proto with the
# grpcio-tools version the tests pin (client/python/pyproject.toml, extra "test").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
"$python" -c "import grpc_tools" 2>/dev/null || { echo "needs grpcio-tools==1.85.1 (pip install 'grpcio-tools==1.85.1')" >&2; exit 1; }
cd "$here/../../proto/proto"
"$python" -m grpc_tools.protoc -I. --python_out="$here" --grpc_python_out="$here" --pyi_out="$here" paramserver/v1/paramserver.proto
echo "regenerated $here/paramserver/v1/"
