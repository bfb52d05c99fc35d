"""Train a search policy with IG-Search: REINFORCE over groups of rollouts, IG on the queries.

    python train.py                        # offline default: SmolLM2-135M, wiki QA, BM25, 2 CPUs
    python train.py --preset paper         # the paper's setting (Qwen2.5-3B, GPU)
    python train.py --outcome_only         # the Search-R1 GRPO baseline (alpha = 0)
    python train.py --resume runs/default  # continue a run from its last checkpoint

Each step: sample questions -> G rollouts each -> exact-match reward and IG per search step ->
group advantages plus alpha * IG on query tokens -> one REINFORCE update -> one log line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import igsearch as ig
import prepare
from config import Config, check_config, estimate_seconds, method_name, parse_config
from evaluate import evaluate, format_table
from machinery import credit_page as credit
from machinery import distributed as dd
from machinery import fast, lm, loaders, lora
from machinery import memory_estimate as memory
from machinery import run_folder as ckpt
from machinery.errors import InputError, RetrieverError, TrainingError
from retriever import make_search
from warmup import warmup

# --------------------------------------------------------------------- the phases of an RL step


def sample_questions(train_q: list[dict], cfg: Config, gen: torch.Generator) -> list[dict]:
    """The step's questions, each G times in a row (a group): the same global draw on every rank,
    each rank taking its share of whole groups."""
    idx = torch.randint(len(train_q), (cfg.questions_per_step,), generator=gen)
    return [train_q[i] for i in idx.tolist()[dd.shard(len(idx))] for _ in range(cfg.group_size)]


def generate_rollouts(
    policy, tokenizer, questions: list[dict], search, cfg: Config, generator
) -> list[ig.Trajectory]:
    """ig.rollout of every question, in chunks of at most cfg.rollout_batch (0 = all at once)."""
    tpl = ig.TEMPLATES[cfg.template]
    prompts = [ig.build_prompt(tokenizer, q["question"], tpl) for q in questions]
    size, trajs = cfg.rollout_batch or len(prompts), []
    for k in range(0, len(prompts), size):
        trajs += ig.rollout(
            policy,
            tokenizer,
            prompts[k : k + size],
            search,
            template=tpl,
            max_searches=cfg.max_searches,
            max_turn_tokens=cfg.max_turn_tokens,
            max_response_tokens=cfg.max_response_tokens,
            temperature=cfg.temperature,
            generator=generator,
            turn=fast.CachedTurns() if cfg.fast else lm.generate_turn,
        )
    return trajs


def alpha_of(cfg: Config) -> float:
    """alpha, the weight of the step values on the query tokens: 0 for outcome-only."""
    return 0.0 if cfg.outcome_only else cfg.ig_alpha


def counterfactual_draws(trajs: list[ig.Trajectory], cfg: Config, gen: torch.Generator) -> ig.Draws:
    """This rank's share of the IG baselines, drawn over every rank's steps in rank order: the same
    pool and draw as one process holding the whole batch."""
    parts = dd.all_gather([ig.step_pairs(t) for t in trajs])  # one list per rank
    first = sum(len(p) for p in parts[: dd.rank()])
    draws = ig.plan_counterfactuals(
        [x for p in parts for x in p], cfg.ig_n_random, cfg.ig_baseline, gen
    )
    return draws[first : first + len(trajs)]


def step_values(
    policy,
    tokenizer,
    trajs: list[ig.Trajectory],
    golds: list[list[str]],
    cfg: Config,
    gen: torch.Generator,
) -> list[list[float | None]] | None:
    """What alpha weighs on each search step's query tokens: IG_t (the paper; also sets step.ig),
    or, for the hit-bonus baseline, 1 where the step's documents hold a gold answer and 0 where
    not. None when alpha is 0 (outcome-only): nothing is scored."""
    if alpha_of(cfg) == 0:
        return None
    if cfg.step_reward == "hit":
        return [
            [float(ig.documents_hold_answer(st.documents, g)) for st in t.steps]
            for t, g in zip(trajs, golds)
        ]
    draws = counterfactual_draws(trajs, cfg, gen)
    return ig.information_gain(
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
        score=fast.answer_scores_shared_prefix if cfg.fast else ig.answer_scores,
    )


def advantages(
    trajs: list[ig.Trajectory],
    rewards: torch.Tensor,
    values: list[list[float | None]] | None,
    cfg: Config,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A_{i,p} = A_i + alpha * v~_t / |Q_t| on the query tokens of step t, A_i elsewhere; A_i is the
    group baseline (GRPO) and v_t the step value (IG_t), shaped. Returns A_i (B,) (the log and the
    step page show it) and A_{i,p}, one (R_i,) tensor per rollout."""
    adv = ig.group_advantages(rewards, cfg.group_size, cfg.normalize_std)  # (B,)
    return adv, ig.token_advantages(
        trajs,
        adv,
        alpha_of(cfg),
        cfg.ig_dead_zone,
        cfg.ig_neg_scale,
        cfg.ig_clip or None,
        cfg.group_size if cfg.ig_center else 0,
        values or [[None] * len(t.steps) for t in trajs],
    )


