"""One RL step of IG-Search with the run's config: the phases that train.py calls in this order.

    questions = sample_questions(...)   the step's questions, each G times in a row (a group)
    trajs = generate_rollouts(...)      a multi-turn rollout of each (igsearch.rollout)
    outcome = rewards(...)              R_i = EM of the last <answer>; which documents hold a gold
    bonus = step_bonus(...)             what alpha weighs on each search step's query: IG_t
    adv = advantages(...)               A_i, and A_{i,p} = A_i + alpha * IG~_t / |Q_t| on Q_t
    stats = update(...)                 one REINFORCE step over the batch

Each phase is a function of its inputs and the config. How the model runs (the plain functions or
their fast twins, fp32 or bf16) is chosen once, in train.set_up, as a `Compute`, and passed in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

import igsearch as ig
from config import Config
from machinery import distributed as dd
from machinery import fast, lm

# ------------------------------------------------------------------ how the model runs, chosen once


@dataclass(frozen=True)
class Compute:
    """The plain functions of igsearch.py and machinery/lm.py, or their twins of machinery/fast.py
    (the same results up to float rounding, tested), and the autocast dtype: chosen once for a run
    and used by training, in-training evaluation and evaluate.py alike."""

    new_turn: Callable[[], Callable]  # a turn sampler for one rollout batch (igsearch.rollout)
    answer_logprobs: Callable  # IG scoring's forward passes (igsearch.information_gain)
    policy_logprobs: Callable  # the update's forward pass
    backward: Callable[[torch.Tensor], None]  # the update's backward pass
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None  # autocast dtype (bf16), None: fp32 throughout

    def autocast(self, cache: bool = True):
        """Autocast to amp_dtype; the weights, gradients and AdamW state stay fp32. cache=False
        casts the weights anew at each use instead of keeping bf16 copies: IG scoring's long
        no-grad forwards kept ~0.9 GiB more resident with the cache, at the same speed."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache)


def choose_compute(
    use_fast: bool, device: torch.device, amp_dtype: torch.dtype | None = None
) -> Compute:
    """Compute with the fast twins (use_fast) or the plain functions, autocast to amp_dtype."""
    if amp_dtype is not None and device.type == "cpu":
        lm.bound_kernel_caches()  # before the first bf16 product
    if use_fast:
        return Compute(
            new_turn=fast.CachedTurns,
            answer_logprobs=fast.answer_logprobs_shared_prefix,
            policy_logprobs=fast.policy_logprobs,
            backward=fast.backward,
            device=device,
            amp_dtype=amp_dtype,
        )
    return Compute(
        new_turn=lambda: lm.generate_turn,
        answer_logprobs=ig.answer_logprobs,
        policy_logprobs=ig.policy_logprobs,
        backward=lambda loss: loss.backward(),
        device=device,
        amp_dtype=amp_dtype,
    )


# ------------------------------------------------------------------------------------ the phases


def sample_questions(
    train_questions: list[dict], cfg: Config, generator: torch.Generator
) -> list[dict]:
    """The step's questions, each G times in a row (a group): the same global draw on every rank,
    each rank taking its share of whole groups."""
    idx = torch.randint(len(train_questions), (cfg.questions_per_step,), generator=generator)
    picked = idx.tolist()[dd.shard(len(idx))]
    return [train_questions[i] for i in picked for _ in range(cfg.group_size)]


