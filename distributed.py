"""Data-parallel training across processes: `torchrun --nproc_per_node K train.py ...`.

Every rank draws the same global batch of questions and rolls out a contiguous share of whole groups
(`shard`), so the batch in rank order is the batch a single process would hold. Information gain
draws its counterfactuals over the gathered global list of steps (`all_gather`), gradients are
summed over ranks (`all_reduce_grads`) with each rank's loss already divided by the global token
count: one update equals the single-process update. Only rank 0 writes files and prints.

Without WORLD_SIZE > 1 (a plain `python train.py`) every helper is the identity.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# Ranks wait for each other at every gather; rank 0 alone runs the before/after evaluation.
TIMEOUT = datetime.timedelta(hours=2)


def setup() -> torch.device:
    """Join the process group that torchrun's environment describes (nccl on CUDA, gloo on CPU);
    returns this rank's device: cuda:LOCAL_RANK, cuda, or cpu."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(n: int) -> slice:
    """This rank's contiguous share of n items: rank r of K gets [r*n//K, (r+1)*n//K)."""
    r, k = rank(), world_size()
    return slice(r * n // k, (r + 1) * n // k)


def all_gather(items: list) -> list[list]:
    """Every rank's list (picklable objects), in rank order: [items] in a single process."""
    if world_size() == 1:
        return [items]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, items)
    return parts


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(model: torch.nn.Module) -> None:
    """grad <- sum over ranks of grad, for every trained parameter (a missing grad counts as 0)."""
    if world_size() == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:  # every rank must join every all_reduce, in the same order
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def broadcast_params(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters to every rank (after a warm-up that each rank ran on its own)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, 0)
