"""Seconds per sync step of 4 worker processes on 2 shards (AdamW on the servers,
f32 pull + push of random gradients), for models of 1M, 10M and 25M parameters:

- Python workers (this package),
- Rust workers (`client/examples/sync_steps.rs`),
- a Ray actor parameter server written the way Ray's documentation shows it
  (one actor holding numpy weights with Adam in numpy, 4 worker actors),

all in the same run, then the PyTorch overlap: one PyTorch worker whose backward
hooks stream the gradients, against the same worker pushing after backward.

Run with `client/python/benches/run.sh` (it builds the release binaries, makes a
virtualenv with ray, and calls this script).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

import paramserver as ps

ROOT = Path(__file__).resolve().parents[3]
RELEASE = ROOT / "target" / "release"
COLUMNS = 1024


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_shards(count: int = 2, local: bool = False):
    """Shard processes; with `local`, each also serves a local channel, which workers on this host use."""
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    logs = tempfile.mkdtemp(prefix="ps-bench-")
    processes = [
        subprocess.Popen(
            [str(RELEASE / "server"), "--shard-index", str(i), "--shards", ",".join(addrs), "--metrics-addr", "off", "--lease", "30s"]
            + (["--local-dir", os.path.join(logs, f"shard-{i}")] if local else []),
            stdout=open(os.path.join(logs, f"shard-{i}.log"), "w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(count)
    ]
    ps.Client(addrs).wait_ready(30)
    return addrs, processes


def register(addrs: List[str], name: str, params: int, workers: int) -> None:
    spec = ps.model_spec(
        name,
        {"w": (params // COLUMNS, COLUMNS)},
        [ps.group("all", ["*"], ps.adamw(1e-4))],
        min_workers=workers,
    )
    ps.Client(addrs).register(spec)


def python_worker(addrs: List[str], name: str, rank: int, steps: int, warmup: int, queue) -> None:
    client = ps.Client(addrs)
    model = client.model(name)
    joined = model.join(f"py-{rank}", rank)
    model.start_heartbeat(f"py-{rank}", joined.lease_s)
    rng = np.random.default_rng(rank)
    grads = {n: rng.random(t.shape, dtype=np.float32) - 0.5 for n, t in model.tensors.items()}
    out = {n: np.empty(t.shape, dtype=np.float32) for n, t in model.tensors.items()}
    started = None
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        model.pull(step, out=out)
        model.push(f"py-{rank}", step, grads)
    model.pull(steps, out=out)
    queue.put((time.perf_counter() - started) / (steps - warmup))
    model.leave(f"py-{rank}")


def python_run(addrs, params, workers, steps, warmup) -> float:
    name = f"py-{params}"
    register(addrs, name, params, workers)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=python_worker, args=(addrs, name, r, steps, warmup, queue)) for r in range(workers)]
    for p in procs:
        p.start()
    times = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return statistics.median(times)


def rust_run(addrs, params, workers, steps, warmup) -> float:
    name = f"rs-{params}"
    register(addrs, name, params, workers)
    return sync_steps(addrs, name, workers, steps, warmup)


def sync_steps(addrs, name: str, workers: int, steps: int, warmup: int, env=None) -> float:
    """Median seconds per step of `workers` Rust `sync_steps` processes on a registered model."""
    example = RELEASE / "examples" / "sync_steps"
    procs = [
        subprocess.Popen([str(example), ",".join(addrs), name, f"rs-{r}", str(r), str(steps), str(warmup)], stdout=subprocess.PIPE, text=True, env=env)
        for r in range(workers)
    ]
    times = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"sync_steps failed: {out}")
        times.append(json.loads(out.strip().splitlines()[-1])["seconds_per_step"])
    return statistics.median(times)


RAY_SCRIPT = r'''
import json, sys, time
import numpy as np
import ray

params, workers, steps, warmup = (int(a) for a in sys.argv[1:5])
optimizer = sys.argv[5] if len(sys.argv) > 5 else "adam"
ray.init(num_cpus=workers + 1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)


@ray.remote
class ParameterServer:
    """Ray's documented parameter server: numpy weights in one actor, here with Adam."""

    def __init__(self, size):
        self.w = np.zeros(size, dtype=np.float32)
        self.m = np.zeros(size, dtype=np.float32)
        self.v = np.zeros(size, dtype=np.float32)
        self.t = 0

    def apply_gradients(self, *gradients):
        g = np.stack(gradients).sum(axis=0) / len(gradients)
        if optimizer == "sgd":
            self.w -= 1e-4 * g
            return self.w
        self.t += 1
        lr, b1, b2, eps = 1e-4, 0.9, 0.999, 1e-8
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        self.w -= lr * m_hat / (np.sqrt(v_hat) + eps)
        return self.w

    def get_weights(self):
        return self.w


