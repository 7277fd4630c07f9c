"""The Python client against two real shards: round trip, sync equivalence
against a local numpy step, encodings, and the mistakes a Python user can make."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import paramserver as ps
from paramserver import codec


def spec_with(name: str, values, optimizer, **kwargs):
    return ps.model_spec(name, values, [ps.group("all", ["*"], optimizer)], **kwargs)


def test_register_layout_push_pull_round_trip(any_shards):
    shards = any_shards
    rng = np.random.default_rng(0)
    values = {"layer.weight": rng.standard_normal((37, 19), dtype=np.float32), "layer.bias": rng.standard_normal(19, dtype=np.float32)}
    client = shards.client()
    model = client.register(spec_with("round-trip", values, ps.sgd(0.5), max_block_elements=100), values)
    assert {b.shard for b in model.layout.blocks} == {0, 1}, "the model spans both shards"
    assert client.register(spec_with("round-trip", values, ps.sgd(0.5), max_block_elements=100), values).name == "round-trip"
    version, pulled = model.pull(0)
    assert version == 0
    for name in values:
        np.testing.assert_array_equal(pulled[name], values[name])
    joined = model.join("py-0")
    assert (joined.rank, joined.version) == (0, 0)
    grads = {name: rng.standard_normal(v.shape, dtype=np.float32) for name, v in values.items()}
    summary = model.push("py-0", 0, grads)
    assert summary.accepted == len(model.layout.blocks) and summary.updated == summary.accepted
    assert model.push("py-0", 0, grads).duplicate == summary.accepted, "a retried push is not counted twice"
    out = {name: np.zeros_like(v) for name, v in values.items()}
    version, same = model.pull(1, out=out)
    assert version == 1 and same is out
    for name in values:
        np.testing.assert_allclose(out[name], values[name] - 0.5 * grads[name], rtol=1e-6, atol=1e-6)
    statuses = client.status("round-trip")
    assert [s.shard_index for s in statuses] == [0, 1] and statuses[0].limits.max_streams > 0
    model.leave("py-0")
    assert [client.local_channel(s) for s in (0, 1)] == (["segments"] * 2 if shards.local else [None, None])


def adamw_step(w, m, v, g, t, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    w *= 1 - lr * wd
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    w -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


def test_two_python_workers_in_sync_equal_a_local_step_on_the_mean_gradient(any_shards):
    shards = any_shards
    rng = np.random.default_rng(1)
    values = {"w": rng.standard_normal((40, 30), dtype=np.float32), "b": rng.standard_normal(30, dtype=np.float32)}
    spec = spec_with("equivalence", values, ps.adamw(0.01, weight_decay=0.1), max_block_elements=256)
    workers = [shards.client(), shards.client()]
    models = [workers[0].register(spec, values), workers[1].register(spec, values)]
    for i, model in enumerate(models):
        model.join(f"py-{i}")
    local = {name: v.astype(np.float64) for name, v in values.items()}
    moments = {name: (np.zeros_like(v), np.zeros_like(v)) for name, v in local.items()}
    for step in range(4):
        grads = [{name: rng.standard_normal(v.shape, dtype=np.float32) for name, v in values.items()} for _ in models]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: models[i].push(f"py-{i}", step, grads[i]), range(2)))
        for name in local:
            mean = (grads[0][name].astype(np.float64) + grads[1][name]) / 2
            adamw_step(local[name], *moments[name], mean, step + 1)
        version, pulled = models[1].pull(step + 1)
        assert version == step + 1
        for name in local:
            np.testing.assert_allclose(pulled[name], local[name], rtol=2e-5, atol=1e-6)
    if shards.local:
        assert [w.local_channel(s) for w in workers for s in (0, 1)] == ["segments"] * 4, "every push and pull went through segments"


def test_half_precision_and_sign_encodings_round_trip_as_the_servers_read_them():
    values = np.array([1.0, -2.5, 3.14159, -0.0001, 65504.0, 1e-8, -7.0], dtype=np.float32)
    out = np.empty_like(values)
    codec.decode_into(codec.BF16, codec.encode(codec.BF16, values), 0.0, out)
    np.testing.assert_allclose(out, values, rtol=2**-8)
    # Round to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 and goes to 1.
    tie = np.array([1 + 2**-8, 1 + 3 * 2**-8], dtype=np.float32)
    codec.decode_into(codec.BF16, codec.encode(codec.BF16, tie), 0.0, out[:2])
    assert list(out[:2]) == [1.0, 1 + 2**-6]
    codec.decode_into(codec.F16, codec.encode(codec.F16, values), 0.0, out)
    np.testing.assert_allclose(out, values.astype(np.float16).astype(np.float32))
    signs = codec.encode(codec.SIGN1, values)
    assert len(signs) == 4 and int.from_bytes(signs, "little") == 0b1001010
    codec.decode_into(codec.SIGN1, signs, 0.5, out)
    assert list(out) == [0.5, -0.5, 0.5, -0.5, 0.5, 0.5, -0.5]


def test_bf16_and_sign_pushes_are_applied_as_the_servers_decode_them(shards):
    values = {"w": np.linspace(-1, 1, 96, dtype=np.float32)}
    client = shards.client()
    groups = [ps.group("signs", ["*"], ps.sgd(0.1), push_encodings=["sign1"])]
    model = client.register(ps.model_spec("signs", values, groups), values)
    model.join("py-0")
    grad = np.where(np.arange(96) % 3 == 0, -2.0, 1.0).astype(np.float32)
    model.push("py-0", 0, {"w": grad})
    _, pulled = model.pull(1)
    scale = np.float32(np.abs(grad).mean())
    np.testing.assert_allclose(pulled["w"], values["w"] - 0.1 * np.sign(grad) * scale, rtol=1e-6)
    halves = {"h": np.ones(10, dtype=np.float32)}
    model = client.register(ps.model_spec("halves", halves, [ps.group("all", ["*"], ps.sgd(1.0), push_encodings=["bf16"])]), halves)
    model.join("py-0")
    model.push("py-0", 0, {"h": np.full(10, 1 + 2**-9, dtype=np.float32)})
    _, pulled = model.pull(1, encoding=ps.BF16)
    np.testing.assert_array_equal(pulled["h"], np.zeros(10, dtype=np.float32))


def test_a_push_may_name_another_encoding_its_group_accepts_and_no_other(shards):
    values = {"w": np.linspace(-1, 1, 96, dtype=np.float32)}
    client = shards.client()
    groups = [ps.group("signs", ["*"], ps.sgd(0.1), push_encodings=["sign1", "f32"])]
    model = client.register(ps.model_spec("warm-signs", values, groups), values)
    model.join("py-0")
    grad = np.linspace(-3, 2, 96, dtype=np.float32)
    with pytest.raises(ValueError, match="cannot be pushed as ENCODING_BF16: its group accepts ENCODING_SIGN1, ENCODING_F32"):
        model.push_tensors("py-0", 0, {"w": grad}, encodings={"w": ps.BF16})
    model.push_tensors("py-0", 0, {"w": grad}, encodings={"w": ps.F32})
    _, pulled = model.pull(1)
    np.testing.assert_allclose(pulled["w"], values["w"] - 0.1 * grad, rtol=1e-6)


def test_mistakes_raise_clear_exceptions_and_change_nothing(any_shards):
    shards = any_shards
    values = {"w": np.ones((4, 3), dtype=np.float32)}
    client = shards.client()
    model = client.register(spec_with("mistakes", values, ps.sgd(0.1)), values)
    model.join("py-0")
    with pytest.raises(ValueError, match=r"tensor 'w' has shape \(4, 3\)"):
        model.push("py-0", 0, {"w": np.ones((3, 4), dtype=np.float32)})
    with pytest.raises(TypeError, match="must be numbers"):
        model.push("py-0", 0, {"w": np.array([["a"] * 3] * 4)})
    with pytest.raises(KeyError, match="no tensor 'bias'"):
        model.push("py-0", 0, {"w": np.ones((4, 3)), "bias": np.ones(3)})
    with pytest.raises(KeyError, match="missing"):
        model.push("py-0", 0, {})
    with pytest.raises(ValueError, match="float32"):
        model.pull(0, out={"w": np.zeros((4, 3), dtype=np.float64)})
    # What only the servers can tell: a step ahead, a NaN, an unknown model.
    with pytest.raises(ps.ServerError) as ahead:
        model.push("py-0", 5, {"w": np.ones((4, 3))})
    assert ahead.value.code == grpc.StatusCode.FAILED_PRECONDITION and ahead.value.kind == "future-step"
    with pytest.raises(ps.ServerError) as nan:
        model.push("py-0", 0, {"w": np.full((4, 3), np.nan)})
    assert nan.value.code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in nan.value.message
    with pytest.raises(ps.ServerError) as unknown:
        client.model("no-such-model")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND and unknown.value.kind == "unknown-model"
    version, pulled = model.pull(0)
    assert version == 0
    np.testing.assert_array_equal(pulled["w"], values["w"])


def test_a_closed_server_raises_unavailable_after_the_retries(shards):
    client = shards.client(attempts=2, backoff_s=0.05)
    shards.stop()
    with pytest.raises(ps.ServerError) as closed:
        client.status()
    assert closed.value.code == grpc.StatusCode.UNAVAILABLE
    assert "shard 0" in str(closed.value)


def test_a_federated_round_of_two_python_clients_applies_the_mean_delta(shards):
    values = {"w": np.linspace(-1, 1, 300, dtype=np.float32).reshape(30, 10)}
    spec = spec_with("fed", values, ps.sgd(1.0), max_block_elements=128)
    spec.mode = ps.pb.CONSISTENCY_MODE_FEDERATED
    spec.federated.CopyFrom(ps.pb.FederatedConfig(algorithm=ps.pb.FEDERATED_ALGORITHM_FEDAVG, clients=2, participation=1.0, client_lr=0.1, local_steps=1, rounds=2))
    client = shards.client()
    model = client.register(spec, values)
    deltas = [{"w": np.full((30, 10), 0.25 * (c + 1), dtype=np.float32)} for c in range(2)]
    for c in range(2):
        task = model.round_task(c, 0)
        assert (task.round, task.selected, task.finished) == (1, True, False)
        _, x = model.pull(task.round - 1)
        np.testing.assert_array_equal(x["w"], values["w"])
        assert model.push_round_update(c, task.round, deltas[c]).accepted == len(model.layout.blocks)
        assert model.complete_round(c, task.round).cohort_size == 2
    version, x = model.pull(1)
    assert version == 1
    np.testing.assert_allclose(x["w"], values["w"] + 0.375, rtol=1e-6)
    with pytest.raises(ps.ServerError) as closed:
        model.push_round_update(0, 1, deltas[0])
    assert closed.value.kind == "round-closed"


def test_hand_encoded_messages_equal_the_generated_ones():
    from paramserver import wire

    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    parts = wire.tensor_chunk_parts("layer.weight", 3, 1024, 3, codec.F32, codec.payload_view(codec.F32, values), 0.0)
    generated = ps.pb.GradientChunk(
        model="m", worker_id="w", step=7, epoch=2,
        chunk=ps.pb.TensorChunk(tensor="layer.weight", block=3, offset=1024, length=3, encoding=codec.F32, payload=values.tobytes()),
    )
    assert ps.pb.GradientChunk.FromString(wire.gradient_chunk("m", "w", 7, 2, parts)) == generated
    for lr_scale in (0.0, 0.375):
        scaled = ps.pb.GradientChunk.FromString(wire.gradient_chunk("m", "w", 7, 2, parts, lr_scale))
        assert scaled.HasField("lr_scale") and scaled.lr_scale == lr_scale
        generated.lr_scale = lr_scale
        assert scaled == generated
    signs = wire.tensor_chunk_parts("t", 0, 0, 3, codec.SIGN1, codec.encode(codec.SIGN1, values), 0.5)
    assert ps.pb.GradientChunk.FromString(wire.gradient_chunk("m", "w", 0, 0, signs)).chunk.scale == 0.5
    pulled = ps.pb.WeightChunk(version=9, checkpoint=True, chunk=generated.chunk).SerializeToString()
    chunk = wire.parse_weight_chunk(pulled)
    assert (chunk.version, chunk.checkpoint, chunk.tensor, chunk.block, chunk.offset, chunk.length) == (9, True, "layer.weight", 3, 1024, 3)
    assert bytes(chunk.payload) == values.tobytes()


def test_shard_ranges_expand_as_the_servers_expand_them():
    from paramserver.client import expand_shards

    assert expand_shards(["ps-{0..2}.ps:50051", "x:1"]) == ["ps-0.ps:50051", "ps-1.ps:50051", "ps-2.ps:50051", "x:1"]
    assert expand_shards(["ps-{0..<3}.ps:50051"]) == expand_shards(["ps-{0..2}.ps:50051"])
    for bad in ["ps-{3..1}:1", "ps-{0..}:1", "p-{0..1}-{0..1}:1", "ps-{0..<0}:1", "ps-{0..<}:1"]:
        with pytest.raises(ValueError):
            expand_shards([bad])


def test_a_state_dict_is_read_at_one_version_or_says_the_model_moved(shards):
    """A step that completed on some blocks only (here: a push of one tensor of two) is
    not read as one state: the read is repeated, and with no attempts left it raises."""
    spec = ps.model_spec("torn", {"a": (4,), "b": (4,)}, [ps.group("all", ["*"], ps.sgd(0.5))])
    model = shards.client().register(spec)
    model.join("w")
    model.push_tensors("w", 0, {"a": np.ones(4, np.float32)})
    with pytest.raises(RuntimeError, match="moved on while it was read"):
        model.state_dict(attempts=1)
    model.push_tensors("w", 0, {"b": np.ones(4, np.float32)})
    version, arrays = model.state_dict()
    assert version == 1 and arrays["a"].tolist() == arrays["b"].tolist() == [-0.5] * 4
