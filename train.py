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
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint as ckpt
import distributed as dd
import fast
import igsearch as ig
import prepare
from compare import method_name
from errors import InputError, OneLineParser, TrainingError
from evaluate import documents_hold_answer, evaluate, format_table, make_search
from retriever import RetrieverError
from warmup import warmup


@dataclass
class Config:
    # data, model, retriever ("" = the offline default built by prepare.py)
    model: str = ""  # HF name or folder (paper: Qwen/Qwen2.5-3B)
    trust_remote_code: bool = False  # run Python code shipped with the model (trusted repos only)
    train_data: str = ""  # FlashRAG JSON lines (paper: NQ + HotpotQA train)
    test_data: str = ""  # held-out questions for the before/after table
    corpus: str = ""  # wiki-18 JSON lines for in-memory BM25 (paper: wiki-18 with E5)
    retriever_url: str = ""  # Search-R1 /retrieve endpoint; replaces corpus when set
    retriever_timeout: float = 30.0  # seconds per retriever request before it counts as failed
    retriever_retries: int = 3  # tries per retriever request (back-off 0.5 s, 1 s, ...)
    topk: int = 3  # passages per search (paper 3)
    doc_words: int = 30  # words kept per passage, 0 = all (paper: up to 512 tokens)
    template: str = "igsearch"  # prompt and tags: igsearch (documents + refine) or searchr1
    # rollout
    questions_per_step: int = 4  # prompts per step (paper 256)
    group_size: int = 4  # G rollouts per question, the baseline's group (paper 5)
    max_searches: int = 2  # searches per rollout before the final answer turn (paper 5)
    max_turn_tokens: int = 32  # new tokens per turn (paper 512)
    max_response_tokens: int = 512  # response budget, documents included (paper ~4096)
    temperature: float = 1.0  # sampling temperature (paper 1.0)
    # reward
    outcome_only: bool = False  # alpha = 0: the Search-R1 GRPO baseline
    ig_alpha: float = 0.3  # weight of IG on the query tokens (paper 0.3)
    ig_n_random: int = 3  # N counterfactual document sets per step (paper 3)
    ig_baseline: str = "random"  # random (paper) or empty (the paper's ablation)
    ig_head_weight: float = 3.0  # weight of the first 3 answer tokens in s(a*|C) (official 3)
    ig_all_golds: bool = False  # score every gold answer and keep the best (default: the first)
    ig_dead_zone: float = 0.0  # |IG| below this counts as 0 (paper: delta, value not public)
    ig_neg_scale: float = 1.0  # factor on negative IG (paper: eta < 1, value not public)
    ig_clip: float = 0.0  # clip IG to [-c, c], 0 = off
    ig_center: bool = False  # IG minus its question's group mean (not the paper's: a variant)
    ig_max_len: int = 1024  # scoring contexts are left-truncated to this many tokens
    ig_batch_size: int = 16  # scoring sequences per forward pass
    normalize_std: bool = True  # divide the group advantage by the group's std
    # optimisation
    steps: int = 12  # RL steps (paper 200)
    lr: float = 2e-5  # AdamW learning rate (paper 1e-6)
    kl_coef: float = 0.0  # k3 KL penalty to the frozen start model (paper 0.001)
    grad_clip: float = 1.0  # gradient-norm clip
    max_bad_steps: int = 3  # stop after this many steps in a row with a non-finite loss or gradient
    micro_batch: int = 2  # rollouts per forward/backward in the update (gradient accumulation)
    rollout_batch: int = 0  # sequences generated together, at most (0 = all): bounds the KV cache
    grad_checkpointing: bool = True  # recompute each layer's activations in the backward pass
    fsdp: bool = False  # torchrun: shard weights, gradients and AdamW state over the ranks
    fast: bool = True  # the exact speed-ups of fast.py (same results, less time and memory)
    warmup_examples: int = 64  # format warm-up: supervised trajectories from the train split
    warmup_lr: float = 5e-5  # learning rate of the warm-up
    warmup_batch: int = 8  # trajectories per warm-up step
    warmup_query: str = "question"  # the warm-up's query: the question, or "varied" (query_forms)
    # evaluation, logging, checkpoints
    eval_questions: int = 64  # held-out test questions in the before/after table (0 = skip)
    val_questions: int = 200  # validation questions carved from the train split, never trained on
    eval_every: int = 0  # validation EM every K RL steps, at step 0 and at the end (0 = off)
    eval_start: bool = True  # evaluate the start model (off when runs share a start checkpoint)
    eval_batch: int = 16  # questions per evaluation rollout batch
    out_dir: str = "runs/default"  # run folder: config, metrics.jsonl, checkpoint/
    save_every: int = 5  # checkpoint every K steps (and at the end)
    seed: int = 0  # one seed for data order, sampling and counterfactual draws


