"""Tokens per second of one worker training the LLaMA-style decoder through 2 release
shards (AdamW), the Rust worker's candle version (`worker train --task llama-SIZE`)
against the PyTorch one (`paramserver.models.llama` attached with
`paramserver.torch`), alternated `--rounds` times in one run on the same shards, batch
`--batch` x 128 bytes, `--steps` steps each. Needs `cargo build --release --bin server
--bin worker` and the bench virtualenv (`lm.sh` makes it):

    target/bench-venv/bin/python client/python/benches/candle_vs_torch.py --size small
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import paramserver as ps
import paramserver.torch as pst
from paramserver import data
from paramserver.models import llama

RELEASE = Path(__file__).resolve().parents[3] / "target" / "release"
SEQ_LEN = 128


def candle(addrs, args, round_: int) -> float:
    """Tokens/s of `--steps` more steps of the Rust worker, from its summary line."""
    out = subprocess.run(
        [str(RELEASE / "worker"), "train", "--task", f"llama-{args.size}", "--shards", ",".join(addrs), "--world-size", "1",
         "--rank", "0", "--steps", str(args.steps * (round_ + 1)), "--batch-size", str(args.batch), "--lr", "0.003", "--worker-id", "candle"],
        capture_output=True, text=True, check=True,
    )
    seconds = float(re.search(r"(\d+) steps in ([\d.]+) s", out.stdout + out.stderr).group(2))
    return args.steps * args.batch * SEQ_LEN / seconds


def pytorch(addrs, args, corpus, round_: int) -> float:
    """Tokens/s of `--steps` steps of a PyTorch worker on a model of its own."""
    net = llama.build(args.size, seed=0)
    values = ps.arrays_of(net)
    client = ps.Client(addrs)
    model = client.register(ps.model_spec(f"torch-{args.size}", values, [ps.group("all", ["*"], ps.adamw(3e-3))]), values)
    worker = pst.attach(net, model, "torch", rank=0)
    began = time.perf_counter()
    for step in range(args.steps):
        net.loss(torch.from_numpy(data.rank_batch(corpus.train, step, args.batch, SEQ_LEN, 0, 0, 1))).backward()
        worker.step()
    took = time.perf_counter() - began
    worker.close()
    return args.steps * args.batch * SEQ_LEN / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=sorted(llama.SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    addrs = ["127.0.0.1:57180", "127.0.0.1:57181"]
    corpus = data.stdlib_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        shards = [
            subprocess.Popen([str(RELEASE / "server"), "--shard-index", str(i), "--shards", ",".join(addrs), "--metrics-addr", "off",
                              "--local-dir", f"{tmp}/shard-{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(2)
        ]
        try:
            ps.Client(addrs).wait_ready(30)
            rates = {"candle": [], "pytorch": []}
            for r in range(args.rounds):
                rates["candle"].append(candle(addrs, args, r))
                rates["pytorch"].append(pytorch(addrs, args, corpus, r))
                print(f"round {r + 1}/{args.rounds}: candle {rates['candle'][-1]:,.0f} tokens/s, PyTorch {rates['pytorch'][-1]:,.0f} tokens/s", flush=True)
        finally:
            for s in shards:
                s.kill()
    c, t = statistics.median(rates["candle"]), statistics.median(rates["pytorch"])
    print(f"llama-{args.size}, batch {args.batch} x {SEQ_LEN}, {args.steps} steps, torch threads {torch.get_num_threads()}: "
          f"candle {c:,.0f} tokens/s, PyTorch {t:,.0f} tokens/s (median of {args.rounds}); candle/PyTorch {c / t:.2f}")


if __name__ == "__main__":
    main()
