"""PyTorch through the parameter server: gradients streamed by backward hooks
give the same step as a local one, and a PyTorch worker trains the digits
model together with a Rust worker."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
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


def _adamw_pair(name: str, shards, overlap_bytes: int = 1024, **attach):
    """A digits MLP attached to a fresh AdamW model, and a copy with torch's AdamW."""
    torch.manual_seed(0)
    net = digits_torch.DigitsMlp()
    values = ps.arrays_of(net)
    spec = ps.model_spec(name, values, [ps.group("all", ["*"], ps.adamw(0.01, weight_decay=0.1))], max_block_elements=512)
    worker = pst.attach(net, shards.client().register(spec, values), "torch-0", bucket_bytes=overlap_bytes, **attach)
    reference = digits_torch.DigitsMlp()
    reference.load_state_dict(net.state_dict())
    return net, worker, reference, torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)


def _assert_same_weights(net, reference, atol=2e-6):
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=0, atol=atol, err_msg=name)


def _step_together(workers, nets, reference, step: int, loss_of, after=None) -> None:
    """Each worker's backward and step in a thread of its own, as separate processes would
    run them (a sync step waits for every worker), then every copy equals the reference."""

    def run(rank: int) -> int:
        loss_of(rank).backward()
        version = workers[rank].step()
        if after is not None:
            after(rank)
        return version

    with ThreadPoolExecutor(len(workers)) as pool:
        assert list(pool.map(run, range(len(workers)))) == [step + 1] * len(workers)
    for net in nets:
        _assert_same_weights(net, reference)


@pytest.mark.parametrize("micro_batches", [2, 4])
@pytest.mark.parametrize("how", ["no_sync", "accumulation_steps"])
def test_accumulated_micro_batches_push_their_sum_once_as_torch_steps_on_it(shards, micro_batches, how):
    attach = {"accumulation_steps": micro_batches} if how == "accumulation_steps" else {}
    net, worker, reference, local = _adamw_pair(f"accumulate-{how}-{micro_batches}", shards, **attach)
    x, y = digits_torch.digits(0, 1)
    size = 64 // micro_batches
    for step in range(5):
        for i in range(micro_batches):
            batch = slice(64 * step + size * i, 64 * step + size * (i + 1))
            last = i == micro_batches - 1
            quiet = worker.no_sync() if how == "no_sync" and not last else contextlib.nullcontext()
            with quiet:
                (torch.nn.functional.cross_entropy(net(x[batch]), y[batch]) / micro_batches).backward()
            if last:
                assert len(worker._pushes) >= 2, "the last backward pushed buckets while it ran"
            else:
                assert not worker._pushes, "a micro-batch before the last pushed nothing"
        assert worker.step() == step + 1
        local.zero_grad()
        for i in range(micro_batches):
            batch = slice(64 * step + size * i, 64 * step + size * (i + 1))
            (torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]) / micro_batches).backward()
        local.step()
        _assert_same_weights(net, reference)
    worker.close()


def test_a_second_backward_after_its_push_says_how_to_accumulate(shards):
    net, worker, _, _ = _adamw_pair("accumulate-refused", shards)
    x, y = digits_torch.digits(0, 1)
    torch.nn.functional.cross_entropy(net(x[:32]), y[:32]).backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        torch.nn.functional.cross_entropy(net(x[32:64]), y[32:64]).backward()
    worker.close()


