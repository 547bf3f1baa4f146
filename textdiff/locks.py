"""One writer per output: a lock file beside what a run writes, holding the writer's pid.

Two `textdiff` runs writing the same cache, model folder or `--out` would interleave their files
(DVC's own lock covers `dvc repro`, not a `textdiff train` typed in a second terminal). The lock is
created exclusively (O_EXCL); a second run reads the first's pid and command and refuses in one
line. A lock whose process is gone (killed) is stale: it is taken over, and the run says so.
Under torchrun the launching process holds the lock and hands it to its ranks through the
environment (`TEXTDIFF_LOCKS`), so the job's own processes are not refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from textdiff.atomic import process_alive
from textdiff.errors import TextDiffError

HELD_ENV = "TEXTDIFF_LOCKS"  # os.pathsep-separated locks this process tree already holds


def lock_path(target: Path) -> Path:
    """The lock of an output: `<name>.lock` beside a file or folder, `.textdiff.lock` inside a
    folder that a run only adds to (--out of predict)."""
    target = Path(target)
    return target.parent / f"{target.name}.lock"


def _held_here(path: Path) -> bool:
    held = os.environ.get(HELD_ENV, "")
    return str(path.resolve()) in held.split(os.pathsep) if held else False


@contextlib.contextmanager
def hold(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` while writing `what` (e.g. "the feature cache cache/features.zarr")."""
    path = Path(path)
    if _held_here(path) or int(os.environ.get("RANK", "0")) > 0:
        yield  # the launcher (or rank 0 of this torchrun job) holds it
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TextDiffError(f"{path.parent}: cannot create the folder for {what} ({err.strerror})") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(Path(a).name if i == 0 else a
                                                                                for i, a in enumerate(sys.argv)),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read(path)
            if other is None:
                time.sleep(0.2)  # being written this very moment, or just removed: look again
                continue
            if other.get("host") != me["host"] or process_alive(int(other.get("pid", -1))):
                raise TextDiffError(
                    f"{path}: {what} is being written by another run (pid {other.get('pid')} on "
                    f"{other.get('host')}, `{other.get('command')}`, since {other.get('started')}); wait for it to "
                    "finish or stop it, or delete this lock file if that run is gone") from None
            print(f"{path}: taking over the lock of pid {other.get('pid')} (`{other.get('command')}`, since "
                  f"{other.get('started')}), which is no longer running")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        except OSError as err:
            raise TextDiffError(f"{path}: cannot create the lock for {what} ({err.strerror})") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise TextDiffError(f"{path}: could not take the lock for {what} (another run keeps taking it)")
    previous = os.environ.get(HELD_ENV)
    os.environ[HELD_ENV] = os.pathsep.join(filter(None, [previous, str(path.resolve())]))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = previous
        with contextlib.suppress(FileNotFoundError):
            if (_read(path) or {}).get("pid") == me["pid"]:
                os.unlink(path)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
