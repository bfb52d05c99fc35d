"""A training step's log line, and the health checks that stop a run.

train.py appends one record per RL step to metrics.jsonl and prints it; tools/compare.py reads
them back. The checks say in words why a model must not go on (a non-finite loss or weights, a
uniform output).
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from machinery import distributed as dd


class PhaseTimes(NamedTuple):
    """Seconds a step spent in each phase."""

    rollout: float
    ig: float  # rewards and the step bonus (IG scoring)
    update: float


class SearchStats(NamedTuple):
    """One search step, as the log counts it."""

    hit: bool  # its documents hold a gold answer
    ig: float | None  # its IG, None when not scored
    cut: bool  # its documents were cut to the response budget


@dataclass
class RolloutStats:
    """One rollout, as the log counts it (gathered from every rank)."""

    reward: float
    searches: list[SearchStats]
    length: int  # response tokens, documents included
    valid: bool  # it wrote an answer
    truncated: bool
    entropy: float  # sum of the policy entropy over its trained tokens
    trained: int  # its trained tokens
    query_entropy: float  # sum of the entropy over its query tokens
    query: int  # its query tokens
    query_bonus: float  # sum over its query tokens of |alpha * b~_t / |Q_t||: the bonus's part
    query_adv: float  # |A_i| * its query tokens (the outcome's part)


def rollout_stats(
    traj,
    reward: float,
    answered: bool,
    hits: list[bool],
    igs: list[float | None],
    entropy: torch.Tensor,
    token_adv: torch.Tensor,
    a_i: float,
) -> RolloutStats:
    """RolloutStats of one rollout (an igsearch.Trajectory); hits and igs: each search step's;
    entropy (R,) is the update's token entropy, 0 off the loss mask; token_adv (R,) its A_{i,p},
    a_i its A_i."""
    spans = [torch.arange(*s.query_span) for s in traj.steps]
    query = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
    return RolloutStats(
        reward=reward,
        searches=[
            SearchStats(hit=h, ig=v, cut=s.cut > 0) for s, h, v in zip(traj.steps, hits, igs)
        ],
        length=len(traj.response_ids),
        valid=answered,
        truncated=traj.truncated,
        entropy=float(entropy.sum()),
        trained=sum(traj.loss_mask),
        query_entropy=float(entropy[query].sum()),
        query=len(query),
        query_bonus=float((token_adv[query] - a_i).abs().sum()),
        query_adv=abs(a_i) * len(query),
    )


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def step_record(
    *,
    step: int,
    rollouts: list[RolloutStats],
    group_size: int,
    stats: dict,
    times: PhaseTimes,
    device: torch.device,
) -> dict:
    """The step's log line over the global batch: every rank's rollouts gathered (times: rank 0's).

    hit: share of search steps whose documents hold a gold answer; hit1: share of rollouts whose
    first search does (none counts as a miss); ig_hit / ig_miss: mean IG of those steps and of the
    others (does IG tell a query that found the answer from one that did not?); an IG mean over no
    scored step is None (JSON null), never 0 (tools/compare.py leaves it out); docs_cut: share of
    search steps whose documents were cut to the response budget; query_entropy near 0: the
    queries are fixed and IG's gradient on them (~ 1 - p) vanishes. query_tokens: mean |Q_t|;
    bonus_share: the step bonus's share of the push on query tokens, sum |alpha b~_t/|Q_t||
    over sum (|A_i| + |alpha b~_t/|Q_t||) (the bonus is spread over |Q_t| tokens, A_i is not).
    stats: step.update's.
    """
    ranks = [part[0] for part in dd.all_gather([(peak_memory_gb(device), rollouts)])]  # rank order
    rolls = [r for _, rank_rolls in ranks for r in rank_rolls]
    mem = max(gb for gb, _ in ranks)
    steps = [s for r in rolls for s in r.searches]
    igs = [s.ig for s in steps if s.ig is not None]
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0
    mean_ig = lambda xs: float(np.mean(xs)) if xs else None  # no step to average: undefined
    total = lambda key: sum(getattr(r, key) for r in rolls)
    rewards_all = [r.reward for r in rolls]
    zero_adv = (torch.tensor(rewards_all).view(-1, group_size).std(-1) == 0).float().mean()
    return {
        "step": step + 1,
        "reward": mean(rewards_all),
        "em": mean(rewards_all),
        "ig_mean": mean_ig(igs),
        "ig_pos": mean_ig([v > 0 for v in igs]),
        "hit": mean([s.hit for s in steps]),
        "hit1": mean([bool(r.searches) and r.searches[0].hit for r in rolls]),
        "ig_hit": mean_ig([s.ig for s in steps if s.hit and s.ig is not None]),
        "ig_miss": mean_ig([s.ig for s in steps if not s.hit and s.ig is not None]),
        "docs_cut": mean([s.cut for s in steps]),
        "searches": mean([len(r.searches) for r in rolls]),
        "length": mean([r.length for r in rolls]),
        "zero_adv_groups": float(zero_adv),
        "valid": mean([r.valid for r in rolls]),
        "truncated": mean([r.truncated for r in rolls]),
        "loss": stats["loss"],
        "kl": stats["kl"],
        "entropy": total("entropy") / max(total("trained"), 1),
        "query_entropy": total("query_entropy") / max(total("query"), 1),
        "query_tokens": total("query") / max(len(steps), 1),
        "bonus_share": total("query_bonus") / max(total("query_bonus") + total("query_adv"), 1e-9),
        "grad_norm": stats["grad_norm"],
        "skipped": stats["skipped"],
        "t_rollout": times.rollout,
        "t_ig": times.ig,
        "t_update": times.update,
        "mem_gb": mem,
    }


# ------------------------------------------------------------------------------ health checks


def mean_entropy(stats: dict) -> float:
    """The policy's mean entropy over an update's trained tokens, from step.update's per-rollout
    token entropies (0 off the loss mask, so the zeros are left out)."""
    entropy = torch.cat(stats["token_entropy"]) if stats.get("token_entropy") else torch.zeros(0)
    entropy = entropy[entropy > 0]
    return float(entropy.mean()) if len(entropy) else 0.0


def step_problem(model, stats: dict, skipped_ok: bool = False) -> str | None:
    """Why the model after an update (stats: step.update's) must not go on, in words, or None:
    a non-finite loss or gradient (unless skipped_ok: RL tolerates max_bad_steps of them), weights
    that are not finite, or a uniform output (the mean entropy of the trained tokens within 2 % of
    ln V: the model prefers no token, as after a learning rate of 1e30). Every rank calls it."""
    if stats.get("skipped") and not skipped_ok:
        return f"the loss or gradient is not finite (grad_norm {stats.get('grad_norm')})"
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # (a shard)
    bad = dd.all_sum([float(sum(not local(p).isfinite().all() for p in model.parameters()))])[0]
    if bad:
        return f"{bad:.0f} weight tensors are not finite"
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    entropy = mean_entropy(stats)
    if vocab and entropy >= 0.98 * math.log(vocab):
        return f"the output is uniform (entropy {entropy:.3f} nats, ln V = {math.log(vocab):.3f})"
    return None
