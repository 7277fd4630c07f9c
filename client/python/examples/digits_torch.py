"""A PyTorch worker for the built-in `digits-mlp` model: the 8x8 digits shipped in
`worker/data/`, split exactly as the Rust `worker` splits them (SplitMix64
shuffle with the same seed, 20% held out, rank r of w takes every w-th of the
rest), trained through the parameter server with `paramserver.torch`.

Mixed with Rust workers on one model in sync mode (the Rust worker registers it):

    ./target/release/server --shard-index 0 --shards 127.0.0.1:50051,127.0.0.1:50052 &
    ./target/release/server --shard-index 1 --shards 127.0.0.1:50051,127.0.0.1:50052 &
    ./target/release/worker train --shards 127.0.0.1:50051,127.0.0.1:50052 --world-size 2 --rank 1 --steps 300 &
    python client/python/examples/digits_torch.py --shards 127.0.0.1:50051,127.0.0.1:50052 --world-size 2 --rank 0 --steps 300
    ./target/release/worker evaluate --shards 127.0.0.1:50051,127.0.0.1:50052 --min-version 300
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import paramserver as ps
import paramserver.torch as pst

DIGITS = Path(__file__).resolve().parents[3] / "worker" / "data" / "digits.csv.gz"
SPLIT_SEED = 20_241_127
MASK = (1 << 64) - 1


class SplitMix64:
    """The Rust worker's generator, so both sides hold out the same examples."""

    def __init__(self, seed: int):
        self.state = seed & MASK

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def shuffle(self, items: List[int]) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.next_u64() % (i + 1)
            items[i], items[j] = items[j], items[i]


def digits(rank: int, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's training examples: pixels / 16 and labels."""
    rows = np.loadtxt(gzip.open(DIGITS, "rt"), delimiter=",", dtype=np.float32)
    order = list(range(len(rows)))
    SplitMix64(SPLIT_SEED).shuffle(order)
    test_len = round(len(rows) * 0.2)
    train = [order[i] for i in range(test_len, len(rows))][rank::world]
    x = torch.from_numpy(rows[train, :64] / 16.0)
    y = torch.from_numpy(rows[train, 64].astype(np.int64))
    return x, y


class DigitsMlp(torch.nn.Module):
    """`digits-mlp`: fc1 (64 -> 64), ReLU, fc2 (64 -> 10), PyTorch Linear layout like the Rust model."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def wait_for_model(client: ps.Client, name: str, timeout_s: float = 60.0) -> ps.Model:
    """The model once another worker registered it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.model(name)
        except ps.ServerError as error:
            if error.kind != "unknown-model" or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def train(shards: List[str], rank: int, world: int, steps: int, batch: int = 32, model_name: str = "digits-mlp", seed: int = 0) -> float:
    """Trains `steps` sync steps as rank `rank`; returns the last minibatch loss."""
    x, y = digits(rank, world)
    net = DigitsMlp()
    client = ps.Client(shards)
    client.wait_ready(60)
    worker = pst.attach(net, wait_for_model(client, model_name), f"torch-{rank}", rank=rank)
    generator = torch.Generator().manual_seed(seed + rank)
    loss = float("nan")
    while worker.version < steps:
        pick = torch.randint(len(y), (batch,), generator=generator)
        loss_t = F.cross_entropy(net(x[pick]), y[pick])
        loss_t.backward()
        worker.step()
        loss = float(loss_t)
    worker.close()
    client.close()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="127.0.0.1:50051")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="digits-mlp")
    args = parser.parse_args()
    started = time.monotonic()
    loss = train(args.shards.split(","), args.rank, args.world_size, args.steps, args.batch_size, args.model)
    print(f"torch worker rank {args.rank}: {args.steps} steps in {time.monotonic() - started:.1f} s, last minibatch loss {loss:.4f}")


if __name__ == "__main__":
    main()
