"""Building a ModelSpec from Python values: tensors from shapes, numpy arrays
or a torch module's named parameters, parameter groups with the servers'
optimizers, push encodings and aggregation. Anything these helpers do not
cover can be set on the returned protobuf messages directly (`paramserver.pb`)."""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import codec
from .v1 import paramserver_pb2 as pb

_MODES = {
    "sync": pb.CONSISTENCY_MODE_SYNC,
    "async": pb.CONSISTENCY_MODE_ASYNC,
    "bounded-staleness": pb.CONSISTENCY_MODE_BOUNDED_STALENESS,
    "ssp": pb.CONSISTENCY_MODE_BOUNDED_STALENESS,
}
_ENCODINGS = {"f32": codec.F32, "bf16": codec.BF16, "f16": codec.F16, "sign1": codec.SIGN1}

Shape = Tuple[int, ...]
TensorSource = Union[Shape, Sequence[int], np.ndarray]


def sgd(lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, dampening: float = 0.0) -> pb.OptimizerConfig:
    """SGD on the servers (momentum, Nesterov, L2 weight decay)."""
    return pb.OptimizerConfig(sgd=pb.SgdConfig(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, dampening=dampening))


def adamw(
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    l2_decay: bool = False,
    freeze_variance_after: int = 0,
) -> pb.OptimizerConfig:
    """AdamW on the servers (decoupled decay; `l2_decay` for Adam with L2). With
    `freeze_variance_after=K`, the second moment stops changing after step K (1-bit Adam:
    pushes of 1-bit signs with error feedback after a full-precision warm-up of K steps)."""
    config = pb.AdamWConfig(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, l2_decay=l2_decay, freeze_variance_after=freeze_variance_after)
    return pb.OptimizerConfig(adamw=config)


def buffers(names: Iterable[str], sync: str = "broadcast", name: str = "buffers", push_encodings: Sequence[str] = ("f32",)) -> pb.ParamGroup:
    """A group of module buffers (BatchNorm's running statistics, counters), which the
    shards hold, checkpoint and serve but do not train: each step keeps rank 0's values
    (`sync="broadcast"`, DDP's default) or the mean of every worker's (`"mean"`). `names`
    are the buffers' names (exact, or glob patterns), e.g. `buffer_names(module)`; put the
    group before any catch-all group, since a tensor belongs to the first group it matches."""
    if sync not in _BUFFER_SYNCS:
        raise ValueError(f"unknown buffer sync {sync!r}; use broadcast or mean")
    patterns = list(names)
    if not patterns:
        raise ValueError("a buffer group needs at least one name")
    config = pb.OptimizerConfig(buffer=pb.BufferConfig(sync=_BUFFER_SYNCS[sync]))
    return group(name, patterns, config, push_encodings=push_encodings)


_BUFFER_SYNCS = {"broadcast": pb.BUFFER_SYNC_BROADCAST, "mean": pb.BUFFER_SYNC_MEAN}


def group(
    name: str,
    patterns: Iterable[str],
    optimizer: pb.OptimizerConfig,
    push_encodings: Sequence[str] = ("f32",),
    majority_vote: bool = False,
    schedule: Optional[pb.LrSchedule] = None,
) -> pb.ParamGroup:
    """A parameter group: the tensors whose names match a glob pattern, their optimizer,
    the encodings pushes may use (the first is what clients send), and the aggregation."""
    try:
        encodings = [_ENCODINGS[e] for e in push_encodings]
    except KeyError as error:
        raise ValueError(f"unknown encoding {error.args[0]!r}; use f32, bf16, f16 or sign1") from None
    return pb.ParamGroup(
        name=name,
        patterns=list(patterns),
        optimizer=optimizer,
        push_encodings=encodings,
        aggregation=pb.AGGREGATION_MAJORITY_VOTE if majority_vote else pb.AGGREGATION_MEAN,
        schedule=schedule,
    )


def tensor(name: str, source: TensorSource, init: Optional[pb.InitRule] = None) -> pb.TensorSpec:
    """A tensor from a shape (initialised by `init`, zeros by default) or from an
    array (its shape, values PROVIDED with the registration)."""
    if isinstance(source, np.ndarray) or hasattr(source, "detach"):
        shape = tuple(int(d) for d in source.shape)
        init = pb.InitRule(kind=pb.INIT_KIND_PROVIDED)
    else:
        shape = tuple(int(d) for d in source)
        init = init or pb.InitRule(kind=pb.INIT_KIND_ZEROS)
    return pb.TensorSpec(name=name, shape=list(shape), init=init)


def model_spec(
    name: str,
    tensors: Mapping[str, TensorSource],
    groups: Sequence[pb.ParamGroup],
    mode: str = "sync",
    staleness: int = 0,
    max_block_elements: int = 0,
    max_grad_norm: float = 0.0,
    min_workers: int = 0,
    step_deadline_ms: int = 0,
    quorum: int = 0,
    max_workers: int = 0,
    grad_clip: str = "mean",
) -> pb.ModelSpec:
    """A model spec; `tensors` maps names to shapes or to arrays of initial values
    (pass the same arrays to `Client.register`). `max_grad_norm` clips each step's
    mean gradient on the shards (`grad_clip="mean"`, as `clip_grad_norm_` after DDP's
    all-reduce) or each worker's own gradient before it is pushed (`"per-worker"`)."""
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; use sync, async or bounded-staleness")
    if grad_clip not in _GRAD_CLIPS:
        raise ValueError(f"unknown grad_clip {grad_clip!r}; use mean or per-worker")
    return pb.ModelSpec(
        name=name,
        tensors=[tensor(n, source) for n, source in tensors.items()],
        groups=list(groups),
        mode=_MODES[mode],
        staleness=staleness,
        max_block_elements=max_block_elements,
        max_grad_norm=max_grad_norm,
        min_workers=min_workers,
        step_deadline_ms=step_deadline_ms,
        quorum=quorum,
        max_workers=max_workers,
        grad_clip=_GRAD_CLIPS[grad_clip],
    )


_GRAD_CLIPS = {"mean": pb.GRAD_CLIP_MEAN, "per-worker": pb.GRAD_CLIP_PER_WORKER}


def arrays_of(module, buffers: bool = False) -> Dict[str, np.ndarray]:
    """A torch module's named parameters (and, with `buffers`, the buffers its
    state_dict holds) as f32 numpy arrays (copies, on the CPU)."""
    tensors = dict(module.named_parameters())
    if buffers:
        tensors.update((name, module.get_buffer(name)) for name in buffer_names(module))
    return {name: t.detach().to("cpu", dtype=_torch_float32()).numpy().copy() for name, t in tensors.items()}


def buffer_names(module) -> list:
    """The names of a torch module's buffers that its state_dict holds (the persistent
    ones: running statistics and counters), in state_dict order."""
    parameters = {name for name, _ in module.named_parameters()}
    return [name for name in module.state_dict(keep_vars=True) if name not in parameters]


def _torch_float32():
    import torch

    return torch.float32
