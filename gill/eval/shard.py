"""Data-parallel evaluation under torchrun: which examples this process takes, and the group's barrier.

``torchrun --nproc-per-node N -m gill.eval vist ...`` starts N processes; each reads the whole dataset
(cheap, deterministic), takes every N-th batch of examples, writes its own records file, and rank 0 merges
them once all are done. Batches are cut from the whole dataset before they are dealt out, so an example is
computed in the same batch whatever N is, and the results do not depend on the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def takes(self, batch_number: int) -> bool:
        return batch_number % self.world == self.rank

    def device(self, device: str | None) -> str | None:
        """``cuda`` means this process's GPU (``cuda:LOCAL_RANK``) when there are several processes."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device


def from_env() -> Shard:
    """This process's place in a torchrun group (RANK, WORLD_SIZE, LOCAL_RANK), or a group of one."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun): {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not in a group of WORLD_SIZE {world}")
    return Shard(rank, world, local)


def init(shard: Shard, device: str | None) -> None:
    """Join the process group (nccl for GPUs, gloo otherwise) when there is more than one process."""
    if shard.world == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if (device or "").startswith("cuda"):
        import torch

        torch.cuda.set_device(shard.local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def barrier(shard: Shard) -> None:
    if shard.world == 1:
        return
    import torch.distributed as dist

    dist.barrier()


def finish(shard: Shard) -> None:
    if shard.world == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