def test_frozen_parameters_are_held_and_never_changed_and_the_rest_trains_as_torch(shards):
    # fc1 frozen, as partial fine-tuning does; AdamW's weight decay would move it if it were stepped.
    torch.manual_seed(0)
    net = digits_torch.DigitsMlp()
    net.fc1.requires_grad_(False)
    values = ps.arrays_of(net)
    spec = ps.model_spec("frozen-fc1", values, [ps.group("all", ["*"], ps.adamw(0.01, weight_decay=0.1))], max_block_elements=512)
    worker = pst.attach(net, shards.client().register(spec, values), "torch-0", bucket_bytes=1024)
    reference = digits_torch.DigitsMlp()
    reference.load_state_dict(net.state_dict())
    reference.fc1.requires_grad_(False)
    local = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)
    frozen = {name: p.detach().clone() for name, p in net.named_parameters() if name.startswith("fc1")}
    x, y = digits_torch.digits(0, 1)
    for step in range(5):
        batch = slice(32 * step, 32 * (step + 1))
        torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        assert worker.step() == step + 1
        local.zero_grad()
        torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]).backward()
        local.step()
        _assert_same_weights(net, reference)
    for name, p in net.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name]), f"{name} is frozen and stays bit for bit"
    # The shards hold the frozen tensors: a fresh pull has them, unchanged.
    _, pulled = worker.model.pull(5)
    np.testing.assert_array_equal(pulled["fc1.weight"].reshape(-1), frozen["fc1.weight"].numpy().reshape(-1))
    worker.close()