def update(model, ref_model, tokenizer, trajs, tok_adv, optimizer, cfg: Config) -> dict:
    """One REINFORCE step over the batch, in micro-batches with gradient accumulation.

    Data-parallel, trajs is this rank's share: each rank's loss is divided by the global batch's
    token count and the gradients are summed over ranks, so the step equals one process's step.
    Returns the summed loss and KL, the gradient norm, whether the step was skipped (non-finite),
    and each rollout's token entropies (R_i,) from the same forward pass, for the log.
    """
    model.train()
    optimizer.zero_grad()
    logprobs = fast.policy_logprobs if cfg.fast else ig.policy_logprobs
    n_tokens = dd.all_sum([float(sum(sum(t.loss_mask) for t in trajs))])[0]  # sum_p mask_p, global
    loss_sum, kl_sum, entropies = 0.0, 0.0, []
    for k in range(0, len(trajs), cfg.micro_batch):
        mb = trajs[k : k + cfg.micro_batch]
        batch = ig.response_batch(
            mb, tokenizer.pad_token_id, model.device, tok_adv[k : k + cfg.micro_batch]
        )
        with bf16(model.device):
            logp, entropy = logprobs(model, batch)  # (b, R)
            ref_logp = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp, _ = logprobs(ref_model, batch)
            loss, kl = ig.policy_loss(
                logp, batch["advantages"], batch["loss_mask"], ref_logp, cfg.kl_coef, n_tokens
            )
        fast.backward(loss) if cfg.fast else loss.backward()
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
    query_bonus: float  # sum over its query tokens of |alpha * IG~_t / |Q_t||: IG's part
    query_adv: float  # |A_i| * its query tokens (the outcome's part)


def rollout_stats(
    traj: ig.Trajectory,
    golds: list[str],
    reward: float,
    entropy: torch.Tensor,
    tok_adv: torch.Tensor,
    a_i: float,
) -> RolloutStats:
    """RolloutStats of one rollout; entropy (R,) is update's token entropy, 0 off the loss mask;
    tok_adv (R,) its A_{i,p}, a_i its A_i."""
    spans = [torch.arange(*s.query_span) for s in traj.steps]
    query = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
    return RolloutStats(
        reward,
        [
            SearchStats(ig.documents_hold_answer(s.documents, golds), s.ig, s.cut > 0)
            for s in traj.steps
        ],
        len(traj.response_ids),
        ig.extract_answer(traj) is not None,
        traj.truncated,
        float(entropy.sum()),
        sum(traj.loss_mask),
        float(entropy[query].sum()),
        len(query),
        float((tok_adv[query] - a_i).abs().sum()),
        abs(a_i) * len(query),
    )


