"""Returns parsed safetensors headers and zero-copy tensor views; writes headers for streamed shards.

The format: 8 bytes little-endian header length N, N bytes of JSON (name -> dtype, shape,
data_offsets relative to the end of the header), then the raw little-endian tensor bytes.
Parsing it ourselves lets a plan validate every file (truncation, overlapping or out-of-range
offsets, unknown dtypes) before any work starts, and lets the writer stream tensors into
pre-computed offsets without holding a shard in memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.errors import CheckpointError

DTYPE_FROM_CODE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_CODE.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def dtype_itemsize(dtype: torch.dtype) -> int:
    """Returns the size in bytes of one element of `dtype`."""
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Returns the tensors described by a safetensors file's header, and its metadata.

    Raises CheckpointError naming the file (and the tensor) when the header is corrupt or the
    file is shorter than the header says (a truncated download).
    """
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a safetensors file")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, header missing)")
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (declares {header_len} header bytes, file has {size} bytes)"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {exc})") from exc
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + header_len
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry, data_start, data_len)
    _check_no_overlap(path, infos)
    return infos, dict(metadata)


def _check_no_overlap(path: Path, infos: dict[str, TensorInfo]) -> None:
    """Raises when two tensors' byte ranges overlap (one would silently read the other's bytes)."""
    spans = sorted((i.offset, i.offset + i.nbytes, i.name) for i in infos.values() if i.nbytes)
    reach, holder = -1, ""
    for begin, end, name in spans:
        if begin < reach:
            raise CheckpointError(f"{path}: tensors {holder!r} and {name!r} have overlapping data_offsets")
        if end > reach:
            reach, holder = end, name


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in DTYPE_FROM_CODE:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {entry}")
    dtype = DTYPE_FROM_CODE[code]
    begin, end = offsets
    expected = math.prod(shape) * dtype_itemsize(dtype)
    if end - begin != expected or begin < 0:
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets {offsets} for {expected} bytes "
            f"(shape {shape}, {code}): corrupt header"
        )
    if end > data_len:
        raise CheckpointError(
            f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end} "
            f"but the file has {data_start + data_len} bytes"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, expected)


class MappedFile:
    """A read-only view of one file through mmap; tensors are views into the page cache."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = path.open("rb")
        size = os.fstat(self._fh.fileno()).st_size
        # ACCESS_COPY gives a writable (private) mapping so torch.frombuffer does not warn;
        # nothing ever writes to it, so no page is copied.
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """Returns a zero-copy tensor over `info`'s bytes (do not write to it)."""
        if info.numel == 0 or self._mm is None:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.offset % dtype_itemsize(info.dtype):
            raw = bytearray(self._mm[info.offset : info.offset + info.nbytes])
            return torch.frombuffer(raw, dtype=info.dtype).reshape(info.shape)
        flat = torch.frombuffer(self._mm, dtype=info.dtype, count=info.numel, offset=info.offset)
        return flat.reshape(info.shape)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # A tensor view still references the mapping; the OS frees it with the view.
                pass
        self._fh.close()


def header_bytes(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[int, int]]]:
    """Returns the encoded header (length prefix included) and each entry's [begin, end) offsets."""
    header: dict[str, object] = {"__metadata__": metadata}
    spans = []
    cursor = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype_itemsize(dtype)
        header[name] = {
            "dtype": CODE_FROM_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [cursor, cursor + nbytes],
        }
        spans.append((cursor, cursor + nbytes))
        cursor += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, spans


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Returns the raw little-endian bytes of a CPU tensor, without a copy when contiguous."""
    t = tensor.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy().data)
