"""What a kill costs `textdiff train`: an uninterrupted run against one SIGKILLed after its second
epoch began and started again (issue "Survive a kill anywhere").

    python3 benchmarks/train_resume.py                 # the workspace's cache, train.epochs=3
    python3 benchmarks/train_resume.py --epochs 5 --kill-after-round 3

Needs a finished `dvc repro` up to extract. The runs happen in a scratch workspace (hard links of
cache/ and data/prepared, the params with `train.epochs` changed), so the workspace's model is not
touched. Prints the seconds of each run, the resumed run's share of the uninterrupted one, whether
the weights are equal tensor for tensor, and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = Path("models/classifier.resume.pt")
MODEL = Path("models/classifier/model.pt")


def _saved_round(work: Path) -> int:
    try:
        return int(torch.load(work / CHECKPOINT, map_location="cpu", weights_only=True)["round"])
    except Exception:  # noqa: BLE001 - not written yet, or being replaced this moment
        return 0


def _train(work: Path, env: dict, kill_after_round: int | None = None, grace: float = 1.0) -> float:
    """Seconds of one `textdiff train`; with `kill_after_round`, SIGKILLs it (and its children)
    `grace` seconds after that round's checkpoint is on disk, i.e. inside the next epoch."""
    command = [sys.executable, "-m", "stages.cli", "train", "--params", "params.yaml"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    if kill_after_round is None:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"textdiff train failed:\n{err[-3000:]}")
        return time.perf_counter() - started
    while _saved_round(work) < kill_after_round:
        if process.poll() is not None:
            raise SystemExit(f"the run ended before round {kill_after_round}: {process.stderr.read()[-3000:]}")
        time.sleep(0.1)
    time.sleep(grace)
    for p in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=REPO, help="a workspace after `dvc repro` (default: the repo)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kill-after-round", type=int, default=1, help="kill once this round's checkpoint is saved")
    ap.add_argument("--grace", type=float, default=1.0, help="seconds after that checkpoint (inside the next epoch)")
    args = ap.parse_args()

    params = yaml.safe_load((args.workspace / "params.yaml").read_text())
    params["train"]["epochs"] = args.epochs
    scratch = Path(tempfile.mkdtemp(prefix="train-resume-"))
    try:
        for folder in ("cache", "data/prepared"):
            shutil.copytree(args.workspace / folder, scratch / folder, copy_function=os.link)
        (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = dict(os.environ, PYTHONPATH=str(REPO))

        whole = _train(scratch, env)
        reference = torch.load(scratch / MODEL, map_location="cpu", weights_only=True)
        shutil.rmtree(scratch / "models")
        killed_at = _train(scratch, env, kill_after_round=args.kill_after_round, grace=args.grace)
        assert (scratch / CHECKPOINT).is_file(), "no checkpoint survived the kill"
        resumed = _train(scratch, env)
        weights = torch.load(scratch / MODEL, map_location="cpu", weights_only=True)
        same = reference.keys() == weights.keys() and all(torch.equal(reference[k], weights[k]) for k in reference)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"device: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, train.device={params['train']['device']}")
    print(f"train.epochs={args.epochs}, killed {args.grace:.1f} s after round {args.kill_after_round}'s checkpoint")
    print(f"uninterrupted run      {whole:7.1f} s")
    print(f"killed run, until kill {killed_at:7.1f} s")
    print(f"resumed run            {resumed:7.1f} s  = {100 * resumed / whole:.1f} % of the uninterrupted run")
    print(f"weights equal to the uninterrupted run's: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