PRESETS = {
    "default": {},
    # the README's learning experiment: from one shared warm-up checkpoint, 40 steps, validation
    # every 10 steps, all 751 test questions at the end (micro_batch 8, no checkpointing: faster)
    "learn": dict(steps=40, lr=2e-5, eval_questions=751, eval_start=False, warmup_examples=0,
                  eval_every=10, micro_batch=8, grad_checkpointing=False, out_dir="runs/learn"),
    "paper": dict(model="Qwen/Qwen2.5-3B", questions_per_step=256, group_size=5, max_searches=5,
                  max_turn_tokens=512, max_response_tokens=4096, doc_words=0, steps=200, lr=1e-6,
                  kl_coef=0.001, micro_batch=4, ig_batch_size=32, ig_max_len=4096,
                  warmup_examples=0, grad_checkpointing=True, rollout_batch=64,
                  eval_questions=0, eval_batch=64, save_every=10, out_dir="runs/paper"),
}


def parse_bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
        text.lower())
    if value is None:
        raise ValueError(text)
    return value


# what a resumed run cannot change: its folder and start, its seed (every RNG state is restored),
# the split and test set its earlier records were measured on, the warm-up it already did
FIXED_ON_RESUME = ("model", "out_dir", "seed", "train_data", "test_data", "val_questions",
                   "eval_questions", "eval_start", "warmup_examples", "warmup_lr", "warmup_batch",
                   "warmup_query")


def parse_config(argv: list[str] | None = None) -> tuple[Config, str, bool]:
    """--field value for every Config field, --preset NAME, --resume RUN_DIR, --restart
    -> (config, resume, restart)."""
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--resume", default="", help="run folder to continue from its checkpoint")
    p.add_argument("--restart", action="store_true",
                   help="start over in an out_dir that holds a run (removes its files)")
    for f in dataclasses.fields(Config):
        if f.type == "bool":  # --flag, or --flag true/false
            p.add_argument(f"--{f.name}", nargs="?", const=True, default=None, type=parse_bool)
        else:
            p.add_argument(f"--{f.name}", default=None,
                           type={"int": int, "float": float}.get(f.type, str))
    args = p.parse_args(argv)
    values = dataclasses.asdict(Config())
    given = {k: v for k, v in vars(args).items() if k in values and v is not None}
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.json").exists():
            raise InputError(f"{run}: not a run folder (no config.json)")
        if not ckpt.last_checkpoint(run).exists():
            raise InputError(f"{run}: no checkpoint to resume from (the run stopped before its "
                             f"first save): start it again without --resume")
        saved = ckpt.read_json(run / "config.json")
        for name in FIXED_ON_RESUME:
            if name in given and given[name] != saved.get(name, given[name]):
                raise InputError(f"--{name} cannot change on --resume (the run continues from "
                                 f"{run}/checkpoint): start a new run to change it")
        if args.preset != "default":
            raise InputError("--preset cannot be given with --resume (the run keeps its config)")
        values.update(checked_fields(saved, run / "config.json"))
    else:
        values.update(PRESETS[args.preset])
    values.update(given)
    return Config(**values), args.resume, args.restart


