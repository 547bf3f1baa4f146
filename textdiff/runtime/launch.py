"""Starting a stage under torchrun from inside DVC, so `dvc repro` stays the one entry point."""

from __future__ import annotations

import subprocess
import sys

from textdiff.errors import TextDiffError


def relaunch_under_torchrun(nproc: int, args: list[str]) -> None:
    """Run `textdiff <args>` as `nproc` processes on this machine (`torchrun --standalone`) and wait.

    torchrun sets RANK / WORLD_SIZE for each copy; a rank that fails prints its own one-line error
    and torchrun stops the others, so a failure here is one more line naming the exit code.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--no-python", sys.executable, "-m", "stages.cli", *args]
    print(f"running under torchrun with {nproc} processes: textdiff {' '.join(args)}", flush=True)
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise TextDiffError(f"textdiff {args[0]} under torchrun ({nproc} processes) failed with exit code {code}; "
                            "the failing rank's message is above")