def generate_rollouts(
    policy,
    tokenizer,
    questions: list[dict],
    search,
    cfg: Config,
    generator: torch.Generator | None,
    compute: Compute | None = None,
    temperature: float | None = None,
) -> list[ig.Trajectory]:
    """igsearch.rollout of every question, in chunks of at most cfg.rollout_batch (0 = all at
    once), at cfg.temperature (evaluation passes 0: greedy). compute: the run's (None: cfg.fast's
    choice, fp32)."""
    compute = compute or choose_compute(cfg.fast, next(policy.parameters()).device)
    template = ig.TEMPLATES[cfg.template]
    prompts = [ig.build_prompt(tokenizer, q["question"], template) for q in questions]
    size, trajs = cfg.rollout_batch or len(prompts), []
    for k in range(0, len(prompts), size):
        with compute.autocast():
            trajs += ig.rollout(
                policy,
                tokenizer,
                prompts[k : k + size],
                search,
                template=template,
                max_searches=cfg.max_searches,
                max_turn_tokens=cfg.max_turn_tokens,
                max_response_tokens=cfg.max_response_tokens,
                temperature=cfg.temperature if temperature is None else temperature,
                generator=generator,
                turn=compute.new_turn(),
            )
    return trajs


class Outcome(NamedTuple):
    """What each rollout earned, and the facts about it that the log and the hit bonus read."""

    rewards: torch.Tensor  # (B,) R_i = EM of the last <answer> against the gold answers
    answers: list[str | None]  # the last <answer> block of each rollout, None: it wrote none
    hits: list[list[bool]]  # [i][t]: the documents of search step t hold a gold answer


def rewards(trajs: list[ig.Trajectory], golds: list[list[str]]) -> Outcome:
    """R_i = EM(answer_i, gold): the outcome reward; and each search step's hit."""
    answers = [ig.extract_answer(t) for t in trajs]
    return Outcome(
        rewards=torch.tensor([ig.exact_match(a, g) for a, g in zip(answers, golds)]),  # (B,)
        answers=answers,
        hits=[
            [ig.documents_hold_answer(s.documents, g) for s in t.steps]
            for t, g in zip(trajs, golds)
        ],
    )


def alpha_of(cfg: Config) -> float:
    """alpha, the weight of the step bonus on the query tokens: 0 for outcome-only."""
    return 0.0 if cfg.outcome_only else cfg.ig_alpha


def counterfactual_draws(
    trajs: list[ig.Trajectory], cfg: Config, generator: torch.Generator
) -> ig.Draws:
    """This rank's share of the IG baselines, drawn over every rank's steps in rank order: the same
    pool and draw as one process holding the whole batch."""
    parts = dd.all_gather([ig.step_pairs(t) for t in trajs])  # one list per rank
    first = sum(len(p) for p in parts[: dd.rank()])
    draws = ig.plan_counterfactuals(
        [x for p in parts for x in p],
        cfg.ig_n_random,
        cfg.ig_baseline,
        generator,
        group_size=cfg.group_size if cfg.ig_pool == "others" else 0,
    )
    return draws[first : first + len(trajs)]


class StepBonus(NamedTuple):
    """What alpha weighs on each search step's query tokens, and the IG it came from."""

    bonus: list[list[float | None]]  # [i][t]: IG_t (or the hit, 1/0); None: no bonus
    gains: list[list[ig.Gain | None]]  # [i][t]: IG_t and its scores, where IG was scored


def step_bonus(
    policy,
    tokenizer,
    trajs: list[ig.Trajectory],
    golds: list[list[str]],
    outcome: Outcome,
    cfg: Config,
    generator: torch.Generator,
    compute: Compute | None = None,
) -> StepBonus:
    """The step bonus of every search step: IG_t (the paper's step_reward "ig"), or, for the
    hit-bonus baseline ("hit"), 1 where the step's documents hold a gold answer and 0 where not.
    Nothing is scored when alpha is 0 (outcome-only). compute: as generate_rollouts'."""
    none = [[None] * len(t.steps) for t in trajs]
    if alpha_of(cfg) == 0:
        return StepBonus(bonus=none, gains=none)
    if cfg.step_reward == "hit":
        return StepBonus(bonus=[[float(h) for h in row] for row in outcome.hits], gains=none)
    draws = counterfactual_draws(trajs, cfg, generator)
    compute = compute or choose_compute(cfg.fast, next(policy.parameters()).device)
    with compute.autocast(cache=False):
        gains = ig.information_gain(
            policy,
            tokenizer,
            trajs,
            golds,
            draws,
            template=ig.TEMPLATES[cfg.template],
            all_golds=cfg.ig_all_golds,
            max_len=cfg.ig_max_len,
            batch_size=cfg.ig_batch_size,
            head_weight=cfg.ig_head_weight,
            logprobs=compute.answer_logprobs,
        )
    return StepBonus(bonus=[[g and g.ig for g in row] for row in gains], gains=gains)


