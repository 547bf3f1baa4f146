"""Write one image's chunk of a cache array as the very bytes zarr would, at the speed of the codec.

Why not `array[i] = value`: zarr's write path holds the GIL for much of a chunk's life (copy into a
chunk buffer, the fill-value scan, its event loop), so on a 16-core GPU machine it stopped at
~0.5-0.6 GB/s of float16 whatever the number of threads, while zstd alone (which releases the GIL)
and plain files reached 2.5-4.3 GB/s (measured on a lent H100 machine, `benchmarks/cache_writes.py`).
The paper's teacher makes 47 MB per image and timestep, so at GPU speed zarr's path, not the
teacher, set the pace of stage one.

This writer keeps zarr as the format and its codec: for an array whose chunks are one whole image
and whose codecs are exactly (little-endian bytes, zstd) on a local store, it encodes the image with
the same numcodecs Zstd that zarr's ZstdCodec wraps and writes the file at the key zarr's chunk-key
encoding gives, through a temporary file renamed into place as zarr's LocalStore does. Anything
else (read-only, other codecs or chunking, a fill value that is not all zero bits, complex dtypes)
goes through `array[i] = value`, and so does an item whose bits are all zero unless the array is
configured to write empty chunks (zarr's default writes no chunk for a fill-value item, and deletes
an old one; the cache's arrays keep every chunk, see `cache.keeping_empty_chunks`). Tests compare the files
byte for byte with zarr's.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.storage import LocalStore


class ImageChunkWriter:
    """`writer(i, value)` stores item i (the array's first axis) of an array chunked one item per chunk."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self._codec: numcodecs.Zstd | None = None
        codecs = tuple(array.metadata.codecs) if array.metadata.zarr_format == 3 else ()
        whole_items = tuple(array.chunks) == (1, *array.shape[1:])
        store = array.store_path.store
        if (whole_items and isinstance(store, LocalStore) and not store.read_only and len(codecs) == 2
                and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec)
                and (codecs[0].endian is None or codecs[0].endian.value == "little")
                and array.dtype.kind in "fiub" and _zero_bits(array.metadata.fill_value, array.dtype)):
            self._codec = numcodecs.Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
            self._dir = Path(store.root) / array.store_path.path
            self._zeros = (0,) * (array.ndim - 1)
        self._keep_empty = bool(array.config.write_empty_chunks)

    @property
    def fast(self) -> bool:
        return self._codec is not None

    def __call__(self, i: int, value: np.ndarray) -> None:
        value = np.asarray(value)
        if self._codec is None:
            self.array[i] = value
            return
        n = self.array.shape[0]
        if not -n <= i < n:
            raise IndexError(f"{self.array.path}: item {i} outside [0, {n})")
        i = i % n
        item = np.ascontiguousarray(value, dtype=self.array.dtype.newbyteorder("<"))
        if item.shape != tuple(self.array.shape[1:]):  # no broadcasting: one whole item, as stored
            raise ValueError(f"{self.array.path}: item of shape {item.shape}, expected {tuple(self.array.shape[1:])}")
        if not self._keep_empty and not item.view(f"u{item.dtype.itemsize}").any():  # the fill value: zarr's rule
            self.array[i] = value
            return
        path = self._dir / self.array.metadata.encode_chunk_key((i, *self._zeros))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")  # as zarr's LocalStore: whole or absent
        try:
            partial.write_bytes(self._codec.encode(item))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def _zero_bits(fill: object, dtype: np.dtype) -> bool:
    """Whether the fill value is all zero bits (0, +0.0, False): then "every bit zero" is exactly
    zarr's empty-chunk test, which compares floats bit for bit (-0.0 is not +0.0 there)."""
    try:
        return not np.asarray(fill, dtype=dtype).reshape(1).view(f"u{dtype.itemsize}").any()
    except (TypeError, ValueError):
        return False
