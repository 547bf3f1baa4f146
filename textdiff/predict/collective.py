"""What the processes of a torchrun `textdiff predict` job say to each other: one all-gather.

Kept here rather than in `textdiff.runtime.distributed`, which the extract and train stages depend
on: predict is not a DVC stage, and an edit for it must not re-run them.
"""

from __future__ import annotations

from textdiff.runtime.distributed import Ranks


def gathered(obj: object, ranks: Ranks) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] for a single process.
    Also a barrier: it returns once every rank has got here."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed

    out: list = [None] * ranks.world
    torch.distributed.all_gather_object(out, obj)
    return out