@ray.remote
class DataWorker:
    def __init__(self, size, seed):
        self.g = np.random.default_rng(seed).random(size, dtype=np.float32) - 0.5

    def compute_gradients(self, weights):
        return self.g


server = ParameterServer.remote(params)
data_workers = [DataWorker.remote(params, i) for i in range(workers)]
current = server.get_weights.remote()
ray.get(current)
for step in range(steps):
    if step == warmup:
        started = time.perf_counter()
    gradients = [w.compute_gradients.remote(current) for w in data_workers]
    current = server.apply_gradients.remote(*gradients)
    ray.get(current)
print(json.dumps({"seconds_per_step": (time.perf_counter() - started) / (steps - warmup)}))
ray.shutdown()
'''


def ray_run(params, workers, steps, warmup, optimizer: str = "adam") -> Optional[float]:
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    out = subprocess.run([sys.executable, "-c", RAY_SCRIPT, str(params), str(workers), str(steps), str(warmup), optimizer], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]


def overlap_run(addrs, steps, warmup, overlap: bool) -> float:
    """One PyTorch worker, an MLP of about 10M parameters, CPU; seconds per step."""
    import torch

    import paramserver.torch as pst

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = torch.nn.Sequential(*[layer for _ in range(9) for layer in (torch.nn.Linear(1024, 1024), torch.nn.ReLU())], torch.nn.Linear(1024, 10))
    values = ps.arrays_of(net)
    client = ps.Client(addrs)
    name = f"torch-overlap-{overlap}"
    model = client.register(ps.model_spec(name, values, [ps.group("all", ["*"], ps.adamw(1e-4))]), values)
    worker = pst.attach(net, model, "torch-0", overlap=overlap)
    x, y = torch.randn(64, 1024), torch.randint(10, (64,))
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        worker.step()
    elapsed = (time.perf_counter() - started) / (steps - warmup)
    worker.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000,25000000")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--transport", choices=["local", "tcp"], default="local", help="local: the shards serve a local channel (shared memory), which the workers use; tcp: loopback gRPC")
    args = parser.parse_args()
    sizes = [int(s) // COLUMNS * COLUMNS for s in args.sizes.split(",")]
    addrs, shards = start_shards(local=args.transport == "local")
    try:
        transport = "the shards' local channel (shared memory)" if args.transport == "local" else "loopback TCP gRPC"
        print(f"{args.workers} worker processes, 2 shards, sync, AdamW, f32 pull + push over {transport}; seconds per step (median of workers, {args.steps - args.warmup} steps after {args.warmup} warm-up)")
        print(f"{'parameters':>12} {'python':>9} {'rust':>9} {'ray':>9} {'python/rust':>12} {'ray/python':>11}")
        for params in sizes:
            rust = rust_run(addrs, params, args.workers, args.steps, args.warmup)
            python = python_run(addrs, params, args.workers, args.steps, args.warmup)
            ray = ray_run(params, args.workers, args.steps, args.warmup)
            ray_text = f"{ray:9.3f}" if ray is not None else f"{'n/a':>9}"
            ratio = f"{ray / python:11.2f}" if ray is not None else f"{'n/a':>11}"
            print(f"{params:>12,} {python:9.3f} {rust:9.3f} {ray_text} {python / rust:12.2f} {ratio}", flush=True)
        try:
            hooks = overlap_run(addrs, args.steps, args.warmup, overlap=True)
            after = overlap_run(addrs, args.steps, args.warmup, overlap=False)
            print(f"PyTorch MLP of 9.4M parameters, 1 worker: {hooks:.3f} s/step with hooks streaming during backward, {after:.3f} s/step pushing after backward ({after / hooks:.2f}x)")
        except ImportError:
            print("PyTorch overlap: skipped, torch is not installed")
    finally:
        for shard in shards:
            shard.kill()


if __name__ == "__main__":
    main()