def step_record(
    step: int,
    trajs: list[ig.Trajectory],
    golds: list[list[str]],
    rewards: torch.Tensor,
    adv: torch.Tensor,
    tok_adv: list[torch.Tensor],
    cfg: Config,
    stats: dict,
    times: list[float],
    device: torch.device,
) -> dict:
    """The step's log line over the global batch: every rank's rollouts gathered (times: rank 0's).

    hit: share of search steps whose documents hold a gold answer; hit1: share of rollouts whose
    first search does (none counts as a miss); ig_hit / ig_miss: mean IG of those steps and of the
    others (does IG tell a query that found the answer from one that did not?); docs_cut: share of
    search steps whose documents were cut to the response budget; query_entropy near 0: the
    queries are fixed and IG's gradient on them (~ 1 - p) vanishes. query_tokens: mean |Q_t|;
    bonus_share: the step bonus's (IG's) share of the push on query tokens, sum |alpha IG~_t/|Q_t||
    over sum (|A_i| + |alpha IG~_t/|Q_t||) (the bonus is spread over |Q_t| tokens, A_i is not).
    adv (B,) is A_i, tok_adv the A_{i,p} (one (R_i,) tensor per rollout).
    """
    mine = [
        rollout_stats(t, g, r, e, ta, a)
        for t, g, r, e, ta, a in zip(
            trajs, golds, rewards.tolist(), stats["token_entropy"], tok_adv, adv.tolist()
        )
    ]
    ranks = [part[0] for part in dd.all_gather([(peak_memory_gb(device), mine)])]  # in rank order
    rolls = [r for _, rank_rolls in ranks for r in rank_rolls]
    mem = max(gb for gb, _ in ranks)
    steps = [s for r in rolls for s in r.searches]
    igs = [s.ig for s in steps if s.ig is not None]
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0
    total = lambda key: sum(getattr(r, key) for r in rolls)
    rewards_all = [r.reward for r in rolls]
    zero_adv = (torch.tensor(rewards_all).view(-1, cfg.group_size).std(-1) == 0).float().mean()
    return {
        "step": step + 1,
        "reward": mean(rewards_all),
        "em": mean(rewards_all),
        "ig_mean": mean(igs),
        "ig_pos": mean([v > 0 for v in igs]),
        "hit": mean([s.hit for s in steps]),
        "hit1": mean([bool(r.searches) and r.searches[0].hit for r in rolls]),
        "ig_hit": mean([s.ig for s in steps if s.hit and s.ig is not None]),
        "ig_miss": mean([s.ig for s in steps if not s.hit and s.ig is not None]),
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
        "t_rollout": times[1] - times[0],
        "t_ig": times[2] - times[1],
        "t_update": times[3] - times[2],
        "mem_gb": mem,
    }


def evaluate_on(s: Setup, questions: list[dict], desc: str) -> dict:
    """Greedy EM of the policy on held-out questions (rank 0 alone holds them)."""
    with bf16(s.device):
        return evaluate(
            s.policy,
            s.tokenizer,
            questions,
            s.search,
            desc=desc,
            batch_size=s.cfg.eval_batch,
            template=s.cfg.template,
            max_searches=s.cfg.max_searches,
            max_turn_tokens=s.cfg.max_turn_tokens,
        )[0]


def validate(s: Setup, step: int) -> dict:
    """Validation after `step` RL steps: a point of the held-out learning curve."""
    return {f"val_{k}": v for k, v in evaluate_on(s, s.val_q, f"validate {step}").items()}