class Advantages(NamedTuple):
    outcome: torch.Tensor  # (B,) A_i, the group baseline's advantage
    tokens: list[torch.Tensor]  # A_{i,p}: one (R_i,) tensor per rollout


def advantages(
    trajs: list[ig.Trajectory],
    rewards: torch.Tensor,
    step_bonus: list[list[float | None]],
    cfg: Config,
) -> Advantages:
    """A_{i,p} = A_i + alpha * b~_t / |Q_t| on the query tokens of step t, A_i elsewhere: A_i is
    the group baseline (GRPO), b_t the step bonus (IG_t), centred in its group with --ig_center
    (not the paper's) and shaped (dead zone, scale on negative values, clip)."""
    outcome = ig.group_advantages(rewards, cfg.group_size, cfg.normalize_std)  # (B,) A_i
    if cfg.ig_center:
        step_bonus = ig.center_in_groups(step_bonus, cfg.group_size)
    tokens = ig.token_advantages(
        trajs,
        outcome,
        step_bonus,
        alpha=alpha_of(cfg),
        dead_zone=cfg.ig_dead_zone,
        neg_scale=cfg.ig_neg_scale,
        clip=cfg.ig_clip or None,
    )
    return Advantages(outcome=outcome, tokens=tokens)


def update(
    model,
    ref_model,
    tokenizer,
    trajs: list[ig.Trajectory],
    token_adv: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    compute: Compute | None = None,
) -> dict:
    """One REINFORCE step over the batch, in micro-batches with gradient accumulation. compute:
    the run's (None: cfg.fast's choice, fp32, as the warm-up's tests and tools use it).

    Data-parallel, trajs is this rank's share: each rank's loss is divided by the global batch's
    token count and the gradients are summed over ranks, so the step equals one process's step.
    Returns the summed loss and KL, the gradient norm, whether the step was skipped (non-finite),
    and each rollout's token entropies (R_i,) from the same forward pass, for the log.
    """
    compute = compute or choose_compute(cfg.fast, next(model.parameters()).device)
    model.train()
    optimizer.zero_grad()
    n_tokens = dd.all_sum([float(ig.loss_tokens(trajs))])[0]  # sum_p mask_p over the global batch
    loss_sum, kl_sum, entropies = 0.0, 0.0, []
    for k in range(0, len(trajs), cfg.micro_batch):
        mb = trajs[k : k + cfg.micro_batch]
        batch = lm.response_batch(
            mb, tokenizer.pad_token_id, model.device, token_adv[k : k + cfg.micro_batch]
        )
        with compute.autocast():
            logp, entropy = compute.policy_logprobs(model, batch)  # (b, R)
            ref_logp = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp, _ = compute.policy_logprobs(ref_model, batch)
            loss, kl = ig.policy_loss(
                logp, batch["advantages"], batch["loss_mask"], ref_logp, cfg.kl_coef, n_tokens
            )
        compute.backward(loss)
        loss_sum, kl_sum = loss_sum + loss.item(), kl_sum + kl.item()
        entropies += [row[len(row) - len(t.response_ids) :].cpu() for row, t in zip(entropy, mb)]
    dd.all_reduce_grads(model)
    loss_sum, kl_sum = dd.all_sum([loss_sum, kl_sum])
    grad_norm = dd.clip_grad_norm(model, cfg.grad_clip)
    finite = np.isfinite(loss_sum) and np.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad()
    return {
        "loss": loss_sum,
        "kl": kl_sum,
        "grad_norm": grad_norm,
        "skipped": not finite,
        "token_entropy": entropies,
    }
