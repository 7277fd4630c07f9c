"""A module's whole state through the parameter server: BatchNorm buffers held
by the shards and synchronised as DDP does (against a real DDP run over gloo),
and the state_dict exported from the shards and, with no shard running, from
their checkpoints (`ctl export`)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (Debian's python3-torch provides it for the tests)")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="the safetensors package reads the exported files")

import paramserver as ps  # noqa: E402
import paramserver.torch as pst  # noqa: E402
from paramserver import safetensors  # noqa: E402

from conftest import binary, free_port  # noqa: E402
import ddp_reference  # noqa: E402
from ddp_reference import SmallCnn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_torch  # noqa: E402

STEPS = 8
BUFFERS = ["bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked", "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked"]


def _ddp(tmp_path: Path, init: dict, sync: str) -> dict:
    """Rank 0's state_dict after STEPS steps of the same training under DDP (2 gloo processes)."""
    torch.save(init, tmp_path / "init.pt")
    out = tmp_path / f"ddp-{sync}.pt"
    script = Path(__file__).with_name("ddp_reference.py")
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "init.pt"), str(out), str(STEPS), str(free_port()), sync],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


def _assert_state(state: dict, expected: dict, what: str) -> None:
    assert list(state) == list(expected), what
    for name, value in expected.items():
        got = state[name].detach()
        if value.is_floating_point():
            np.testing.assert_allclose(got.numpy(), value.numpy(), rtol=0, atol=2e-5, err_msg=f"{what}: {name}")
        else:
            assert got.dtype == value.dtype and torch.equal(got, value), f"{what}: {name} is {got}, DDP's {value}"


def _train(shards, name: str, sync: str):
    """Two workers (ranks 0 and 1, each in a thread of its own, as two processes would
    run) train SmallCnn through both shards; returns their modules and the model."""
    torch.manual_seed(11)
    nets = [SmallCnn() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    init = {k: v.clone() for k, v in nets[0].state_dict().items()}
    values = ps.arrays_of(nets[0], buffers=True)
    assert sorted(ps.buffer_names(nets[0])) == sorted(BUFFERS)
    groups = [ps.buffers(ps.buffer_names(nets[0]), sync=sync), ps.group("weights", ["*"], ps.sgd(ddp_reference.LR, momentum=ddp_reference.MOMENTUM))]
    spec = ps.model_spec(name, values, groups, max_block_elements=512)
    client = shards.client()
    models = [client.register(spec, values), client.model(name)]
    assert len({b.shard for t in models[0].tensors.values() for b in t.blocks}) == 2, "the model spans both shards"
    workers = [pst.attach(nets[r], models[r], f"torch-{r}", rank=r) for r in range(2)]
    x, y = digits_torch.digits(0, 1)

    def run(rank: int) -> int:
        batch = ddp_reference.batch(step, rank)
        torch.nn.functional.cross_entropy(nets[rank](x[batch]), y[batch]).backward()
        return workers[rank].step()

    for step in range(STEPS):
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(run, range(2))) == [step + 1] * 2
    for worker in workers:
        worker.close()
    return nets, models[0], init


@pytest.mark.parametrize("sync", ["broadcast", "mean"])
def test_a_batchnorm_cnn_trained_by_two_workers_ends_and_evaluates_as_ddp(shards, tmp_path, sync):
    """"broadcast" against DDP's default (rank 0's buffers before every forward pass),
    "mean" against DDP with the buffers averaged over the ranks after each step; then
    the model exported from the shards, loaded into a fresh module by `load_state_dict`,
    evaluates as DDP's rank 0 does."""
    nets, model, init = _train(shards, f"bn-cnn-{sync}", sync)
    expected = _ddp(tmp_path, init, sync)
    assert int(expected["bn1.num_batches_tracked"]) == STEPS
    assert not torch.allclose(expected["bn1.running_mean"], init["bn1.running_mean"]), "the statistics moved"
    for rank, net in enumerate(nets):
        _assert_state(net.state_dict(), expected, f"worker {rank}")

    path = tmp_path / "exported.safetensors"
    assert model.export(str(path)) == STEPS
    exported = safetensors_torch.load_file(str(path))
    assert sorted(exported) == sorted(expected), "every parameter and buffer, nothing else"
    evaluated, reference = SmallCnn(), SmallCnn()
    evaluated.load_state_dict(exported)
    reference.load_state_dict(expected)
    evaluated.eval()
    reference.eval()
    x, y = digits_torch.digits(0, 1)
    held_out = slice(2 * ddp_reference.PER_RANK * STEPS, None)
    with torch.no_grad():
        ours, theirs = evaluated(x[held_out]), reference(x[held_out])
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-4)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    accuracy = float((ours.argmax(1) == y[held_out]).float().mean())
    print(f"{sync}: held-out accuracy {accuracy:.3f} on {len(y[held_out])} digits after {STEPS} steps")


