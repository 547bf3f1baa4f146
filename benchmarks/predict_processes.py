"""`textdiff predict` end to end by number of processes: one process with all threads, one with one
thread, and torchrun with N processes of one thread each (issue "A cohort of slides").

    python3 benchmarks/predict_processes.py --images 8
    python3 benchmarks/predict_processes.py --images 8 --nproc 1 2 4
    python3 benchmarks/predict_processes.py --slide-size 8000 --slide-tissue 4   # one synthetic slide instead

Each run is the whole command a user types (model loading included) on the first N MoNuSeg test
images into a fresh --out, timed from start to exit; peak RSS is the largest resident set of any
one process of the run and the sum of the processes' peaks, sampled every 0.1 s. With
`--slide-size`, the input is instead one synthetic pyramidal slide (`benchmarks/wsi.py`: glass with
a mosaic of test images in its middle), whose tiles the processes share; its rate is predict's own,
megapixels of tissue tiles at the working resolution per second. Prints the table and the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from textdiff.data.dataset import list_images  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import resolve_data_root  # noqa: E402


def _run(command: list[str], env: dict) -> tuple[float, float, float, str]:
    """(seconds, largest process peak RSS MiB, sum of the processes' peaks MiB, output tail)."""
    started = time.perf_counter()
    # From the repo, so `-m stages.cli` is this checkout's code whatever the caller's folder.
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    peaks: dict[int, int] = {}
    while process.poll() is None:
        try:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)
    output = process.stdout.read()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    mib = [v / 2**20 for v in peaks.values()] or [0.0]
    return seconds, max(mib), sum(mib), output.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--nproc", type=int, nargs="*", default=[2], help="torchrun process counts to run")
    ap.add_argument("--model", type=Path, default=Path("models/classifier"), help="the trained model folder")
    ap.add_argument("--slide-size", type=int, default=0, help="> 0: one synthetic slide of this many pixels a side")
    ap.add_argument("--slide-tissue", type=int, default=4, help="its tissue: a mosaic of N x N test images")
    args = ap.parse_args()

    params = load_params(REPO / "params.yaml")
    root = resolve_data_root(params.data.root)
    images = list_images(root, "test")[: args.images]
    scratch = Path(tempfile.mkdtemp(prefix="predict-processes-"))
    folder = scratch / "images"
    folder.mkdir()
    if args.slide_size:
        from wsi import build_slide

        build_slide(folder / "synthetic.tif", args.slide_size, args.slide_tissue)
        what = (f"one synthetic slide of {args.slide_size}² pixels with {args.slide_tissue}x{args.slide_tissue} test "
                "images of tissue")
    else:
        for path in images:
            os.link(path, folder / path.name)
        what = f"{len(images)} MoNuSeg test images (1000x1000, {len(images)} megapixels)"
    reports = root / "Test_Folder" / "Test_text.xlsx"
    base = ["predict", str(folder), "--out", "OUT", "--mpp", "0.25", "--model", str(args.model.resolve()),
            *(["--text", "Many nuclei."] if args.slide_size else ["--reports", str(reports)])]
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    configs = [(f"1 process, {threads} threads", threads, [sys.executable, "-m", "stages.cli"]),
               ("1 process, 1 thread", 1, [sys.executable, "-m", "stages.cli"])]
    for n in args.nproc:
        configs.append((f"torchrun, {n} processes x 1 thread", 1,
                        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                         "--no-python", sys.executable, "-m", "stages.cli"]))
    rows = []
    try:
        for k, (label, omp, prefix) in enumerate(configs):
            out = scratch / f"out{k}"
            command = [*prefix, *[str(out) if a == "OUT" else a for a in base]]
            env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(omp))
            seconds, largest, total, tail = _run(command, env)
            rate = re.search(r"\(([0-9.]+) megapixels/s", tail)
            rows.append((label, seconds, largest, total, float(rate.group(1)) if rate else float("nan")))
            print(f"{label}: {seconds:.1f} s ({tail})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    print(f"\n{what}, end to end with model loading; {cpu}, {threads} cores")
    rate = "megapixels/s (predict's, tissue tiles, working resolution)" if args.slide_size else "images/s"
    print(f"| run | seconds | {rate} | peak RSS, largest process (MiB) | peak RSS, all (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for label, seconds, largest, total, printed in rows:
        value = printed if args.slide_size else len(images) / seconds
        print(f"| {label} | {seconds:.1f} | {value:.3f} | {largest:.0f} | {total:.0f} |")


if __name__ == "__main__":
    main()
