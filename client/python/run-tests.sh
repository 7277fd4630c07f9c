#!/usr/bin/env bash
# The Python client's tests, run by the README's test command (and so by .ci/run):
# a virtualenv on the system interpreter (which holds Debian's python3-torch and
# numpy; pip must not replace them), the package installed from this directory
# with its test extra, and pytest against the `server` and `worker` binaries of
# `cargo build` (target/debug unless PS_SERVER_BIN / PS_WORKER_BIN say otherwise).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${PS_PYTHON_VENV:-$root/target/python-venv}"
system_python=/usr/bin/python3
[ -x "$system_python" ] || system_python="$(command -v python3)"

if ! "$system_python" -c "import torch" 2>/dev/null; then
    echo "=================================================================="
    echo "NOTE: torch is not importable by $system_python; the PyTorch tests"
    echo "will be SKIPPED (apt-get install python3-torch provides it)."
    echo "=================================================================="
fi
if [ ! -x "$venv/bin/python" ]; then
    "$system_python" -m venv --system-site-packages "$venv"
fi
# numpy comes from the system when it is there; pip keeps it (no upgrade).
"$venv/bin/pip" install -q --disable-pip-version-check "$here[test]"
(cd "$root" && cargo build -q --bins)
cd "$here"
exec "$venv/bin/python" -m pytest -q -rs "$@"