class TwoHeads(torch.nn.Module):
    """A trunk and two heads, of which a step may use one: the other gets no gradient."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(64, 32)
        self.even = torch.nn.Linear(32, 10)
        self.odd = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
        return getattr(self, head)(torch.relu(self.trunk(x)))


def test_a_parameter_without_a_gradient_is_left_as_torch_leaves_it_and_counts_as_zeros_beside_one_with(shards):
    """Two workers; each step each worker uses one head. Where both use the same head,
    the other head has no gradient anywhere and is left alone (weights, moments and
    Adam's step count, as torch.optim skips it); where they use different heads, each
    head's mean counts the other worker's part as zeros (as DDP's all-reduce with
    find_unused_parameters does)."""
    torch.manual_seed(1)
    nets = [TwoHeads() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    values = ps.arrays_of(nets[0])
    spec = ps.model_spec("two-heads", values, [ps.group("all", ["*"], ps.adamw(0.01, weight_decay=0.1))], max_block_elements=256)
    client = shards.client()
    model = client.register(spec, values)
    workers = [pst.attach(nets[0], model, "torch-0", rank=0, bucket_bytes=512)]
    workers.append(pst.attach(nets[1], client.model("two-heads"), "torch-1", rank=1, bucket_bytes=512))
    reference = TwoHeads()
    reference.load_state_dict(nets[0].state_dict())
    local = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)
    x, y = digits_torch.digits(0, 1)
    heads = [("even", "even"), ("odd", "even"), ("odd", "odd"), ("even", "even"), ("even", "odd"), ("odd", "odd")]
    for step, pair in enumerate(heads):
        batches = [slice(64 * step + 32 * r, 64 * step + 32 * (r + 1)) for r in range(2)]
        # The reference: every worker's gradient, the mean over both workers with zeros
        # for a head one of them did not use, None where neither did.
        parts = []
        for rank, head in enumerate(pair):
            reference.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(reference(x[batches[rank]], head), y[batches[rank]]).backward()
            parts.append({n: (None if p.grad is None else p.grad.clone()) for n, p in reference.named_parameters()})
        for name, p in reference.named_parameters():
            got = [part[name] for part in parts if part[name] is not None]
            p.grad = None if not got else sum(got[1:], got[0]) / 2 if len(got) == 2 else got[0] / 2
        local.step()
        # The same through the shards.
        _step_together(workers, nets, reference, step, lambda r: torch.nn.functional.cross_entropy(nets[r](x[batches[r]], pair[r]), y[batches[r]]))
    for worker in workers:
        worker.close()


@pytest.mark.parametrize("grad_clip", ["mean", "per-worker"])
def test_a_script_that_clips_and_accumulates_steps_as_torch_does(shards, grad_clip):
    """max_grad_norm set and two micro-batches: the sum is clipped and stepped once,
    as a one-process script that accumulates, calls clip_grad_norm_ and steps AdamW
    does. The shards clip it (the pushes overlap the last backward, so the worker
    says it accumulates), or the worker does (it pushes after backward, so it may
    just call backward twice)."""
    torch.manual_seed(0)
    net = digits_torch.DigitsMlp()
    values = ps.arrays_of(net)
    adamw = ps.adamw(0.01, weight_decay=0.1)
    spec = ps.model_spec(f"clip-accumulate-{grad_clip}", values, [ps.group("all", ["*"], adamw)], max_block_elements=512, max_grad_norm=0.1, grad_clip=grad_clip)
    attach = {"accumulation_steps": 2} if grad_clip == "mean" else {}
    worker = pst.attach(net, shards.client().register(spec, values), "torch-0", bucket_bytes=1024, **attach)
    assert worker.overlap == (grad_clip == "mean")
    reference = digits_torch.DigitsMlp()
    reference.load_state_dict(net.state_dict())
    local = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)
    x, y = digits_torch.digits(0, 1)
    for step in range(4):
        for half in range(2):
            batch = slice(64 * step + 32 * half, 64 * step + 32 * (half + 1))
            (torch.nn.functional.cross_entropy(net(x[batch]), y[batch]) / 2).backward()
            (torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]) / 2).backward()
        assert bool(worker._pushes) == (grad_clip == "mean"), "only the shards' clipping lets pushes overlap backward"
        assert worker.step() == step + 1
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        assert norm > 0.1, "the clip is active"
        local.step()
        local.zero_grad()
        _assert_same_weights(net, reference)
    worker.close()


@pytest.mark.parametrize("grad_clip", ["mean", "per-worker"])
def test_two_workers_clip_the_mean_gradient_as_ddp_does_or_each_their_own(shards, grad_clip):
    """Two workers on two shards, AdamW, max_grad_norm 0.1. The default clips the
    step's mean by its norm over every tensor of both shards, as `clip_grad_norm_`
    after DDP's all-reduce; "per-worker" clips each worker's gradient before the mean."""
    torch.manual_seed(4)
    nets = [digits_torch.DigitsMlp() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    values = ps.arrays_of(nets[0])
    name = f"clip-two-{grad_clip}"
    spec = ps.model_spec(name, values, [ps.group("all", ["*"], ps.adamw(0.01, weight_decay=0.1))], max_block_elements=512, max_grad_norm=0.1, grad_clip=grad_clip)
    client = shards.client()
    models = [client.register(spec, values), client.model(name)]
    assert len({b.shard for t in models[0].tensors.values() for b in t.blocks}) == 2, "the model spans both shards"
    workers = [pst.attach(nets[r], models[r], f"torch-{r}", rank=r, bucket_bytes=1024) for r in range(2)]
    reference = digits_torch.DigitsMlp()
    reference.load_state_dict(nets[0].state_dict())
    local = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)
    x, y = digits_torch.digits(0, 1)
    for step in range(6):
        batches = [slice(64 * step + 32 * r, 64 * step + 32 * (r + 1)) for r in range(2)]
        parts = []
        for batch in batches:
            local.zero_grad()
            torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]).backward()
            if grad_clip == "per-worker":
                torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
            parts.append([p.grad.clone() for p in reference.parameters()])
        for p, a, b in zip(reference.parameters(), *parts):
            p.grad = (a + b) / 2
        if grad_clip == "mean":
            assert torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1) > 0.1, "the clip is active"
        local.step()

        _step_together(workers, nets, reference, step, lambda r: torch.nn.functional.cross_entropy(nets[r](x[batches[r]]), y[batches[r]]))
    for worker in workers:
        worker.close()


def _warmup_then_halve(step: int) -> float:
    """LambdaLR's factor: a warmup from 0 (so the first update has lr 0), then halving every 3 steps."""
    return min(1.0, step / 2) * 0.5 ** (step // 3)


@pytest.mark.parametrize("how", ["lr_lambda", "one_cycle"])
def test_the_learning_rate_follows_the_scripts_schedule_as_torch_does(shards, how):
    """Two workers, AdamW on the shards, and the lr driven by the script: a LambdaLR
    factor given as `lr_lambda`, or OneCycleLR stepping `worker.optimizer`. The
    reference is one process on both half-batches with torch's AdamW and the same
    scheduler on it."""
    torch.manual_seed(2)
    nets = [digits_torch.DigitsMlp() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    values = ps.arrays_of(nets[0])
    spec = ps.model_spec(f"lr-{how}", values, [ps.group("all", ["*"], ps.adamw(0.01, weight_decay=0.1))], max_block_elements=512)
    client = shards.client()
    models = [client.register(spec, values), client.model(f"lr-{how}")]
    reference = digits_torch.DigitsMlp()
    reference.load_state_dict(nets[0].state_dict())
    local = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)

    def one_cycle(optimizer):
        # The shards follow the lr; a scheduler that also cycles Adam's betas is not followed there.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=8, cycle_momentum=False)

    if how == "lr_lambda":
        workers = [pst.attach(nets[r], models[r], f"torch-{r}", rank=r, bucket_bytes=1024, lr_lambda=_warmup_then_halve) for r in range(2)]
        schedulers = [None, None]
        local_scheduler = torch.optim.lr_scheduler.LambdaLR(local, _warmup_then_halve)
    else:
        workers = [pst.attach(nets[r], models[r], f"torch-{r}", rank=r, bucket_bytes=1024, lr=0.01) for r in range(2)]
        schedulers = [one_cycle(w.optimizer) for w in workers]
        local_scheduler = one_cycle(local)
    x, y = digits_torch.digits(0, 1)
    for step in range(8):
        batches = [slice(64 * step + 32 * r, 64 * step + 32 * (r + 1)) for r in range(2)]
        local.zero_grad()
        for batch in batches:
            (torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]) / 2).backward()
        local.step()
        local_scheduler.step()

        _step_together(
            workers, nets, reference, step,
            lambda r: torch.nn.functional.cross_entropy(nets[r](x[batches[r]]), y[batches[r]]),
            after=lambda r: schedulers[r] is not None and schedulers[r].step(),
        )
        if step == 0 and how == "lr_lambda":
            for name, p in nets[0].named_parameters():
                np.testing.assert_array_equal(p.detach().numpy(), values[name], err_msg=f"lr 0 moved {name}")
    for worker in workers:
        worker.close()