def checked_fields(saved: dict, where: Path) -> dict:
    """config.json's fields, each known and of its field's type, else one line naming it."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    for name, value in saved.items():
        if name not in fields:
            raise InputError(f"{where}: unknown config field '{name}'")
        ok = isinstance(value, kinds[fields[name]])
        if not ok or (fields[name] != "bool" and isinstance(value, bool)):
            raise InputError(f"{where}: '{name}' is {value!r}, not of type {fields[name]}")
    return saved


def check_config(cfg: Config, world_size: int = 1) -> None:
    """Every rule on the config, in one place: a value out of range stops the run with one line
    naming the field and what it accepts."""
    c = cfg
    rules = [
        ("group_size", c.group_size >= 2, "an integer >= 2"), ("ig_alpha", c.ig_alpha >= 0, ">= 0"),
        ("topk", c.topk >= 1, "an integer >= 1"), ("max_searches", c.max_searches >= 0, ">= 0"),
        ("questions_per_step", c.questions_per_step >= max(1, world_size),
         f">= 1 and >= the {world_size} ranks"),
        ("questions_per_step", not c.fsdp or c.questions_per_step % world_size == 0,
         f"a multiple of the {world_size} ranks with --fsdp"),
        ("fsdp", not c.fsdp or world_size > 1,
         "False in one process: launch with torchrun --nproc_per_node K to shard"),
        ("max_turn_tokens", c.max_turn_tokens >= 1, ">= 1"),
        ("ig_n_random", c.ig_n_random >= 1, ">= 1"), ("micro_batch", c.micro_batch >= 1, ">= 1"),
        ("ig_baseline", c.ig_baseline in ("random", "empty"), "random or empty"),
        ("warmup_query", c.warmup_query in ("question", "varied"), "question or varied"),
        ("template", c.template in ig.TEMPLATES, " or ".join(ig.TEMPLATES)),
        ("lr", c.lr > 0, "> 0"), ("temperature", c.temperature >= 0, ">= 0"),
        ("retriever_retries", c.retriever_retries >= 1, ">= 1"),
        ("retriever_timeout", c.retriever_timeout > 0, "> 0"),
        ("rollout_batch", c.rollout_batch >= 0, ">= 0"),
        ("val_questions", c.val_questions >= 0, ">= 0"), ("eval_every", c.eval_every >= 0, ">= 0"),
        ("steps", c.steps >= 0, ">= 0"), ("save_every", c.save_every >= 1, ">= 1"),
        ("max_bad_steps", c.max_bad_steps >= 1, ">= 1"), ("seed", c.seed >= 0, ">= 0"),
        ("doc_words", c.doc_words >= 0, ">= 0 (0 = whole passages)"),
        ("ig_clip", c.ig_clip >= 0, ">= 0 (0 = off)"), ("grad_clip", c.grad_clip > 0, "> 0"),
        ("kl_coef", c.kl_coef >= 0, ">= 0"), ("ig_neg_scale", c.ig_neg_scale >= 0, ">= 0"),
        ("ig_dead_zone", c.ig_dead_zone >= 0, ">= 0"),
        ("ig_head_weight", c.ig_head_weight > 0, "> 0"),
        ("ig_batch_size", c.ig_batch_size >= 1, ">= 1"),
        ("ig_max_len", c.ig_max_len >= 64, ">= 64 (a context and its answer must fit)"),
        ("eval_batch", c.eval_batch >= 1, ">= 1"), ("warmup_batch", c.warmup_batch >= 1, ">= 1"),
        ("warmup_examples", c.warmup_examples >= 0, ">= 0"),
        ("warmup_lr", c.warmup_lr > 0, "> 0"), ("eval_questions", c.eval_questions >= 0, ">= 0"),
        ("max_response_tokens", c.max_response_tokens >= c.max_turn_tokens,
         f">= max_turn_tokens ({c.max_turn_tokens})"),
        ("out_dir", c.out_dir.strip() != "", "a folder path")]
    rules += [(f.name, math.isfinite(getattr(c, f.name)), "a finite number")
              for f in dataclasses.fields(c) if f.type == "float"]
    for name, ok, accepted in rules:
        if not ok:
            raise InputError(f"config: {name}={getattr(cfg, name)!r} is out of range "
                             f"(accepted: {accepted})")


# Seconds per unit of work of the offline default on 2 quiet CPU cores, measured from one plain
# `python train.py`: the time estimate printed at the start of a run scales these.
CPU_SECONDS = {"setup": 20, "eval_untrained": 1.7, "warmup": 2.0, "eval_formatted": 1.0,
               "rollout": 3.85}


def estimate_seconds(cfg: Config) -> float:
    """The run's wall-clock on 2 CPU cores with the default model, from CPU_SECONDS."""
    c, n = CPU_SECONDS, cfg.eval_questions
    evals = n * (c["eval_untrained"] * cfg.eval_start
                 + c["eval_formatted"] * ((cfg.warmup_examples > 0) + (cfg.steps > 0)))
    if cfg.eval_every:  # validation at step 0 (when this run made its start model), each K steps
        n_val = bool(cfg.eval_start or cfg.warmup_examples) + math.ceil(cfg.steps / cfg.eval_every)
        evals += n_val * cfg.val_questions * c["eval_formatted"]
    rl = cfg.steps * cfg.questions_per_step * cfg.group_size * c["rollout"]  # rollout + IG + update
    return c["setup"] + evals + cfg.warmup_examples * c["warmup"] + rl


