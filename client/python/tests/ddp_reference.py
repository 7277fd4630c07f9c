"""The DDP side of the buffer tests: a small CNN with BatchNorm trained by 2
processes with DistributedDataParallel over gloo on loopback, as a PyTorch
user would, and rank 0's final state_dict saved for the test to compare with
the same training through the parameter server.

    python ddp_reference.py INIT OUT STEPS PORT broadcast|mean

INIT holds the initial state_dict (torch.save). "broadcast" is DDP's default
(`broadcast_buffers=True`: rank 0's buffers before each forward pass); "mean"
turns that off and averages the buffers over the ranks after each step
(all_reduce, then divide), as a script that wants averaged statistics does."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_torch  # noqa: E402

LR, MOMENTUM, PER_RANK = 0.05, 0.9, 32


class SmallCnn(torch.nn.Module):
    """Two 3x3 convolutions with BatchNorm over the 8x8 digits, then a linear head (3,866 parameters)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x.view(-1, 1, 8, 8))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def batch(step: int, rank: int) -> slice:
    """Rank `rank`'s share of the global batch of step `step` (two ranks)."""
    start = 2 * PER_RANK * step + PER_RANK * rank
    return slice(start, start + PER_RANK)


def _rank(rank: int, init: str, out: str, steps: int, port: int, sync: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    net = SmallCnn()
    net.load_state_dict(torch.load(init))
    ddp = DistributedDataParallel(net, broadcast_buffers=sync == "broadcast")
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = digits_torch.digits(0, 1)
    for step in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(ddp(x[batch(step, rank)]), y[batch(step, rank)]).backward()
        optimizer.step()
        if sync == "mean":
            for buffer in net.buffers():
                dist.all_reduce(buffer)
                buffer.copy_(buffer / 2 if buffer.is_floating_point() else buffer // 2)
    if rank == 0:
        torch.save(net.state_dict(), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    init, out, steps, port, sync = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    mp.spawn(_rank, args=(init, out, steps, port, sync), nprocs=2)