def test_workers_whose_learning_rates_differ_are_told_so(shards):
    torch.manual_seed(3)
    net = digits_torch.DigitsMlp()
    values = ps.arrays_of(net)
    spec = ps.model_spec("lr-mismatch", values, [ps.group("all", ["*"], ps.sgd(0.1))], max_block_elements=512)
    client = shards.client()
    model = client.register(spec, values)
    model.join("raw-0", 0)
    worker = pst.attach(net, client.model("lr-mismatch"), "torch-1", rank=1, overlap=False, lr_lambda=lambda step: 0.5)
    # The first worker's push opens step 0 with scale 1 on every shard.
    model.push("raw-0", 0, {name: np.zeros(t.shape, np.float32) for name, t in model.tensors.items()}, lr_scale=1.0)
    x, y = digits_torch.digits(0, 1)
    torch.nn.functional.cross_entropy(net(x[:32]), y[:32]).backward()
    with pytest.raises(ps.ServerError) as refused:
        worker.step()
    assert "first push carried 1" in refused.value.message and "same scale" in refused.value.message, refused.value.message
    # Nothing of it was applied: the step is still open, and the same push with the agreed scale completes it.
    worker.lr_lambda = lambda step: 1.0
    torch.nn.functional.cross_entropy(net(x[:32]), y[:32]).backward()
    assert worker.step() == 1
    worker.close()
    model.leave("raw-0")


