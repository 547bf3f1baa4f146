"""Atomic writes: a stage's output appears whole or not at all.

DVC trusts whatever sits at an output path; a run killed half-way must not leave a file that looks
finished. Everything is written next to its final place and moved in with os.replace. A write the
machine refuses (a full disk, a read-only folder, `ulimit -f`) becomes a one-line `WriteRefused`
naming the output, after the temporary is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from textdiff.errors import TextDiffError, WriteRefused, largest_file, write_failure


def _temp_beside(final: Path) -> Path:
    """`.<name>.tmp-<pid>` next to `final`: hidden, and recognisable by `remove_stale_temporaries`."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with `pid` still runs (a killed writer's does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but is not ours to signal
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporaries (files or folders) a killed process left in `folder`, so DVC never
    caches them as outputs. Those of a process still running (another stage writing there) stay."""
    for tmp in Path(folder).glob(".*.*-*"):
        kind, _, pid = tmp.name.rpartition(".")[2].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid() or process_alive(int(pid)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_write_failures(final: Path, what: str | None = None, temp: Path | None = None) -> Iterator[None]:
    """Re-raise a failure of the machine to write `final` as `WriteRefused`; anything else as it was.

    `temp` is the file or folder being filled: its size tells a file size limit from other errors.
    """
    try:
        yield
    except TextDiffError:
        raise
    except Exception as err:
        reason = write_failure(err, final, largest_file(temp) if temp is not None else 0)
        if reason is None:
            raise
        raise WriteRefused(final, reason, what) from err


@contextlib.contextmanager
def atomic_dir(final: Path, what: str | None = None) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final`, on error it vanishes."""
    final = Path(final)
    tmp = _temp_beside(final)
    try:
        with naming_write_failures(final, what, tmp):
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
            _swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, final: Path) -> None:
    """Move the old folder aside, the new one in, then delete the old one: a failed rename puts the
    old one back, so `final` is never left missing or half-written."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path, what: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `final`; it becomes `final` only if the block succeeds."""
    final = Path(final)
    tmp = _temp_beside(final)
    try:
        with naming_write_failures(final, what, tmp):
            final.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            if tmp.is_file():  # some writers (safetensors) create 0600 files; outputs are shared
                os.chmod(tmp, 0o644)
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
