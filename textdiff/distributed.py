"""Running a stage on many processes with torch.distributed, as `torchrun` launches them.

No scheduler of our own: torchrun (or SLURM's srun with torchrun's rendezvous) starts N copies of
the same command and sets RANK / WORLD_SIZE / LOCAL_RANK; this module turns those into a `Ranks`
value (gloo on CPUs, NCCL on GPUs, one GPU per local rank) and deals out work deterministically.
A single process (no WORLD_SIZE) is `Ranks()` and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the job's processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes what is shared (the cache's layout, metadata, reports)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items, dealt round robin: item k goes to rank k % world. Deterministic, so a
        resumed job deals the remaining items the same way on every rank."""
        return list(items[self.rank :: self.world])


def init_ranks(device: torch.device) -> tuple[Ranks, torch.device]:
    """The ranks of a torchrun job (initialising the process group once) and this rank's device:
    `cuda:LOCAL_RANK` on GPUs. Outside torchrun: one rank, the device unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size()), device


def close_ranks(ranks: Ranks) -> None:
    """Leave the process group cleanly (a rank that exits without it makes torch warn)."""
    if ranks.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