# ----------------------------------------------------------------------- the parts of a step


def rollouts(policy, tokenizer, prompts: list[str], search, cfg: Config, generator
             ) -> list[ig.Trajectory]:
    """ig.rollout in chunks of at most cfg.rollout_batch sequences (0 = all at once)."""
    size, trajs = cfg.rollout_batch or len(prompts), []
    for k in range(0, len(prompts), size):
        trajs += ig.rollout(policy, tokenizer, prompts[k: k + size], search,
                            template=ig.TEMPLATES[cfg.template], max_searches=cfg.max_searches,
                            max_turn_tokens=cfg.max_turn_tokens,
                            max_response_tokens=cfg.max_response_tokens,
                            temperature=cfg.temperature, generator=generator,
                            turn=fast.CachedTurns() if cfg.fast else ig.generate_turn)
    return trajs


def counterfactual_draws(trajs: list[ig.Trajectory], cfg: Config, gen: torch.Generator) -> list:
    """This rank's share of the IG baselines, drawn over every rank's steps in rank order: the same
    pool and draw as one process holding the whole batch."""
    parts = dd.all_gather([ig.step_pairs(t) for t in trajs])  # one list per rank
    first = sum(len(p) for p in parts[: dd.rank()])
    draws = ig.plan_counterfactuals([x for p in parts for x in p], cfg.ig_n_random,
                                    cfg.ig_baseline, gen)
    return draws[first: first + len(trajs)]


def information_gain(policy, tokenizer, trajs: list[ig.Trajectory], golds: list[list[str]],
                     cfg: Config, gen: torch.Generator) -> None:
    """IG of every search step (sets step.ig), the counterfactuals drawn over the global batch."""
    draws = counterfactual_draws(trajs, cfg, gen)
    ig.information_gain(policy, tokenizer, trajs, golds, draws, template=ig.TEMPLATES[cfg.template],
                        all_golds=cfg.ig_all_golds, max_len=cfg.ig_max_len,
                        batch_size=cfg.ig_batch_size, head_weight=cfg.ig_head_weight,
                        score=fast.answer_scores_shared_prefix if cfg.fast else ig.answer_scores)


