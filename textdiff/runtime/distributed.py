"""Running a stage on many processes with torch.distributed, as `torchrun` launches them.

No scheduler of our own: torchrun (or SLURM's srun with torchrun's rendezvous) starts N copies of
the same command and sets RANK / WORLD_SIZE / LOCAL_RANK; this module turns those into a `Ranks`
value (gloo on CPUs, NCCL on GPUs, one GPU per local rank) and deals out work deterministically.
A single process (no WORLD_SIZE) is `Ranks()` and never touches torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from textdiff.errors import TextDiffError

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


def _launch_env() -> int:
    """WORLD_SIZE, after checking the variables torchrun sets are all there and sane: a hand-set
    WORLD_SIZE without them would otherwise end in a c10d traceback, or wait forever for a rank
    that does not exist."""
    def integer(name: str, default: str | None = None) -> int:
        raw = os.environ.get(name, default)
        if raw is None:
            raise TextDiffError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {name} is not set: launch with "
                                "torchrun (it sets RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or unset WORLD_SIZE")
        try:
            return int(raw)
        except ValueError:
            raise TextDiffError(f"{name}={raw!r} is not an integer (torchrun's environment)") from None

    world = integer("WORLD_SIZE", "1")
    if world <= 1:
        return world
    rank = integer("RANK")
    if not 0 <= rank < world:
        raise TextDiffError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise TextDiffError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun, or unset WORLD_SIZE")
    return world


def init_ranks(device: torch.device) -> tuple[Ranks, torch.device]:
    """The ranks of a torchrun job (initialising the process group once) and this rank's device:
    `cuda:LOCAL_RANK` on GPUs. Outside torchrun: one rank, the device unchanged."""
    world = _launch_env()
    if world <= 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size()), device


@dataclass(frozen=True)
class Share:
    """This rank's part of a global batch, and how its losses weigh so that the ranks together
    compute the whole batch's loss: `mean_weight` = world x part / batch for per-image means (DDP
    averages gradients over ranks), `sums_weight` 0 or 1 for sums that are all-reduced. A rank left
    without an image (a last, short batch) runs the batch's first one at weight 0, since every rank
    must take part in each gradient all-reduce."""

    items: list
    mean_weight: float
    sums_weight: float


def local_share(batch: Sequence[T], ranks: Ranks) -> Share:
    """Every rank draws the same global batches; rank r takes the r-th of `world` near-equal
    contiguous parts."""
    if ranks.world == 1:
        return Share(list(batch), 1.0, 1.0)
    n, w = len(batch), ranks.world
    sizes = [n // w + (r < n % w) for r in range(w)]
    start = sum(sizes[: ranks.rank])
    mine = list(batch[start : start + sizes[ranks.rank]])
    if not mine:
        return Share(list(batch[:1]), 0.0, 0.0)
    return Share(mine, w * len(mine) / n, 1.0)


def summed_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A differentiable all-reduce (sum): the gradient of a sum over ranks flows back to every rank."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def data_parallel(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel (gradients averaged over ranks), or itself alone."""
    if ranks.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Unused parameters: the contrastive heads get no gradient while train.contrastive_weight is 0.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def close_ranks(ranks: Ranks) -> None:
    """Leave the process group cleanly (a rank that exits without it makes torch warn)."""
    if ranks.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
