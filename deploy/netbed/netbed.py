#!/usr/bin/env python3
"""A multi-host test bed on one Linux machine: every shard and every worker
runs in its own network namespace, with its own address and network stack,
joined to the others by a veth pair to one bridge, each link shaped by `tc
tbf` in both directions (a host's upload and its download). The processes are
the real binaries (`server`, and `sync_steps` workers from the ps-client
examples) talking gRPC over the shaped links.

    sudo deploy/netbed/netbed.py bench     # 2 shards, 4 workers, 25M parameters, per link rate and encoding
    sudo deploy/netbed/netbed.py faults    # a worker's link cut; a shard's link cut for less than the lease

`bench` prints seconds per step for each push/pull encoding next to its wire
floor: the bytes that crossed the busiest link per step, both directions (read from the interfaces' own counters, so gRPC,
HTTP/2, TCP and IP framing included), divided by the link rate. Both
directions count because a sync step pulls the weights of step t, then pushes
the gradient computed on them: the two never overlap on one link.

Delay is not modelled: this machine's kernel has no `netem`, so the links have
rate limits and queues but only the sub-millisecond latency of veth.

Everything it makes (namespaces, links, processes) carries this run's id and is
removed on exit, on an error, and on SIGINT/SIGTERM; `netbed.py clean` removes
what a killed run left behind.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release"  # --bin-dir changes it
PREFIX = "psnb"
SUBNET = "198.18.0"  # RFC 2544's benchmarking range: no real host owns it.
GRPC_PORT = 50051
METRICS_PORT = 9100


def sh(*cmd: str, check: bool = True) -> str:
    """Runs a command, returns its stdout; fails with its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def parse_rate(text: str) -> float:
    """Bits per second of a tc rate such as 1gbit or 500mbit."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    raise ValueError(f"'{text}': a rate reads like 1gbit, 10gbit or 500mbit")


def parse_count(text: str) -> int:
    """25M, 1M, 500k or a plain number."""
    factors = {"k": 1_000, "K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
    return int(float(text[:-1]) * factors[text[-1]]) if text[-1] in factors else int(text)


@dataclass
class Host:
    """One namespace: its name, its address and its end of the bridge."""

    role: str
    index: int
    run_id: str

    @property
    def ns(self) -> str:
        return f"{PREFIX}{self.run_id}-{self.role}{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{(10 if self.role == 's' else 20) + self.index}"

    @property
    def bridge_port(self) -> str:
        return f"nb{self.run_id}{self.role}{self.index}"

    def run(self, *cmd: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.ns, *cmd, check=check)

    def counters(self) -> tuple[int, int]:
        """(received, sent) bytes of the host's link, as its interface counts them."""
        stats = "/sys/class/net/eth0/statistics"
        out = self.run("sh", "-c", f"cat {stats}/rx_bytes {stats}/tx_bytes").split()
        return int(out[0]), int(out[1])


