"""Connections to every shard of a cluster and the calls on one model.

The contract is the README's "Writing a client in another language"; this
module follows it step by step: shard headers and tokens on every call, the
layout from the servers, blocks routed to their shards in chunks of at most
2 MiB, the model's epoch in every push and pull, idempotent retries of
transient failures, and the error kinds turned into typed exceptions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import grpc
import numpy as np

from . import codec, local, safetensors, wire
from .shards import expand_shards
from .v1 import paramserver_pb2 as pb
from .v1 import paramserver_pb2_grpc as pb_grpc

#: Largest message either side accepts (a 4 MiB chunk plus framing).
MAX_MESSAGE_BYTES = 5 << 20
#: Payload bytes of one push stream at most; a larger push is split by blocks.
PUSH_STREAM_BYTES = 256 << 20

T = TypeVar("T")

_PUSH_METHOD = local.PUSH_METHOD
_PULL_METHOD = local.PULL_METHOD

_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}

_log = logging.getLogger("paramserver")


class ServerError(Exception):
    """An RPC failed: the gRPC `code`, the shard's `message`, and its error `kind` (``ps-error``) if any."""

    def __init__(self, shard: int, code: grpc.StatusCode, message: str, kind: Optional[str] = None, trailers=None):
        self.shard = shard
        self.code = code
        self.message = message
        self.kind = kind
        self.trailers = dict(trailers or {})
        label = f" [{kind}]" if kind else ""
        super().__init__(f"shard {shard}: {code.name}{label}: {message}")


class RolledBack(ServerError):
    """The model was rolled back to a checkpoint: continue from `resume_version` under `epoch`."""

    def __init__(self, shard, code, message, kind, trailers):
        super().__init__(shard, code, message, kind, trailers)
        self.epoch = int(self.trailers.get("ps-epoch", 0))
        self.resume_version = int(self.trailers.get("ps-resume-version", 0))


class LayoutChanged(ServerError):
    """An online reshard changed the cluster's shard list: `shards` is the new one.
    `Model.follow_new_layout` opens the model there; the step that failed is redone on it."""

    def __init__(self, shard, code, message, kind, trailers):
        super().__init__(shard, code, message, kind, trailers)
        self.shards = [s for s in str(self.trailers.get("ps-shards", "")).split(",") if s]


def _error(shard: int, error: grpc.RpcError) -> ServerError:
    trailers = {k: v for k, v in (error.trailing_metadata() or ())}
    kind = trailers.get("ps-error")
    cls = {"epoch-changed": RolledBack, "layout-changed": LayoutChanged}.get(kind, ServerError)
    return cls(shard, error.code(), error.details() or "", kind, trailers)


#: How often a request held by an online reshard is tried again.
_RESHARDING_POLL_S = 0.05


