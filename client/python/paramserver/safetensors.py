"""The safetensors file format (an 8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range, then the raw
little-endian data) for float32 arrays, without the `safetensors` package:
what `Model.export` and `ctl export` write, and what `safetensors.torch.load_file`
and `torch.nn.Module.load_state_dict` read."""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Mapping, Optional

import numpy as np

_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}


def save(arrays: Mapping[str, np.ndarray], path: str, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes `arrays` as float32 tensors in their shapes, through a temporary file renamed into place."""
    header: Dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    data = []
    offset = 0
    for name, array in arrays.items():
        values = np.asarray(array, dtype="<f4", order="C")  # keeps 0-d arrays 0-d
        header[name] = {"dtype": "F32", "shape": list(values.shape), "data_offsets": [offset, offset + values.nbytes]}
        data.append(values)
        offset += values.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as readers that map the file expect
    partial = f"{path}.partial"
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for values in data:
            out.write(values.tobytes())
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def load(path: str) -> Dict[str, np.ndarray]:
    """Reads a safetensors file into numpy arrays (the common dtypes), by name."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        data = file.read()
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"'{name}' has dtype {entry['dtype']}, which this reader does not know")
        start, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]]).newbyteorder("<")
        arrays[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(entry["shape"]).copy()
    return arrays
