#!/usr/bin/env bash
# The test command's run of the network test bed's fault tests
# (deploy/netbed/netbed.py faults): 2 shards and 4 workers in their own
# network namespaces over shaped links; a shard's link is cut for less than
# the lease and restored, then a worker's link is cut for good.
# It runs the debug build (`cargo test --workspace` has built all but ctl;
# PS_BIN_DIR=target/release takes that build instead and builds nothing).
# Namespaces need root: without it the test prints SKIPPED and exits 0.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin_dir=${PS_BIN_DIR:-}
if [ -z "$bin_dir" ]; then
  # After `cargo test --workspace` only ctl is left to link.
  cargo build --quiet --workspace --bin server --bin ctl --example sync_steps
  bin_dir=target/debug
fi
for bin in server ctl examples/sync_steps; do
  [ -x "$bin_dir/$bin" ] || { echo "netbed: $bin_dir/$bin is missing" >&2; exit 1; }
done
if [ "$(id -u)" != 0 ]; then
  echo "=== SKIPPED: the network test bed needs root (network namespaces, veth, tc) ==="
  exit 0
fi
for tool in ip tc; do
  command -v "$tool" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; }
done
echo "netbed: fault tests with the binaries in $bin_dir"
# A smaller run than the default: the debug build's loops are unoptimized.
[ "$bin_dir" = target/debug ] && [ $# = 0 ] && set -- --params 2M --steps 30
exec python3 deploy/netbed/netbed.py --bin-dir "$bin_dir" faults "$@"