def _resharding(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.UNAVAILABLE and any(
        k == "ps-error" and v == "resharding" for k, v in (error.trailing_metadata() or ())
    )


def _transient(error: grpc.RpcError) -> bool:
    if error.code() in _TRANSIENT:
        return True
    # A shard that stops or dies resets its open streams: INTERNAL from the transport
    # (gRPC core says "RST_STREAM"), not the shard's own INTERNAL, which is never retried.
    details = error.details() or ""
    if error.code() == grpc.StatusCode.INTERNAL and ("RST_STREAM" in details or details.startswith("h2 protocol error")):
        return True
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return any(k == "ps-error" and v == "busy" for k, v in (error.trailing_metadata() or ()))
    return False


@dataclass
class Tls:
    """TLS to the shards: the CA that signed them, and a client certificate for mutual TLS."""

    ca_pem: bytes
    cert_pem: Optional[bytes] = None
    key_pem: Optional[bytes] = None
    domain: Optional[str] = None

    @classmethod
    def from_files(cls, ca: str, cert: Optional[str] = None, key: Optional[str] = None, domain: Optional[str] = None) -> "Tls":
        """Reads the PEM files."""

        def read(path: Optional[str]) -> Optional[bytes]:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return cls(read(ca), read(cert), read(key), domain)


@dataclass
class Joined:
    """What JoinWorker answered: the rank, where to start, the lease."""

    rank: int
    version: int
    lease_s: float


@dataclass
class PushSummary:
    """Blocks a push counted, found already counted, and whose update it ran; payload bytes sent."""

    accepted: int = 0
    duplicate: int = 0
    updated: int = 0
    bytes: int = 0


class Client:
    """Connections to every shard of a cluster, in the servers' `--shards` order."""

    def __init__(
        self,
        shards: Sequence[str],
        token: Optional[str] = None,
        admin_token: Optional[str] = None,
        tls: Optional[Tls] = None,
        attempts: int = 20,
        backoff_s: float = 0.1,
        local_mode: Optional[str] = None,
    ):
        """`local_mode` says how shards on this host that serve a local channel
        (server --local-dir) are reached: "segments" (shared memory and a Unix
        socket, the default), "socket" (gRPC over the Unix socket) or "off";
        None reads PS_LOCAL."""
        if not shards:
            raise ValueError("a client needs at least one shard address")
        self.local_mode = local_mode or os.environ.get("PS_LOCAL", "segments")
        if self.local_mode not in local.MODES:
            raise ValueError(f"local_mode must be one of {local.MODES}, not {self.local_mode!r}")
        self.shards = expand_shards(shards)
        # What another Client of this one's settings needs (`on_shards`).
        self._settings = dict(
            token=token, admin_token=admin_token, tls=tls, attempts=attempts, backoff_s=backoff_s, local_mode=self.local_mode
        )
        self.attempts = attempts
        self.backoff_s = backoff_s
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self._channels = []
        for address in self.shards:
            if tls is None:
                channel = grpc.insecure_channel(address, options=options)
            else:
                credentials = grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem)
                tls_options = options + ([("grpc.ssl_target_name_override", tls.domain)] if tls.domain else [])
                channel = grpc.secure_channel(address, credentials, options=tls_options)
            self._channels.append(channel)
        self._stubs = [pb_grpc.ParameterServerStub(c) for c in self._channels]
        # The bulk calls with hand-encoded messages (see `wire`): pushes send bytes, pulls receive them.
        self._raw_push = [
            c.stream_unary(_PUSH_METHOD, request_serializer=None, response_deserializer=pb.PushGradientsResponse.FromString)
            for c in self._channels
        ]
        self._raw_pull = [
            c.unary_stream(_PULL_METHOD, request_serializer=pb.PullWeightsRequest.SerializeToString, response_deserializer=None)
            for c in self._channels
        ]
        # One pool for the calls that go to several shards at once: threads made per
        # call cost more than a small model's whole step.
        self._pool = ThreadPoolExecutor(4 * len(self.shards) + 4, thread_name_prefix="paramserver")
        count = str(len(self.shards))
        self._metadata = [self._headers(token, i, count) for i in range(len(self.shards))]
        self._admin_metadata = [self._headers(admin_token or token, i, count) for i in range(len(self.shards))]
        self._options = options
        self._local_token = token or admin_token
        # Per shard: None until asked, then a LocalShard, or False for the network.
        self._reach: List[object] = [None] * len(self.shards)
        self._reach_lock = threading.Lock()

    def local_shard(self, shard: int) -> Optional[local.LocalShard]:
        """The shard's local channel when this client can use it (found out on the first call)."""
        if self.local_mode == "off":
            return None
        with self._reach_lock:
            known = self._reach[shard]
            if known is not None:
                return known or None
            try:
                status = self._stubs[shard].GetStatus(pb.GetStatusRequest(), metadata=self._metadata[shard], timeout=10)
            except grpc.RpcError as error:
                if not _transient(error):
                    self._reach[shard] = False
                return None  # a shard that did not answer is asked again next time
            reach: object = False
            if status.HasField("local"):
                try:
                    found = local.LocalShard(status.local, self._local_token, self._options, self.local_mode == "segments")
                    again = found.stub.GetStatus(pb.GetStatusRequest(), metadata=self._metadata[shard], timeout=10)
                    if again.local.instance == found.instance:
                        reach = found
                    else:
                        found.close()
                except (local.NotLocal, grpc.RpcError) as error:
                    _log.debug("shard %d reached over the network: %s", shard, error)
            self._reach[shard] = reach
            return reach or None

    def local_channel(self, shard: int) -> Optional[str]:
        """"segments" or "socket" once the shard is reached through its local channel, else None."""
        reach = self._reach[shard]
        if not reach:
            return None
        return "segments" if reach.segments else "socket"

    def _leave_local(self, shard: int, why: str) -> None:
        _log.warning("shard %d: local channel given up, back to the network: %s", shard, why)
        with self._reach_lock:
            self._reach[shard] = False

    def _stub(self, shard: int):
        reach = self._reach[shard]
        return reach.stub if reach else self._stubs[shard]

    def _bulk(self, shard: int):
        """The raw push and pull callables of a shard, over its Unix socket when it is local."""
        reach = self._reach[shard]
        if reach:
            return reach.raw_push, reach.raw_pull
        return self._raw_push[shard], self._raw_pull[shard]

    @staticmethod
    def _headers(token: Optional[str], index: int, count: str) -> List[Tuple[str, str]]:
        headers = [("ps-shard-index", str(index)), ("ps-shard-count", count)]
        if token:
            headers.append(("authorization", f"Bearer {token}"))
        return headers

    def on_shards(self, shards: Sequence[str]) -> "Client":
        """A client with this one's tokens, TLS and retries for another shard list
        (the one an online reshard moved the cluster to)."""
        return Client(shards, **self._settings)

    def close(self) -> None:
        """Closes every connection."""
        self._pool.shutdown(wait=False)
        for channel in self._channels:
            channel.close()
        for reach in self._reach:
            if reach:
                reach.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_shards(self) -> int:
        """Shards in the cluster."""
        return len(self.shards)

    def call(self, shard: int, method: str, request, admin: bool = False, timeout: Optional[float] = None, retry: bool = True):
        """Calls one unary RPC on one shard, retrying transient failures with backoff (doubling up to 2 s)."""
        metadata = (self._admin_metadata if admin else self._metadata)[shard]
        stub = getattr(self._stub(shard), method)
        return self._retry(shard, lambda: stub(request, metadata=metadata, timeout=timeout), retry)

    def stream(self, shard: int, method: str, messages: Callable[[], Iterable], admin: bool = False, retry: bool = True):
        """Calls one client-streaming RPC; `messages` makes a fresh iterator for every attempt."""
        metadata = (self._admin_metadata if admin else self._metadata)[shard]
        stub = getattr(self._stub(shard), method)
        return self._retry(shard, lambda: stub(messages(), metadata=metadata), retry)

    def _retry(self, shard: int, attempt: Callable[[], T], retry: bool) -> T:
        delay, n = self.backoff_s, 1
        while True:
            try:
                return attempt()
            except grpc.RpcError as error:
                if retry and _resharding(error):
                    # Held at a step boundary while an online reshard moves blocks: for as long
                    # as the move takes (the shards end the hold themselves if it is abandoned).
                    time.sleep(_RESHARDING_POLL_S)
                    continue
                if not (retry and _transient(error) and n < self.attempts):
                    raise _error(shard, error) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                n += 1

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Waits until every shard answers GetStatus."""
        deadline = time.monotonic() + timeout_s
        for shard in range(self.num_shards):
            while True:
                try:
                    self.call(shard, "GetStatus", pb.GetStatusRequest(), retry=False, timeout=2.0)
                    break
                except ServerError as error:
                    if error.code not in _TRANSIENT and error.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def status(self, model: str = "") -> List[pb.GetStatusResponse]:
        """Every shard's status (models, versions, workers, limits), in shard order."""
        return [self.call(s, "GetStatus", pb.GetStatusRequest(model=model)) for s in range(self.num_shards)]

    def plan_layout(self, spec: pb.ModelSpec) -> pb.Layout:
        """The layout the servers would give `spec`, without registering it."""
        return self.call(0, "PlanLayout", pb.PlanLayoutRequest(spec=spec))

    def register(self, spec: pb.ModelSpec, values: Optional[Mapping[str, np.ndarray]] = None) -> "Model":
        """Registers `spec` on every shard with the initial values of its PROVIDED
        tensors (each block sent to the shard that owns it). An identical spec
        registered before is not an error. Needs the admin token when the shards have one."""
        values = dict(values or {})
        provided = {t.name for t in spec.tensors if t.init.kind == pb.INIT_KIND_PROVIDED}
        unknown = set(values) - {t.name for t in spec.tensors}
        if unknown:
            raise KeyError(f"values for tensors the spec does not have: {sorted(unknown)}")
        missing = provided - set(values)
        if missing:
            raise KeyError(f"PROVIDED tensors need initial values: {sorted(missing)}")
        shapes = {t.name: tuple(t.shape) for t in spec.tensors}
        flat = {name: _flat(name, values[name], shapes[name]) for name in provided}
        per_shard: List[List[Tuple[str, pb.BlockPlacement]]] = [[] for _ in range(self.num_shards)]
        if provided:
            for block in self.plan_layout(spec).blocks:
                if block.tensor in provided:
                    per_shard[block.shard].append((block.tensor, block))

        def messages(shard: int) -> Callable[[], Iterator[pb.RegisterModelRequest]]:
            def make() -> Iterator[pb.RegisterModelRequest]:
                yield pb.RegisterModelRequest(spec=spec)
                for name, block in per_shard[shard]:
                    start, end = codec.block_range(block)
                    for chunk in codec.chunks(name, block.block, flat[name][start:end], codec.F32):
                        yield pb.RegisterModelRequest(values=chunk)

            return make

        replies = list(self._pool.map(lambda s: self.stream(s, "RegisterModel", messages(s), admin=True), range(self.num_shards)))
        return Model(self, replies[0].layout)

    def model(self, name: str) -> "Model":
        """Opens a registered model by name: once every shard that holds blocks of it has it
        (a registration reaches the shards one by one; before that, unknown-model)."""
        layout = self.call(0, "GetLayout", pb.GetLayoutRequest(model=name))
        for shard in sorted({block.shard for block in layout.blocks} - {0}):
            self.call(shard, "GetLayout", pb.GetLayoutRequest(model=name))
        return Model(self, layout)

    def checkpoint(self, model: str, wait: bool = True, timeout_s: float = 60.0) -> pb.CheckpointResponse:
        """Asks for a checkpoint of `model` on every shard at one version (admin token)."""
        request = pb.CheckpointRequest(model=model, wait=wait, timeout_ms=int(timeout_s * 1000))
        return self.call(0, "Checkpoint", request, admin=True)


