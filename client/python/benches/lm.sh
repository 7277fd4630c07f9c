#!/usr/bin/env bash
# The language-model comparison in one command: release binaries, a virtualenv on
# the system interpreter (Debian's python3-torch, with OpenBLAS) with this package,
# then benches/lm.py (see its docstring). Extra arguments go to lm.py, e.g.
# --size tiny --steps 40, or --systems ps --modes adamw,frugal.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="$root/target/bench-venv"
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
    echo "torch is not importable by /usr/bin/python3: apt-get install python3-torch libopenblas0-pthread" >&2
    exit 1
fi
if ! ldconfig -p | grep -q libopenblas; then
    echo "NOTE: OpenBLAS is not installed; torch runs on the reference BLAS, about 27x slower (apt-get install libopenblas0-pthread)" >&2
fi
(cd "$root" && cargo build -q --release -p ps-server --bin server)
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$here/.."
exec "$venv/bin/python" "$here/lm.py" "$@"
