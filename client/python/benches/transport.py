"""Seconds per sync step of 4 Rust worker processes on the shards' host, for
models of 1M, 10M and 25M f32 parameters, SGD and AdamW on the servers, f32
pull + push of random gradients, through each way to reach the shards:

- gRPC over loopback TCP (`PS_LOCAL=off`),
- gRPC over the shards' Unix sockets (`PS_LOCAL=socket`),
- the shared-memory path (`PS_LOCAL=segments`: gradients and weights through memfd segments),
- raw loopback TCP moving the same bytes (no framing, no math: a floor for the network path),
- a Ray actor parameter server written the way Ray's documentation shows it
  (numpy weights in one actor, 4 worker actors; `pip install ray`),

all in the same run. Run with `client/python/benches/transport.sh`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import paramserver as ps
from workers import COLUMNS, RELEASE, free_port, ray_run, sync_steps


def start_shards(count: int, local_root: str):
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    processes = [
        subprocess.Popen(
            [
                str(RELEASE / "server"),
                "--shard-index", str(i),
                "--shards", ",".join(addrs),
                "--metrics-addr", "off",
                "--lease", "30s",
                "--local-dir", os.path.join(local_root, f"shard-{i}"),
            ],
            stdout=open(os.path.join(local_root, f"shard-{i}.log"), "w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(count)
    ]
    ps.Client(addrs).wait_ready(30)
    return addrs, processes


def register(addrs, name: str, params: int, workers: int, optimizer: str) -> None:
    config = ps.sgd(1e-4) if optimizer == "sgd" else ps.adamw(1e-4)
    spec = ps.model_spec(name, {"w": (params // COLUMNS, COLUMNS)}, [ps.group("all", ["*"], config)], min_workers=workers)
    ps.Client(addrs).register(spec)


def rust_run(addrs, params: int, workers: int, steps: int, warmup: int, optimizer: str, mode: str) -> float:
    name = f"{mode}-{optimizer}-{params}"
    register(addrs, name, params, workers, optimizer)
    return sync_steps(addrs, name, workers, steps, warmup, env=dict(os.environ, PS_LOCAL=mode))


def raw_tcp_run(params: int, workers: int, steps: int, warmup: int) -> float:
    example = RELEASE / "examples" / "raw_tcp_steps"
    out = subprocess.run([str(example), str(params), str(workers), str(steps), str(warmup)], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000,25000000")
    parser.add_argument("--optimizers", default="sgd,adamw")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray column")
    args = parser.parse_args()
    sizes = [int(s) // COLUMNS * COLUMNS for s in args.sizes.split(",")]
    local_root = tempfile.mkdtemp(prefix="ps-transport-")
    addrs, shards = start_shards(args.shards, local_root)
    try:
        print(
            f"{args.workers} worker processes, {args.shards} shards on this host, sync, f32 pull + push; seconds per step "
            f"(median of workers, {args.steps - args.warmup} steps after {args.warmup} warm-up)"
        )
        header = f"{'parameters':>12} {'opt':>5} {'tcp gRPC':>9} {'unix gRPC':>9} {'segments':>9} {'raw TCP':>9} {'ray':>9} {'tcp/seg':>8} {'ray/seg':>8}"
        print(header)
        for optimizer in args.optimizers.split(","):
            for params in sizes:
                tcp = rust_run(addrs, params, args.workers, args.steps, args.warmup, optimizer, "off")
                socket = rust_run(addrs, params, args.workers, args.steps, args.warmup, optimizer, "socket")
                segments = rust_run(addrs, params, args.workers, args.steps, args.warmup, optimizer, "segments")
                raw = raw_tcp_run(params, args.workers, args.steps, args.warmup)
                ray = None if args.no_ray else ray_run(params, args.workers, args.steps, args.warmup, "sgd" if optimizer == "sgd" else "adam")
                ray_text = f"{ray:9.3f}" if ray is not None else f"{'n/a':>9}"
                ratio = f"{ray / segments:8.2f}" if ray is not None else f"{'n/a':>8}"
                print(f"{params:>12,} {optimizer:>5} {tcp:9.3f} {socket:9.3f} {segments:9.3f} {raw:9.3f} {ray_text} {tcp / segments:8.2f} {ratio}", flush=True)
    finally:
        for shard in shards:
            shard.kill()


if __name__ == "__main__":
    main()
