"""Train a search policy with IG-Search: REINFORCE over groups of rollouts, information gain on queries.

    python train.py                          # offline default: SmolLM2-135M, wiki QA, BM25, 2 CPU cores
    python train.py --preset paper           # the paper's setting (Qwen2.5-3B, GPU)
    python train.py --outcome_only           # the Search-R1 GRPO baseline (alpha = 0)
    python train.py --resume runs/default    # continue a run from its last checkpoint

Each step: sample questions -> G rollouts each -> exact-match reward and IG per search step ->
group advantages plus alpha * IG on query tokens -> one REINFORCE update -> one log line.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import json
import os
import pickle
import random
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import distributed as dd
import igsearch as ig
import prepare
from evaluate import evaluate, format_table, make_search, method_name, write_json
from retriever import InputError, OneLineParser, RetrieverError


@dataclass
class Config:
    # data, model, retriever ("" = the offline default built by prepare.py)
    model: str = ""  # HF name or folder (paper: Qwen/Qwen2.5-3B)
    trust_remote_code: bool = False  # run Python code shipped with the model (only for repositories you trust)
    train_data: str = ""  # FlashRAG JSON lines (paper: NQ + HotpotQA train)
    test_data: str = ""  # held-out questions for the before/after table
    corpus: str = ""  # wiki-18 JSON lines for in-memory BM25 (paper: wiki-18 with E5)
    retriever_url: str = ""  # Search-R1 /retrieve endpoint; replaces corpus when set
    retriever_timeout: float = 30.0  # seconds per retriever request before it counts as failed
    retriever_retries: int = 3  # tries per retriever request (back-off 0.5 s, 1 s, ...) before the run stops
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
    ig_head_weight: float = 3.0  # weight of the first 3 answer tokens in s(a*|C) (official code 3; 1 = plain mean)
    ig_all_golds: bool = False  # score every gold answer and keep the best (default: the first)
    ig_dead_zone: float = 0.0  # |IG| below this counts as 0 (paper: delta, value not public)
    ig_neg_scale: float = 1.0  # factor on negative IG (paper: eta < 1, value not public)
    ig_clip: float = 0.0  # clip IG to [-c, c], 0 = off
    ig_center: bool = False  # IG minus its question's group mean before shaping (not the paper's; a variant)
    ig_max_len: int = 1024  # scoring contexts are left-truncated to this many tokens
    ig_batch_size: int = 16  # scoring sequences per forward pass
    normalize_std: bool = True  # divide the group advantage by the group's std
    # optimisation
    steps: int = 12  # RL steps (paper 200)
    lr: float = 2e-5  # AdamW learning rate (paper 1e-6)
    kl_coef: float = 0.0  # k3 KL penalty to the frozen start model (paper 0.001)
    grad_clip: float = 1.0  # gradient-norm clip
    max_bad_steps: int = 3  # stop after this many steps in a row with a non-finite loss or gradient
    micro_batch: int = 2  # rollouts per forward/backward in the update (gradient accumulation; paper preset 4)
    rollout_batch: int = 0  # sequences generated together, at most (0 = all at once): bounds the KV cache
    grad_checkpointing: bool = True  # recompute each layer's activations in the backward pass (bounds memory)
    fsdp: bool = False  # torchrun: shard weights, gradients and AdamW state over the ranks (see distributed.py)
    warmup_examples: int = 64  # format warm-up: supervised trajectories from the train split (0 = off)
    warmup_lr: float = 5e-5  # learning rate of the warm-up
    warmup_batch: int = 8  # trajectories per warm-up step
    warmup_query: str = "question"  # the warm-up's query: the question verbatim, or "varied" (see query_forms)
    # evaluation, logging, checkpoints
    eval_questions: int = 64  # held-out test questions in the before/after table (0 = skip)
    val_questions: int = 200  # validation questions carved from the train split, never trained on
    eval_every: int = 0  # validation EM every K RL steps, at step 0 and at the end (0 = off)
    eval_start: bool = True  # evaluate the start model too (off when several runs share one start checkpoint)
    eval_batch: int = 16  # questions per evaluation rollout batch
    out_dir: str = "runs/default"  # run folder: config, metrics.jsonl, checkpoint/
    save_every: int = 5  # checkpoint every K steps (and at the end)
    seed: int = 0  # one seed for data order, sampling and counterfactual draws


# Seconds per unit of work of the offline default on 2 quiet CPU cores, measured from one plain
# `python train.py` (572 s in all): the time estimate printed at the start of a run scales these.
CPU_SECONDS = {"setup": 20, "eval_untrained": 1.7, "warmup": 2.0, "eval_formatted": 1.0, "rollout": 3.85}


def estimate_seconds(cfg: "Config") -> float:
    """The run's wall-clock on 2 CPU cores with the default model: per question, example and rollout."""
    c, n = CPU_SECONDS, cfg.eval_questions
    evals = n * (c["eval_untrained"] * cfg.eval_start + c["eval_formatted"] * ((cfg.warmup_examples > 0) + (cfg.steps > 0)))
    rl = cfg.steps * cfg.questions_per_step * cfg.group_size * c["rollout"]  # rollout + IG + update
    if cfg.eval_every:  # validation at step 0 (when this run made its start model), every K steps, at the end
        n_val = bool(cfg.eval_start or cfg.warmup_examples) + -(-cfg.steps // cfg.eval_every)
        evals += n_val * cfg.val_questions * c["eval_formatted"]
    return c["setup"] + evals + cfg.warmup_examples * c["warmup"] + rl


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); the message says what is on disk."""


PRESETS = {
    "default": {},
    # the README's learning experiment on 2 CPU cores: nine runs from one shared warm-up checkpoint, each
    # ~13 min (12 steps x ~57 s + 100 test questions); its start row comes from the warm-up run's table.
    # micro_batch 8 without checkpointing: the setting results/ was produced with (same gradient, other rounding)
    "learn": dict(steps=40, lr=2e-5, eval_questions=751, eval_start=False, warmup_examples=0, eval_every=10,
                  micro_batch=8, grad_checkpointing=False, out_dir="runs/learn"),
    "paper": dict(model="Qwen/Qwen2.5-3B", questions_per_step=256, group_size=5, max_searches=5,
                  max_turn_tokens=512, max_response_tokens=4096, doc_words=0, steps=200, lr=1e-6,
                  kl_coef=0.001, micro_batch=4, ig_batch_size=32, ig_max_len=4096, warmup_examples=0,
                  grad_checkpointing=True, rollout_batch=64,
                  eval_questions=0, eval_batch=64, save_every=10, out_dir="runs/paper"),
}


def parse_config(argv: list[str] | None = None) -> tuple[Config, str]:
    """--field value for every Config field, --preset NAME, --resume RUN_DIR. Returns (config, resume)."""
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--resume", default="", help="run folder to continue from its checkpoint")
    for f in dataclasses.fields(Config):
        if f.type == "bool":  # --flag, or --flag true/false
            p.add_argument(f"--{f.name}", nargs="?", const=True, default=None, type=lambda s: s.lower() in ("1", "true", "yes"))
        else:
            p.add_argument(f"--{f.name}", type={"int": int, "float": float}.get(f.type, str), default=None)
    args = p.parse_args(argv)
    values = dataclasses.asdict(Config())
    if args.resume:
        if not (Path(args.resume) / "config.json").exists():
            raise InputError(f"{args.resume}: not a run folder (no config.json)")
        values.update(json.loads((Path(args.resume) / "config.json").read_text()))
    values.update(PRESETS[args.preset] if not args.resume else {})
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    cfg = Config(**values)
    check_config(cfg)
    return cfg, args.resume


def check_config(cfg: Config) -> None:
    """Values out of range stop the run with one line naming the field and what it accepts."""
    rules = [("group_size", cfg.group_size >= 2, "an integer >= 2"), ("ig_alpha", cfg.ig_alpha >= 0, ">= 0"),
             ("topk", cfg.topk >= 1, "an integer >= 1"), ("questions_per_step", cfg.questions_per_step >= 1, ">= 1"),
             ("max_searches", cfg.max_searches >= 0, ">= 0"), ("max_turn_tokens", cfg.max_turn_tokens >= 1, ">= 1"),
             ("ig_n_random", cfg.ig_n_random >= 1, ">= 1"), ("micro_batch", cfg.micro_batch >= 1, ">= 1"),
             ("ig_baseline", cfg.ig_baseline in ("random", "empty"), "random or empty"),
             ("warmup_query", cfg.warmup_query in ("question", "varied"), "question or varied"),
             ("template", cfg.template in ig.TEMPLATES, " or ".join(ig.TEMPLATES)),
             ("lr", cfg.lr > 0, "> 0"), ("temperature", cfg.temperature >= 0, ">= 0"),
             ("retriever_retries", cfg.retriever_retries >= 1, ">= 1"),
             ("retriever_timeout", cfg.retriever_timeout > 0, "> 0"), ("rollout_batch", cfg.rollout_batch >= 0, ">= 0"),
             ("val_questions", cfg.val_questions >= 0, ">= 0"), ("eval_every", cfg.eval_every >= 0, ">= 0")]
    for name, ok, accepted in rules:
        if not ok:
            raise InputError(f"config: {name}={getattr(cfg, name)!r} is out of range (accepted: {accepted})")


def rng_state(gens: dict[str, torch.Generator]) -> dict:
    """Every RNG state, in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            **{k: g.get_state() for k, g in gens.items()}}


