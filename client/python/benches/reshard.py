"""What moving a job from 2 to 3 shards costs, for a model of about 100M
parameters under AdamW (weights and two moments: 1.2 GB of state):

1. 2 release shards with checkpoint directories; one Python worker trains a
   few sync steps (pull + push of random gradients); the median step time;
2. the shards stopped with SIGTERM (each writes a last checkpoint);
3. baseline in the same run: `cp -r` of the old checkpoint directories (the
   same bytes read and written once);
4. `ctl reshard` 2 -> 3 in place;
5. 3 shards started on the rewritten directories, until every shard reports
   the model restored and agreed;
6. the worker trains on 3 shards; the median step time; the weights it pulls
   are checked against the ones it pulled before the move.

Prints a table (seconds, GB/s, the ratio to the copy) and the downtime: stop
+ reshard + restore.

With --online, the move is made while the worker trains (`ctl resize`): 2
shards and a third started with the three-shard list; the worker trains sync
steps and follows the new list when a request is refused with
layout-changed; `ctl resize` 2 -> 3 runs after a few steps. Prints the
resize's own report (how long training was held at the step boundary, blocks
and bytes moved), the worker's step times before, across and after the move
(the baseline: its median step on 2 shards in the same run), and checks that
the weights it pulls right after the move equal those it would have pulled
without it (the same run on 2 shards, replayed with the same gradients).

Run from the repository root after `cargo build --release --bin server --bin ctl`:

    target/python-venv/bin/python client/python/benches/reshard.py [--params 100000000] [--online]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List

import numpy as np

import paramserver as ps

ROOT = Path(__file__).resolve().parents[3]
RELEASE = ROOT / "target" / "release"
MODEL = "reshard-bench"
COLUMNS = 2048


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_shard(index: int, addrs: List[str], root: Path) -> subprocess.Popen:
    log = open(root / f"shard-{index}-of-{len(addrs)}.log", "w")
    return subprocess.Popen(
        [str(RELEASE / "server"), "--shard-index", str(index), "--shards", ",".join(addrs)]
        + ["--metrics-addr", "off", "--lease", "600s", "--checkpoint-dir", str(root / f"checkpoints-{index}")]
        + ["--checkpoint-every", "0", "--shutdown-grace", "600s"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def start_shards(count: int, root: Path) -> tuple[List[str], List[subprocess.Popen]]:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    return addrs, [start_shard(i, addrs, root) for i in range(count)]


def restored(addrs: List[str]) -> bool:
    try:
        status = ps.Client(addrs).status(MODEL)
    except Exception:  # noqa: BLE001 - a shard still starting
        return False
    models = [m for s in status for m in s.models]
    return len(models) == len(addrs) and not any(m.recovering for m in models)


def model_at(addrs: List[str], version: int):
    """The model once its shards agree on an epoch: restored shards each roll
    the cluster back to the common version under a new epoch, one after the
    other, so a handle taken too early meets `epoch-changed` (as a worker
    would, and takes the new epoch as it does)."""
    out = None
    for _ in range(100):
        model = ps.Client(addrs).model(MODEL)
        try:
            out = {n: np.empty(t.shape, dtype=np.float32) for n, t in model.tensors.items()}
            model.pull(version, out=out)
            return model
        except ps.RolledBack as rolled:
            if rolled.resume_version != version:
                raise SystemExit(f"rolled back to version {rolled.resume_version}, not {version}") from None
            time.sleep(0.2)
    raise SystemExit("the shards kept changing epochs")


def train(addrs: List[str], start: int, steps: int, rng) -> tuple[float, dict, dict]:
    """Median seconds per step, and the weights at the first and the last version."""
    model = model_at(addrs, start)
    model.join("bench-0", 0)
    grads = {n: (rng.random(t.shape, dtype=np.float32) - 0.5) * 1e-2 for n, t in model.tensors.items()}
    out = {n: np.empty(t.shape, dtype=np.float32) for n, t in model.tensors.items()}
    times, first, step = [], None, start
    while step < start + steps:
        began = time.perf_counter()
        try:
            model.pull(step, out=out)
            if first is None:
                first = {n: v.copy() for n, v in out.items()}
            model.push("bench-0", step, grads)
        except ps.RolledBack as rolled:
            # Another restored shard's recovery moved the epoch on: take it, as a worker does.
            model = model_at(addrs, rolled.resume_version)
            model.join("bench-0", 0)
            step = rolled.resume_version
            continue
        times.append(time.perf_counter() - began)
        step += 1
    model.pull(start + steps, out=out)
    # A worker that leaves lets a stopping shard checkpoint the current version
    # at once; one that is still live makes it wait for a step that never comes.
    model.leave("bench-0")
    return statistics.median(times[1:] if len(times) > 1 else times), first, out


def online(shapes: dict, params: int, steps: int, root: Path) -> None:
    """The move made while one worker trains: see the module docs."""
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    procs = [start_shard(i, addrs[:2], root) for i in range(2)] + [start_shard(2, addrs, root)]
    try:
        ps.Client(addrs[:2]).wait_ready(60)
        spec = ps.model_spec(MODEL, shapes, [ps.group("all", ["*"], ps.adamw(1e-4))], min_workers=1)
        model = ps.Client(addrs[:2]).register(spec)
        model.join("bench-0", 0)
        rng = np.random.default_rng(0)
        grads = [{n: (rng.random(t.shape, dtype=np.float32) - 0.5) * 1e-2 for n, t in model.tensors.items()} for _ in range(2)]
        out = {n: np.empty(t.shape, dtype=np.float32) for n, t in model.tensors.items()}
        said: List[str] = []

        def resize() -> None:
            done = subprocess.run(
                [str(RELEASE / "ctl"), "--shards", ",".join(addrs[:2]), "resize", "--to", ",".join(addrs), "--hold-timeout", "600s"],
                capture_output=True, text=True,
            )
            said.append(f"exit {done.returncode}: {done.stdout}{done.stderr}")

        mover = threading.Thread(target=resize)
        times, followed, step, at_move, began = [], 0, 0, steps, None
        while step < 2 * steps:
            if step == at_move and not mover.is_alive() and not said:
                mover.start()
            # A step redone on the new list counts from its first try.
            began = began or time.perf_counter()
            try:
                model.pull(step, out=out)
                model.push("bench-0", step, grads[step % 2])
            except ps.LayoutChanged as moved:
                model = model.follow_new_layout(moved)
                followed += 1
                continue  # the same step on the new list, its time counted from the first try
            times.append((step, time.perf_counter() - began, model.client.num_shards))
            step, began = step + 1, None
        mover.join()
        model.pull(2 * steps, out=out)
        after = {n: v.copy() for n, v in out.items()}
        model.leave("bench-0")
        if not said or not said[0].startswith("exit 0"):
            raise SystemExit(f"ctl resize failed: {said}")
        report = said[0].split(": ", 1)[1].splitlines()[0]
        adopted = [line.split("moves: ")[-1].strip() for log in sorted(root.glob("shard-*.log"))
                   for line in log.read_text().splitlines() if "adopted:" in line or "blocks received" in line or "blocks sent" in line]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # The same steps on 2 shards that never moved: the weights must be the same bits.
    (root / "reference").mkdir()
    addrs, procs = start_shards(2, root / "reference")
    try:
        ps.Client(addrs).wait_ready(60)
        model = ps.Client(addrs).register(spec)
        model.join("bench-0", 0)
        for step in range(2 * steps):
            model.pull(step, out=out)
            model.push("bench-0", step, grads[step % 2])
        model.pull(2 * steps, out=out)
        differing = [n for n in after if not np.array_equal(after[n].view(np.uint32), out[n].view(np.uint32))]
        if differing:
            raise SystemExit(f"{len(differing)} tensors differ from the run that never moved")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    before = statistics.median(t for s, t, n in times if n == 2 and s < at_move)
    held_step, across = max(((s, t) for s, t, n in times if at_move <= s <= at_move + 3), key=lambda st: st[1])
    settled = statistics.median(t for s, t, n in times if n == 3 and s > held_step)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print()
    print(f"{params / 1e6:.1f}M parameters, AdamW; commit {commit}; {platform.node()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}; command: target/python-venv/bin/python client/python/benches/reshard.py "
          f"--params {params} --online")
    print(f"ctl resize: {report}")
    print(f"the worker followed the new list {followed} time(s); its weights after the move equal the unmoved run's, bit for bit")
    for line in adopted:
        print(f"  shard log: {line}")
    print("step seconds (shards): " + ", ".join(f"{t:.2f} ({n})" for _, t, n in times))
    print()
    print("| sync step of the worker (pull + push) | seconds | × the median step on 2 shards |")
    print("|---|---:|---:|")
    print(f"| median on 2 shards, before the move (baseline) | {before:.2f} | 1.00 |")
    print(f"| the step held at the boundary (step {held_step}) | {across:.2f} | {across / before:.2f} |")
    print(f"| median on 3 shards, after it | {settled:.2f} | {settled / before:.2f} |")


def stop(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        if p.wait(timeout=900) != 0:
            raise SystemExit(f"a shard exited with {p.returncode}")


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=100_000_000, help="parameters (rounded to whole 2048-wide rows)")
    parser.add_argument("--steps", type=int, default=4, help="sync steps on each side of the move")
    parser.add_argument("--online", action="store_true", help="move while the worker trains (`ctl resize`)")
    args = parser.parse_args()
    for binary in ("server", "ctl"):
        if not (RELEASE / binary).exists():
            raise SystemExit(f"no {RELEASE / binary}: cargo build --release --bin server --bin ctl")
    rows_per_tensor = 2048
    tensors = max(1, round(args.params / (rows_per_tensor * COLUMNS)))
    shapes = {f"layers.{i}.weight": (rows_per_tensor, COLUMNS) for i in range(tensors)}
    params = tensors * rows_per_tensor * COLUMNS
    root = Path(tempfile.mkdtemp(prefix="ps-reshard-bench-"))
    if args.online:
        try:
            print(f"[reshard-bench] {params / 1e6:.1f}M parameters in {tensors} tensors, AdamW, moved online", flush=True)
            return online(shapes, params, max(args.steps, 8), root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    rows = []
    try:
        print(f"[reshard-bench] {params / 1e6:.1f}M parameters in {tensors} tensors, AdamW, state in {root}", flush=True)
        addrs, procs = start_shards(2, root)
        ps.Client(addrs).wait_ready(60)
        spec = ps.model_spec(MODEL, shapes, [ps.group("all", ["*"], ps.adamw(1e-4))], min_workers=1)
        ps.Client(addrs).register(spec)
        step_2, _, before = train(addrs, 0, args.steps, rng)
        print(f"[reshard-bench] 2 shards: {args.steps} steps, median {step_2:.2f} s", flush=True)

        began = time.perf_counter()
        stop(procs)
        stop_s = time.perf_counter() - began
        old = [root / f"checkpoints-{i}" for i in range(2)]
        # The version every shard holds, newest: the one `ctl reshard` reads.
        held = [{p.name for p in (d / MODEL).iterdir() if p.name.startswith("v")} for d in old]
        newest = max(set.intersection(*held))
        state_bytes = sum(tree_bytes(d / MODEL / newest) for d in old)
        print(f"[reshard-bench] stopped with a last checkpoint in {stop_s:.1f} s ({newest}: {state_bytes / 1e9:.2f} GB)", flush=True)

        copies = root / "copy"
        began = time.perf_counter()
        for i, d in enumerate(old):
            shutil.copytree(d / MODEL / newest, copies / str(i))
        os.sync()
        copy_s = time.perf_counter() - began
        shutil.rmtree(copies)
        print(f"[reshard-bench] baseline cp -r + sync: {copy_s:.1f} s", flush=True)

        new = old + [root / "checkpoints-2"]
        began = time.perf_counter()
        done = subprocess.run(
            [str(RELEASE / "ctl"), "reshard", "--model", MODEL, "--from", ",".join(map(str, old)), "--to", ",".join(map(str, new))],
            capture_output=True,
            text=True,
        )
        reshard_s = time.perf_counter() - began
        if done.returncode != 0:
            raise SystemExit(f"ctl reshard failed: {done.stderr}")
        print(f"[reshard-bench] {done.stdout.splitlines()[0]} in {reshard_s:.1f} s", flush=True)
        for d in old:
            shutil.rmtree(d / ".before-reshard")

        began = time.perf_counter()
        addrs, procs = start_shards(3, root)
        while not restored(addrs):
            if time.perf_counter() - began > 900:
                raise SystemExit("the 3 shards did not restore within 15 minutes")
            time.sleep(0.2)
        restore_s = time.perf_counter() - began
        print(f"[reshard-bench] 3 shards restored and agreed in {restore_s:.1f} s", flush=True)
        version = min(m.min_version for s in ps.Client(addrs).status(MODEL) for m in s.models)
        if version != args.steps:
            raise SystemExit(f"the 3 shards continue from version {version}, not {args.steps}")
        step_3, moved, _ = train(addrs, version, args.steps, rng)
        print(f"[reshard-bench] 3 shards: {args.steps} steps, median {step_3:.2f} s", flush=True)
        differing = [n for n in before if not np.array_equal(moved[n].view(np.uint32), before[n].view(np.uint32))]
        if differing:
            raise SystemExit(f"after the move, {len(differing)} tensors differ from the 2 shards' last weights")
        stop(procs)

        gbps = lambda s: state_bytes / s / 1e9  # noqa: E731
        rows = [
            ("stop (SIGTERM, last checkpoint written)", stop_s, gbps(stop_s)),
            ("`cp -r` of the checkpoints + sync (baseline)", copy_s, gbps(copy_s)),
            ("`ctl reshard` 2 -> 3, in place", reshard_s, gbps(reshard_s)),
            ("3 shards start, restore and agree", restore_s, gbps(restore_s)),
        ]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        print()
        print(f"{params / 1e6:.1f}M parameters, AdamW, {state_bytes / 1e9:.2f} GB of checkpoint; commit {commit}; "
              f"{platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; "
              f"command: target/python-venv/bin/python client/python/benches/reshard.py --params {args.params}")
        print()
        print("| phase | seconds | GB/s of checkpoint | × the copy |")
        print("|---|---:|---:|---:|")
        for name, seconds, rate in rows:
            print(f"| {name} | {seconds:.1f} | {rate:.2f} | {seconds / copy_s:.2f} |")
        downtime = stop_s + reshard_s + restore_s
        print(f"| **downtime: stop + reshard + restore** | **{downtime:.1f}** | | {downtime / copy_s:.2f} |")
        print()
        print(f"median sync step (1 worker, pull + push of {params * 4 / 1e9:.2f} GB): {step_2:.2f} s on 2 shards, "
              f"{step_3:.2f} s on 3 shards")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
