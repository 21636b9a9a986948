"""Reader for the IDX format of (Fashion-)MNIST, plain or gzip-compressed.

Layout (big-endian): magic ``0x00 0x00 <type> <ndim>``, then ``ndim`` uint32
sizes, then ``prod(sizes)`` items of ``<type>``. Type codes: ``0x08`` uint8,
``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from hbpc.data.errors import CorruptDataFile

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic ``1f 8b``."""
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise CorruptDataFile(f"{path}: corrupt gzip stream ({err})") from err


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array of shape ``sizes`` in native byte order."""
    if len(data) < 4:
        raise CorruptDataFile(f"{source}: truncated IDX header ({len(data)} bytes, need at least 4)")
    zero, type_code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or type_code not in IDX_TYPES:
        raise CorruptDataFile(f"{source}: bad IDX magic {data[:4].hex()} (expected 0000 then a type code in "
                              f"{', '.join(f'{c:02x}' for c in IDX_TYPES)} and the number of dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDataFile(
            f"{source}: truncated IDX header ({len(data)} bytes, need {header} for {ndim} dimensions)"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[type_code])
    expected = math.prod(shape) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        kind = "truncated" if found < expected else "trailing bytes in"
        raise CorruptDataFile(f"{source}: {kind} IDX data: shape {shape} of {dtype.name} needs "
                              f"{expected} bytes after the header, found {found}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a numpy array; ``CorruptDataFile`` if malformed."""
    path = Path(path)
    return parse_idx(read_bytes(path), str(path))
