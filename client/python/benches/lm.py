"""A LLaMA-style language model (`paramserver.models.llama`) trained on real text
(`paramserver.data`: the Python source of the standard library and of torch, 26 MB) by the same job on
one host, in one run, three ways:

1. the parameter server: 2 shards serving the local channel and N PyTorch
   workers (`paramserver.torch.attach`), once per optimizer mode on the shards
   (AdamW; FRUGAL rho = 0.25 with its sign step at lr and at 0.1 lr; AdamSNSM;
   AdamSN; AdamW fed 1-bit error-feedback pushes after a full-precision fifth of
   the run, its v frozen there: 1-bit Adam);
2. DDP over gloo with `torch.optim.AdamW` (25 MB buckets);
3. DDP with `ZeroRedundancyOptimizer` around AdamW (ZeRO-1).

Every run sees the same model, seed, data order (`data.rank_batch`), global
batch, warm-up + cosine schedule (a LambdaLR function; on the shards it travels
as each push's lr_scale) and clipping at 1.0 (of the mean gradient: on the
shards, GRAD_CLIP_MEAN; under DDP, `clip_grad_norm_` after the all-reduce).
Rank 0 measures the validation loss every `--eval-every` steps on fixed
validation windows (its evaluation time is left out of the timings). Written
to `results/lm.md` (tables, machine, commit, command) and `results/lm-loss.svg`.

    client/python/benches/lm.sh --size small            # the default comparison
    client/python/benches/lm.sh --size tiny --steps 40  # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

import paramserver as ps
import paramserver.torch as pst
from paramserver import data
from paramserver.models import llama

ROOT = Path(__file__).resolve().parents[3]
RELEASE = ROOT / "target" / "release"
EVAL_SEQUENCES = 16

# The learning rate of each mode, as the papers and docs/optimizers.md choose them
# (SN and SM take about 10x Adam's, since their denominators sum over a row).
MODES = {
    "adamw": 3e-3,
    # FRUGAL as the papers' C4 scripts set it (block mode, rho 0.25, T 200, both parts
    # at lr), and with the state-free sign step at 0.1 lr (inactive_lr_scale, as their
    # GLUE scripts set it): the best of the sweep in docs/notes/lm.md.
    "frugal": 3e-3,
    "frugal-i0.1": 3e-3,
    "adam-sn-sm": 3e-2,
    "adam-sn": 3e-2,
    # AdamW on the shards, the workers pushing 1-bit scaled signs with error feedback
    # after a full-precision fifth of the run, where the shards freeze v (1-bit Adam).
    "adamw-1bit": 3e-3,
}
# Modes outside the default comparison, named with --modes: the svd projections,
# with the exact SVD and with the randomized range finder (docs/optimizers.md).
MORE_MODES = {
    "adam-sn-sm-randomized": 3e-2,
    "frugal-svd": 3e-3,
    "frugal-svd-randomized": 3e-3,
    # The rest of that sweep: the sign step at 0.3 and 0.03 lr, and the active window
    # moved (and Adam's state reset) every 50 steps instead of 200.
    "frugal-i0.3": 3e-3,
    "frugal-i0.03": 3e-3,
    "frugal-t50-i0.1": 3e-3,
    # 1-bit Adam warmed up on 40% of the run instead of a fifth.
    "adamw-1bit-w40": 3e-3,
}
LEARNING_RATES = {**MODES, **MORE_MODES}


def full_precision_steps(mode: str, steps: int) -> int:
    """Steps a 1-bit mode pushes in f32 before its signs: a fifth of the run (`-wNN`: NN%;
    see docs/notes/lm.md); without them AdamW's v, fed scaled signs, loses
    its per-coordinate scale and the run diverged (3.24 nats at 300 steps, against 1.83)."""
    if "-1bit" not in mode:
        return 0
    percent = int(mode.split("-w")[1]) if "-1bit-w" in mode else 20
    return steps * percent // 100


def optimizer(mode: str, lr: float, seed: int, steps: int) -> ps.pb.OptimizerConfig:
    """The shards' optimizer of a mode (weight decay 0, as the papers' LLaMA runs)."""
    pb = ps.pb
    if mode == "adamw" or mode.startswith("adamw-1bit"):
        return ps.adamw(lr, freeze_variance_after=full_precision_steps(mode, steps))
    solver = pb.SVD_SOLVER_RANDOMIZED if mode.endswith("-randomized") else pb.SVD_SOLVER_EXACT
    if mode == "frugal" or mode.startswith("frugal-t") or mode.startswith("frugal-i"):
        knobs = {part[0]: part[1:] for part in mode.split("-")[1:]}
        gap = int(knobs.get("t", 200))
        inactive = float(knobs.get("i", 1.0))
        return pb.OptimizerConfig(
            frugal=pb.FrugalConfig(lr=lr, density=0.25, update_gap=gap, inactive_lr_scale=inactive, mode=pb.FRUGAL_MODE_BLOCK, seed=seed)
        )
    if mode in ("frugal-svd", "frugal-svd-randomized"):
        return pb.OptimizerConfig(frugal=pb.FrugalConfig(lr=lr, density=0.25, update_gap=200, mode=pb.FRUGAL_MODE_SVD, seed=seed, svd_solver=solver))
    if mode in ("adam-sn-sm", "adam-sn-sm-randomized"):
        return pb.OptimizerConfig(
            subspace_momentum=pb.SubspaceMomentumConfig(
                lr=lr, rank=16, update_gap=200, projection=pb.PROJECTION_KIND_SVD, adaptive=True, correct_bias=True, seed=seed, svd_solver=solver
            )
        )
    if mode == "adam-sn":
        return pb.OptimizerConfig(subset_norm=pb.SubsetNormConfig(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, correct_bias=True, subsets=pb.SUBSET_KIND_HEURISTIC))
    raise ValueError(f"unknown mode {mode!r}; use {', '.join(LEARNING_RATES)}")


def schedule(steps: int, warmup: int, min_factor: float = 0.1):
    """LambdaLR's factor of step k: a linear warm-up to 1 over `warmup` steps (from
    1/warmup, so the first step moves), then a cosine decay to `min_factor` at `steps`."""

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        progress = min(1.0, (k - warmup) / max(1, steps - warmup))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def validation_loss(net: torch.nn.Module, corpus: data.Corpus, args) -> float:
    """Mean loss over the fixed validation windows."""
    with torch.no_grad():
        losses = [
            float(net.loss(torch.from_numpy(data.global_batch(corpus.validation, 1_000_000 + i, EVAL_SEQUENCES, args.seq_len, args.seed))))
            for i in range(args.eval_batches)
        ]
    return statistics.fmean(losses)


class Recorder:
    """A rank's step times, losses and (rank 0) validation curve."""

    def __init__(self, rank: int, args, label: str):
        self.rank, self.args, self.label = rank, args, label
        self.step_seconds: List[float] = []
        self.curve: List[Dict[str, float]] = []
        self.started = time.perf_counter()
        self.eval_seconds = 0.0

    def evaluate(self, step: int, net, corpus) -> None:
        if self.rank != 0 or (step % self.args.eval_every and step != self.args.steps):
            return
        began = time.perf_counter()
        loss = validation_loss(net, corpus, self.args)
        self.eval_seconds += time.perf_counter() - began
        wall = time.perf_counter() - self.started - self.eval_seconds
        self.curve.append({"step": step, "wall_s": wall, "val_loss": loss})
        tokens = step * self.args.sequences * self.args.seq_len
        rate = tokens / sum(self.step_seconds) if self.step_seconds else 0.0
        print(f"[{self.label}] step {step}/{self.args.steps}  val loss {loss:.4f}  {rate:,.0f} tokens/s", flush=True)

    def save(self, out: Path) -> None:
        result = {
            "rank": self.rank,
            "step_seconds": self.step_seconds,
            "curve": self.curve,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        (out / f"rank-{self.rank}.json").write_text(json.dumps(result))


def ps_worker(rank: int, addrs: List[str], name: str, args, out: str) -> None:
    torch.set_num_threads(args.threads)
    corpus = data.python_corpus()
    net = llama.build(args.size, seed=args.seed)
    model = ps.Client(addrs).model(name)
    worker = pst.attach(
        net, model, f"lm-{rank}", rank=rank, lr_lambda=schedule(args.steps, args.warmup)
    )
    recorder = Recorder(rank, args, f"ps {args.mode}")
    recorder.evaluate(0, net, corpus)
    for step in range(args.steps):
        batch = torch.from_numpy(data.rank_batch(corpus.train, step, args.sequences, args.seq_len, args.seed, rank, args.workers))
        began = time.perf_counter()
        net.loss(batch).backward()
        worker.step()
        recorder.step_seconds.append(time.perf_counter() - began)
        recorder.evaluate(step + 1, net, corpus)
    worker.close()
    recorder.save(Path(out))


def ddp_worker(rank: int, port: int, zero: bool, args, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    torch.set_num_threads(args.threads)
    corpus = data.python_corpus()
    net = llama.build(args.size, seed=args.seed)
    ddp = DistributedDataParallel(net, bucket_cap_mb=args.bucket_mb)
    lr = MODES["adamw"]
    if zero:
        optimizer_ = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.AdamW, lr=lr, weight_decay=0.0)
    else:
        optimizer_ = torch.optim.AdamW(ddp.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer_, schedule(args.steps, args.warmup))
    recorder = Recorder(rank, args, "zero-1 adamw" if zero else f"ddp adamw ({args.bucket_mb:g} MB buckets)")
    recorder.evaluate(0, net, corpus)
    for step in range(args.steps):
        batch = torch.from_numpy(data.rank_batch(corpus.train, step, args.sequences, args.seq_len, args.seed, rank, args.workers))
        began = time.perf_counter()
        optimizer_.zero_grad(set_to_none=True)
        llama.next_token_loss(ddp, batch).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        optimizer_.step()
        scheduler.step()
        recorder.step_seconds.append(time.perf_counter() - began)
        recorder.evaluate(step + 1, net, corpus)
    recorder.save(Path(out))
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss(pid: int) -> int:
    """A process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def collect(out: Path, workers: int) -> Dict:
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(workers)]
    return {"curve": ranks[0]["curve"], "step_seconds": ranks[0]["step_seconds"], "worker_peak_rss": max(r["peak_rss_bytes"] for r in ranks)}


def run_ps(mode: str, args) -> Dict:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(args.shards)]
    logs = Path(tempfile.mkdtemp(prefix="ps-lm-"))
    shards = [
        subprocess.Popen(
            [str(RELEASE / "server"), "--shard-index", str(i), "--shards", ",".join(addrs), "--metrics-addr", "off", "--lease", "60s", "--local-dir", str(logs / f"shard-{i}")],
            stdout=open(logs / f"shard-{i}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(args.shards)
    ]
    try:
        client = ps.Client(addrs)
        client.wait_ready(30)
        net = llama.build(args.size, seed=args.seed)
        values = ps.arrays_of(net)
        name = f"lm-{args.size}-{mode}"
        groups = []
        encodings = ["f32"]
        if "-1bit" in mode:
            # The token embedding in f32: the rows of bytes no warm-up batch held keep v = 0,
            # which a frozen AdamW would turn a sign's scale into lr * scale / eps for.
            groups.append(ps.group("embeddings", ["embed_tokens.weight"], ps.adamw(LEARNING_RATES[mode]), push_encodings=["f32"]))
            encodings = ["sign1", "f32"]
        groups.append(ps.group("all", ["*"], optimizer(mode, LEARNING_RATES[mode], args.seed, args.steps), push_encodings=encodings))
        spec = ps.model_spec(name, values, groups, max_grad_norm=args.clip, min_workers=args.workers)
        client.register(spec, values)
        run_args = argparse.Namespace(**{**vars(args), "mode": mode})
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=ps_worker, args=(r, addrs, name, run_args, str(logs))) for r in range(args.workers)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"a parameter-server worker failed (exit {p.exitcode}); shard logs in {logs}")
        status = client.status(name)
        state_bytes = sum(g.state_bytes for s in status for m in s.models for g in m.groups)
        result = collect(logs, args.workers)
        result.update(shard_rss=[peak_rss(s.pid) for s in shards], state_bytes=state_bytes, system="parameter server", mode=mode)
        return result
    finally:
        for s in shards:
            s.kill()
            s.wait()


def run_ddp(zero: bool, args, bucket_mb: float = 25.0) -> Dict:
    out = Path(tempfile.mkdtemp(prefix="ddp-lm-"))
    args = argparse.Namespace(**{**vars(args), "bucket_mb": bucket_mb})
    torch.multiprocessing.spawn(ddp_worker, args=(free_port(), zero, args, str(out)), nprocs=args.workers)
    result = collect(out, args.workers)
    params = llama.parameter_count(args.size)
    # AdamW's m and v in f32: on every rank under DDP, split over the ranks under ZeRO-1.
    state = 8 * params * (1 if zero else args.workers)
    system = "ZeRO-1 (DDP + ZeroRedundancyOptimizer)" if zero else "DDP (gloo)" if bucket_mb == 25 else f"DDP (gloo, {bucket_mb:g} MB buckets)"
    result.update(shard_rss=[], state_bytes=state, system=system, mode="adamw")
    return result


def wire_bytes_per_step(result: Dict, params: int, workers: int, steps: int, size: str) -> float:
    """Bytes one worker sends and receives per step, from the formats: the parameter
    server's f32 push (1-bit after a 1-bit mode's full-precision steps but for the
    token embedding: the mean over the run) and f32 pull of every parameter; DDP's ring all-reduce of f32
    gradients (2 (n-1)/n of them each way); ZeRO-1 that, plus the broadcast of each
    rank's updated partition to the others."""
    if result["system"] == "parameter server":
        warm = full_precision_steps(result["mode"], steps)
        embedding = llama.config(size).vocab * llama.config(size).dim
        one_bit = 4 * embedding + (params - embedding) / 8
        push = (warm * 4 * params + (steps - warm) * one_bit) / steps if "-1bit" in result["mode"] else 4 * params
        return push + 4 * params
    ring = 2 * 2 * (workers - 1) / workers * 4 * params
    return ring + (2 * (workers - 1) / workers * 4 * params if result["system"].startswith("ZeRO") else 0)


