"""PyTorch integration: a module whose backward pass streams its gradients to
the shards while it is still running, and whose parameters are refreshed from
the shards after every step.

    worker = paramserver.torch.attach(net, client.model("digits-mlp"), "torch-0")
    for x, y in batches:
        loss = F.cross_entropy(net(x), y)
        loss.backward()     # full buckets of gradients are pushed as backward produces them
        worker.step()       # the rest is pushed; the next version is pulled into the parameters
    worker.close()

Each parameter gets a hook (as DDP's buckets do): its gradient is copied to
the host as soon as autograd computes it, gathered into buckets of about
`bucket_bytes`, and each full bucket is pushed in a background thread (a push
of some tensors' blocks is a valid part of a step). The spec's
`max_grad_norm` clips the mean gradient on the shards, as `clip_grad_norm_`
after DDP's all-reduce does, so the pushes still overlap backward; only with
`grad_clip="per-worker"` (each worker clips its own gradient, which needs its
whole norm first) are the gradients pushed after backward instead. Parameters may live on the CPU or
a CUDA device; a CPU float32 parameter is pulled into in place.

Frozen parameters (`requires_grad_(False)`, as in partial fine-tuning) are
held by the shards and pulled like the others, but get no hook and are pushed
as "no gradient", so the shards never change them; a trainable parameter that
the step's forward pass did not reach (its `.grad` is None) is pushed the same
way, and the shards leave it (weights and optimizer state) as torch.optim
would, unless another worker of the step has a gradient for it (then the mean
counts this worker's part as zeros, as DDP's all-reduce does).

Module buffers (BatchNorm's running mean and variance, its counter) go to
the shards when the model holds them in a buffers group
(`paramserver.buffers(paramserver.buffer_names(net))`, registered with
`arrays_of(net, buffers=True)`): every `step()` pushes their values, rank 0's
only with the default `sync="broadcast"` (as DDP broadcasts rank 0's before
each forward pass) or every worker's with `"mean"`, and the pull after it
loads what the shards kept into every worker's buffers. So each forward pass
starts from the same buffers, a checkpoint holds them, and `Model.export`
writes a complete `state_dict`. Buffers the model does not hold stay on each
worker, as before.

A group whose first push encoding is `sign1` gets 1-bit pushes with error
feedback: each tensor goes out as the sign of its gradient plus the residual
the earlier signs left, scaled by its mean magnitude, and the worker keeps the
new residual (the "scaled sign" of EF-signSGD, algorithms.md section 6; the
shards run the group's optimizer on the mean of the decoded signs). The
residuals are the worker's own state: a rollback does not take them back.
Under AdamW, push the first steps in full precision and freeze the second
moment there (1-bit Adam's recipe): register `adamw(lr, freeze_variance_after=K)`
with push encodings `["sign1", "f32"]`; the layout then says K
(`full_precision_steps`), and steps 0..K-1 go as f32, later ones as 1-bit signs.

Gradient accumulation works as with DDP: several `backward()` calls before
`step()` push the sum their gradients leave in `.grad`, once. Run all but the
last micro-batch inside `worker.no_sync()` (DDP's name for it), or attach with
`accumulation_steps=N`; either way only the last backward overlaps its pushes
with the computation, and the earlier ones cost nothing but autograd's own
accumulation. A second backward that reaches a tensor already pushed in this
step cannot be added to it any more, and raises.

    for i, (x, y) in enumerate(micro_batches):
        with worker.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            (loss_fn(net(x), y) / len(micro_batches)).backward()
    worker.step()

The learning rate stays in the script's hands: every push carries a scale on
the lr of the model's spec, which the shards multiply into that step's update
(the same for every group, as a scheduler with one factor). Give it as a
function of the step, which is LambdaLR's lambda (`scheduler.step()` once per
`worker.step()` calls it with the step number):

    worker = attach(net, model, "w0", lr_lambda=lambda step: min(1.0, step / 100))

or drive `worker.optimizer` (with `lr=` the spec's lr) with any
`torch.optim.lr_scheduler`, which then sets its lr as it would a torch
optimizer's (OneCycleLR, CosineAnnealingLR, ReduceLROnPlateau ...):

    worker = attach(net, model, "w0", lr=3e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(worker.optimizer, max_lr=3e-4, total_steps=1000)
    ...; worker.step(); scheduler.step()

Mixed precision: with `torch.autocast` in bf16 nothing changes. With a loss
scale (`torch.cuda.amp.GradScaler`, float16), attach with `scaler=scaler` and
leave `scaler.step()` and `scaler.update()` out: `worker.step()` unscales the
gradients (as `scaler.unscale_` does), and when any of them holds inf or NaN it
pushes "overflow" instead, which makes the shards skip the step for every
worker (as GradScaler skips `optimizer.step()`, and as DDP's all-reduce spreads
one rank's inf to all). Each worker reads from its next pull whether the step
was skipped and moves its scale as `scaler.update()` would (backoff on a skip,
growth after `growth_interval` clean steps), so every worker keeps the same
scale. The gradients are then pushed after backward (the decision needs all
of them).

    scaler = torch.cuda.amp.GradScaler()
    worker = attach(net, model, "w0", scaler=scaler)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = loss_fn(net(x), y)
    scaler.scale(loss).backward()
    worker.step()

Every worker of a step must push the same scale (the shards refuse a push
whose scale differs from the step's first), so each worker runs the same
schedule. A function of the step follows a rollback or a resync by itself; a
scheduler does not go back with the model, so after one the scales of the
steps redone may differ from the first time (the run goes on, not bit-identically).

An online reshard (`ctl resize`) holds the step at its boundary while the shards
move blocks; `step()` then finds the shard list changed, opens the model on the
new one and pushes the step's gradients again there (no shard counted any of
them), so the run goes on bit-identically, with no rollback and no restart.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from . import codec
from .client import LayoutChanged, Model, RolledBack, ServerError
from .spec import buffer_names
from .v1 import paramserver_pb2 as pb


class LearningRate(torch.optim.Optimizer):
    """Stands in for the script's optimizer so that a `torch.optim.lr_scheduler`
    can drive the learning rate: it holds `lr` in `param_groups[0]` and updates
    nothing itself (the shards do). The pushed scale is its lr over `base_lr`."""

    def __init__(self, base_lr: float):
        if not base_lr > 0:
            raise ValueError(f"lr must be the positive lr of the model's spec, got {base_lr}")
        # torch.optim wants parameters to hold; an empty tensor stands for the model's.
        super().__init__([torch.zeros(0, requires_grad=True)], {"lr": base_lr})
        self.base_lr = base_lr

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the shards apply the update
        return None

    def scale(self) -> float:
        """The current lr over the base lr: the scale the next push carries."""
        return self.param_groups[0]["lr"] / self.base_lr


class AttachedModule:
    """A torch module trained through the parameter server; see the module docs."""

    def __init__(
        self,
        module: torch.nn.Module,
        model: Model,
        worker: str,
        rank: Optional[int] = None,
        bucket_bytes: int = 4 << 20,
        overlap: bool = True,
        accumulation_steps: int = 1,
        lr: Optional[float] = None,
        lr_lambda: Optional[Callable[[int], float]] = None,
        scaler=None,
    ):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be at least 1, got {accumulation_steps}")
        if lr is not None and lr_lambda is not None:
            raise ValueError("give lr (to drive worker.optimizer with a scheduler) or lr_lambda (a function of the step), not both")
        self.lr_lambda = lr_lambda
        # A loss scaler (GradScaler's public methods): unscale, skip on overflow, move the scale.
        self.scaler = scaler
        self._growth_tracker = 0
        self._overflow_seen = 0
        self.optimizer: Optional[LearningRate] = None if lr is None else LearningRate(lr)
        self.module = module
        self.model = model
        self.worker = worker
        self.params: Dict[str, torch.nn.Parameter] = dict(module.named_parameters())
        # The buffers the shards hold; the module's others stay on this worker.
        self.buffers: Dict[str, torch.Tensor] = {n: module.get_buffer(n) for n in buffer_names(module) if n in model.tensors}
        missing = set(model.tensors) - set(self.params) - set(self.buffers)
        extra = set(self.params) - set(model.tensors)
        if missing or extra:
            raise ValueError(f"the module's parameters and buffers differ from model '{model.name}': not in the module {sorted(missing)}, not in the model {sorted(extra)}")
        for name, tensor in {**self.params, **self.buffers}.items():
            if tuple(tensor.shape) != model.tensors[name].shape:
                raise ValueError(f"'{name}' has shape {tuple(tensor.shape)}, the model's tensor {model.tensors[name].shape}")
            if model.tensors[name].buffer != (name in self.buffers):
                kind = "a buffer of the module, but the model trains it" if name in self.buffers else "a parameter of the module, but the model holds it as a buffer"
                raise ValueError(f"'{name}' is {kind}: put the module's buffers, and only them, in a group made by paramserver.buffers(...)")
        # The tensors pushed as 1-bit signs with error feedback (after their warm-up, if any).
        self._one_bit = {name for name, tensor in model.tensors.items() if tensor.encoding == codec.SIGN1}
        self.bucket_bytes = bucket_bytes
        # Clipping its own gradient, or looking for an overflow, needs every tensor before any is sent.
        self.overlap = overlap and model.max_grad_norm <= 0 and scaler is None
        self.accumulation_steps = accumulation_steps
        self._grads: Dict[str, Optional[np.ndarray]] = {}
        # Per tensor pushed as sign1, what the signs left out so far (error feedback).
        self._residuals: Dict[str, np.ndarray] = {}
        # Per tensor, the backward passes of this step that reached it.
        self._backwards: Dict[str, int] = {}
        self._no_sync = False
        self._bucket: List[str] = []
        self._bucket_size = 0
        self._pushes: List[Future] = []
        # The step's pushes as calls on a model, so an online reshard can send them again.
        self._sent: List[Callable[[Model], object]] = []
        self._lock = threading.Lock()
        self._sender = ThreadPoolExecutor(1, thread_name_prefix=f"push-{worker}")
        # A frozen parameter has no gradient to hook; it is pulled, and pushed as "no gradient".
        self._hooks = [param.register_hook(self._hook(name, param)) for name, param in self.params.items() if param.requires_grad]
        joined = model.join(worker, rank)
        self.rank = joined.rank
        model.start_heartbeat(worker, joined.lease_s)
        self.version = joined.version
        self._pull(self.version)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside leave their gradients in `.grad` (autograd adds them up)
        and push nothing; the first backward after it pushes the sum. As DDP's `no_sync`."""
        previous, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = previous

    def _hook(self, name: str, param: torch.nn.Parameter):
        def on_gradient(grad: torch.Tensor) -> None:
            with self._lock:
                if self._no_sync:
                    return
                # With overlap, a gradient the hooks kept is already bucketed for sending.
                if self.overlap and name in self._grads:
                    raise RuntimeError(
                        f"a second backward() reached '{name}' after its gradient was pushed for step {self.version}: "
                        "run all but the last micro-batch inside worker.no_sync(), or attach with accumulation_steps=N"
                    )
                seen = self._backwards.get(name, 0) + 1
                self._backwards[name] = seen
                if seen < self.accumulation_steps:
                    return  # autograd adds this one to .grad; the last micro-batch pushes the sum
            # The hook runs before autograd adds `grad` to `.grad`, which holds the earlier
            # micro-batches: their sum is what torch.optim would step on (the same addition).
            host = _host(grad if param.grad is None else param.grad + grad)
            with self._lock:
                self._grads[name] = host
                if not self.overlap:
                    return
                self._bucket.append(name)
                self._bucket_size += host.nbytes
                if self._bucket_size >= self.bucket_bytes:
                    self._send_bucket()

        return on_gradient

    def _send_bucket(self) -> None:
        names, self._bucket, self._bucket_size = self._bucket, [], 0
        if names:
            part = {n: self._compensate(n, self._grads[n]) for n in names}
            warm = {n: codec.F32 for n in names if n in self._one_bit and self._warming(n)}
            self._submit(lambda model, v=self.version, s=self.lr_scale(): model.push_tensors(self.worker, v, part, s, encodings=warm))

    def _submit(self, push: Callable[[Model], object]) -> None:
        """Sends a push of this step on the sender thread, and keeps it to send again."""
        self._sent.append(push)
        self._pushes.append(self._sender.submit(lambda: push(self.model)))

    def _compensate(self, name: str, grad: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """Error feedback for a tensor pushed as 1-bit signs (its group's first encoding is
        sign1): the gradient plus the residual of earlier steps, q = g + e, goes out as
        sign(q) times ||q||_1 / d (what the shards decode), and e = q - that is kept."""
        if grad is None or name not in self._one_bit or self._warming(name):
            return grad
        residual = self._residuals.get(name)
        compensated = grad if residual is None else grad + residual
        scale = np.float32(codec.mean_abs(compensated))
        self._residuals[name] = compensated - np.where(compensated >= 0, scale, -scale)
        return compensated

    def _warming(self, name: str) -> bool:
        """Whether this step of a 1-bit tensor is in its group's full-precision warm-up."""
        return self.version < self.model.tensors[name].full_precision_steps

    def lr_scale(self) -> Optional[float]:
        """The learning-rate scale of the step being pushed (None: the spec's lr as it is)."""
        if self.lr_lambda is not None:
            return float(self.lr_lambda(self.version))
        if self.optimizer is not None:
            return self.optimizer.scale()
        return None

    def step(self) -> int:
        """Pushes what backward left unsent (the sum in `.grad` where the last micro-batch
        did not reach a tensor; "no gradient" for frozen parameters and those whose `.grad`
        is None), waits for every push of the step, pulls the next version into the
        parameters and clears their gradients. Returns the version now in the parameters."""
        with self._lock:
            for name, param in self.params.items():
                if name not in self._grads:
                    grad = param.grad
                    self._grads[name] = None if grad is None else _host(grad)
                    self._bucket.append(name)
            # Values, not gradients: added after the unscaling and clipping.
            values = self._buffer_values()
            if self.overlap:
                self._grads.update(values)
                self._bucket.extend(values)
                self._send_bucket()
            elif self.scaler is not None and not self._unscale():
                self._bucket = []
                self._submit(lambda model, v=self.version, s=self.lr_scale(): model.push_overflow(self.worker, v, s))
            else:
                self.model.clip(self._grads)
                self._grads.update(values)
                self._bucket = list(self._grads)
                self._send_bucket()
            pushes, self._pushes = self._pushes, []
            sent, self._sent = self._sent, []
            self._grads = {}
            self._backwards = {}
        if self.optimizer is not None:
            # A scheduler counts the optimizer's steps (and warns when it is stepped before one).
            self.optimizer.step()
        try:
            try:
                _wait_all(pushes)
            except LayoutChanged as moved:
                # An online reshard held the step at its boundary and moved the blocks: no shard
                # counted any of it, so all of it goes again, to the new shard list.
                self._follow(moved)
                for push in sent:
                    push(self.model)
        except RolledBack as rolled:
            # A shard restarted and the model went back to a checkpoint: continue from there,
            # or from the lowest version over the shards if the run went on while this
            # worker was away (one shard may be a step past another that waits for it).
            self.model.epoch = rolled.epoch
            joined = self.model.join(self.worker, self.rank)
            self.version = min(rolled.resume_version, joined.version)
            self._pull(self.version)
            return self.version
        except ServerError as error:
            if error.kind not in ("stale-step", "unknown-worker"):
                raise
            # The step went ahead without this worker (its lease lapsed): rejoin and resume.
            joined = self.model.join(self.worker, self.rank)
            self.model.start_heartbeat(self.worker, joined.lease_s)
            self.version = joined.version
            self._pull(self.version)
            return self.version
        self.version += 1
        skipped = self._pull(self.version)
        if self.scaler is not None:
            self._update_scale(skipped)
        return self.version

    def _buffer_values(self) -> Dict[str, Optional[np.ndarray]]:
        """What this worker pushes for each buffer: its values, or None where the group
        takes rank 0's and this worker is another rank."""
        return {
            name: _host(buffer) if self.rank == 0 or self.model.tensors[name].buffer_sync == pb.BUFFER_SYNC_MEAN else None
            for name, buffer in self.buffers.items()
        }

    def _unscale(self) -> bool:
        """Divides the gradients by the loss scale in place, as `GradScaler.unscale_` does
        (times the f32 reciprocal); False if any of them holds inf or NaN."""
        inverse = np.float32(1.0 / float(self.scaler.get_scale()))
        finite = True
        for grad in self._grads.values():
            if grad is not None:
                grad *= inverse
                finite = finite and bool(np.isfinite(grad).all())
        return finite

    def _update_scale(self, skipped: bool) -> None:
        """`GradScaler.update()`'s rule, on what the shards said of the step: back off after a
        skipped step, grow after `growth_interval` clean ones in a row."""
        scale = float(self.scaler.get_scale())
        if skipped:
            scale *= self.scaler.get_backoff_factor()
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.scaler.get_growth_interval():
                scale *= self.scaler.get_growth_factor()
                self._growth_tracker = 0
        self.scaler.update(scale)

    def _follow(self, moved: LayoutChanged) -> None:
        """Continues on the shard list an online reshard moved the cluster to."""
        previous = self.model
        self.model = previous.follow_new_layout(moved)
        previous.client.close()

    def _pull(self, version: int) -> bool:
        """Pulls `version` into the parameters and clears their gradients; True if the shards
        skipped a step for an overflow since the previous pull."""
        try:
            return self._pull_once(version)
        except LayoutChanged as moved:
            self._follow(moved)
            return self._pull_once(version)

    def _pull_once(self, version: int) -> bool:
        held = {**self.params, **self.buffers}
        in_place = {
            name: t.data.numpy()
            for name, t in held.items()
            if t.device.type == "cpu" and t.dtype == torch.float32 and t.data.is_contiguous()
        }
        _, arrays = self.model.pull(version, out=dict(in_place))
        with torch.no_grad():
            for name, tensor in held.items():
                if name not in in_place:
                    pulled = torch.from_numpy(arrays[name]).to(tensor.device)
                    # Integer buffers (a counter) travel as f32; they hold whole numbers.
                    tensor.copy_(pulled if tensor.is_floating_point() else pulled.round())
            for param in self.params.values():
                param.grad = None
        skipped = self.model.overflow_steps > self._overflow_seen
        self._overflow_seen = self.model.overflow_steps
        return skipped

    def close(self) -> None:
        """Removes the hooks and leaves the model."""
        for hook in self._hooks:
            hook.remove()
        self._sender.shutdown(wait=True)
        self.model.leave(self.worker)


def _wait_all(pushes: List[Future]) -> None:
    """Waits for every push, then raises the first one's error, if any (none is left in flight)."""
    errors = [push.exception() for push in pushes]
    for error in errors:
        if error is not None:
            raise error


def _host(gradient: torch.Tensor) -> np.ndarray:
    """A gradient as a flat float32 array of its own on the host."""
    return gradient.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1).copy()


def attach(module: torch.nn.Module, model: Model, worker: str, **options) -> AttachedModule:
    """Joins `model` as `worker`, loads its current weights into `module`, and
    streams the module's gradients on every backward, or on every
    `accumulation_steps`-th. Options as `AttachedModule` takes them: `rank`,
    `bucket_bytes`, `overlap`, `accumulation_steps`, `lr` or `lr_lambda`,
    `scaler` (see the module docs)."""
    return AttachedModule(module, model, worker, **options)
