"""Wire encodings of tensor chunks, exactly as the shards read them.

- f32: little-endian IEEE floats.
- bf16: the upper 16 bits of the f32, rounded to nearest even.
- f16: IEEE half, rounded to nearest even.
- sign1: one bit per element, 32 elements per little-endian u32 word, bit i of
  a word for element i, set for a negative value; every element decodes to
  +-scale (one finite scale >= 0 per block). Sign chunks start at multiples of 32.
- no-gradient: pushes only, no payload: the worker has no gradient for the
  block this step (one chunk for the whole block).

Chunks carry at most CHUNK_BYTES of payload (the servers refuse more than 4 MiB).
"""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

from .v1 import paramserver_pb2 as pb

#: Payload bytes per chunk, as the Rust client sends them.
CHUNK_BYTES = 2 << 20
#: Elements per sign word.
SIGN_WORD_ELEMENTS = 32

F32 = pb.ENCODING_F32
BF16 = pb.ENCODING_BF16
F16 = pb.ENCODING_F16
SIGN1 = pb.ENCODING_SIGN1
NO_GRADIENT = pb.ENCODING_NO_GRADIENT
OVERFLOW = pb.ENCODING_OVERFLOW

_NAMES = {F32: "f32", BF16: "bf16", F16: "f16", SIGN1: "sign1", NO_GRADIENT: "no-gradient", OVERFLOW: "overflow"}


def encoding_name(encoding: int) -> str:
    """The short name of an encoding (f32, bf16, f16, sign1)."""
    return _NAMES.get(encoding, f"encoding {encoding}")


def payload_len(encoding: int, elements: int) -> int:
    """Bytes that `elements` values take in `encoding`."""
    if encoding == F32:
        return 4 * elements
    if encoding in (BF16, F16):
        return 2 * elements
    if encoding == SIGN1:
        return 4 * ((elements + SIGN_WORD_ELEMENTS - 1) // SIGN_WORD_ELEMENTS)
    if encoding in (NO_GRADIENT, OVERFLOW):
        return 0
    raise ValueError(f"unknown encoding {encoding}")


def elements_per_chunk(encoding: int) -> int:
    """Elements in one full chunk: whole sign words, at most CHUNK_BYTES."""
    word_bytes = payload_len(encoding, SIGN_WORD_ELEMENTS)
    return CHUNK_BYTES // word_bytes * SIGN_WORD_ELEMENTS


def encode(encoding: int, values: np.ndarray) -> bytes:
    """`values` (f32, contiguous) as the payload of one chunk."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if encoding == F32:
        return values.astype("<f4", copy=False).tobytes()
    if encoding == BF16:
        bits = values.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").tobytes()
    if encoding == F16:
        return values.astype("<f2").tobytes()
    if encoding == SIGN1:
        padded = (len(values) + SIGN_WORD_ELEMENTS - 1) // SIGN_WORD_ELEMENTS * SIGN_WORD_ELEMENTS
        negative = np.zeros(padded, dtype=bool)
        negative[: len(values)] = values < 0
        return np.packbits(negative, bitorder="little").tobytes()
    raise ValueError(f"unknown encoding {encoding}")


def payload_view(encoding: int, values: np.ndarray):
    """The payload of `values` in `encoding`: for f32 a view of the array itself
    (no copy) when it is already little-endian float32 and contiguous."""
    if encoding == F32 and values.dtype == np.dtype("<f4") and values.flags.c_contiguous:
        return memoryview(values).cast("B")
    return encode(encoding, values)


def decode_into(encoding: int, payload, scale: float, out: np.ndarray) -> None:
    """Decodes a payload of len(out) elements into `out` (an f32 view), with one copy."""
    n = len(out)
    size = memoryview(payload).nbytes
    if size != payload_len(encoding, n):
        raise ValueError(f"a {encoding_name(encoding)} payload of {n} elements takes {payload_len(encoding, n)} bytes, got {size}")
    if encoding == F32:
        out[:] = np.frombuffer(payload, dtype="<f4")
    elif encoding == BF16:
        out.view(np.uint32)[:] = np.frombuffer(payload, dtype="<u2").astype(np.uint32) << 16
    elif encoding == F16:
        out[:] = np.frombuffer(payload, dtype="<f2")
    elif encoding == SIGN1:
        negative = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), bitorder="little")[:n].astype(bool)
        out[:] = np.where(negative, -scale, scale)
    else:
        raise ValueError(f"unknown encoding {encoding}")


def payloads(values: np.ndarray, encoding: int) -> Iterator[Tuple[int, int, object]]:
    """One block's values split into chunk payloads, lazily: (offset, length, payload),
    each payload at most CHUNK_BYTES (an f32 payload is a view, see `payload_view`)."""
    per_chunk = elements_per_chunk(encoding)
    for start in range(0, len(values), per_chunk):
        part = values[start : start + per_chunk]
        yield start, len(part), payload_view(encoding, part)


def chunks(tensor: str, block: int, values: np.ndarray, encoding: int, scale: float = 0.0) -> Iterator[pb.TensorChunk]:
    """One block's values as generated TensorChunk messages, lazily."""
    for offset, length, payload in payloads(values, encoding):
        yield pb.TensorChunk(
            tensor=tensor, block=block, offset=offset, length=length, encoding=encoding, payload=bytes(payload), scale=scale
        )


def mean_abs(values: np.ndarray) -> float:
    """The scale that makes sign1 the scaled sign of error feedback: ||x||_1 / d, summed in f64."""
    return float(np.abs(values, dtype=np.float64).mean()) if len(values) else 0.0


def block_range(block: pb.BlockPlacement) -> Tuple[int, int]:
    """The block's element range within its tensor."""
    return block.offset, block.offset + block.length
