"""Data-parallel training across processes: `torchrun --nproc_per_node K train.py ...`.

Every rank draws the same global batch of questions and rolls out a contiguous share of whole groups
(`shard`), so the batch in rank order is the batch a single process would hold. Information gain
draws its counterfactuals over the gathered global list of steps (`all_gather`), gradients are
summed over ranks (`all_reduce_grads`) with each rank's loss already divided by the global token
count: one update equals the single-process update. Only rank 0 writes files and prints.

With --fsdp the trained model is sharded instead of replicated (`shard_model`, FSDP2's fully_shard):
each rank holds 1/K of the fp32 weights, gradients and AdamW state (16 bytes per parameter in all)
and FSDP sums the gradients in its reduce-scatter. Rollouts, IG scoring, evaluation and checkpoints
use a full copy of the weights on every rank (`copy_full`, 4 bytes per parameter), refreshed after
every update: sampling then runs without a collective per forward pass, and ranks whose rollouts
take different numbers of tokens do not wait on each other while sampling.

Without WORLD_SIZE > 1 (a plain `python train.py`) every helper is the identity.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from machinery import lm

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


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written its files)."""
    if world_size() > 1:
        dist.barrier()


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
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(model: torch.nn.Module) -> None:
    """grad <- sum over ranks of grad, for every trained parameter (a missing grad counts as 0).
    A sharded model's gradients are already summed by FSDP's reduce-scatter."""
    if world_size() == 1 or is_sharded(model):
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:  # every rank must join every all_reduce, in the same order
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def broadcast_params(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters to every rank (after a warm-up that each rank ran on its own)."""
    if world_size() == 1 or is_sharded(model):  # sharded: one copy of each weight exists
        return
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, 0)


def shard_model(model: torch.nn.Module) -> None:
    """FSDP: shard each decoder layer's parameters (one all-gather per layer) and the rest
    (embeddings, final norm, head) over the ranks. The root keeps its parameters gathered after
    its forward (FSDP's default for the root): policy_logprobs applies the head to the returned
    hidden states outside it."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in lm.decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    for m in model.modules():
        # sum over ranks, not the mean: each rank's loss is already / global tokens
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # a plain SUM (gloo has no pre-multiplied sum)
            m.set_force_sum_reduction_for_comms(True)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def copy_full(sharded: torch.nn.Module, replica: torch.nn.Module) -> None:
    """replica <- the sharded model's weights, gathered one parameter at a time (every rank calls
    it)."""
    dst = dict(replica.named_parameters())
    for name, p in sharded.named_parameters():
        dst[name].copy_(p.full_tensor())


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients to a global norm of max_norm; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # sharded: a norm over all ranks
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict; for a sharded model the whole state gathered (every rank calls
    it)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Inverse of optimizer_state: each rank of a sharded model keeps its shard of the state."""
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
