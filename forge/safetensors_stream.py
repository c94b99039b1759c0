"""Tensor-at-a-time safetensors reading and writing, for merges that must not hold a shard in memory.

The format is small: an 8-byte little-endian header length, a JSON header (name → dtype, shape,
data_offsets; plus ``__metadata__``), then the raw bytes. Reading with seek/read (not mmap) and
writing each tensor as soon as it is ready keeps the peak near the largest single tensor, and keeps
file pages out of the resident set.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
CODES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """The header (tensor entries and ``__metadata__``) and the offset where tensor data starts."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return header, 8 + size


def iter_tensors(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (name, tensor) one at a time, in file order, each read into its own memory."""
    import torch

    header, start = read_header(path)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb") as fh:
        for name, entry in entries:
            begin, end = entry["data_offsets"]
            fh.seek(start + begin)
            raw = bytearray(end - begin)
            fh.readinto(raw)  # into the tensor's own buffer: no intermediate bytes copy
            dtype = getattr(torch, DTYPES[entry["dtype"]])
            tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(entry["shape"])


class StreamWriter:
    """Write tensors one by one into a safetensors file whose layout is declared up front."""

    def __init__(self, path: Path, layout: list[tuple[str, str, list[int]]], metadata: dict | None = None):
        import torch

        header: dict = {}
        offset = 0
        for name, dtype, shape in layout:
            count = 1
            for dim in shape:
                count *= dim
            nbytes = count * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self.header = header
        self.order = [name for name, _, _ in layout]
        self.fh = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.fh.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0

    def write(self, name: str, tensor) -> None:
        expected = self.order[self.next]
        if name != expected:
            raise ValueError(f"expected tensor {expected!r} next, got {name!r}")
        entry = self.header[name]
        if CODES[str(tensor.dtype).removeprefix("torch.")] != entry["dtype"] or list(tensor.shape) != entry["shape"]:
            raise ValueError(f"{name}: expected {entry['dtype']} {entry['shape']}, "
                             f"got {tensor.dtype} {list(tensor.shape)}")
        import torch

        if tensor.numel():
            # the uint8 view's numpy array is written through the buffer protocol: no copy of the data
            self.fh.write(tensor.contiguous().view(-1).view(torch.uint8).numpy())
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            self.fh.close()
            raise ValueError(f"only {self.next} of {len(self.order)} tensors were written")
        self.fh.close()
