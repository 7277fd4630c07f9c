"""Online resharding with a PyTorch worker: `ctl resize` moves the cluster from 2
shards to 3 and back while an attached module trains; the worker follows the new
shard list (LayoutChanged) and its weights end bit for bit where a run that
never left 2 shards ends."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import List

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (Debian's python3-torch provides it for the tests)")

import paramserver as ps  # noqa: E402
import paramserver.torch as pst  # noqa: E402

from conftest import binary, free_port  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_torch  # noqa: E402

STEPS = 40


class Cluster:
    """Two shards, and a third started with the three-shard list, waiting to be added."""

    def __init__(self, local: bool = False) -> None:
        self.local = local
        self.addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        self.logs = tempfile.mkdtemp(prefix="ps-pytest-resize-")
        self.processes = [self._start(i, self.addrs[:2]) for i in range(2)] + [self._start(2, self.addrs)]
        ps.Client(self.addrs[:2]).wait_ready(30)

    def _start(self, index: int, shards: List[str]) -> subprocess.Popen:
        log = open(os.path.join(self.logs, f"shard-{index}.log"), "w")
        args = [str(binary("server")), "--shard-index", str(index), "--shards", ",".join(shards), "--metrics-addr", "off"]
        if self.local:
            args += ["--local-dir", os.path.join(self.logs, f"shard-{index}")]
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def resize(self, count_from: int, count_to: int, said: List[str]) -> threading.Thread:
        """`ctl resize` in a thread (it waits for the run to reach its step boundary)."""

        def run() -> None:
            done = subprocess.run(
                [str(binary("ctl")), "--shards", ",".join(self.addrs[:count_from]), "resize", "--to", ",".join(self.addrs[:count_to])],
                capture_output=True, text=True, timeout=120,
            )
            said.append(f"exit {done.returncode}: {done.stdout}{done.stderr}")

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def train(client: ps.Client, name: str, on_step=None, micro_batches: int = 1, max_grad_norm: float = 0.0) -> dict:
    """STEPS steps of the digits MLP under AdamW through one attached worker, each step
    `micro_batches` backward passes accumulated, the mean gradient clipped by the shards
    to `max_grad_norm` (0: not); the final weights."""
    torch.manual_seed(0)
    net = digits_torch.DigitsMlp()
    values = ps.arrays_of(net)
    groups = [ps.group("all", ["*"], ps.adamw(0.01))]
    spec = ps.model_spec(name, values, groups, max_block_elements=512, max_grad_norm=max_grad_norm)
    worker = pst.attach(net, client.register(spec, values), "torch-0", accumulation_steps=micro_batches)
    x, y = digits_torch.digits(0, 1)
    for step in range(STEPS):
        for micro in range(micro_batches):
            start = 32 * (step % 10) + 16 * micro * (micro_batches > 1)
            batch = slice(start, start + 32 // micro_batches)
            torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        assert worker.step() == step + 1
        if on_step is not None:
            on_step(step, worker)
    weights = {n: p.detach().numpy().copy() for n, p in net.named_parameters()}
    worker.close()
    return weights


@pytest.mark.parametrize(
    "transport,micro_batches,max_grad_norm",
    [("tcp", 1, 0.0), ("local", 1, 0.0), ("tcp", 2, 0.5)],
    ids=["tcp", "local", "clipped-and-accumulated"],
)
def test_a_torch_worker_follows_a_resize_2_3_2_and_ends_bit_identical(transport, micro_batches, max_grad_norm):
    options = dict(micro_batches=micro_batches, max_grad_norm=max_grad_norm)
    reference_cluster = Cluster()
    try:
        reference = train(ps.Client(reference_cluster.addrs[:2]), "resize-reference", **options)
    finally:
        reference_cluster.stop()
    cluster = Cluster(local=transport == "local")
    said: List[str] = []
    resizes: List[threading.Thread] = []

    lists = []
    used_local = set()

    def on_step(step: int, worker: pst.AttachedModule) -> None:
        if not lists or lists[-1] != worker.model.client.shards:
            lists.append(worker.model.client.shards)
        client = worker.model.client
        used_local.update(s for s in range(client.num_shards) if client.local_channel(s))
        if step == 5:
            resizes.append(cluster.resize(2, 3, said))
        elif step >= 20 and len(resizes) == 1 and not resizes[0].is_alive():
            resizes.append(cluster.resize(3, 2, said))

    try:
        weights = train(ps.Client(cluster.addrs[:2]), "resize-reference", on_step, **options)
        for thread in resizes:
            thread.join(60)
        assert len(said) == 2 and all(s.startswith("exit 0") for s in said), said
        assert "from 2 to 3 shards" in said[0] and "from 3 to 2 shards" in said[1], said
        assert lists == [cluster.addrs[:2], cluster.addrs, cluster.addrs[:2]], "the worker did not train on each list"
        for name, want in reference.items():
            np.testing.assert_array_equal(weights[name], want, err_msg=name)
        status = ps.Client(cluster.addrs[:2]).status()
        assert all(s.num_shards == 2 for s in status)
        if cluster.local:
            assert used_local, "the worker never reached a shard through its local channel"
    finally:
        cluster.stop()