# ----------------------------------------------------------------------------------- set-up


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bf16(device: torch.device):
    """bf16 autocast on CUDA, off on CPU. The trained weights stay fp32: AdamW steps of lr 1e-6
    would round away on bf16 weights (spacing ~1e-4 near 0.02)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


@dataclass
class Setup:
    """Everything a run holds: config, folder, device, models, optimizer, data, retriever, RNGs."""

    cfg: Config
    run: Path
    device: torch.device
    model: torch.nn.Module  # the trained model (sharded with FSDP)
    policy: torch.nn.Module  # what samples, scores and is saved: the model, or its full copy
    tokenizer: object
    search: object
    train_q: list[dict]
    val_q: list[dict]  # rank 0 alone evaluates: [] on the others
    test_q: list[dict]
    gens: dict[str, torch.Generator]
    ref_model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    table: dict = dataclasses.field(default_factory=dict)
    step: int = 0

    def save(self, step: int) -> None:
        ckpt.save_checkpoint(
            self.run,
            self.policy,
            self.tokenizer,
            self.model,
            self.optimizer,
            step,
            dataclasses.asdict(self.cfg),
            self.gens,
        )

    def sync_policy(self) -> None:
        """With FSDP, refresh the full copy that samples, scores and is saved (every rank)."""
        if self.policy is not self.model:
            dd.copy_full(self.model, self.policy)


def set_up(cfg: Config, resume: str, restart: bool = False) -> Setup:
    """The run's state: device, seeds, run folder, data, retriever, model and optimizer; for a
    resumed run, the checkpoint's weights, optimizer and RNG states. It evaluates and trains
    nothing: train() does, in order."""
    device, main = dd.setup(), dd.is_main()  # only rank 0 (main) prints and writes files
    check_config(cfg, dd.world_size())
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    gens = {
        "data": torch.Generator().manual_seed(cfg.seed),
        "ig": torch.Generator().manual_seed(cfg.seed + 1),
        "sample": torch.Generator(device=device).manual_seed(cfg.seed + 2 + 1000 * dd.rank()),
    }
    run = Path(resume or cfg.out_dir)
    table = run / "table.json"  # a resumed run's rows so far, read before any work
    table = ckpt.read_table(table) if resume and table.exists() else {}
    if main:  # the folder is this run's: locked, and never an older run's files (ckpt.claim_run)
        ckpt.claim_run(run, bool(resume), restart)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        if device.type == "cpu" and not cfg.model:
            print(
                f"estimate: ~{estimate_seconds(cfg) / 60:.0f} min on 2 CPU cores (measured "
                f"rates, config.CPU_SECONDS); each phase's bar shows its own ETA"
            )
    memory.check(
        cfg,
        str(ckpt.last_checkpoint(run)) if resume else cfg.model or prepare.default_model(),
        device,
        dd.world_size(),
        quiet=not main,
    )
    own_data = cfg.train_data and (cfg.corpus or cfg.retriever_url)
    data = {} if own_data else prepare.default_data(cfg.task)
    train_file = cfg.train_data or data["train"]
    train_q, val_q = loaders.split_validation(
        loaders.load_questions(train_file), cfg.val_questions if cfg.eval_every else 0
    )
    if not train_q:
        raise InputError(
            f"config: val_questions={cfg.val_questions} leaves no training questions "
            f"in {train_file}"
        )
    test_file = cfg.test_data or data.get("test", "")
    test_q = []
    if test_file and cfg.eval_questions:
        test_q = loaders.load_questions(test_file)[: cfg.eval_questions]
    search = make_search(
        cfg.corpus or data.get("corpus", ""),
        cfg.retriever_url,
        cfg.topk,
        cfg.doc_words or None,
        cfg.retriever_timeout,
        cfg.retriever_retries,
    )
    start_model = str(ckpt.last_checkpoint(run)) if resume and not cfg.lora_rank else cfg.model
    start_model = start_model or prepare.default_model()
    model, tokenizer = loaders.load_model(
        start_model, device, cfg.trust_remote_code, dtype=torch.float32
    )
    if main:  # every input is checked: now config.json (and --restart removes the older files)
        ckpt.start_run(run, dataclasses.asdict(cfg), bool(resume))
    if cfg.lora_rank:  # the base stays the loaded model; a resumed run reloads only its adapter
        lora.add_adapter(
            model,
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.lora_targets,
            ckpt.last_checkpoint(run) if resume else None,
        )
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    policy = model
    if cfg.fsdp:
        policy = copy.deepcopy(model).eval().requires_grad_(False)
        dd.shard_model(model)
    elif cfg.fast:  # (FSDP's sharded gradients stay dense)
        fast.lean_backward(model)
    s = Setup(
        cfg,
        run,
        device,
        model,
        policy,
        tokenizer,
        search,
        train_q,
        val_q if main else [],
        test_q if main else [],
        gens,
        table=table,
    )
    s.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if resume:
        s.step = ckpt.load_state(run, model, s.optimizer, gens)
        if dd.rank():  # the checkpoint holds rank 0's sampling state; the others must not repeat it
            gens["sample"].manual_seed(cfg.seed + 2 + 1000 * dd.rank() + s.step)
        kept = ckpt.load_metrics(run / "metrics.jsonl", s.step)  # drop records after the checkpoint
        if main:
            ckpt.write_lines(run / "metrics.jsonl", [json.dumps(r) for r in kept])
    return s


def frozen_copy(policy, device: torch.device):
    """The KL reference: a frozen copy of the model RL starts from (bf16 on CUDA is enough)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)


def reference_model(policy, cfg: Config, device: torch.device):
    """The KL penalty's start model: under LoRA the base with its adapter off (no second copy),
    else a frozen copy; None without a KL term."""
    if cfg.kl_coef == 0:
        return None
    return lora.AdapterOff(policy) if cfg.lora_rank else frozen_copy(policy, device)


# ------------------------------------------------------------------------------------ train


