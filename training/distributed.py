"""torchrun helpers: process group set-up (gloo on CPU, nccl on GPU), gathers that keep local gradients."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device_type: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def global_count(local: torch.Tensor) -> torch.Tensor:
    """Sum of a count over ranks (no gradient)."""
    total = local.detach().float().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.clamp_min(1.0)


def gather_keep_local(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows in rank order; this rank's rows keep their gradient, the others carry none."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def all_mean(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(values, t.tolist())}


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
