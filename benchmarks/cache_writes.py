"""How fast this machine writes feature chunks into zarr: MB/s (uncompressed) by writer threads and folder.

    python benchmarks/cache_writes.py                       # the temp dir, 1 / 2 / 8 threads
    python benchmarks/cache_writes.py --dirs /tmp /dev/shm --threads 1 8 16

Stage one on a GPU makes features faster than most disks take them (the paper's 256 ADM: 47 MB of
float16 per image and timestep), so this says whether a slow stage is bound by compression (scales
with threads), by the disk (does not; a RAM folder is faster), or by zarr itself. Chunks are the
cache's own: one image of the largest paper block, [3 steps, 256, 256, 256] float16, zstd (zarr's
default codec, as the cache uses), through the extract stage's own writer (`ImageChunkWriter`: zarr's
bytes without zarr's per-chunk Python), and the same bytes as plain files, without zarr at all.
Prints measured numbers only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.extract.chunk_files import ImageChunkWriter  # noqa: E402


def rate(write, n: int, threads: int, nbytes: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(min(threads, n))))  # warm-up: files, thread start, codec
        t0 = time.perf_counter()
        list(pool.map(write, range(n)))
        return n * nbytes / (time.perf_counter() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", nargs="*", default=[tempfile.gettempdir()])
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2, 8])
    ap.add_argument("--chunks", type=int, default=16, help="chunks written per measurement")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    chunk = (rng.standard_normal((3, 256, 256, 256)) * 0.5).astype(np.float16)  # compresses like features (~70 %)
    codec = numcodecs.Zstd(level=0)
    print(f"{os.cpu_count()} cpus; chunk {chunk.nbytes / 1e6:.0f} MB float16; zarr {zarr.__version__}")
    for base in args.dirs:
        for threads in args.threads:
            work = tempfile.mkdtemp(dir=base, prefix="textdiff-writes-")
            try:
                group = zarr.open_group(os.path.join(work, "c.zarr"), mode="w", zarr_format=3)
                array = group.create_array("x", shape=(args.chunks, *chunk.shape), chunks=(1, *chunk.shape),
                                           dtype="float16", fill_value=0)
                via_zarr = rate(lambda i, array=array: array.__setitem__(i, chunk), args.chunks, threads, chunk.nbytes)
                ours = group.create_array("y", shape=(args.chunks, *chunk.shape), chunks=(1, *chunk.shape),
                                          dtype="float16", fill_value=0)
                writer = ImageChunkWriter(ours)
                via_writer = rate(lambda i, writer=writer: writer(i, chunk), args.chunks, threads, chunk.nbytes)

                def plain(i: int, work: str = work) -> None:
                    with open(os.path.join(work, f"plain{i}"), "wb") as f:
                        f.write(codec.encode(chunk))

                via_files = rate(plain, args.chunks, threads, chunk.nbytes)
                print(f"{base}: {threads:2d} threads: zarr {via_zarr:6.0f} MB/s; "
                      f"ImageChunkWriter {via_writer:6.0f} MB/s; "
                      f"zstd + plain files {via_files:6.0f} MB/s")
            finally:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
