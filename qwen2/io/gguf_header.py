"""A GGUF file's metadata and tensor table without its tokenizer: what `qwen2 info` needs.

gguf's GGUFReader builds a numpy view for every element of every array field; on a Qwen2 file
that is ~300,000 tokenizer strings (tokens and merges), seconds per open. This reader walks the
same header (GGUF v2/v3: magic, version, counts, key/values, tensor infos) and steps over string
arrays, keeping only their length."""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from qwen2.errors import CheckpointError

# GGUFValueType -> struct format of a scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class Value:
    value: object

    def contents(self):  # as gguf's ReaderField
        return self.value


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # ggml order (ne0 first), as GGUFReader's
    tensor_type: int


@dataclass
class Header:
    fields: dict[str, Value]       # string arrays and arrays past 64 items hold only their length
    tensors: list[TensorInfo]


def read_header(path) -> Header:
    f = Path(path)
    try:
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(m, f)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError, OSError) as e:
        raise CheckpointError(f"{f}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def _parse(m, f: Path) -> Header:
    if m[:4] != b"GGUF":
        raise CheckpointError(f"{f}: not a GGUF file (magic {bytes(m[:4])!r}, expected b'GGUF')")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
    if version < 2:
        raise CheckpointError(f"{f}: GGUF version {version} is not supported")
    pos = 24

    def string(p):
        (n,) = struct.unpack_from("<Q", m, p)
        return m[p + 8:p + 8 + n].decode("utf-8"), p + 8 + n

    def value(p, vtype):
        if vtype == _STRING:
            return string(p)
        if vtype == _ARRAY:
            itype, count = struct.unpack_from("<IQ", m, p)
            p += 12
            if itype == _STRING:  # step over the strings: their lengths only
                for _ in range(count):
                    p += 8 + struct.unpack_from("<Q", m, p)[0]
                return count, p
            fmt = _SCALARS[itype]
            size = struct.calcsize(fmt)
            items = [struct.unpack_from(fmt, m, p + k * size)[0] for k in range(min(count, 64))]
            return (items if count <= 64 else count), p + count * size
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, m, p)[0], p + struct.calcsize(fmt)

    fields = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", m, pos)
        v, pos = value(pos + 4, vtype)
        fields[key] = Value(v)
    tensors = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", m, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
        pos += 4 + 8 * n_dims
        ttype, _offset = struct.unpack_from("<IQ", m, pos)
        pos += 12
        tensors.append(TensorInfo(name, tuple(int(d) for d in dims), ttype))
    return Header(fields, tensors)
