"""Streaming safetensors: read one tensor at a time; write tensor by tensor.

The `safetensors` package loads whole files and writes only from a complete dict, which for the 7B
model means ~15 GB in host memory. The format is small enough to stream: an 8-byte little-endian
header length, a JSON header `{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`, then the
raw little-endian bytes of every tensor back to back. Reads use pread (no mmap, so pages do not
stay resident); the writer computes the header from the shapes up front and then appends.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from tttjax.errors import UserError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # the reference implementation's limit


class SafetensorsError(UserError):
    """A file that is not valid safetensors (truncated, corrupt header, unknown dtype)."""


def _as_bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


class SafetensorsReader:
    """Header-validated random access to the tensors of one file."""

    def __init__(self, path: str | Path):
        self.path, self._fd = Path(path), -1
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{self.path}: {size} bytes is too short for a safetensors file")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise SafetensorsError(f"{self.path}: header length {n} does not fit the file's {size} bytes "
                                       "(truncated, or not a safetensors file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check(name, entry, size)
        self._fd = os.open(self.path, os.O_RDONLY)

    def _check(self, name: str, entry, size: int) -> tuple[np.dtype, tuple[int, ...], int]:
        try:
            dtype, shape, (begin, end) = np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{self.path}: tensor {name!r} has an unsupported or corrupt header entry "
                                   f"{entry!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has offsets {[begin, end]} that do not match "
                                   f"its shape {list(shape)} and dtype {entry['dtype']}")
        if self._start + end > size:
            raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte {self._start + end} "
                                   f"but the file has {size}")
        return dtype, shape, self._start + begin

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    __del__ = close

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, offset = self._entries[name]
        out = np.empty(shape, dtype)
        view, done = _as_bytes(out), 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise SafetensorsError(f"{self.path}: truncated while reading {name!r}")
            done += got
        return out


def partial_path(path: str | Path) -> Path:
    """Where SafetensorsWriter writes `path` until every tensor is in."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


class SafetensorsWriter:
    """Writes the tensors of `specs` ({name: (shape, dtype)}) one by one in sorted name order.
    The file appears under its name only once every tensor is written."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = sorted(specs)
        self._specs = {k: (tuple(int(d) for d in s), np.dtype(t)) for k, (s, t) in specs.items()}
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = dict(metadata)
        for name in self._order:
            shape, dtype = self._specs[name]
            if dtype not in _CODES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._partial = partial_path(self.path)
        self._file = open(self._partial, "wb")
        try:
            self._file.write(len(blob).to_bytes(8, "little") + blob)
        except BaseException:
            self._file.close()
            self._partial.unlink(missing_ok=True)
            raise
        self._next = 0  # index into _order of the tensor to write next

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._file.close()
            self._partial.unlink(missing_ok=True)

    def write(self, name: str, array: np.ndarray) -> None:
        """Appends tensor `name`, which must be the next in sorted order."""
        if self._next >= len(self._order) or name != self._order[self._next]:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"{self.path}: expected tensor {expected!r} next, got {name!r}")
        shape, dtype = self._specs[name]
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(f"{self.path}: {name} is {array.dtype}{list(array.shape)}, its header says "
                             f"{dtype}{list(shape)}")
        self._file.write(_as_bytes(array))
        self._next += 1

    def close(self) -> None:
        if self._next < len(self._order):
            self._file.close()
            self._partial.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: not written: tensor {self._order[self._next]!r} and "
                             f"{len(self._order) - self._next - 1} more were never given")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial, self.path)


def load(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a (small) file."""
    with SafetensorsReader(path) as reader:
        return {name: reader.read(name) for name in reader.names()}


def save(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Whole-dict convenience over SafetensorsWriter."""
    with SafetensorsWriter(path, {k: (v.shape, v.dtype) for k, v in tensors.items()}, metadata) as w:
        for name in sorted(tensors):
            w.write(name, tensors[name])