def _flat(name: str, array, shape: Tuple[int, ...]) -> np.ndarray:
    """`array` as a contiguous f32 vector of the tensor's size, refusing another shape or a non-float dtype."""
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"tensor '{name}': values must be numbers, got dtype {array.dtype}")
    expected = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if array.size != expected or (array.ndim > 1 and tuple(array.shape) != tuple(shape)):
        raise ValueError(f"tensor '{name}' has shape {tuple(shape)} ({expected} elements), got {tuple(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1)


@dataclass
class _Tensor:
    name: str
    shape: Tuple[int, ...]
    size: int
    # The encoding pushes use: its group's first push encoding.
    encoding: int
    # Every push encoding its group accepts (a push may name another than the first).
    encodings: Tuple[int, ...] = ()
    # Steps before this one go as f32 (a 1-bit group's warm-up, from its layout).
    full_precision_steps: int = 0
    blocks: List[pb.BlockPlacement] = field(default_factory=list)
    # A module buffer (its group's optimizer is BufferConfig): values, not gradients, are pushed.
    buffer: bool = False
    # How its values are synchronised (pb.BUFFER_SYNC_*), for a buffer.
    buffer_sync: int = pb.BUFFER_SYNC_BROADCAST


class Model:
    """One registered model: membership, pushes and pulls, routed by its layout."""

    def __init__(self, client: Client, layout: pb.Layout):
        self.client = client
        self.layout = layout
        self.name = layout.model
        self.epoch = layout.epoch
        groups = {g.name: g for g in layout.groups}
        self.tensors: Dict[str, _Tensor] = {}
        for t in layout.tensors:
            shape = tuple(int(d) for d in t.shape)
            size = int(np.prod(shape, dtype=np.int64)) if shape else 1
            group = groups.get(t.group)
            encodings = tuple(group.push_encodings) if group is not None and group.push_encodings else (codec.F32,)
            buffer, sync = (group.buffers, group.buffer_sync) if group is not None else (False, pb.BUFFER_SYNC_BROADCAST)
            warm = group.full_precision_steps if group is not None else 0
            self.tensors[t.name] = _Tensor(t.name, shape, size, encodings[0], encodings, warm, buffer=buffer, buffer_sync=sync)
        for block in layout.blocks:
            self.tensors[block.tensor].blocks.append(block)
        self.shards_with_blocks = sorted({b.shard for b in layout.blocks})
        # Per worker heart-beating through this handle: what stops it, and its lease.
        self._heartbeats: Dict[str, Tuple[threading.Event, float]] = {}
        # Local channel, per shard: the push segment (fd, id, size) and the weights segment (fd, id).
        self._push_segments: Dict[int, Tuple[int, str, int]] = {}
        self._weights: Dict[int, Tuple[int, str]] = {}
        # Steps of the model skipped because a worker's gradient overflowed, as of the last pull.
        self.overflow_steps = 0
        # The lowest and highest block version the last pull read (they differ when a step
        # completed on some blocks while the pull read others).
        self.pulled_versions = (0, 0)
        self._segment_locks = {shard: threading.Lock() for shard in range(client.num_shards)}

    @property
    def max_grad_norm(self) -> float:
        """The global norm this client clips its own gradient to before pushing (0: none);
        with the default GRAD_CLIP_MEAN in sync mode the shards clip the mean instead."""
        return self.layout.max_grad_norm

    # Membership.

    def join(self, worker: str, rank: Optional[int] = None) -> Joined:
        """Joins on shard 0, then on every other shard with the rank shard 0 gave."""
        first = self.client.call(0, "JoinWorker", pb.JoinWorkerRequest(model=self.name, worker_id=worker, rank=rank))
        versions = [first.version] if 0 in self.shards_with_blocks else []
        for shard in range(1, self.client.num_shards):
            reply = self.client.call(shard, "JoinWorker", pb.JoinWorkerRequest(model=self.name, worker_id=worker, rank=first.rank))
            if shard in self.shards_with_blocks:
                versions.append(reply.version)
        return Joined(first.rank, min(versions) if versions else 0, first.lease_ms / 1000.0)

    def heartbeat(self, worker: str) -> None:
        """Renews the lease on every shard."""
        for shard in range(self.client.num_shards):
            self.client.call(shard, "Heartbeat", pb.HeartbeatRequest(model=self.name, worker_id=worker))

    def start_heartbeat(self, worker: str, lease_s: float) -> None:
        """Heartbeats every shard every third of the lease, each shard in a daemon thread of its own
        (a shard that is down does not hold up the others' beats), until `leave`."""
        stop = threading.Event()
        self._heartbeats[worker] = (stop, lease_s)
        period = lease_s / 3
        request = pb.HeartbeatRequest(model=self.name, worker_id=worker)

        def beat(shard: int) -> None:
            pause, retry = period, 0.1
            while not stop.wait(pause):
                try:
                    self.client.call(shard, "Heartbeat", request, timeout=period, retry=False)
                    pause, retry = period, 0.1
                except (ServerError, grpc.RpcError):
                    # Soon, not a whole period later: a beat lost to a short cut and the next one
                    # lost to another would cost the lease. The next push rejoins if it was lost.
                    pause, retry = min(retry, period / 4), retry * 2

        for shard in range(self.client.num_shards):
            threading.Thread(target=beat, args=(shard,), name=f"heartbeat-{worker}-{shard}", daemon=True).start()

    def follow_new_layout(self, moved: LayoutChanged) -> "Model":
        """After `LayoutChanged`: this model on the cluster's new shard list, through a
        new Client with this one's settings. The workers that joined through this handle
        are members there already (the shards carry them over, with their ranks); their
        heartbeats move to the new handle. Redo the call that failed on it."""
        model = self.client.on_shards(moved.shards).model(self.name)
        model.epoch = max(model.epoch, self.epoch)
        for worker, (stop, lease_s) in list(self._heartbeats.items()):
            stop.set()
            model.start_heartbeat(worker, lease_s)
        self._heartbeats.clear()
        _log.info("model %s: the shard list changed (online reshard) from %d to %d shards; continuing on the new one",
                  self.name, self.client.num_shards, model.client.num_shards)
        return model

    def leave(self, worker: str) -> None:
        """Stops the heartbeats and leaves every shard, so no step waits for the lease to run out."""
        beating = self._heartbeats.pop(worker, None)
        if beating:
            beating[0].set()
        first_error = None
        for shard in range(self.client.num_shards):
            try:
                self.client.call(shard, "LeaveWorker", pb.LeaveWorkerRequest(model=self.name, worker_id=worker))
            except ServerError as error:
                # unknown-worker: a peer's drop got there first. Either way, go on to the other shards.
                if error.kind != "unknown-worker" and first_error is None:
                    first_error = error
        if first_error is not None:
            raise first_error

    # Pushes.

    def _check_grads(self, grads: Mapping[str, object]) -> Dict[str, Optional[np.ndarray]]:
        unknown = set(grads) - set(self.tensors)
        if unknown:
            raise KeyError(f"model '{self.name}' has no tensor {sorted(unknown)[0]!r}")
        missing = set(self.tensors) - set(grads)
        if missing:
            raise KeyError(f"a push needs every tensor; missing {sorted(missing)}")
        return {name: None if grads[name] is None else _flat(name, grads[name], self.tensors[name].shape) for name in self.tensors}

    def push(self, worker: str, step: int, grads: Mapping[str, object], lr_scale: Optional[float] = None) -> PushSummary:
        """Pushes one step's gradients of every tensor to the shards that own them,
        in each group's first push encoding; None for a tensor without a gradient
        this step (see `push_tensors`). `lr_scale` multiplies the learning rate of
        this step's update (every worker of a step must give the same; None is 1).
        A failed push may be retried as is."""
        return self.push_tensors(worker, step, self._check_grads(grads), lr_scale)

    def push_overflow(self, worker: str, step: int, lr_scale: Optional[float] = None) -> PushSummary:
        """Says this worker's gradient of `step` holds inf or NaN (mixed precision's loss scale
        overflowed): every block is pushed as ENCODING_OVERFLOW, and the shards skip the step for
        every worker, as GradScaler skips optimizer.step(). The next pull's `overflow_steps` grows."""
        return self.push_tensors(worker, step, {name: None for name in self.tensors}, lr_scale, overflow=True)

    def push_tensors(
        self,
        worker: str,
        step: int,
        flat: Mapping[str, Optional[np.ndarray]],
        lr_scale: Optional[float] = None,
        overflow: bool = False,
        encodings: Optional[Mapping[str, int]] = None,
    ) -> PushSummary:
        """Pushes some tensors (flat f32, whole) of one step: their blocks are a valid part of the step.
        The PyTorch integration pushes buckets of tensors this way as backward produces them.
        A tensor given as None has no gradient in this step (frozen, or unused by the step's
        forward pass): its blocks are pushed as ENCODING_NO_GRADIENT, which leaves them as they
        are when no worker of the step has a gradient for them, as torch.optim does.
        `encodings` names, per tensor, another of its group's push encodings than the first
        (e.g. f32 during the full-precision warm-up of a 1-bit group)."""
        chosen = {name: self._pushed_as(name, (encodings or {}).get(name)) for name in flat}
        streams: Dict[int, List[List[Tuple[_Tensor, pb.BlockPlacement]]]] = {}
        sizes: Dict[int, int] = {}
        total = 0
        for name, values in flat.items():
            tensor = chosen[name]
            encoding = (codec.OVERFLOW if overflow else codec.NO_GRADIENT) if values is None else tensor.encoding
            for block in tensor.blocks:
                nbytes = codec.payload_len(encoding, block.length)
                shard_streams = streams.setdefault(block.shard, [])
                if not shard_streams or sizes[block.shard] + nbytes > PUSH_STREAM_BYTES:
                    shard_streams.append([])
                    sizes[block.shard] = 0
                shard_streams[-1].append((tensor, block))
                sizes[block.shard] += nbytes
                total += nbytes
        scales = {
            name: (codec.mean_abs(values) if values is not None and chosen[name].encoding == codec.SIGN1 else 0.0)
            for name, values in flat.items()
        }

        # What a block without values goes as: no gradient, or the step's overflow.
        empty = codec.OVERFLOW if overflow else codec.NO_GRADIENT

        def messages(blocks: List[Tuple[_Tensor, pb.BlockPlacement]]) -> Callable[[], Iterator[bytes]]:
            def make() -> Iterator[bytes]:
                for tensor, block in blocks:
                    if flat[tensor.name] is None:
                        parts = wire.tensor_chunk_parts(tensor.name, block.block, 0, block.length, empty, b"", 0.0)
                        yield wire.gradient_chunk(self.name, worker, step, self.epoch, parts, lr_scale)
                        continue
                    start, end = codec.block_range(block)
                    for offset, length, payload in codec.payloads(flat[tensor.name][start:end], tensor.encoding):
                        parts = wire.tensor_chunk_parts(tensor.name, block.block, offset, length, tensor.encoding, payload, scales[tensor.name])
                        yield wire.gradient_chunk(self.name, worker, step, self.epoch, parts, lr_scale)

            return make

        def send(shard: int, blocks) -> pb.PushGradientsResponse:
            metadata = self.client._metadata[shard]
            return self.client._retry(shard, lambda: self.client._bulk(shard)[0](messages(blocks)(), metadata=metadata), True)

        def send_shard(shard: int) -> List[pb.PushGradientsResponse]:
            found = self.client.local_shard(shard)
            if found is not None and found.segments:
                blocks = [pair for stream in streams[shard] for pair in stream]
                try:
                    return self._push_local(found, shard, blocks, flat, scales, worker, step, lr_scale, empty)
                except local.NotLocal as error:
                    self.client._leave_local(shard, str(error))
            return list(self.client._pool.map(lambda blocks: send(shard, blocks), streams[shard]))

        summary = PushSummary(bytes=total)
        for replies in self.client._pool.map(send_shard, list(streams)):
            for reply in replies:
                summary.accepted += reply.blocks_accepted
                summary.duplicate += reply.blocks_duplicate
                summary.updated += reply.blocks_updated
        return summary

    def _pushed_as(self, name: str, encoding: Optional[int]) -> _Tensor:
        """The tensor as this push sends it: in `encoding` if given (one its group accepts)."""
        tensor = self.tensors[name]
        if encoding is None or encoding == tensor.encoding:
            return tensor
        if encoding not in tensor.encodings:
            accepted = ", ".join(pb.Encoding.Name(e) for e in tensor.encodings)
            raise ValueError(f"'{name}' cannot be pushed as {pb.Encoding.Name(encoding)}: its group accepts {accepted}")
        return dataclasses.replace(tensor, encoding=encoding)

    def _push_local(
        self, found: local.LocalShard, shard: int, blocks, flat, scales, worker: str, step: int, lr_scale: Optional[float], empty: int
    ) -> List[pb.PushGradientsResponse]:
        """Writes the shard's payloads into this model's segment there and names them in PushLocal calls."""
        with self._segment_locks[shard]:
            planned = []
            size = 0
            for tensor, block in blocks:
                if flat[tensor.name] is None:
                    header = pb.TensorChunk(tensor=tensor.name, block=block.block, offset=0, length=block.length, encoding=empty)
                    planned.append((pb.LocalChunk(chunk=header, segment_offset=size, payload_bytes=0), b""))
                    continue
                start, end = codec.block_range(block)
                for offset, length, payload in codec.payloads(flat[tensor.name][start:end], tensor.encoding):
                    nbytes = codec.payload_len(tensor.encoding, length)
                    header = pb.TensorChunk(
                        tensor=tensor.name, block=block.block, offset=offset, length=length, encoding=tensor.encoding, scale=scales[tensor.name]
                    )
                    planned.append((pb.LocalChunk(chunk=header, segment_offset=size, payload_bytes=nbytes), payload))
                    size += nbytes
            segment = self._push_segments.get(shard)
            if segment is None or segment[2] < size:
                if segment is not None:
                    os.close(segment[0])
                    del self._push_segments[shard]
                capacity = max(1 << 20, -(-size // (1 << 20)) * (1 << 20))
                fd, segment_id = found.attach(capacity)
                segment = self._push_segments[shard] = (fd, segment_id, capacity)
            fd, segment_id, _ = segment
            for local_chunk, payload in planned:
                if local_chunk.payload_bytes and os.pwrite(fd, payload, local_chunk.segment_offset) != local_chunk.payload_bytes:
                    raise local.NotLocal("a short write into the push segment")
            requests: List[pb.LocalPushRequest] = []
            request_bytes = 0
            for local_chunk, _ in planned:
                if not requests or request_bytes + local_chunk.payload_bytes > PUSH_STREAM_BYTES or len(requests[-1].chunks) >= 16384:
                    requests.append(pb.LocalPushRequest(model=self.name, worker_id=worker, step=step, epoch=self.epoch, segment=segment_id, lr_scale=lr_scale))
                    request_bytes = 0
                requests[-1].chunks.append(local_chunk)
                request_bytes += local_chunk.payload_bytes
            metadata = self.client._metadata[shard]
            try:
                return [self.client._retry(shard, lambda r=r: found.stub.PushLocal(r, metadata=metadata), True) for r in requests]
            except ServerError as error:
                if error.code == grpc.StatusCode.NOT_FOUND and error.message.startswith("segment '"):
                    os.close(fd)
                    del self._push_segments[shard]
                    raise local.NotLocal(error.message) from None
                raise

    # Pulls.

    def pull(
        self,
        min_version: int,
        out: Optional[Dict[str, np.ndarray]] = None,
        timeout_s: float = 60.0,
        encoding: int = codec.F32,
        part: int = pb.WEIGHT_PART_PARAMETERS,
    ) -> Tuple[int, Dict[str, np.ndarray]]:
        """Waits until every block reaches `min_version` and reads the weights into
        `out` (arrays of the tensors' shapes, f32, C-contiguous, written in place;
        new ones when absent). Returns the lowest block version read and the arrays.
        `part=pb.WEIGHT_PART_CONTROL_VARIATE` reads SCAFFOLD's global control variate instead."""
        out = {} if out is None else out
        for name, tensor in self.tensors.items():
            array = out.get(name)
            if array is None:
                out[name] = np.empty(tensor.shape, dtype=np.float32)
            elif array.dtype != np.float32 or array.size != tensor.size or not array.flags.c_contiguous:
                raise ValueError(f"tensor '{name}': pull into a C-contiguous float32 array of shape {tensor.shape}")
        flat = {name: array.reshape(-1) for name, array in out.items() if name in self.tensors}
        request = pb.PullWeightsRequest(
            model=self.name, min_version=min_version, timeout_ms=int(timeout_s * 1000), encoding=encoding, epoch=self.epoch, part=part
        )
        # Each block read: its version and its count of overflow skips, from every shard's thread.
        read_blocks: List[Tuple[int, int]] = []

        def read(shard: int) -> int:
            found = self.client.local_shard(shard) if encoding == codec.F32 and part == pb.WEIGHT_PART_PARAMETERS else None
            if found is not None and found.segments:
                try:
                    lowest = self._pull_local(found, shard, request, flat, read_blocks)
                    if lowest is not None:
                        return lowest
                except local.NotLocal as error:
                    self.client._leave_local(shard, str(error))

            def attempt() -> int:
                lowest = None
                for raw in self.client._bulk(shard)[1](request, metadata=self.client._metadata[shard]):
                    chunk = wire.parse_weight_chunk(raw)
                    block = self._block(chunk.tensor, chunk.block)
                    if chunk.offset + chunk.length > block.length:
                        raise ValueError(f"a shard sent elements past the end of tensor '{chunk.tensor}' block {chunk.block}")
                    start = block.offset + chunk.offset
                    codec.decode_into(chunk.encoding, chunk.payload, chunk.scale, flat[chunk.tensor][start : start + chunk.length])
                    lowest = chunk.version if lowest is None else min(lowest, chunk.version)
                    read_blocks.append((chunk.version, chunk.overflow_steps))
                return lowest if lowest is not None else min_version

            return self.client._retry(shard, attempt, True)

        versions = list(self.client._pool.map(read, self.shards_with_blocks))
        if part == pb.WEIGHT_PART_PARAMETERS and read_blocks:
            self.overflow_steps = max(overflow for _, overflow in read_blocks)
        if read_blocks:
            self.pulled_versions = (min(v for v, _ in read_blocks), max(v for v, _ in read_blocks))
        return (min(versions) if versions else min_version), out

    def _pull_local(self, found: local.LocalShard, shard: int, request: pb.PullWeightsRequest, flat, read_blocks: List[Tuple[int, int]]) -> Optional[int]:
        """Reads a shard's published blocks straight into `flat`; None when the shard kept
        rewriting the slot while it was read (then the caller pulls over gRPC)."""
        ask = pb.LocalPullRequest(model=self.name, min_version=request.min_version, timeout_ms=request.timeout_ms, epoch=self.epoch)
        metadata = self.client._metadata[shard]
        for _ in range(4):
            try:
                reply = self.client._retry(shard, lambda: found.stub.PullLocal(ask, metadata=metadata), True)
            except ServerError as error:
                if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise local.NotLocal(error.message) from None  # no room for the weights segment: gRPC needs none
                raise
            with self._segment_locks[shard]:
                weights = self._weights.get(shard)
                if weights is None or weights[1] != reply.segment:
                    if weights is not None:
                        os.close(weights[0])
                        del self._weights[shard]
                    weights = found.open_weights(self.name)
                    self._weights[shard] = weights
                    if weights[1] != reply.segment:
                        raise local.NotLocal(f"the shard published segment {reply.segment} but opened {weights[1]}")
            fd = weights[0]
            for published in reply.blocks:
                block = self._block(published.tensor, published.block)
                if block.shard != shard or block.length != published.length:
                    raise ValueError(f"shard {shard} published tensor '{published.tensor}' block {published.block} at another place or size")
                target = flat[published.tensor][block.offset : block.offset + block.length]
                if os.preadv(fd, [memoryview(target).cast("B")], published.offset) != 4 * block.length:
                    raise local.NotLocal("the weights segment ended early")
            # The values were read before the sequence number: a rewrite that overlapped them has moved it.
            if local.read_sequence(fd, reply.slot) == reply.sequence:
                read_blocks.extend((b.version, b.overflow_steps) for b in reply.blocks)
                return min((b.version for b in reply.blocks), default=request.min_version)
        return None

    def state_dict(self, min_version: int = 0, timeout_s: float = 60.0, attempts: int = 5) -> Tuple[int, Dict[str, np.ndarray]]:
        """Every tensor of the model (weights and buffers) in its own shape, every block at
        one version (at least `min_version`): that version, and the arrays by name. While
        workers train, a step may complete on some blocks during the read; the read is then
        repeated at the newest version seen, up to `attempts` times, and a model that keeps
        moving raises (pause the workers, or export a checkpoint with `ctl export`)."""
        for _ in range(attempts):
            _, arrays = self.pull(min_version, timeout_s=timeout_s)
            lowest, highest = self.pulled_versions
            if lowest == highest:
                return lowest, arrays
            min_version = highest
        raise RuntimeError(
            f"model '{self.name}' moved on while it was read ({attempts} reads, the last one found blocks at versions "
            f"{lowest} to {highest}); pause its workers, or export a checkpoint with `ctl export`"
        )

    def export(self, path: str, min_version: int = 0, timeout_s: float = 60.0) -> int:
        """Writes `state_dict()` as a safetensors file (f32, the spec's shapes), which
        `safetensors.torch.load_file` reads and `load_state_dict` takes; returns the version."""
        version, arrays = self.state_dict(min_version, timeout_s)
        safetensors.save(arrays, path, {"model": self.name, "version": str(version)})
        return version

    # Federated rounds (README, "Writing a client in another language", step 7).

    def round_task(self, client_id: int, after_round: int, timeout_s: float = 60.0) -> pb.RoundTask:
        """The next round after `after_round` for one federated client (long poll on shard 0):
        whether it is selected, the round's lr, `last_included_round`, `finished`."""
        request = pb.GetRoundTaskRequest(model=self.name, client=client_id, after_round=after_round, timeout_ms=int(timeout_s * 1000), epoch=self.epoch)
        return self.client.call(0, "GetRoundTask", request)

    def push_round_update(
        self,
        client_id: int,
        round: int,
        deltas: Mapping[str, object],
        controls: Optional[Mapping[str, object]] = None,
    ) -> PushSummary:
        """One client's update for `round` to every shard that holds blocks: each block's
        delta (w_K - x) and, where the method takes one, its control part, in one stream per shard."""
        flat = self._check_grads(deltas)
        control = self._check_grads(controls) if controls is not None else {}
        per_shard: Dict[int, List[Tuple[_Tensor, pb.BlockPlacement]]] = {}
        for tensor in self.tensors.values():
            for block in tensor.blocks:
                per_shard.setdefault(block.shard, []).append((tensor, block))

        def messages(blocks) -> Callable[[], Iterator[pb.RoundUpdateChunk]]:
            def make() -> Iterator[pb.RoundUpdateChunk]:
                for tensor, block in blocks:
                    start, end = codec.block_range(block)
                    parts = [(pb.ROUND_PART_DELTA, flat)] + ([(pb.ROUND_PART_CONTROL, control)] if control else [])
                    for part, values in parts:
                        for chunk in codec.chunks(tensor.name, block.block, values[tensor.name][start:end], tensor.encoding if tensor.encoding != codec.SIGN1 else codec.F32):
                            yield pb.RoundUpdateChunk(model=self.name, client=client_id, round=round, part=part, chunk=chunk, epoch=self.epoch)

            return make

        summary = PushSummary()
        for reply in self.client._pool.map(lambda item: self.client.stream(item[0], "PushRoundUpdate", messages(item[1])), per_shard.items()):
            summary.accepted += reply.blocks_accepted
            summary.duplicate += reply.blocks_duplicate
        return summary

    def complete_round(self, client_id: int, round: int) -> pb.CompleteRoundResponse:
        """Tells shard 0 the client's update is on every shard; only then does it count."""
        return self.client.call(0, "CompleteRound", pb.CompleteRoundRequest(model=self.name, client=client_id, round=round, epoch=self.epoch))

    def _block(self, tensor: str, index: int) -> pb.BlockPlacement:
        try:
            return self.tensors[tensor].blocks[index]
        except (KeyError, IndexError):
            raise ValueError(f"a shard sent tensor '{tensor}' block {index}, which the layout does not have") from None

    def clip(self, grads: Mapping[str, Optional[np.ndarray]]) -> float:
        """Scales `grads` in place so their global L2 norm is at most max_grad_norm (None: no
        gradient, and buffers' values, left out); returns the norm before."""
        present = [g for name, g in grads.items() if g is not None and not self.tensors[name].buffer]
        norm = float(np.sqrt(sum(float(np.dot(g.reshape(-1).astype(np.float64), g.reshape(-1).astype(np.float64))) for g in present)))
        limit = self.max_grad_norm
        if limit > 0 and norm > limit:
            scale = np.float32(limit / (norm + 1e-6))  # as the Rust client and torch clip
            for g in present:
                g *= scale
        return norm