def save_checkpoint(run: Path, policy, tokenizer, model, optimizer, step: int, cfg: Config, gens: dict) -> None:
    """Write run/checkpoint atomically: build checkpoint.tmp, then swap it in by renames. Every rank
    calls it (a sharded model's optimizer state is gathered); rank 0 writes the policy's weights."""
    state = dd.optimizer_state(model, optimizer)
    if not dd.is_main():
        return
    tmp, final, old = run / "checkpoint.tmp", run / "checkpoint", run / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": state, "rng": rng_state(gens)}, tmp / "state.pt")
    (tmp / "config.json.igsearch").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def last_checkpoint(run: Path) -> Path:
    """run/checkpoint, or checkpoint.old when a crash fell between save_checkpoint's two renames."""
    return run / "checkpoint.old" if not (run / "checkpoint").exists() and (run / "checkpoint.old").exists() \
        else run / "checkpoint"


def load_state(run: Path, model, optimizer, gens: dict) -> int:
    """Restore optimizer and every RNG state; returns the step to continue from."""
    ckpt = last_checkpoint(run)
    try:
        state = torch.load(ckpt / "state.pt", weights_only=True)  # no arbitrary unpickling
    except pickle.UnpicklingError as e:
        raise InputError(f"{ckpt / 'state.pt'}: refused, not a state file written by train.py "
                         f"({str(e).splitlines()[0][:120]})") from None
    dd.load_optimizer_state(model, optimizer, state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    for k, g in gens.items():
        g.set_state(rng[k])
    return state["step"]


def write_lines(path: Path, lines: list[str]) -> None:
    """Replace a text file atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def load_metrics(path: Path, upto: int) -> list[dict]:
    """The records of metrics.jsonl up to step `upto`; a partial line from a crash is skipped with a warning."""
    records = []
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path}:{n}: skipped an incomplete record (the run was interrupted)", file=sys.stderr)
            continue
        if rec.get("step", 0) <= upto:
            records.append(rec)
    return records


QUERY_STOPWORDS = frozenset("a an and are as at by for from how in is it of on or that the this to was what "
                            "when where which who whom whose why with".split())


def query_forms(question: str, gen: torch.Generator) -> list[str]:
    """Three mechanical queries for one question: verbatim, its keywords, a random half of its keywords.

    Why vary them: a warm-up that always copies the question leaves the policy copying it with
    probability ~1, and IG, which acts on query tokens through grad log p ~ (1 - p), has nothing to shape.
    """
    words = re.findall(r"\w+", question)
    keys = [w for w in words if w.lower() not in QUERY_STOPWORDS] or words
    keep = torch.rand(len(keys), generator=gen) < 0.5
    half = [w for w, k in zip(keys, keep.tolist()) if k] or keys[:1]
    return [question, " ".join(keys), " ".join(half)]


def warmup(model, tokenizer, questions: list[dict], search, cfg: Config, gen: torch.Generator) -> None:
    """Format warm-up: supervised steps on trajectories built mechanically from the train split.

    question -> <search> query </search> -> inserted documents (mask 0) -> <answer> gold </answer>,
    kept only where the gold answer appears in the retrieved documents. The query is the question
    (warmup_query "question") or one of query_forms drawn at random ("varied"). Loss on the search and
    answer tokens only, through the same mask and loss as the RL update.
    """
    tpl = ig.TEMPLATES[cfg.template]
    order = torch.randperm(len(questions), generator=gen).tolist()
    pool = [questions[i] for i in order[: cfg.warmup_examples * 2]]
    if cfg.warmup_query == "varied":
        pick = torch.randint(3, (len(pool),), generator=gen).tolist()
        queries = [query_forms(q["question"], gen)[k] for q, k in zip(pool, pick)]
    else:
        queries = [q["question"] for q in pool]
    docs = search(queries)
    trajs = []
    for q, query, d in zip(pool, queries, docs):
        gold = q["golden_answers"][0]
        if gold.lower() not in d.lower() or len(trajs) >= cfg.warmup_examples:
            continue
        d = ig.sanitize_documents(d, tokenizer.all_special_tokens)
        trajs.append(ig.supervised_trajectory(tokenizer, ig.build_prompt(tokenizer, q["question"], tpl), [
            (f"<search> {query} </search>", True), (ig.observation_text(d, tpl), False),
            (f"<answer> {gold} </answer>{tokenizer.eos_token or ''}", True)]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    for k in tqdm(range(0, len(trajs), cfg.warmup_batch), desc="warm-up", disable=not dd.is_main()):
        batch = trajs[k: k + cfg.warmup_batch]
        # advantage 1 on every target token: the REINFORCE loss becomes -mean log p(target), in micro-batches
        update(model, None, tokenizer, batch, [torch.ones(len(t.response_ids)) for t in batch], opt, cfg)
    dd.broadcast_params(model)  # every rank ran the same steps; rank 0's weights are the ones kept


def update(model, ref_model, tokenizer, trajs, tok_adv, optimizer, cfg: Config) -> dict:
    """One REINFORCE step over the batch, in micro-batches with gradient accumulation.

    Data-parallel, trajs is this rank's share: each rank's loss is divided by the global batch's token
    count and the gradients are summed over ranks, so the step equals the single-process step.
    """
    model.train()
    optimizer.zero_grad()
    n_tokens = dd.all_sum([float(sum(sum(t.loss_mask) for t in trajs))])[0]  # sum_p mask_p over the global batch
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, KL, entropy summed over tokens; query entropy and query tokens
    for k in range(0, len(trajs), cfg.micro_batch):
        mb = trajs[k: k + cfg.micro_batch]
        batch = ig.response_batch(mb, tokenizer.pad_token_id, model.device)
        R = batch["targets"].shape[1]
        query = torch.zeros(len(mb), R, device=model.device)  # (b, R): 1 on the query tokens, where IG acts
        for b, t in enumerate(mb):
            off = R - len(t.response_ids)  # left padding of row b
            for s in t.steps:
                query[b, off + s.query_span[0]: off + s.query_span[1]] = 1
        adv = torch.stack([torch.cat([a.new_zeros(R - len(a)), a]) for a in tok_adv[k: k + cfg.micro_batch]])  # (b, R)
        with bf16(model.device):
            logp, entropy = ig.policy_logprobs(model, batch)  # (b, R)
            ref_logp = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp, _ = ig.policy_logprobs(ref_model, batch)
            loss, kl = ig.policy_loss(logp, adv.to(logp.device), batch["loss_mask"], ref_logp, cfg.kl_coef, n_tokens)
        release_freed_memory()  # what the forward freed, before the backward needs the room
        loss.backward()
        release_freed_memory()  # the micro-batch's activations: RSS would otherwise grow with each one
        sums = [sums[0] + loss.item(), sums[1] + kl.item(), sums[2] + float((entropy * batch["loss_mask"]).sum()),
                sums[3] + float((entropy * query).sum()), sums[4] + float(query.sum())]
    dd.all_reduce_grads(model)
    loss_sum, kl_sum, ent_sum, ent_q_sum, n_query = dd.all_sum(sums)
    grad_norm = dd.clip_grad_norm(model, cfg.grad_clip)
    finite = np.isfinite(loss_sum) and np.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad()
    # query_entropy near 0: the queries are fixed and IG's gradient on them (prop. to 1 - p) vanishes
    return {"loss": loss_sum, "kl": kl_sum, "entropy": ent_sum / max(n_tokens, 1),
            "query_entropy": ent_q_sum / max(n_query, 1), "grad_norm": grad_norm,
            "skipped": not finite}


LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand the heap's free blocks back to the OS (glibc's malloc_trim). glibc keeps freed blocks for
    reuse, so without it the peak RSS grew ~0.1 GiB with every micro-batch of an update (measured)."""
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def lean_backward(model, trim_every: int = 5):
    """Lower the update's peak memory; the gradient stays the same (to float rounding, ~1e-5 measured).

    - A tied embedding (the head reuses the input embedding matrix: SmolLM2, Qwen2.5-3B) gets a sparse
      gradient, the rows of the batch's tokens, which the head's dense V x H gradient absorbs in place:
      without it the backward holds two dense V x H gradients and their sum (3 x 108 MiB for SmolLM2).
    - On CPU the heap's free blocks go back to the OS every `trim_every` decoder layers of a backward
      pass: glibc keeps what each recomputed layer frees, and RSS rose ~0.3 GiB above the live tensors
      within one backward (measured on a warm-up micro-batch).
    Returns a function that undoes both (bench.py times the update with and without).
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    was_sparse = emb.sparse
    emb.sparse = was_sparse or (head is not None and emb.weight is head.weight)
    cpu = next(model.parameters()).device.type == "cpu"
    layers = dd.decoder_layers(model) if cpu else []

    def trim_when_its_gradient_passes(module, inputs, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden.register_hook(lambda grad: release_freed_memory())
    hooks = [layer.register_forward_hook(trim_when_its_gradient_passes) for layer in layers[::trim_every]]

    def undo():
        emb.sparse = was_sparse
        for h in hooks:
            h.remove()
    return undo


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bf16(device: torch.device):
    """bf16 autocast on CUDA, off on CPU. The trained weights stay fp32: AdamW steps of lr 1e-6 would
    round away on bf16 weights (spacing ~1e-4 near 0.02)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def sync_policy(model, policy) -> None:
    """With FSDP, refresh the full copy that samples, scores and is saved (every rank calls it)."""
    if policy is not model:
        dd.copy_full(model, policy)


def rollouts(model, tokenizer, prompts: list[str], search, cfg: Config, generator, **kw) -> list[ig.Trajectory]:
    """ig.rollout in chunks of at most cfg.rollout_batch sequences (0 = all at once)."""
    size = cfg.rollout_batch or len(prompts)
    return [t for k in range(0, len(prompts), size) for t in ig.rollout(
        model, tokenizer, prompts[k: k + size], search, temperature=cfg.temperature, generator=generator, **kw)]


def counterfactual_draws(trajs: list[ig.Trajectory], cfg: Config, gen: torch.Generator) -> list:
    """This rank's share of the IG baselines, drawn over every rank's steps in rank order: the same
    pool and draw as one process holding the whole batch."""
    parts = dd.all_gather([ig.step_pairs(t) for t in trajs])  # one list per rank
    first = sum(len(p) for p in parts[: dd.rank()])
    draws = ig.plan_counterfactuals([x for p in parts for x in p], cfg.ig_n_random, cfg.ig_baseline, gen)
    return draws[first: first + len(trajs)]


def step_record(step: int, trajs: list[ig.Trajectory], golds: list[list[str]], rewards: torch.Tensor, cfg: Config,
                stats: dict, times: list[float], device: torch.device) -> dict:
    """The step's log line over the global batch: every rank's rollouts gathered (times are rank 0's).

    hit: share of search steps whose documents hold a gold answer; ig_hit / ig_miss: mean IG of those
    steps and of the others (does IG tell a query that found the answer from one that did not?)."""
    mem = peak_memory_gb(device)
    mine = [(r, len(t.steps), len(t.response_ids), ig.extract_answer(t) is not None, t.truncated, mem,
             [(ig.documents_hold_answer(s.documents, g), s.ig) for s in t.steps])
            for t, g, r in zip(trajs, golds, rewards.tolist())]
    r, searches, length, valid, truncated, mem, step_lists = zip(*[x for part in dd.all_gather(mine) for x in part])
    steps = [x for xs in step_lists for x in xs]  # (hit, IG or None) of every search step
    igs = [v for _, v in steps if v is not None]
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return {"step": step + 1, "reward": float(np.mean(r)), "em": float(np.mean(r)),
            "ig_mean": mean(igs), "ig_pos": mean([v > 0 for v in igs]),
            "hit": mean([h for h, _ in steps]), "ig_hit": mean([v for h, v in steps if h and v is not None]),
            "ig_miss": mean([v for h, v in steps if not h and v is not None]),
            "searches": float(np.mean(searches)), "length": float(np.mean(length)),
            "zero_adv_groups": float((torch.tensor(r).view(-1, cfg.group_size).std(-1) == 0).float().mean()),
            "valid": float(np.mean(valid)), "truncated": float(np.mean(truncated)), **stats,
            "t_rollout": times[1] - times[0], "t_ig": times[2] - times[1], "t_update": times[3] - times[2],
            "mem_gb": max(mem)}


def validate(policy, tokenizer, val_q: list[dict], search, step: int, eval_kw: dict, device) -> dict:
    """Greedy EM on the validation split after `step` RL steps: the held-out learning curve's point."""
    with bf16(device):
        summary = evaluate(policy, tokenizer, val_q, search, desc=f"validate {step}", **eval_kw)[0]
    return {f"val_{k}": v for k, v in summary.items()}


def train(cfg: Config, resume: str = "") -> dict:
    # ---- setup: device once (one rank of torchrun, or alone), seeds, model, data, retriever, run folder
    device, main = dd.setup(), dd.is_main()  # only rank 0 (main) prints and writes files
    if cfg.fsdp and dd.world_size() == 1:
        raise InputError("config: fsdp=True shards over several processes: launch with torchrun --nproc_per_node K")
    if cfg.fsdp and cfg.questions_per_step % dd.world_size():  # FSDP: every rank runs as many forward passes
        raise InputError(f"config: questions_per_step={cfg.questions_per_step} is out of range with --fsdp "
                         f"(accepted: a multiple of the {dd.world_size()} ranks)")
    if cfg.questions_per_step < dd.world_size():
        raise InputError(f"config: questions_per_step={cfg.questions_per_step} is out of range "
                         f"(accepted: >= the {dd.world_size()} ranks)")
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    gens = {"data": torch.Generator().manual_seed(cfg.seed), "ig": torch.Generator().manual_seed(cfg.seed + 1),
            "sample": torch.Generator(device=device).manual_seed(cfg.seed + 2 + 1000 * dd.rank())}  # per rank
    run = Path(resume or cfg.out_dir)
    if main:
        run.mkdir(parents=True, exist_ok=True)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        if device.type == "cpu" and not cfg.model:
            print(f"estimate: ~{estimate_seconds(cfg) / 60:.0f} min on 2 CPU cores (measured rates, "
                  f"train.CPU_SECONDS); each phase's bar shows its own ETA")
    data = prepare.default_data() if not (cfg.train_data and (cfg.corpus or cfg.retriever_url)) else {}
    train_q, val_q = prepare.split_validation(prepare.load_questions(cfg.train_data or data["train"]),
                                              cfg.val_questions if cfg.eval_every else 0)
    if not train_q:
        raise InputError(f"config: val_questions={cfg.val_questions} leaves no training questions "
                         f"in {cfg.train_data or data['train']}")
    test_path = cfg.test_data or data.get("test", "")
    test_q = prepare.load_questions(test_path)[: cfg.eval_questions] if test_path and cfg.eval_questions else []
    search = make_search(cfg.corpus or data.get("corpus", ""), cfg.retriever_url, cfg.topk, cfg.doc_words or None,
                         cfg.retriever_timeout, cfg.retriever_retries)
    start_model = str(last_checkpoint(run)) if resume else cfg.model
    model, tokenizer = prepare.load_model(start_model, device, cfg.trust_remote_code, dtype=torch.float32)
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    policy = model  # what samples, scores and is saved: the trained model, or with FSDP its full copy
    if cfg.fsdp:
        policy = copy.deepcopy(model).eval().requires_grad_(False)
        dd.shard_model(model)
    else:  # (FSDP's sharded gradients stay dense)
        lean_backward(model)
    tpl = ig.TEMPLATES[cfg.template]
    rollout_kw = dict(template=tpl, max_searches=cfg.max_searches, max_turn_tokens=cfg.max_turn_tokens,
                      max_response_tokens=cfg.max_response_tokens)
    eval_kw = dict(batch_size=cfg.eval_batch, template=cfg.template, max_searches=cfg.max_searches,
                   max_turn_tokens=cfg.max_turn_tokens)
    table, step = {}, 0
    test_q, val_q = (test_q, val_q) if main else ([], [])  # rank 0 alone evaluates
    if not resume:
        if test_q and cfg.eval_start:
            with bf16(device):
                table["start model"] = evaluate(policy, tokenizer, test_q, search, desc="eval start", **eval_kw)[0]
        if cfg.warmup_examples:
            warmup(model, tokenizer, train_q, search, cfg, gens["data"])
            sync_policy(model, policy)
            if test_q:
                with bf16(device):
                    table["after warm-up"] = evaluate(policy, tokenizer, test_q, search, desc="eval warm-up",
                                                      **eval_kw)[0]
    ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # frozen: bf16 is enough
    ref_model = copy.deepcopy(policy).to(ref_dtype).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if resume:
        step = load_state(run, model, optimizer, gens)
        if dd.rank():  # the checkpoint holds rank 0's sampling state; the others must not repeat it
            gens["sample"].manual_seed(cfg.seed + 2 + 1000 * dd.rank() + step)
        table = json.loads((run / "table.json").read_text()) if (run / "table.json").exists() else {}
        kept = load_metrics(run / "metrics.jsonl", step)  # drop records logged after the checkpoint
        if main:
            write_lines(run / "metrics.jsonl", [json.dumps(r) for r in kept])
    else:
        if table:
            write_json(str(run / "table.json"), table)
        if val_q and (cfg.eval_start or cfg.warmup_examples):  # step 0 of the curve (a shared start: its own run)
            write_lines(run / "metrics.jsonl", [json.dumps({"step": 0, **validate(policy, tokenizer, val_q, search, 0,
                                                                                  eval_kw, device)})])
    alpha = 0.0 if cfg.outcome_only else cfg.ig_alpha
    bad_steps = 0
    for step in tqdm(range(step, cfg.steps), desc="train", initial=step, total=cfg.steps, disable=not main):
        # ---- 1. sample questions (the same global draw on every rank; each rank takes its share of
        #         whole groups), G rollouts each (consecutive rows share a question)
        t0 = time.time()
        idx = torch.randint(len(train_q), (cfg.questions_per_step,), generator=gens["data"]).tolist()
        qs = [train_q[i] for i in idx[dd.shard(len(idx))] for _ in range(cfg.group_size)]
        prompts = [ig.build_prompt(tokenizer, q["question"], tpl) for q in qs]
        policy.eval()
        try:
            with bf16(device):
                trajs = rollouts(policy, tokenizer, prompts, search, cfg, gens["sample"], **rollout_kw)
        except RetrieverError:  # keep the work so far, then stop with the retriever's message
            if not cfg.fsdp:  # (FSDP's state gathering needs every rank, which may not be here)
                save_checkpoint(run, policy, tokenizer, model, optimizer, step, cfg, gens)
            raise
        t1 = time.time()
        # ---- 2. outcome rewards and information gain
        golds = [q["golden_answers"] for q in qs]
        rewards = torch.tensor([ig.exact_match(ig.extract_answer(t), g) for t, g in zip(trajs, golds)])  # (B,)
        if alpha > 0:
            draws = counterfactual_draws(trajs, cfg, gens["ig"])  # planned over the global batch
            with bf16(device):
                ig.information_gain(policy, tokenizer, trajs, golds, template=tpl, all_golds=cfg.ig_all_golds,
                                    max_len=cfg.ig_max_len, batch_size=cfg.ig_batch_size,
                                    head_weight=cfg.ig_head_weight, draws=draws)
        t2 = time.time()
        # ---- 3. advantages: group baseline, plus alpha * IG~ / |Q_t| on the query tokens
        adv = ig.group_advantages(rewards, cfg.group_size, cfg.normalize_std)  # (B,)
        tok_adv = ig.token_advantages(trajs, adv, alpha, cfg.ig_dead_zone, cfg.ig_neg_scale, cfg.ig_clip or None,
                                      center_groups=cfg.group_size if cfg.ig_center else 0)
        # ---- 4. one on-policy update
        stats = update(model, ref_model, tokenizer, trajs, tok_adv, optimizer, cfg)
        sync_policy(model, policy)
        t3 = time.time()
        # ---- 5. log, over the global batch
        rec = step_record(step, trajs, golds, rewards, cfg, stats, [t0, t1, t2, t3], device)
        if val_q and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            rec.update(validate(policy, tokenizer, val_q, search, step + 1, eval_kw, device))
        if main:
            with open(run / "metrics.jsonl", "a") as f:  # one whole line per step, flushed
                f.write(json.dumps(rec) + "\n")
                f.flush()
            tqdm.write(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        bad_steps = bad_steps + 1 if stats["skipped"] else 0
        if bad_steps >= cfg.max_bad_steps:
            raise TrainingError(f"{run}: {bad_steps} steps in a row had a non-finite loss or gradient; "
                                f"stopped at step {step + 1}, the last good checkpoint is {run / 'checkpoint'}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(run, policy, tokenizer, model, optimizer, step + 1, cfg, gens)
    if cfg.steps == 0:  # a warm-up-only run: keep the warmed-up model as the run's checkpoint
        save_checkpoint(run, policy, tokenizer, model, optimizer, 0, cfg, gens)
    if test_q and cfg.steps > 0:
        with bf16(device):
            table[method_name(dataclasses.asdict(cfg))] = evaluate(policy, tokenizer, test_q, search, desc="eval trained", **eval_kw)[0]
        write_json(str(run / "table.json"), table)
        print(format_table(table, average=False, first="model"))  # rows are one test set, not datasets
    dd.barrier()  # ranks leave together, once rank 0's checkpoint and table are written
    return table


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume = parse_config(argv)
        train(cfg, resume)
    except (InputError, RetrieverError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dd.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
