"""The one exception type a user is meant to read.

Every check on user input (files, params, checkpoints) raises `TextDiffError` with a single line
that names the file or key and the problem; the CLI prints it without a traceback and exits 1.
Anything else escaping is a bug and keeps its traceback. A write that the machine refuses (full
disk, read-only folder) is a `WriteRefused`: also one line, naming the path.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class TextDiffError(Exception):
    """A problem with the user's input, described in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# A write can fail for reasons that are the user's machine, not a bug: these are reported in one line.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


class WriteRefused(TextDiffError):
    """An output could not be written (full disk, read-only folder, file size limit, permissions)."""

    def __init__(self, path: os.PathLike | str, reason: str, what: str | None = None):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot write {path}" + (f" ({what})" if what else "") + f": {reason}; "
                         "nothing half-written was kept")


def write_failure(err: BaseException, path: os.PathLike | str, largest_written: int = 0) -> str | None:
    """Why writing at `path` failed, if it is the machine's doing; None for anything else (a bug).

    Libraries do not all say: Python raises OSError with an errno, safetensors and h5py put it in
    their text, torch.save raises a RuntimeError without it. So besides the errno of `err` (or
    of what caused it), the folder is probed: a read-only mount, no free blocks, a file that reached
    the process's file size limit (`ulimit -f`, RLIMIT_FSIZE; `largest_written` is the size the
    failed file reached).
    """
    seen: BaseException | None = err
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError):
            if seen.filename is not None and not _beside(seen.filename, path):
                return None  # about another file (an input being read), not this output
            if seen.errno in WRITE_ERRNOS:
                return _reason(seen.errno)
        else:
            # Rust and C libraries put the errno in their text: safetensors "(os error 28)", h5py
            # "errno = 28", torch "file write failed".
            code = re.search(r"os error (\d+)|errno = (\d+)", str(seen))
            if code and int(code.group(1) or code.group(2)) in WRITE_ERRNOS:
                return _reason(int(code.group(1) or code.group(2)))

        seen = seen.__cause__ or seen.__context__
    # No errno to go by (torch.save says "iostream error"): the machine's state decides, so a bug is
    # reported as one only on a full or read-only disk, or with a file at the size limit.
    return probe_folder(path, largest_written)


def _reason(code: int) -> str:
    reason = os.strerror(code).lower()
    if code == errno.EFBIG and _fsize_limit() is not None:
        reason += f" (the file size limit, ulimit -f, is {_fsize_limit()} bytes)"
    return reason


def _beside(filename: os.PathLike | str | bytes, path: os.PathLike | str) -> bool:
    """Whether `filename` is `path`, inside it, or in its folder (where its temporaries are)."""
    name = Path(os.fsdecode(filename)).absolute()
    folder = Path(path).absolute().parent
    return name == folder or folder in name.parents


def probe_folder(path: os.PathLike | str, largest_written: int = 0) -> str | None:
    """A reason `path` cannot be written just now, seen from the file system; None if none is seen."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fs = os.statvfs(folder)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if fs.f_bavail * fs.f_frsize < 64 * 1024:
        return f"no space left on device ({fs.f_bavail * fs.f_frsize} bytes free)"
    limit = _fsize_limit()
    if limit is not None and largest_written >= limit:
        return f"file too large (the file size limit, ulimit -f, is {limit} bytes)"
    return None


def largest_file(path: os.PathLike | str) -> int:
    """Size of `path`, or of the largest file under it (a temp folder being filled); 0 if none."""
    path = Path(path)
    try:
        if path.is_file():
            return path.stat().st_size
        return max((p.stat().st_size for p in path.rglob("*") if p.is_file()), default=0)
    except OSError:
        return 0


def _fsize_limit() -> int | None:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft
