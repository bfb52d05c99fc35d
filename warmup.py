"""The format warm-up: a few supervised steps that teach a small model the tag protocol.

The paper starts from Qwen2.5-3B, which follows the protocol from its instruction alone. The
untrained SmolLM2-135M of the offline default does not (no `<search>`, no closed `<answer>`): every
reward would be 0 and RL would have nothing to learn from. So train.py first fits trajectories built
mechanically from the train split, through the same loss mask and update as RL (step.update).
"""

from __future__ import annotations

import math
import re

import torch
from tqdm import tqdm

import igsearch as ig
import step as rl
from machinery import distributed as dd
from machinery import records
from machinery.errors import TrainingError

QUERY_STOPWORDS = frozenset(
    "a an and are as at by for from how in is it of on or that the this to "
    "was what when where which who whom whose why with".split()
)


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


def retry_forms(question: str, gen: torch.Generator) -> list[str]:
    """query_forms plus a prefix and a suffix of the keywords, each of a random length.

    Every form is built from the question text as the policy sees it, and no length is taken from
    where a noisy question's distractor ends: the warm-up knows nothing the policy could not.
    """
    forms = query_forms(question, gen)
    keys = forms[1].split()
    n_prefix, n_suffix = (
        torch.randint(1, len(keys) + 1, (2,), generator=gen)
        if keys
        else torch.ones(2, dtype=torch.long)
    ).tolist()
    return forms + [" ".join(keys[:n_prefix]), " ".join(keys[-n_suffix:])]


def example_searches(
    pool: list[dict], search, cfg, gen: torch.Generator
) -> list[list[tuple[str, str]] | None]:
    """The (query, documents) searches of each pool question's warm-up example, or None to skip it.

    "question" and "varied": one search (the question, or one of query_forms drawn at random),
    kept when its documents hold the gold. "retry": up to max_searches forms of retry_forms in a
    random order, searched in turn until one holds the gold; the misses before it stay in the
    example, so the model sees the retry form (a query, documents without the answer, a new query).
    """
    golds = [q["golden_answers"][:1] for q in pool]
    if cfg.warmup_query == "retry":
        n = max(1, cfg.max_searches)
        tries = [
            [forms[k] for k in torch.randperm(len(forms), generator=gen)[:n].tolist()]
            for forms in (retry_forms(q["question"], gen) for q in pool)
        ]
        flat = [query for queries in tries for query in queries]
        docs = iter(search(flat))  # one batched retrieval for the whole pool
        out = []
        for queries, gold in zip(tries, golds):
            found = [(query, next(docs)) for query in queries]
            first_hit = next(
                (k for k, (_, d) in enumerate(found) if ig.documents_hold_answer(d, gold)), None
            )
            out.append(None if first_hit is None else found[: first_hit + 1])
        return out
    if cfg.warmup_query == "varied":
        pick = torch.randint(3, (len(pool),), generator=gen).tolist()
        queries = [query_forms(q["question"], gen)[k] for q, k in zip(pool, pick)]
    else:
        queries = [q["question"] for q in pool]
    return [
        [(query, d)] if ig.documents_hold_answer(d, gold) else None
        for query, d, gold in zip(queries, search(queries), golds)
    ]


def warmup_trajectories(
    tokenizer, questions: list[dict], search, cfg, gen: torch.Generator
) -> list[ig.Trajectory]:
    """cfg.warmup_examples supervised trajectories from questions in a random order, drawn in pools
    of twice that many until enough are kept (or the questions run out): question -> the searches
    of example_searches, their documents inserted (mask 0) -> <answer> gold </answer>."""
    tpl, want = ig.TEMPLATES[cfg.template], cfg.warmup_examples
    order = torch.randperm(len(questions), generator=gen).tolist()
    trajs: list[ig.Trajectory] = []
    specials = ig.special_strings(tokenizer)
    for k in range(0, len(order), 2 * want):
        pool = [questions[i] for i in order[k : k + 2 * want]]
        for q, searches in zip(pool, example_searches(pool, search, cfg, gen)):
            if searches is None or len(trajs) >= want:
                continue
            pieces = []
            for query, d in searches:
                d = ig.sanitize_documents(d, specials)
                # trained pieces keep their end-of-sequence token: the user's text in them is plain
                query = ig.plain_text(query, specials)
                pieces += [
                    (f"<search> {query} </search>", True),
                    (ig.observation_text(d, tpl), False),
                ]
            gold = ig.plain_text(q["golden_answers"][0], specials)
            pieces.append((f"<answer> {gold} </answer>{tokenizer.eos_token or ''}", True))
            trajs.append(
                supervised_trajectory(
                    tokenizer, ig.build_prompt(tokenizer, q["question"], tpl), pieces
                )
            )
        if len(trajs) >= want:
            break
    return trajs


def warmup(
    model, tokenizer, questions: list[dict], search, cfg, compute: rl.Compute, gen: torch.Generator
) -> None:
    """Format warm-up: supervised steps on warmup_trajectories, through the same mask and loss as
    the RL update (step.update): loss on the search and answer tokens only. Each step logs its
    loss; a step that leaves the model non-finite or uniform stops the run."""
    trajs = warmup_trajectories(tokenizer, questions, search, cfg, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    n = math.ceil(len(trajs) / cfg.warmup_batch)
    for k in tqdm(range(0, len(trajs), cfg.warmup_batch), desc="warm-up", disable=not dd.is_main()):
        batch = trajs[k : k + cfg.warmup_batch]
        # advantage 1 on every target token: the REINFORCE loss is -mean log p(target)
        ones = [torch.ones(len(t.response_ids)) for t in batch]
        stats = rl.update(model, None, tokenizer, batch, ones, opt, cfg, compute)
        entropy = records.mean_entropy(stats)
        if dd.is_main():
            tqdm.write(
                f"warm-up step {k // cfg.warmup_batch + 1}/{n}: loss={stats['loss']:.4g} "
                f"entropy={entropy:.4g} grad_norm={stats['grad_norm']:.4g}"
            )
        problem = records.step_problem(model, stats)
        if problem:
            raise TrainingError(
                f"warm-up step {k // cfg.warmup_batch + 1}/{n}: {problem}; stopped before any RL "
                f"step, nothing saved (lower --warmup_lr, now {cfg.warmup_lr:g})"
            )
    dd.broadcast_params(model)  # every rank ran the same steps; rank 0's weights are kept