def train(cfg: Config, resume: str = "", restart: bool = False) -> dict:
    """The run: evaluate -> warm-up -> evaluate -> RL steps -> evaluate. Returns the test table."""
    s = set_up(cfg, resume, restart)
    main = dd.is_main()
    if not resume:
        # ---- the start model on the test questions; the format warm-up; the warmed-up model on
        #      the test questions and on validation (step 0 of the learning curve)
        if s.test_q and cfg.eval_start:
            s.table["start model"] = evaluate_on(s, s.test_q, "eval start")
        if cfg.warmup_examples:
            warmup(s.model, s.tokenizer, s.train_q, s.search, cfg, s.gens["data"], update)
            s.sync_policy()
            if s.test_q:
                s.table["after warm-up"] = evaluate_on(s, s.test_q, "eval warm-up")
        if s.table:
            ckpt.write_json(s.run / "table.json", s.table)
        if s.val_q and (cfg.eval_start or cfg.warmup_examples):  # this run made its start model
            ckpt.write_lines(s.run / "metrics.jsonl", [json.dumps({"step": 0, **validate(s, 0)})])
    s.ref_model = reference_model(s.policy, cfg, s.device)
    bad_steps = 0
    for step in tqdm(
        range(s.step, cfg.steps), desc="train", initial=s.step, total=cfg.steps, disable=not main
    ):
        # ---- 1. rollouts: G of each of the step's questions
        t0 = time.time()
        qs = sample_questions(s.train_q, cfg, s.gens["data"])
        s.policy.eval()
        try:
            with bf16(s.device):
                trajs = generate_rollouts(
                    s.policy, s.tokenizer, qs, s.search, cfg, s.gens["sample"]
                )
        except RetrieverError:  # keep the work so far, then stop with the retriever's message
            if not cfg.fsdp:  # (FSDP's state gathering needs every rank, which may not be here)
                s.save(step)
            raise
        t1 = time.time()
        # ---- 2. rewards and IG: R_i = EM, and the value of every search step (IG_t)
        golds = [q["golden_answers"] for q in qs]
        # (B,)
        rewards = torch.tensor(
            [ig.exact_match(ig.extract_answer(t), g) for t, g in zip(trajs, golds)]
        )
        with bf16(s.device):
            values = step_values(s.policy, s.tokenizer, trajs, golds, cfg, s.gens["ig"])
        t2 = time.time()
        # ---- 3. advantages: the group baseline, plus alpha * IG~_t / |Q_t| on the query tokens
        adv, tok_adv = advantages(trajs, rewards, values, cfg)  # (B,) A_i and the A_{i,p}
        # ---- 4. one on-policy REINFORCE update
        stats = update(s.model, s.ref_model, s.tokenizer, trajs, tok_adv, s.optimizer, cfg)
        s.sync_policy()
        t3 = time.time()
        # ---- 5. log (over the global batch), validate, checkpoint
        rec = step_record(
            step, trajs, golds, rewards, adv, tok_adv, cfg, stats, [t0, t1, t2, t3], s.device
        )
        if s.val_q and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            rec.update(validate(s, step + 1))
        if main:
            ckpt.append_record(s.run / "metrics.jsonl", rec)
            tqdm.write(
                " ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                )
            )
            if cfg.html_every and ((step + 1) % cfg.html_every == 0 or step + 1 == cfg.steps):
                page = s.run / "steps" / f"step-{step + 1:04d}.html"
                title = f"{s.run}: step {step + 1}" + (", rank 0's share" * (dd.world_size() > 1))
                credit.write_step_page(
                    page, s.tokenizer, qs, trajs, rewards, adv, tok_adv, cfg, title
                )
        bad_steps = bad_steps + 1 if stats["skipped"] else 0
        problem = ckpt.step_problem(s.policy, stats, skipped_ok=True)
        if bad_steps >= cfg.max_bad_steps or problem:  # never saved: the checkpoint predates it
            raise TrainingError(
                f"{s.run}: stopped at step {step + 1}: "
                + (problem or f"{bad_steps} steps in a row had a non-finite loss or gradient")
                + f"; {ckpt.kept_checkpoint(s.run, 'before them')}"
            )
        if not bad_steps and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            s.save(step + 1)
    if cfg.steps == 0:  # a warm-up-only run: keep the warmed-up model as the run's checkpoint
        s.save(0)
    # ---- the trained model on the test questions
    if s.test_q and cfg.steps > 0:
        s.table[method_name(dataclasses.asdict(cfg))] = evaluate_on(s, s.test_q, "eval trained")
        ckpt.write_json(s.run / "table.json", s.table)
        print(format_table(s.table, average=False, first="model"))  # rows: one test set
    dd.barrier()  # ranks leave together, once rank 0's checkpoint and table are written
    return s.table


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume, restart = parse_config(argv)
        train(cfg, resume, restart)
    except (InputError, RetrieverError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ckpt.release_run()
        dd.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
