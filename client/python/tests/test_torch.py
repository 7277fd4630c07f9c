"""PyTorch through the parameter server: gradients streamed by backward hooks
give the same step as a local one, and a PyTorch worker trains the digits
model together with a Rust worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (Debian's python3-torch provides it for the tests)")

import paramserver as ps  # noqa: E402
import paramserver.torch as pst  # noqa: E402

from conftest import binary  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_torch  # noqa: E402


def test_hooks_stream_gradients_and_the_step_matches_a_local_one(shards):
    torch.manual_seed(0)
    net = digits_torch.DigitsMlp()
    values = ps.arrays_of(net)
    client = shards.client()
    spec = ps.model_spec("torch-equal", values, [ps.group("all", ["*"], ps.sgd(0.1))], max_block_elements=512)
    # Small buckets: backward sends several pushes before it ends.
    worker = pst.attach(net, client.register(spec, values), "torch-0", bucket_bytes=1024)
    reference = digits_torch.DigitsMlp()
    reference.load_state_dict(net.state_dict())
    local = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = digits_torch.digits(0, 1)
    for step in range(3):
        batch = slice(32 * step, 32 * (step + 1))
        torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        assert len(worker._pushes) >= 2, "buckets were pushed while backward ran"
        assert worker.step() == step + 1
        local.zero_grad()
        torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]).backward()
        local.step()
        for (name, p), q in zip(net.named_parameters(), reference.parameters()):
            np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    worker.close()


def test_a_torch_worker_and_a_rust_worker_train_the_digits_model_past_90_percent(shards):
    steps = 300
    rust = subprocess.Popen(
        [str(binary("worker")), "train", "--shards", ",".join(shards.addrs), "--world-size", "2", "--rank", "1", "--steps", str(steps), "--worker-id", "rust-1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        loss = digits_torch.train(shards.addrs, rank=0, world=2, steps=steps)
        _, err = rust.communicate(timeout=120)
        assert rust.returncode == 0, err[-2000:]
    finally:
        rust.kill()
    assert loss < 1.0
    evaluated = subprocess.run(
        [str(binary("worker")), "evaluate", "--shards", ",".join(shards.addrs), "--min-version", str(steps), "--min-accuracy", "0.9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    print(evaluated.stdout)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
