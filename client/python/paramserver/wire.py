"""Hand-written protobuf for the two messages that carry the bulk bytes.

Building a `GradientChunk` with the generated classes copies the payload three
times (numpy to bytes, into the message, into the serialized string), and
reading a `WeightChunk` twice; in Python those copies, not the network, bound
the throughput. Here a push message is its few header fields followed by the
payload, joined in one copy straight from the numpy array, and a pulled
message is parsed in place, its payload handed out as a view. The encodings
are plain protobuf (proto3 wire format) of the messages in the .proto; the
tests check them against the generated classes.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Optional

_FLOAT = struct.Struct("<f")
_DOUBLE = struct.Struct("<d")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _uint(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value) if value else b""


def _text(field: int, value: str) -> bytes:
    data = value.encode()
    return _key(field, 2) + _varint(len(data)) + data if data else b""


def tensor_chunk_parts(tensor: str, block: int, offset: int, length: int, encoding: int, payload, scale: float) -> List:
    """The pieces of an encoded TensorChunk, the payload (any bytes-like object) last and not copied."""
    head = _text(1, tensor) + _uint(2, block) + _uint(3, offset) + _uint(4, length) + _uint(5, encoding)
    tail = _key(7, 5) + _FLOAT.pack(scale) if scale else b""
    size = memoryview(payload).nbytes
    return [head + _key(6, 2) + _varint(size), payload, tail]


def gradient_chunk(model: str, worker: str, step: int, epoch: int, chunk_parts: List, lr_scale: Optional[float] = None) -> bytes:
    """An encoded GradientChunk around an encoded TensorChunk, joined in one copy."""
    chunk_len = sum(memoryview(p).nbytes for p in chunk_parts)
    head = _text(1, model) + _text(2, worker) + _uint(3, step) + _key(4, 2) + _varint(chunk_len)
    # An optional field: present (even when 0) whenever it is set.
    scale = b"" if lr_scale is None else _key(6, 1) + _DOUBLE.pack(lr_scale)
    return b"".join([head, *chunk_parts, _uint(5, epoch), scale])


class PulledChunk(NamedTuple):
    """A WeightChunk read in place: its payload is a view of the received message."""

    version: int
    checkpoint: bool
    tensor: str
    block: int
    offset: int
    length: int
    encoding: int
    payload: memoryview
    scale: float
    overflow_steps: int = 0


def _read_varint(data: memoryview, at: int):
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _skip(data: memoryview, at: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(data, at)[1]
    if wire_type == 1:
        return at + 8
    if wire_type == 2:
        length, at = _read_varint(data, at)
        return at + length
    if wire_type == 5:
        return at + 4
    raise ValueError(f"wire type {wire_type} is not used by this API")


def parse_weight_chunk(raw: bytes) -> PulledChunk:
    """Parses an encoded WeightChunk without copying its payload."""
    data = memoryview(raw)
    version, checkpoint, overflow_steps, at, end = 0, False, 0, 0, len(data)
    fields = {1: "", 2: 0, 3: 0, 4: 0, 5: 0, 7: 0.0}
    payload = data[0:0]
    while at < end:
        key, at = _read_varint(data, at)
        field, wire_type = key >> 3, key & 7
        if field == 1 and wire_type == 0:
            version, at = _read_varint(data, at)
        elif field == 3 and wire_type == 0:
            value, at = _read_varint(data, at)
            checkpoint = bool(value)
        elif field == 4 and wire_type == 0:
            overflow_steps, at = _read_varint(data, at)
        elif field == 2 and wire_type == 2:
            length, at = _read_varint(data, at)
            inner_end = at + length
            while at < inner_end:
                key, at = _read_varint(data, at)
                inner, inner_type = key >> 3, key & 7
                if inner_type == 2 and inner in (1, 6):
                    size, at = _read_varint(data, at)
                    if inner == 1:
                        fields[1] = bytes(data[at : at + size]).decode()
                    else:
                        payload = data[at : at + size]
                    at += size
                elif inner_type == 0 and inner in (2, 3, 4, 5):
                    fields[inner], at = _read_varint(data, at)
                elif inner == 7 and inner_type == 5:
                    fields[7] = _FLOAT.unpack_from(data, at)[0]
                    at += 4
                else:
                    at = _skip(data, at, inner_type)
        else:
            at = _skip(data, at, wire_type)
    return PulledChunk(version, checkpoint, fields[1], fields[2], fields[3], fields[4], fields[5], payload, fields[7], overflow_steps)
