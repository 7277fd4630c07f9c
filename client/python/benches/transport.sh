#!/usr/bin/env bash
# The local-channel benchmark in one command: release binaries, a virtualenv
# with this package and ray (pip), then benches/transport.py (see its docstring).
# Extra arguments go to transport.py (e.g. --sizes 1000000 --no-ray).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="$root/target/bench-venv"
(cd "$root" && cargo build -q --release -p ps-server --bin server \
    && cargo build -q --release -p ps-client --example sync_steps \
    && cargo build -q --release -p ps-testkit --example raw_tcp_steps)
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$here/.."
"$venv/bin/pip" install -q --disable-pip-version-check ray \
    || echo "NOTE: pip could not install ray; the Ray column will read n/a"
exec "$venv/bin/python" "$here/transport.py" "$@"
