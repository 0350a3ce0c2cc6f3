"""safetensors files read and written one tensor at a time, so a process holds one tensor, not one file.

The library reads through a memory map (every page touched stays in the process until the file is closed: a whole
multi-GB checkpoint shard) and writes a whole file from tensors held in memory. The format is simple enough to
stream: an 8-byte little-endian header length, a JSON header of name -> dtype, shape and byte range, then the
bytes. The writer reserves room for the header, appends each tensor's bytes as it comes, and writes the header
last, padded with spaces as the format allows. Assumes a little-endian host, as the library does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


class Reader:
    """One safetensors file: `keys()` and `get(name)`, each tensor read into its own memory (no memory map)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n

    def __enter__(self) -> "Reader":
        self.file = open(self.path, "rb", buffering=0)
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, end = info["data_offsets"]
        data = torch.empty(end - start, dtype=torch.uint8)
        view, done = memoryview(data.numpy()), 0
        self.file.seek(self.data_start + start)
        while done < len(view):
            got = self.file.readinto(view[done:])
            if not got:
                raise EOFError(f"{self.path} ends inside tensor {name}")
            done += got
        return data.view(DTYPES[info["dtype"]]).reshape(info["shape"])


class Writer:
    """Append tensors to one safetensors file; `close()` writes the header into the room reserved for it.

    `header_room`: bytes to reserve, at least the header of every tensor this file may receive (see `header_room`).
    """

    def __init__(self, path: Path, header_room: int):
        self.path, self.room = path, header_room + (-header_room % 8)  # tensors start 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(b"\0" * (8 + self.room))
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
        self.file.write(memoryview(raw.numpy()))
        self.entries[name] = {"dtype": NAMES[data.dtype], "shape": list(data.shape),
                              "data_offsets": [self.size, self.size + raw.numel()]}
        self.size += raw.numel()

    def close(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.room:
            raise RuntimeError(f"{self.path}: header of {len(header)} bytes exceeds the {self.room} reserved")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.room) + header + b" " * (self.room - len(header)))
        self.file.close()


def header_room(names: list[str], max_dims: int = 8) -> int:
    """An upper bound on the header of a file holding tensors of these names (any dtype, up to `max_dims` dims)."""
    per_tensor = len('"":{"dtype":"F8_E4M3","shape":[],"data_offsets":[,]},') + 2 * 20 + max_dims * 21
    return len('{"__metadata__":{"format":"pt"}}') + sum(len(json.dumps(n)) + per_tensor for n in names)
