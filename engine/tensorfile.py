"""Safetensors files, read one tensor at a time and written atomically.

Reading copies each tensor out of a memory map into its own storage, then drops the mapped pages
(MADV_DONTNEED): a mapping left alone would count every touched page of a 6 GB checkpoint in the
process's RSS on top of the copies. Copying from the map is ~3x faster than read() here.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from loradrop.errors import UserError
from loradrop.fsutil import atomic_path

DTYPES: dict[str, torch.dtype] = {
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
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class TensorFile:
    """An open safetensors file: its metadata, its tensors' descriptions, and reads by name."""

    def __init__(self, path: str | os.PathLike, *, what: str = "a .safetensors file"):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist; expected {what}.")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a folder; expected {what}.")
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise UserError(f"{self.path} cannot be read ({e.strerror}); expected {what}.") from None
        try:
            self.metadata, self.infos = _parse_header(self._file, self.path, what)
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._map.close()
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into fresh memory (and cast it, if `dtype` differs)."""
        info = self.infos[key]
        tensor = torch.empty(info.shape, dtype=DTYPES[info.dtype])
        with self.mapped(key) as source:
            tensor.copy_(source)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    @contextlib.contextmanager
    def mapped(self, key: str) -> Iterator[torch.Tensor]:
        """The tensor as a read-only view of the file's bytes, no copy; valid inside the block.
        On leaving it, the pages are dropped again, so RSS never holds the file twice."""
        info = self.infos[key]
        if not info.nbytes:
            yield torch.empty(info.shape, dtype=DTYPES[info.dtype])
            return
        self._check_size([key])
        with self.mapped_bytes(info.start, info.end) as raw:
            yield raw.view(DTYPES[info.dtype]).view(info.shape)

    @contextlib.contextmanager
    def mapped_bytes(self, start: int, end: int) -> Iterator[torch.Tensor]:
        """Bytes [start, end) of the file as a read-only uint8 view; its pages dropped after."""
        if end <= start:  # nothing to map (a map cannot start at the file's end)
            yield torch.empty(0, dtype=torch.uint8)
            return
        with warnings.catch_warnings():  # the map is read-only, and nothing here writes to it
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - start, offset=start)
        try:
            yield raw
        finally:
            del raw
            first = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def _check_size(self, keys: Iterable[str]) -> None:
        """Refuse to map bytes the file no longer has (it may shrink while open): a read past
        the end of a map is SIGBUS, not an exception."""
        size = os.fstat(self._file.fileno()).st_size
        cut = [k for k in keys if self.infos[k].end > size]
        if cut:
            key = min(cut, key=lambda k: self.infos[k].start)
            raise UserError(f"{self.path} is truncated inside tensor {key}; copy the file again.")

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, in file order (sequential reads are fastest on any disk)."""
        for key in sorted(self.infos, key=lambda k: self.infos[k].start):
            yield key, self.read(key, dtype)

    def read_all(
        self, dtype: torch.dtype | None = None, keys: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every tensor (or those of `keys`), each in its own fresh memory, copied out of one
        mapping of the payload: a LoRA's thousands of small tensors cost one map and one
        madvise, not one each."""
        infos = self.infos if keys is None else {k: self.infos[k] for k in keys}
        if not infos:
            return {}
        first = min(i.start for i in infos.values())
        last = max(i.end for i in infos.values())
        self._check_size(infos)
        out = {}
        with self.mapped_bytes(first, last) as raw:
            for key, info in sorted(infos.items(), key=lambda kv: kv[1].start):
                tensor = torch.empty(info.shape, dtype=DTYPES[info.dtype])
                if info.nbytes:  # bytes to bytes: any offset, any dtype
                    tensor.reshape(-1).view(torch.uint8).copy_(raw[info.start - first : info.end - first])
                out[key] = tensor.to(dtype) if dtype is not None and tensor.dtype != dtype else tensor
        return out


def _parse_header(f, path: Path, what: str) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    not_st = f"{path} is not a safetensors file; expected {what}."
    if head[:2] == b"PK" or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        # Only when the bytes make no sense as a safetensors header length: "PK" and 0x80 can
        # also start a perfectly good length.
        not_st = (
            f"{path} is a pickle checkpoint (.ckpt/.pt), which can run code when loaded; "
            f"loradrop reads only {what}: convert it to safetensors first."
        )
    if len(head) < 8:
        raise UserError(not_st)
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > _MAX_HEADER:
        raise UserError(not_st)
    if 8 + n > size:
        if "pickle" in not_st:
            raise UserError(not_st)
        raise UserError(
            f"{path} is truncated: its header alone needs {8 + n} bytes, the file has {size}; copy it again."
        )
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(not_st) from None
    if not isinstance(header, dict):
        raise UserError(not_st)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise UserError(f"{path} has a malformed metadata block; expected {what}.")
    infos: dict[str, TensorInfo] = {}
    need = 0
    for key, spec in header.items():
        try:
            begin, end = spec["data_offsets"]
            info = TensorInfo(
                spec["dtype"], tuple(int(d) for d in spec["shape"]), 8 + n + int(begin), 8 + n + int(end)
            )
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} has a malformed entry for tensor {key}; expected {what}.") from None
        if info.dtype not in DTYPES:
            raise UserError(f"{path} stores tensor {key} as {info.dtype}, which loradrop cannot read.")
        numel = 1
        for d in info.shape:
            numel *= d
        if info.nbytes != numel * DTYPES[info.dtype].itemsize or info.nbytes < 0:
            raise UserError(f"{path} has a malformed entry for tensor {key}; expected {what}.")
        infos[key] = info
        need = max(need, info.end)
    if need > size:
        raise UserError(
            f"{path} is truncated: its tensors need {need} bytes, the file has {size}; copy it again."
        )
    return {str(k): str(v) for k, v in metadata.items()}, infos


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with TensorFile(path) as tf:
        return tf.metadata


_NAMES = {v: k for k, v in DTYPES.items()}
# The safetensors library writes tensors by dtype, in its enum's order from last to first, then by
# name. The same order here gives the same payload bytes, so hashes computed the way kohya does
# (over the library's serialisation) come out the same; it also keeps every tensor aligned.
_ORDER = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
    torch.int16,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.float32,
    torch.float64,
    torch.int64,
]
_RANK = {d: i for i, d in enumerate(_ORDER)}


class Layout:
    """Where each tensor goes in a file: the order and the header's tensor entries.

    Tensors go in the safetensors library's order (see _ORDER), metadata sorted by key, so the
    same tensors always give the same bytes (the library orders metadata by hash, so its own
    output differs from run to run). The tensor entries are encoded once: a trainer saving the
    same ~5,000 tensors every step only re-encodes the metadata.
    """

    def __init__(self, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.specs = dict(specs)
        self.order = sorted(specs, key=lambda k: (-_RANK[specs[k][0]], k))
        entries, offset = {}, 0
        for key in self.order:
            dtype, shape = specs[key]
            nbytes = math.prod(shape) * dtype.itemsize
            entries[key] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        self.nbytes = offset
        self._entries = _json(entries)[1:-1]

    def header(self, metadata: Mapping[str, str] | None) -> bytes:
        """The 8-byte length and the JSON header, padded with spaces to a multiple of 8."""
        parts = []
        if metadata:
            parts.append('"__metadata__":' + _json({str(k): str(v) for k, v in sorted(metadata.items())}))
        if self._entries:
            parts.append(self._entries)
        blob = ("{" + ",".join(parts) + "}").encode()
        blob += b" " * (-len(blob) % 8)
        return struct.pack("<Q", len(blob)) + blob


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def write(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (temporary name beside it, fsync, rename)."""
    layout = Layout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    write_payload(path, layout, payload(tensors, layout.order), metadata)


def payload(tensors: Mapping[str, torch.Tensor], order: list[str]) -> memoryview:
    """Every tensor's bytes in `order`, as one buffer: one write instead of thousands (a LoCon
    has ~5,000 small tensors). Joined with plain memory copies, not torch ops: on a writer
    thread, a torch op would start a second OpenMP team whose spinning threads slow training."""
    return memoryview(b"".join(tensor_bytes(tensors[k]) for k in order))


def write_payload(
    path: str | os.PathLike, layout: Layout, data: memoryview, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a file whose tensor bytes are already laid out in `layout`'s order."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(layout.header(metadata))
        f.write(data)


def write_streaming(
    path: str | os.PathLike,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors made one at a time by `produce(key)`, so a file far larger than memory
    (a random full-size SDXL for a benchmark) never has to exist in RAM."""
    layout = Layout(specs)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(layout.header(metadata))
        for key in layout.order:
            t = produce(key)
            if t.dtype != specs[key][0] or tuple(t.shape) != tuple(specs[key][1]):
                raise ValueError(f"{key}: produced {t.dtype} {tuple(t.shape)}, declared {specs[key]}")
            f.write(tensor_bytes(t))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a tensor, without a copy when it is contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