def summarize(result: Dict, args) -> Dict:
    seconds = result["step_seconds"]
    tokens = args.sequences * args.seq_len
    params = llama.parameter_count(args.size)
    return {
        "wire_mb": wire_bytes_per_step(result, params, args.workers, args.steps, args.size) / 2**20,
        "run": f"{result['system']}, {result['mode']}",
        "final_val_loss": result["curve"][-1]["val_loss"],
        "tokens_per_s": tokens * len(seconds) / sum(seconds),
        "median_step_s": statistics.median(seconds),
        "worker_peak_rss_mb": result["worker_peak_rss"] / 2**20,
        "shard_peak_rss_mb": sum(result["shard_rss"]) / 2**20 if result["shard_rss"] else float("nan"),
        "state_mb": result["state_bytes"] / 2**20,
    }


def write_svg(results: List[Dict], path: Path) -> None:
    """Validation loss against step (left) and against wall time (right), one line per run."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    width, height, pad = 460, 320, 48
    losses = [c["val_loss"] for r in results for c in r["curve"]]
    low, high = min(losses), max(losses)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height + 40 + 18 * len(results)}" font-family="sans-serif" font-size="12">']
    for panel, (key, label) in enumerate([("step", "step"), ("wall_s", "wall time (s)")]):
        x0 = panel * width
        xmax = max(c[key] for r in results for c in r["curve"]) or 1
        sx = lambda v: x0 + pad + (width - 2 * pad) * v / xmax  # noqa: E731
        sy = lambda v: height - pad + (pad - (height - pad)) * (v - low) / ((high - low) or 1)  # noqa: E731
        parts.append(f'<rect x="{x0 + pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#888"/>')
        parts.append(f'<text x="{x0 + width / 2}" y="{height - 12}" text-anchor="middle">{label}</text>')
        parts.append(f'<text x="{x0 + pad}" y="{pad - 8}">validation loss (nats/byte), {low:.3f} to {high:.3f}</text>')
        parts.append(f'<text x="{x0 + width - pad}" y="{height - pad + 14}" text-anchor="end">{xmax:,.0f}</text>')
        for i, r in enumerate(results):
            points = " ".join(f"{sx(c[key]):.1f},{sy(c['val_loss']):.1f}" for c in r["curve"])
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colors[i % len(colors)]}" stroke-width="1.5"/>')
    for i, r in enumerate(results):
        y = height + 20 + 18 * i
        parts.append(f'<line x1="{pad}" y1="{y - 4}" x2="{pad + 24}" y2="{y - 4}" stroke="{colors[i % len(colors)]}" stroke-width="2"/>')
        parts.append(f'<text x="{pad + 30}" y="{y}">{r["system"]}, {r["mode"]}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def write_markdown(results: List[Dict], args, corpus: data.Corpus, path: Path, command: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    params = llama.parameter_count(args.size)
    rows = [summarize(r, args) for r in results]
    adamw_state = next((r["state_mb"] for r in rows if r["run"] == "parameter server, adamw"), None)
    ddp_rate = next((r["tokens_per_s"] for r in rows if r["run"].startswith("DDP (gloo),")), None)
    zero_rate = next((r["tokens_per_s"] for r in rows if r["run"].startswith("ZeRO")), None)
    lines = [
        f"# LLaMA-style `{args.size}` ({params:,} parameters): " + ("the parameter server beside DDP and ZeRO-1" if ddp_rate or zero_rate else "the parameter server's optimizer modes"),
        "",
        f"{datetime.date.today()}, commit {commit}, {platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}.",
        f"Command: `{command}`.",
        f"Job: {args.workers} workers, global batch {args.sequences} x {args.seq_len} tokens, {args.steps} steps, warm-up {args.warmup} then cosine to 0.1, clip 1.0, seed {args.seed}, {args.threads} torch thread(s) per worker; "
        f"the parameter server runs {args.shards} shards with the local channel. Text: {corpus.describe()}.",
        "",
        "| run | final val loss | tokens/s | vs DDP | vs ZeRO-1 | median step s | worker peak RSS MB | shards' peak RSS MB | optimizer state MB | state vs AdamW | MB on the wire per worker-step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = lambda base: f"{row['tokens_per_s'] / base:.2f}" if base else "n/a"  # noqa: E731
        state_ratio = f"{row['state_mb'] / adamw_state:.2f}" if adamw_state and row["run"].startswith("parameter") else ""
        lines.append(
            f"| {row['run']} | {row['final_val_loss']:.4f} | {row['tokens_per_s']:,.0f} | {ratio(ddp_rate)} | {ratio(zero_rate)} | {row['median_step_s']:.3f} | "
            f"{row['worker_peak_rss_mb']:.0f} | {row['shard_peak_rss_mb']:.0f} | {row['state_mb']:.1f} | {state_ratio} | {row['wire_mb']:.1f} |"
        )
    lines += [
        "",
        "Optimizer state: `GetStatus` summed over the shards for the parameter server; AdamW's m and v (8 bytes a parameter) on every rank for DDP, divided over the ranks for ZeRO-1 (the sum is shown). "
        "Shards' peak RSS is the sum of both shards' VmHWM (nan: no shards). Wire bytes are computed from the formats "
        "(f32 push and pull; a ring all-reduce; ZeRO-1's partition broadcast), sent plus received.",
        "Timings leave rank 0's evaluations out. The validation loss is the mean over "
        f"{args.eval_batches} fixed windows of {EVAL_SEQUENCES} x {args.seq_len} validation bytes, in nats per byte.",
        "",
        f"![validation loss against step and wall time]({path.stem}-loss.svg)",
        "",
        "Validation loss by step:",
        "",
        "| step | " + " | ".join(r["run"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for i, point in enumerate(results[0]["curve"]):
        lines.append(f"| {point['step']} | " + " | ".join(f"{r['curve'][i]['val_loss']:.4f}" if i < len(r["curve"]) else "" for r in results) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(llama.SIZES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: a tenth of --steps)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=16, help="sequences in the global batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help="the shards' optimizer modes to run")
    parser.add_argument("--systems", default="ps,ddp,zero,ddp-order", help="which of ps, ddp, zero, ddp-order (DDP with 1 MB buckets: the rounding control) to run")
    parser.add_argument("--out", default=str(ROOT / "results" / "lm.md"))
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    corpus = data.python_corpus()
    systems = args.systems.split(",")
    results = []
    began = time.perf_counter()
    if "ps" in systems:
        for mode in args.modes.split(","):
            results.append(run_ps(mode, args))
    if "ddp" in systems:
        results.append(run_ddp(False, args))
    if "zero" in systems:
        results.append(run_ddp(True, args))
    if "ddp-order" in systems:
        # The same DDP run with buckets of 1 MB: another summation order of the same
        # gradients, which shows how far f32 rounding alone moves a curve.
        results.append(run_ddp(False, args, bucket_mb=1.0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_name(f"{out.stem}-loss.svg")
    write_svg(results, plot)
    command = "client/python/benches/lm.sh " + " ".join(sys.argv[1:])
    write_markdown(results, args, corpus, out, command.strip())
    print(f"\n{len(results)} runs in {time.perf_counter() - began:.0f} s; wrote {out} and {plot}")
    for row in (summarize(r, args) for r in results):
        print(f"  {row['run']:<48} val {row['final_val_loss']:.4f}  {row['tokens_per_s']:>8,.0f} tokens/s  state {row['state_mb']:.1f} MB  worker RSS {row['worker_peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