class _LossScaler:
    """GradScaler's public methods, enabled on the CPU (torch 1.13's GradScaler needs CUDA):
    the scale multiplies the loss, and update(new_scale) sets it."""

    def __init__(self, scale: float, growth_interval: int):
        self._scale, self._interval = scale, growth_interval

    def scale(self, loss):
        return loss * self._scale

    def get_scale(self) -> float:
        return self._scale

    def get_growth_factor(self) -> float:
        return 2.0

    def get_backoff_factor(self) -> float:
        return 0.5

    def get_growth_interval(self) -> int:
        return self._interval

    def update(self, new_scale: float) -> None:
        self._scale = new_scale


def test_a_loss_scale_that_overflows_once_skips_the_step_for_every_worker_as_grad_scaler_with_ddp_does(shards):
    """Two workers with a loss scaler; at step 2 one worker's scaled gradient overflows.
    The reference is GradScaler's rule with DDP in one process: unscale every rank's
    gradient, skip the step everywhere if any holds inf, halve the scale on a skip and
    double it after 3 clean steps."""
    torch.manual_seed(5)
    nets = [digits_torch.DigitsMlp() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    values = ps.arrays_of(nets[0])
    spec = ps.model_spec("loss-scale", values, [ps.group("all", ["*"], ps.adamw(0.01, weight_decay=0.1))], max_block_elements=512)
    client = shards.client()
    models = [client.register(spec, values), client.model("loss-scale")]
    scalers = [_LossScaler(1024.0, growth_interval=3) for _ in range(2)]
    workers = [pst.attach(nets[r], models[r], f"torch-{r}", rank=r, scaler=scalers[r]) for r in range(2)]
    reference = digits_torch.DigitsMlp()
    reference.load_state_dict(nets[0].state_dict())
    local = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)
    scale, tracker = 1024.0, 0
    x, y = digits_torch.digits(0, 1)

    def loss(net, rank: int, step: int):
        batch = slice(64 * step + 32 * rank, 64 * step + 32 * (rank + 1))
        value = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
        # Step 2, worker 1: a loss this large overflows f32 once scaled, as an f16 one would.
        return value * 1e36 if (step, rank) == (2, 1) else value

    for step in range(7):
        parts = []
        for rank in range(2):
            local.zero_grad()
            (loss(reference, rank, step) * scale).backward()
            parts.append([p.grad * np.float32(1.0 / scale) for p in reference.parameters()])
        found_inf = any(not torch.isfinite(g).all() for part in parts for g in part)
        if not found_inf:
            for p, a, b in zip(reference.parameters(), *parts):
                p.grad = (a + b) / 2
            local.step()
        if found_inf:
            scale, tracker = scale * 0.5, 0
        else:
            tracker += 1
            if tracker == 3:
                scale, tracker = scale * 2.0, 0
        assert found_inf == (step == 2)
        _step_together(workers, nets, reference, step, lambda r: scalers[r].scale(loss(nets[r], r, step)))
        assert [s.get_scale() for s in scalers] == [scale, scale], f"step {step}"
    assert models[0].overflow_steps == 1
    for worker in workers:
        worker.close()


def test_bf16_autocast_on_the_cpu_trains_as_torch_does(shards):
    """torch.autocast in bf16 (no loss scale needed) changes nothing for the worker: the
    parameters and their gradients stay f32, and the steps equal torch's under the same autocast."""
    net, worker, reference, local = _adamw_pair("autocast-bf16", shards)
    x, y = digits_torch.digits(0, 1)
    for step in range(3):
        batch = slice(32 * step, 32 * (step + 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
        loss.backward()
        assert net.fc1.weight.grad.dtype == torch.float32, "autocast keeps the parameters' gradients f32"
        assert worker.step() == step + 1
        local.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]).backward()
        local.step()
        _assert_same_weights(net, reference)
    worker.close()