@dataclass
class Bed:
    """The namespaces, links and processes of one run; `close` removes them all."""

    shards: int
    workers: int
    run_id: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    procs: list = field(default_factory=list)
    shard_procs: list = field(default_factory=list)
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ps-netbed-")))
    rate: str = ""

    def __post_init__(self):
        self.shard_hosts = [Host("s", i, self.run_id) for i in range(self.shards)]
        self.worker_hosts = [Host("w", i, self.run_id) for i in range(self.workers)]
        self.bridge_ns = f"{PREFIX}{self.run_id}-br"

    @property
    def hosts(self) -> list[Host]:
        return self.shard_hosts + self.worker_hosts

    @property
    def shard_list(self) -> str:
        return ",".join(f"{h.address}:{GRPC_PORT}" for h in self.shard_hosts)

    def up(self):
        sh("ip", "netns", "add", self.bridge_ns)
        br = ["ip", "netns", "exec", self.bridge_ns]
        sh(*br, "ip", "link", "add", "br0", "type", "bridge")
        sh(*br, "ip", "link", "set", "br0", "up")
        for host in self.hosts:
            sh("ip", "netns", "add", host.ns)
            sh("ip", "link", "add", host.bridge_port, "netns", self.bridge_ns, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            sh(*br, "ip", "link", "set", host.bridge_port, "master", "br0", "up")
            host.run("ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
            host.run("ip", "link", "set", "eth0", "up")
            host.run("ip", "link", "set", "lo", "up")

    def shape(self, rate: str):
        """Limits every link to `rate` each way: the host's side shapes its upload, the bridge's side its download."""
        bits = parse_rate(rate)
        # A token bucket must hold at least a GSO burst and a timer tick's worth of bytes.
        burst = max(256 * 1024, int(bits / 8 / 250))
        tbf = ["root", "tbf", "rate", rate, "burst", str(burst), "latency", "20ms"]
        for host in self.hosts:
            host.run("tc", "qdisc", "replace", "dev", "eth0", *tbf)
            sh("ip", "netns", "exec", self.bridge_ns, "tc", "qdisc", "replace", "dev", host.bridge_port, *tbf)
        self.rate = rate

    def set_link(self, host: Host, up: bool):
        """Cuts or restores a host's cable at the bridge: its packets are lost, its own stack sees nothing."""
        sh("ip", "netns", "exec", self.bridge_ns, "ip", "link", "set", host.bridge_port, "up" if up else "down")

    def start(self, host: Host, name: str, cmd: list[str], env: dict | None = None, capture: bool = False):
        """Starts `cmd` in `host`'s namespace, logging to NAME.log; `capture` pipes its stdout back instead."""
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, *cmd],
            stdout=subprocess.PIPE if capture else log,
            stderr=log,
            text=True,
            env=dict(os.environ, **(env or {})),
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def shard_cpu_seconds(self) -> float:
        """CPU time (user + system) the running shard processes have used so far."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for proc in self.shard_procs:
            if proc.poll() is None:
                # /proc/PID/stat: the fields after the command's closing parenthesis; utime and stime are 14 and 15.
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / ticks

    def start_shards(self, lease: str):
        for host in self.shard_hosts:
            self.shard_procs.append(self.start(
                host,
                f"shard{host.index}",
                [
                    str(BIN / "server"),
                    "--shard-index", str(host.index),
                    "--shards", self.shard_list,
                    "--listen", f"{host.address}:{GRPC_PORT}",
                    "--metrics-addr", f"{host.address}:{METRICS_PORT}",
                    "--lease", lease,
                ],
                env={"RUST_LOG": "warn"},
            ))
        host = self.worker_hosts[0]
        host.run(str(BIN / "ctl"), "--shards", self.shard_list, "health", "--timeout", "30s")

    def stop_all(self):
        """Kills every process this bed started (shards, and workers still running)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        self.shard_procs.clear()

    def close(self):
        self.stop_all()
        for ns in [h.ns for h in self.hosts] + [self.bridge_ns]:
            remove_namespace(ns)


def remove_namespace(ns: str):
    """Kills what still runs in a namespace and deletes it (its veth ends go with it)."""
    for pid in sh("ip", "netns", "pids", ns, check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    sh("ip", "netns", "del", ns, check=False)


def clean_all():
    """Removes every namespace a test-bed run made (its links go with them)."""
    for line in sh("ip", "netns", "list", check=False).splitlines():
        ns = line.split()[0] if line.strip() else ""
        if ns.startswith(PREFIX):
            remove_namespace(ns)


def open_bed(shards: int, workers: int) -> Bed:
    if os.geteuid() != 0:
        sys.exit("netbed needs root (network namespaces, veth, tc): run it with sudo")
    for binary in ["server", "ctl", "examples/sync_steps"]:
        if not (BIN / binary).exists():
            sys.exit(
                f"missing {BIN / binary}: cargo build --release --bin server --bin ctl "
                "&& cargo build --release -p ps-client --example sync_steps"
            )
    bed = Bed(shards, workers)
    atexit.register(bed.close)

    def interrupted(signum, _frame):
        bed.close()
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    bed.up()
    return bed


def run_workers(bed: Bed, model: str, params: int, steps: int, warmup: int, push: str, pull: str, hosts=None):
    """Starts one `sync_steps` worker per host; returns the processes."""
    hosts = hosts if hosts is not None else bed.worker_hosts
    procs = []
    for host in hosts:
        cmd = [
            str(BIN / "examples" / "sync_steps"), bed.shard_list, model, f"worker-{host.index}", str(host.index),
            str(steps), str(warmup), "--register", str(params), "--compression", push, "--pull-encoding", pull,
            "--workers", str(len(bed.worker_hosts)),
        ]
        procs.append(bed.start(host, f"worker{host.index}-{model}", cmd, env={"PS_LOCAL": "off", "RUST_LOG": "warn"}, capture=True))
    return procs


def results(procs, timeout: float) -> list[dict]:
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"a worker failed (exit {proc.returncode}); logs in {proc.args}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


CASES = {
    "f32": ("none", "f32", "f32 push + f32 pull"),
    "bf16": ("bf16", "bf16", "bf16 push + bf16 pull"),
    "sign-mv": ("sign-mv", "bf16", "sign1 (majority vote) + bf16 pull"),
    "sign-ef": ("sign-ef", "bf16", "sign1 (EF) + bf16 pull"),
}


def bench(args):
    bed = open_bed(args.shards, args.workers)
    params = parse_count(args.params)
    print(
        f"netbed: {args.shards} shards and {args.workers} workers in their own namespaces, {params:,} parameters, "
        f"sync, SGD, {args.steps} steps per case ({args.warmup} warm-up); logs in {bed.logs}",
        flush=True,
    )
    table = []
    for rate in args.rates.split(","):
        bed.shape(rate)
        bed.start_shards(args.lease)
        for case in args.cases.split(","):
            push, pull, label = CASES[case]
            before = {h.ns: h.counters() for h in bed.hosts}
            shard_cpu = bed.shard_cpu_seconds()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.monotonic()
            procs = run_workers(bed, f"bench-{case}", params, args.steps, args.warmup, push, pull)
            done = results(procs, timeout=args.timeout)
            wall = time.monotonic() - started
            # CPU per step of each side, over the whole run of the workers (warm-up and
            # registration included): on one machine every process shares its cores, so a
            # step cannot be shorter than this CPU time divided by the cores.
            reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
            run_steps = args.steps + 1
            worker_cpu = (reaped.ru_utime + reaped.ru_stime - children.ru_utime - children.ru_stime) / run_steps
            shard_cpu = (bed.shard_cpu_seconds() - shard_cpu) / run_steps
            seconds = statistics.median(r["seconds_per_step"] for r in done)
            # Pushes cross a worker's upload and a shard's download once per step; weights are
            # pulled once per step and once more at the end. A sync step pulls, then pushes (the
            # push of step t needs the weights of step t), so both directions of a link count.
            per_step = []
            for host in bed.hosts:
                rx0, tx0 = before[host.ns]
                rx1, tx1 = host.counters()
                rx_steps, tx_steps = (args.steps, args.steps + 1) if host.role == "s" else (args.steps + 1, args.steps)
                per_step.append(((rx1 - rx0) / rx_steps + (tx1 - tx0) / tx_steps, f"{host.role}{host.index}"))
            busiest, link = max(per_step)
            floor = busiest * 8 / parse_rate(rate)
            row = dict(
                rate=rate, case=label, seconds=seconds, floor=floor, busiest_mb=busiest / 1e6, link=link, wall=wall,
                worker_cpu=worker_cpu, shard_cpu=shard_cpu,
            )
            table.append(row)
            print(
                f"  {rate:>7} {label:<36} {seconds:7.3f} s/step  wire floor {floor:7.3f} s "
                f"({busiest / 1e6:6.1f} MB through {link}'s link)  x{seconds / floor:4.2f}  "
                f"CPU s/step: workers {worker_cpu:.3f}, shards {shard_cpu:.3f}",
                flush=True,
            )
        bed.stop_all()
    print("\nSummary (seconds per step, median of the workers; floor = busiest link's bytes per step, both ways, / rate)")
    print(f"({os.cpu_count()} cores for every process: CPU s/step is all workers' and all shards' CPU time per step)")
    print("| link | encodings | s/step | wire floor s | step / floor | busiest link MB/step | vs f32 | CPU s/step workers + shards |")
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        f32 = next((r for r in table if r["rate"] == row["rate"] and r["case"] == CASES["f32"][2]), None)
        speedup = f"{f32['seconds'] / row['seconds']:.2f}x" if f32 else "n/a"
        print(
            f"| {row['rate']} | {row['case']} | {row['seconds']:.3f} | {row['floor']:.3f} | "
            f"{row['seconds'] / row['floor']:.2f} | {row['busiest_mb']:.1f} ({row['link']}) | {speedup} | "
            f"{row['worker_cpu']:.2f} + {row['shard_cpu']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


def model_status(bed: Bed, model: str) -> list[dict]:
    """Every shard's status of `model` (`ctl status --json`, asked from a worker's namespace)."""
    out = bed.worker_hosts[0].run(str(BIN / "ctl"), "--shards", bed.shard_list, "status", "--model", model, "--json")
    return [m for shard in json.loads(out) for m in shard["models"] if m["name"] == model]


def wait_version(bed: Bed, model: str, version: int, timeout: float):
    """Waits until every shard holds `model` at `version` or more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            models = model_status(bed, model)
            holding = [m for m in models if m["blocks"] > 0]
            if len(models) == bed.shards and all(m["min_version"] >= version for m in holding):
                return
        except (RuntimeError, json.JSONDecodeError):
            pass  # not registered yet
        time.sleep(0.2)
    raise RuntimeError(f"model {model} did not reach version {version} within {timeout} s")


def faults(args):
    bed = open_bed(2, 4)
    params, steps = parse_count(args.params), args.steps
    bed.shape(args.rate)
    checks = []

    def check(name: str, ok: bool, detail: str):
        checks.append(ok)
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    print(f"netbed faults: 2 shards, 4 workers, {params:,} parameters, {steps} sync steps, links {args.rate}, lease {args.lease}")
    bed.start_shards(args.lease)

    # The reference: nothing cut.
    reference = results(run_workers(bed, "ref", params, steps, 1, "none", "f32"), timeout=args.timeout)
    hashes = {r["weights_fnv"] for r in reference}
    check("reference run", len(hashes) == 1 and all(r["version"] == steps for r in reference),
          f"4 workers at version {reference[0]['version']}, weights {reference[0]['weights_fnv']}")

    # A shard's cable pulled for less than the lease, then put back: the run goes on, and nothing
    # is applied twice, so the weights are bit for bit those of the reference.
    procs = run_workers(bed, "shardcut", params, steps, 1, "none", "f32")
    wait_version(bed, "shardcut", steps // 3, args.timeout)
    bed.set_link(bed.shard_hosts[1], up=False)
    time.sleep(args.cut)
    cut_mid_run = all(p.poll() is None for p in procs)
    bed.set_link(bed.shard_hosts[1], up=True)
    done = results(procs, timeout=args.timeout)
    check(f"shard 1's link cut for {args.cut} s (lease {args.lease}) mid-run",
          cut_mid_run and all(r["version"] == steps and r["weights_fnv"] in hashes for r in done),
          f"versions {[r['version'] for r in done]}, weights {sorted({r['weights_fnv'] for r in done})} "
          f"(reference {sorted(hashes)})")

    # A worker's cable pulled for good: its lease expires, the others finish the run.
    procs = run_workers(bed, "workercut", params, steps, 1, "none", "f32")
    wait_version(bed, "workercut", steps // 3, args.timeout)
    cut_at = time.monotonic()
    bed.set_link(bed.worker_hosts[3], up=False)
    cut_mid_run = all(p.poll() is None for p in procs)
    survivors = results(procs[:3], timeout=args.timeout)
    took = time.monotonic() - cut_at
    os.killpg(procs[3].pid, signal.SIGKILL)
    procs[3].wait()
    check("worker 3's link cut mid-run",
          cut_mid_run and all(r["version"] == steps for r in survivors)
          and len({r["weights_fnv"] for r in survivors}) == 1,
          f"3 survivors at versions {[r['version'] for r in survivors]}, same weights, {took:.1f} s after the cut")
    models = model_status(bed, "workercut")
    check("every shard dropped worker 3 at its lease's expiry",
          all(m["workers_expired"] >= 1 and "worker-3" not in m["live_workers"] for m in models),
          f"expired {[m['workers_expired'] for m in models]}, live {[m['live_workers'] for m in models]}")
    passed = sum(checks)
    print(f"{passed} passed, {len(checks) - passed} failed")
    sys.exit(0 if passed == len(checks) else 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bin-dir", default=str(ROOT / "target" / "release"), help="where server, ctl and examples/sync_steps are (default: target/release)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="seconds per step per link rate and encoding, next to the wire floor")
    b.add_argument("--params", default="25M")
    b.add_argument("--rates", default="1gbit,10gbit", help="tc rates, comma-separated")
    b.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    b.add_argument("--shards", type=int, default=2)
    b.add_argument("--workers", type=int, default=4)
    b.add_argument("--steps", type=int, default=8)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--lease", default="30s")
    b.add_argument("--timeout", type=float, default=600)
    b.add_argument("--json", help="also write the table here")
    f = sub.add_parser("faults", help="a worker's link cut; a shard's link cut for less than the lease")
    f.add_argument("--params", default="4M", help="at least 2M, so that both shards hold blocks")
    f.add_argument("--steps", type=int, default=60)
    f.add_argument("--rate", default="1gbit")
    # A cut link loses TCP's retransmissions too, and they back off (0.2, 0.4, 0.8, 1.6 s ...):
    # after a 2 s cut the connection resumes up to about 3 s after it began, so the lease
    # leaves room for that and for a heartbeat period (a third of the lease).
    f.add_argument("--lease", default="10s")
    f.add_argument("--cut", type=float, default=2.0, help="seconds shard 1's link stays cut")
    f.add_argument("--timeout", type=float, default=120)
    sub.add_parser("clean", help="remove what a killed run left behind")
    args = parser.parse_args()
    global BIN
    BIN = Path(args.bin_dir).resolve()
    if args.command == "clean":
        clean_all()
    else:
        {"bench": bench, "faults": faults}[args.command](args)


if __name__ == "__main__":
    main()