def update(model, ref_model, tokenizer, trajs, tok_adv, optimizer, cfg: Config) -> dict:
    """One REINFORCE step over the batch, in micro-batches with gradient accumulation.

    Data-parallel, trajs is this rank's share: each rank's loss is divided by the global batch's
    token count and the gradients are summed over ranks, so the step equals one process's step.
    """
    model.train()
    optimizer.zero_grad()
    logprobs = fast.policy_logprobs if cfg.fast else ig.policy_logprobs
    n_tokens = dd.all_sum([float(sum(sum(t.loss_mask) for t in trajs))])[0]  # sum_p mask_p, global
    sums = dict(loss=0.0, kl=0.0, entropy=0.0, query_entropy=0.0, query_tokens=0.0)
    for k in range(0, len(trajs), cfg.micro_batch):
        mb = trajs[k: k + cfg.micro_batch]
        batch = ig.response_batch(mb, tokenizer.pad_token_id, model.device)
        R = batch["targets"].shape[1]
        query = torch.zeros(len(mb), R, device=model.device)  # (b, R): 1 on the query tokens
        for b, t in enumerate(mb):
            off = R - len(t.response_ids)  # left padding of row b
            for s in t.steps:
                query[b, off + s.query_span[0]: off + s.query_span[1]] = 1
        adv = torch.stack([torch.cat([a.new_zeros(R - len(a)), a])
                           for a in tok_adv[k: k + cfg.micro_batch]])  # (b, R)
        with bf16(model.device):
            logp, entropy = logprobs(model, batch)  # (b, R)
            ref_logp = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp, _ = logprobs(ref_model, batch)
            loss, kl = ig.policy_loss(logp, adv.to(logp.device), batch["loss_mask"], ref_logp,
                                      cfg.kl_coef, n_tokens)
        fast.backward(loss) if cfg.fast else loss.backward()
        sums["loss"] += loss.item()
        sums["kl"] += kl.item()
        sums["entropy"] += float((entropy * batch["loss_mask"]).sum())
        sums["query_entropy"] += float((entropy * query).sum())
        sums["query_tokens"] += float(query.sum())
    dd.all_reduce_grads(model)
    loss_sum, kl_sum, ent_sum, ent_q_sum, n_query = dd.all_sum(list(sums.values()))
    grad_norm = dd.clip_grad_norm(model, cfg.grad_clip)
    finite = np.isfinite(loss_sum) and np.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad()
    # query_entropy near 0: the queries are fixed and IG's gradient on them (~ 1 - p) vanishes
    return {"loss": loss_sum, "kl": kl_sum, "entropy": ent_sum / max(n_tokens, 1),
            "query_entropy": ent_q_sum / max(n_query, 1), "grad_norm": grad_norm,
            "skipped": not finite}


def step_record(step: int, trajs: list[ig.Trajectory], golds: list[list[str]],
                rewards: torch.Tensor, cfg: Config, stats: dict, times: list[float],
                device: torch.device) -> dict:
    """The step's log line over the global batch: every rank's rollouts gathered (times: rank 0's).

    hit: share of search steps whose documents hold a gold answer; ig_hit / ig_miss: mean IG of
    those steps and of the others (does IG tell a query that found the answer from one that not?);
    docs_cut: share of search steps whose documents were cut to the response budget.
    """
    mem = peak_memory_gb(device)
    mine = [(r, len(t.steps), len(t.response_ids), ig.extract_answer(t) is not None, t.truncated,
             mem, [(documents_hold_answer(s.documents, g), s.ig, s.cut > 0) for s in t.steps])
            for t, g, r in zip(trajs, golds, rewards.tolist())]
    r, searches, length, valid, truncated, mem, step_lists = zip(
        *[x for part in dd.all_gather(mine) for x in part])
    steps = [x for xs in step_lists for x in xs]  # (hit, IG or None, cut) of every search step
    igs = [v for _, v, _ in steps if v is not None]
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    zero_adv = (torch.tensor(r).view(-1, cfg.group_size).std(-1) == 0).float().mean()
    return {"step": step + 1, "reward": float(np.mean(r)), "em": float(np.mean(r)),
            "ig_mean": mean(igs), "ig_pos": mean([v > 0 for v in igs]),
            "hit": mean([h for h, _, _ in steps]),
            "ig_hit": mean([v for h, v, _ in steps if h and v is not None]),
            "ig_miss": mean([v for h, v, _ in steps if not h and v is not None]),
            "docs_cut": mean([c for _, _, c in steps]),
            "searches": float(np.mean(searches)), "length": float(np.mean(length)),
            "zero_adv_groups": float(zero_adv), "valid": float(np.mean(valid)),
            "truncated": float(np.mean(truncated)), **stats,
            "t_rollout": times[1] - times[0], "t_ig": times[2] - times[1],
            "t_update": times[3] - times[2], "mem_gb": max(mem)}


