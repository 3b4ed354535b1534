"""Collectives the training workers share, whatever the task: sums over every worker."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every worker (itself when no process group runs), on `t`'s device."""
    if dist.is_available() and dist.is_initialized():
        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        moved = t.to(device)
        dist.all_reduce(moved)
        return moved.to(t.device)
    return t