def test_a_buffer_pushed_by_another_rank_than_zero_is_refused(shards):
    torch.manual_seed(0)
    net = SmallCnn()
    values = ps.arrays_of(net, buffers=True)
    spec = ps.model_spec("bn-refuse", values, [ps.buffers(ps.buffer_names(net)), ps.group("weights", ["*"], ps.sgd(0.1))])
    model = shards.client().register(spec, values)
    model.join("rank-0", 0)
    model.join("rank-1", 1)
    grads = {name: np.ones(t.shape, np.float32) for name, t in model.tensors.items()}
    with pytest.raises(ps.ServerError) as refused:
        model.push("rank-1", 0, grads)
    assert "rank 0's values only" in refused.value.message and "ENCODING_NO_GRADIENT" in refused.value.message
    grads.update({name: None for name in BUFFERS})
    model.push("rank-1", 0, grads)
    model.push("rank-0", 0, {name: np.full(t.shape, 3.0, np.float32) for name, t in model.tensors.items()})
    _, state = model.state_dict(1)
    assert state["bn1.running_var"].tolist() == [3.0] * 8, "rank 0's values, not their mean with nothing"


def test_a_module_whose_buffers_the_model_trains_is_told_how_to_hold_them(shards):
    net = SmallCnn()
    values = ps.arrays_of(net, buffers=True)
    spec = ps.model_spec("bn-trained", values, [ps.group("all", ["*"], ps.sgd(0.1))])
    model = shards.client().register(spec, values)
    with pytest.raises(ValueError, match=r"'bn1.running_mean' is a buffer of the module, but the model trains it"):
        pst.attach(net, model, "w0")


def test_the_state_dict_is_exported_from_the_checkpoints_with_no_shard_running(checkpointed_shards, tmp_path):
    """The same file from the running shards (Model.export) and from their checkpoint
    directories after they stopped (`ctl export`), and torch loads it."""
    nets, model, _ = _train(checkpointed_shards, "bn-cnn-checkpoint", "broadcast")
    live = tmp_path / "live.safetensors"
    model.export(str(live))
    written = checkpointed_shards.client().checkpoint("bn-cnn-checkpoint")
    assert written.version == STEPS
    checkpointed_shards.stop()

    offline = tmp_path / "offline.safetensors"
    ctl = [str(binary("ctl")), "export", "--model", "bn-cnn-checkpoint", "--checkpoint-dir", ",".join(checkpointed_shards.checkpoint_dirs), "--out", str(offline)]
    run = subprocess.run(ctl, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"at version {STEPS} from 2 shards" in run.stdout, run.stdout
    from_shards, from_disk = safetensors.load(str(live)), safetensors_torch.load_file(str(offline))
    assert list(from_disk) == list(from_shards)
    for name, values in from_shards.items():
        assert np.array_equal(from_disk[name].numpy(), values), name
    restored = SmallCnn()
    restored.load_state_dict(from_disk)
    _assert_state(restored.state_dict(), nets[0].state_dict(), "restored from the checkpoints")

    missing = subprocess.run(ctl[:-4] + ["--checkpoint-dir", checkpointed_shards.checkpoint_dirs[0], "--out", str(offline)], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "shards [1] are missing" in missing.stderr, missing.stderr