def evaluate_on(s: Setup, questions: list[dict], desc: str) -> dict:
    """Greedy EM of the policy on held-out questions (rank 0 alone holds them)."""
    with bf16(s.device):
        return evaluate(s.policy, s.tokenizer, questions, s.search, desc=desc,
                        batch_size=s.cfg.eval_batch, template=s.cfg.template,
                        max_searches=s.cfg.max_searches, max_turn_tokens=s.cfg.max_turn_tokens)[0]


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
        ckpt.save_checkpoint(self.run, self.policy, self.tokenizer, self.model, self.optimizer,
                             step, dataclasses.asdict(self.cfg), self.gens)

    def sync_policy(self) -> None:
        """With FSDP, refresh the full copy that samples, scores and is saved (every rank)."""
        if self.policy is not self.model:
            dd.copy_full(self.model, self.policy)


def set_up(cfg: Config, resume: str, restart: bool = False) -> Setup:
    """Device, seeds, run folder, data, retriever and model; then, for a new run, the start
    model's evaluation, the format warm-up and step 0 of the validation curve; for a resumed run,
    the checkpoint's optimizer and RNG states."""
    device, main = dd.setup(), dd.is_main()  # only rank 0 (main) prints and writes files
    check_config(cfg, dd.world_size())
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    gens = {"data": torch.Generator().manual_seed(cfg.seed),
            "ig": torch.Generator().manual_seed(cfg.seed + 1),
            "sample": torch.Generator(device=device).manual_seed(cfg.seed + 2 + 1000 * dd.rank())}
    run = Path(resume or cfg.out_dir)
    table = run / "table.json"  # a resumed run's rows so far, read before any work
    table = ckpt.read_table(table) if resume and table.exists() else {}
    if main:  # the folder is this run's: locked, and never an older run's files (ckpt.claim_run)
        ckpt.claim_run(run, bool(resume), restart)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        if device.type == "cpu" and not cfg.model:
            print(f"estimate: ~{estimate_seconds(cfg) / 60:.0f} min on 2 CPU cores (measured "
                  f"rates, train.CPU_SECONDS); each phase's bar shows its own ETA")
    own_data = cfg.train_data and (cfg.corpus or cfg.retriever_url)
    data = {} if own_data else prepare.default_data()
    train_file = cfg.train_data or data["train"]
    train_q, val_q = prepare.split_validation(prepare.load_questions(train_file),
                                              cfg.val_questions if cfg.eval_every else 0)
    if not train_q:
        raise InputError(f"config: val_questions={cfg.val_questions} leaves no training questions "
                         f"in {train_file}")
    test_file = cfg.test_data or data.get("test", "")
    test_q = []
    if test_file and cfg.eval_questions:
        test_q = prepare.load_questions(test_file)[: cfg.eval_questions]
    search = make_search(cfg.corpus or data.get("corpus", ""), cfg.retriever_url, cfg.topk,
                         cfg.doc_words or None, cfg.retriever_timeout, cfg.retriever_retries)
    start_model = str(ckpt.last_checkpoint(run)) if resume else cfg.model
    model, tokenizer = prepare.load_model(start_model, device, cfg.trust_remote_code,
                                          dtype=torch.float32)
    if main:  # every input is checked: now config.json (and --restart removes the older files)
        ckpt.start_run(run, dataclasses.asdict(cfg), bool(resume))
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    policy = model
    if cfg.fsdp:
        policy = copy.deepcopy(model).eval().requires_grad_(False)
        dd.shard_model(model)
    elif cfg.fast:  # (FSDP's sharded gradients stay dense)
        fast.lean_backward(model)
    s = Setup(cfg, run, device, model, policy, tokenizer, search, train_q,
              val_q if main else [], test_q if main else [], gens, table=table)
    if not resume:
        if s.test_q and cfg.eval_start:
            s.table["start model"] = evaluate_on(s, s.test_q, "eval start")
        if cfg.warmup_examples:
            warmup(model, tokenizer, train_q, search, cfg, gens["data"], update)
            s.sync_policy()
            if s.test_q:
                s.table["after warm-up"] = evaluate_on(s, s.test_q, "eval warm-up")
    ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # frozen: bf16 is enough
    if cfg.kl_coef > 0:
        s.ref_model = copy.deepcopy(policy).to(ref_dtype).eval().requires_grad_(False)
    s.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if resume:
        s.step = ckpt.load_state(run, model, s.optimizer, gens)
        if dd.rank():  # the checkpoint holds rank 0's sampling state; the others must not repeat it
            gens["sample"].manual_seed(cfg.seed + 2 + 1000 * dd.rank() + s.step)
        kept = ckpt.load_metrics(run / "metrics.jsonl", s.step)  # drop records after the checkpoint
        if main:
            ckpt.write_lines(run / "metrics.jsonl", [json.dumps(r) for r in kept])
    else:
        if s.table:
            ckpt.write_json(run / "table.json", s.table)
        if s.val_q and (cfg.eval_start or cfg.warmup_examples):  # this run made its start model
            ckpt.write_lines(run / "metrics.jsonl", [json.dumps({"step": 0, **validate(s, 0)})])
    return s


