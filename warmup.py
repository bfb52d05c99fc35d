"""The format warm-up: a few supervised steps that teach a small model the tag protocol.

The paper starts from Qwen2.5-3B, which follows the protocol from its instruction alone. The
untrained SmolLM2-135M of the offline default does not (no `<search>`, no closed `<answer>`): every
reward would be 0 and RL would have nothing to learn from. So train.py first fits trajectories built
mechanically from the train split, through the same loss mask and update as RL.
"""
from __future__ import annotations

import math
import re

import torch
from tqdm import tqdm

import checkpoint as ckpt
import distributed as dd
import igsearch as ig
from errors import TrainingError


QUERY_STOPWORDS = frozenset("a an and are as at by for from how in is it of on or that the this to "
                            "was what when where which who whom whose why with".split())


def supervised_trajectory(tokenizer, prompt: str, pieces: list[tuple[str, bool]]) -> ig.Trajectory:
    """A trajectory from given (text, trained) pieces, for the format warm-up: trained pieces get
    mask 1, inserted documents mask 0, exactly as in a rollout."""
    traj = ig.Trajectory(tokenizer(prompt, add_special_tokens=False).input_ids, prompt)
    for text, trained in pieces:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=not trained).input_ids
        traj.append(ids, text, trained)
    traj.done = True
    return traj


def query_forms(question: str, gen: torch.Generator) -> list[str]:
    """Three mechanical queries for one question: verbatim, its keywords, a random half of them.

    Why vary them: a warm-up that always copies the question leaves the policy copying it with
    probability ~1, and IG, which acts on query tokens through grad log p ~ (1 - p), has nothing
    to shape.
    """
    words = re.findall(r"\w+", question)
    keys = [w for w in words if w.lower() not in QUERY_STOPWORDS] or words
    keep = torch.rand(len(keys), generator=gen) < 0.5
    half = [w for w, k in zip(keys, keep.tolist()) if k] or keys[:1]
    return [question, " ".join(keys), " ".join(half)]


def warmup(model, tokenizer, questions: list[dict], search, cfg, gen: torch.Generator,
           update) -> None:
    """Format warm-up: supervised steps on trajectories built mechanically from the train split.

    question -> <search> query </search> -> inserted documents (mask 0) -> <answer> gold </answer>,
    kept only where the gold answer appears in the retrieved documents. The query is the question
    (warmup_query "question") or one of query_forms drawn at random ("varied"). Loss on the search
    and answer tokens only, through the same mask and loss as the RL update (train.update).
    Each step logs its loss; a step that leaves the model non-finite or uniform stops the run.
    """
    tpl = ig.TEMPLATES[cfg.template]
    order = torch.randperm(len(questions), generator=gen).tolist()
    pool = [questions[i] for i in order[: cfg.warmup_examples * 2]]
    if cfg.warmup_query == "varied":
        pick = torch.randint(3, (len(pool),), generator=gen).tolist()
        queries = [query_forms(q["question"], gen)[k] for q, k in zip(pool, pick)]
    else:
        queries = [q["question"] for q in pool]
    trajs, specials = [], ig.special_strings(tokenizer)
    for q, query, d in zip(pool, queries, search(queries)):
        gold = q["golden_answers"][0]
        if gold.lower() not in d.lower() or len(trajs) >= cfg.warmup_examples:
            continue
        d = ig.sanitize_documents(d, specials)
        # trained pieces keep their end-of-sequence token: the user's text in them is made plain
        gold, query = (ig.plain_text(x, specials) for x in (gold, query))
        trajs.append(supervised_trajectory(
            tokenizer, ig.build_prompt(tokenizer, q["question"], tpl),
            [(f"<search> {query} </search>", True), (ig.observation_text(d, tpl), False),
             (f"<answer> {gold} </answer>{tokenizer.eos_token or ''}", True)]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    n = math.ceil(len(trajs) / cfg.warmup_batch)
    for k in tqdm(range(0, len(trajs), cfg.warmup_batch), desc="warm-up", disable=not dd.is_main()):
        batch = trajs[k: k + cfg.warmup_batch]
        # advantage 1 on every target token: the REINFORCE loss is -mean log p(target)
        stats = update(model, None, tokenizer, batch, [torch.ones(len(t.response_ids))
                                                       for t in batch], opt, cfg)
        if dd.is_main():
            tqdm.write(f"warm-up step {k // cfg.warmup_batch + 1}/{n}: loss={stats['loss']:.4g} "
                       f"entropy={stats['entropy']:.4g} grad_norm={stats['grad_norm']:.4g}")
        problem = ckpt.step_problem(model, stats)
        if problem:
            raise TrainingError(f"warm-up step {k // cfg.warmup_batch + 1}/{n}: {problem}; stopped "
                                f"before any RL step, nothing saved (lower --warmup_lr, now "
                                f"{cfg.warmup_lr:g})")
    dd.broadcast_params(model)  # every rank ran the same steps; rank 0's weights are kept
