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
of some tensors' blocks is a valid part of a step). With the spec's
`max_grad_norm` set, clipping needs the whole gradient's norm first, so the
gradients are pushed after backward instead. Parameters may live on the CPU or
a CUDA device; a CPU float32 parameter is pulled into in place.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional

import numpy as np
import torch

from .client import Model, RolledBack, ServerError


class AttachedModule:
    """A torch module trained through the parameter server; see the module docs."""

    def __init__(self, module: torch.nn.Module, model: Model, worker: str, rank: Optional[int] = None, bucket_bytes: int = 4 << 20, overlap: bool = True):
        self.module = module
        self.model = model
        self.worker = worker
        self.params: Dict[str, torch.nn.Parameter] = dict(module.named_parameters())
        missing = set(model.tensors) - set(self.params)
        extra = set(self.params) - set(model.tensors)
        if missing or extra:
            raise ValueError(f"the module's parameters differ from model '{model.name}': missing {sorted(missing)}, not in the model {sorted(extra)}")
        for name, param in self.params.items():
            if tuple(param.shape) != model.tensors[name].shape:
                raise ValueError(f"parameter '{name}' has shape {tuple(param.shape)}, the model's tensor {model.tensors[name].shape}")
        self.bucket_bytes = bucket_bytes
        # Clipping needs every gradient before any is sent.
        self.overlap = overlap and model.max_grad_norm <= 0
        self._grads: Dict[str, np.ndarray] = {}
        self._bucket: List[str] = []
        self._bucket_size = 0
        self._pushes: List[Future] = []
        self._lock = threading.Lock()
        self._sender = ThreadPoolExecutor(1, thread_name_prefix=f"push-{worker}")
        self._hooks = [param.register_hook(self._hook(name)) for name, param in self.params.items()]
        joined = model.join(worker, rank)
        self.rank = joined.rank
        model.start_heartbeat(worker, joined.lease_s)
        self.version = joined.version
        self._pull(self.version)

    def _hook(self, name: str):
        def on_gradient(grad: torch.Tensor) -> None:
            host = grad.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1).copy()
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
            part = {n: self._grads[n] for n in names}
            self._pushes.append(self._sender.submit(self.model.push_tensors, self.worker, self.version, part))

    def step(self) -> int:
        """Pushes what backward left unsent (zeros for parameters without a gradient),
        waits for every push of the step, pulls the next version into the parameters
        and clears their gradients. Returns the version now in the parameters."""
        with self._lock:
            for name, tensor in self.model.tensors.items():
                if name not in self._grads:
                    self._grads[name] = np.zeros(tensor.size, dtype=np.float32)
                    self._bucket.append(name)
            if self.overlap:
                self._send_bucket()
            else:
                self.model.clip(self._grads)
                self._bucket = list(self._grads)
                self._send_bucket()
            pushes, self._pushes = self._pushes, []
            self._grads = {}
        try:
            for push in pushes:
                push.result()
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
        self._pull(self.version)
        return self.version

    def _pull(self, version: int) -> None:
        in_place = {
            name: p.data.numpy()
            for name, p in self.params.items()
            if p.device.type == "cpu" and p.dtype == torch.float32 and p.data.is_contiguous()
        }
        _, arrays = self.model.pull(version, out=dict(in_place))
        with torch.no_grad():
            for name, param in self.params.items():
                if name not in in_place:
                    param.copy_(torch.from_numpy(arrays[name]).to(param.device, param.dtype))
                param.grad = None

    def close(self) -> None:
        """Removes the hooks and leaves the model."""
        for hook in self._hooks:
            hook.remove()
        self._sender.shutdown(wait=True)
        self.model.leave(self.worker)


def attach(module: torch.nn.Module, model: Model, worker: str, rank: Optional[int] = None, bucket_bytes: int = 4 << 20, overlap: bool = True) -> AttachedModule:
    """Joins `model` as `worker`, loads its current weights into `module`, and
    streams the module's gradients on every backward (see the module docs)."""
    return AttachedModule(module, model, worker, rank, bucket_bytes, overlap)