# ------------------------------------------------------------------------------------ train


def train(cfg: Config, resume: str = "", restart: bool = False) -> dict:
    s = set_up(cfg, resume, restart)
    tpl, main = ig.TEMPLATES[cfg.template], dd.is_main()
    alpha = 0.0 if cfg.outcome_only else cfg.ig_alpha
    bad_steps = 0
    for step in tqdm(range(s.step, cfg.steps), desc="train", initial=s.step, total=cfg.steps,
                     disable=not main):
        # ---- 1. sample questions (the same global draw on every rank; each rank takes its share
        #         of whole groups), G rollouts each (consecutive rows share a question)
        t0 = time.time()
        idx = torch.randint(len(s.train_q), (cfg.questions_per_step,), generator=s.gens["data"])
        qs = [s.train_q[i] for i in idx.tolist()[dd.shard(len(idx))] for _ in range(cfg.group_size)]
        prompts = [ig.build_prompt(s.tokenizer, q["question"], tpl) for q in qs]
        s.policy.eval()
        try:
            with bf16(s.device):
                trajs = rollouts(s.policy, s.tokenizer, prompts, s.search, cfg, s.gens["sample"])
        except RetrieverError:  # keep the work so far, then stop with the retriever's message
            if not cfg.fsdp:  # (FSDP's state gathering needs every rank, which may not be here)
                s.save(step)
            raise
        t1 = time.time()
        # ---- 2. outcome rewards R_i = EM, and the information gain of every search step
        golds = [q["golden_answers"] for q in qs]
        rewards = torch.tensor([ig.exact_match(ig.extract_answer(t), g)
                                for t, g in zip(trajs, golds)])  # (B,)
        if alpha > 0:
            with bf16(s.device):
                information_gain(s.policy, s.tokenizer, trajs, golds, cfg, s.gens["ig"])
        t2 = time.time()
        # ---- 3. advantages: the group baseline, plus alpha * IG~_t / |Q_t| on the query tokens
        adv = ig.group_advantages(rewards, cfg.group_size, cfg.normalize_std)  # (B,)
        tok_adv = ig.token_advantages(trajs, adv, alpha, cfg.ig_dead_zone, cfg.ig_neg_scale,
                                      cfg.ig_clip or None, cfg.group_size if cfg.ig_center else 0)
        # ---- 4. one on-policy REINFORCE update
        stats = update(s.model, s.ref_model, s.tokenizer, trajs, tok_adv, s.optimizer, cfg)
        s.sync_policy()
        t3 = time.time()
        # ---- 5. log (over the global batch), validate, checkpoint
        rec = step_record(step, trajs, golds, rewards, cfg, stats, [t0, t1, t2, t3], s.device)
        if s.val_q and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            rec.update(validate(s, step + 1))
        if main:
            ckpt.append_record(s.run / "metrics.jsonl", rec)
            tqdm.write(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in rec.items()))
        bad_steps = bad_steps + 1 if stats["skipped"] else 0
        problem = ckpt.step_problem(s.policy, stats, skipped_ok=True)
        if bad_steps >= cfg.max_bad_steps or problem:  # never saved: the checkpoint predates it
            raise TrainingError(f"{s.run}: stopped at step {step + 1}: " + (problem or (
                f"{bad_steps} steps in a row had a non-finite loss or gradient")) +
                f"; {ckpt.kept_checkpoint(s.run, 'before them')}")
        if not bad_steps and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            s.save(step + 1)
    if cfg.steps == 0:  # a warm-up-only run: keep the warmed-up model as the run's checkpoint
        s.save(0)
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
