"""Reading and writing IDX files (the MNIST file format), gzip-compressed or raw.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then
``ndim`` big-endian uint32 dimensions, then the values in C order, big-endian.
:func:`read_idx` checks every part of that and the exact file length, and
optionally the md5 of the decompressed bytes, so a damaged or wrong file is an
error that names the file, never an array that is silently used.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path

import numpy as np

from fundl.data.errors import DataError

# IDX type code -> big-endian NumPy dtype.
DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in DTYPES.items()}
GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's content, decompressed when it is gzip (detected by its magic bytes, not its name)."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: expected a complete gzip stream, got a damaged or truncated one "
            f"({len(data)} bytes on disk): {e}"
        ) from None


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def parse_idx(data: bytes, source: str = "<bytes>", *, magic: int | None = None,
              shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """Decode IDX bytes into a native-endian array, validating header and length.

    ``magic`` (e.g. 2051 for images, 2049 for labels) and ``shape`` (``None``
    entries match anything) are optional expectations; ``source`` names the
    file in error messages.
    """
    if len(data) < 4:
        raise DataError(f"{source}: expected at least a 4-byte IDX header, got {len(data)} bytes (truncated)")
    got_magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or code not in DTYPES or ndim == 0:
        raise DataError(
            f"{source}: expected an IDX magic number 0x0000TTNN (TT a type code in "
            f"{sorted(hex(c) for c in DTYPES)}, NN >= 1 dimensions), got 0x{got_magic:08x}; "
            f"not an IDX file or corrupted"
        )
    if magic is not None and got_magic != magic:
        raise DataError(f"{source}: expected magic number {magic} (0x{magic:08x}), got {got_magic} (0x{got_magic:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: expected a {header}-byte header for {ndim} dimensions, got {len(data)} bytes (truncated)")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if shape is not None and (len(shape) != ndim or any(s is not None and s != d for s, d in zip(shape, dims))):
        raise DataError(f"{source}: expected dimensions {tuple(shape)}, got {dims}")
    dtype = DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise DataError(
            f"{source}: expected {expected} bytes for dimensions {dims} of {dtype.newbyteorder('=')}, "
            f"got {len(data)} ({what})"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def read_idx(path: str | os.PathLike, *, md5: str | None = None, magic: int | None = None,
             shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a NumPy array.

    ``md5`` is checked against the *decompressed* bytes, which are the same on
    every mirror. Raises :class:`DataError` naming the file on any mismatch.

    Examples:
        >>> from fundl.data import read_idx, write_idx
        >>> path = write_idx("images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
        >>> read_idx(path, magic=2051, shape=(None, 28, 28)).shape
        (5, 28, 28)
    """
    data = read_bytes(path)
    array = parse_idx(data, str(path), magic=magic, shape=shape)  # structural errors first: they say more
    if md5 is not None:
        got = md5_hex(data)
        if got != md5:
            raise DataError(
                f"{path}: checksum mismatch: expected md5 {md5} of the decompressed bytes, got {got}; "
                f"the file is corrupted or is a different file — delete it and obtain it again"
            )
    return array


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes for ``array`` (dtype one of uint8, int8, int16, int32, float32, float64)."""
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODES:
        raise TypeError(f"IDX cannot store dtype {array.dtype}; expected one of {sorted(str(d) for d in _CODES)}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got array of shape {array.shape}")
    code = _CODES[native]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip when ``compress`` (default: when the name ends in ``.gz``).

    The gzip header carries no timestamp, so the output is byte-for-byte reproducible.
    """
    path = Path(path)
    data = encode_idx(array)
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
