"""The counterfactual pool at a small batch: IG of the same rollouts with the official pool (every
search step of the batch) and with the step's own question left out (`--ig_pool others`).

    python tools/pool_check.py --preset query --model runs/query-warmup/checkpoint --steps 10

At the paper's batch (256 questions x 5 rollouts) a step's own question holds 4 of ~1,279 pool
pairs; at the default 4 x 4 it holds 3 of 15, and their documents may hold the same gold, which
lowers IG exactly for the good searches. This samples --steps batches as training does (the run's
config, seed and sampling), scores each batch's IG with both pools from the same generator state,
and prints for each: the mean IG of steps that hit and that miss, the share of hits whose IG is
below the mean IG of their question's group (IG should rank a hit above its group), and the share
of IG computations that drew at least one counterfactual from the step's own question.
Every train.py flag is taken too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

import prepare
import step as rl
from config import parse_config
from machinery import lm, loaders
from machinery.errors import InputError, RetrieverError
from retriever import make_search


def group_figures(trajs, gains, hits, draws, group_size: int) -> list[tuple]:
    """(hit, IG, mean IG of its group, drew from its own question) for every scored step."""
    rows = []
    for g in range(0, len(trajs), group_size):
        members = range(g, min(g + group_size, len(trajs)))
        scored = [x.ig for i in members for x in gains[i] if x is not None]
        own = {s.documents for i in members for s in trajs[i].steps}  # the question's documents
        for i in members:
            for t, gain in enumerate(gains[i]):
                if gain is None:
                    continue
                sibling = any(p.documents in own for p in draws[i][t])
                rows.append((hits[i][t], gain.ig, float(np.mean(scored)), sibling))
    return rows


def report(name: str, rows: list[tuple]) -> str:
    ig_of = lambda hit: [v for h, v, _, _ in rows if h == hit]
    hits, misses = ig_of(True), ig_of(False)
    below = [v < m for h, v, m, _ in rows if h]
    mean = lambda xs: f"{np.mean(xs):+8.2f}" if xs else f"{'-':>8}"
    share = lambda xs: f"{np.mean(xs):8.2f}" if xs else f"{'-':>8}"
    return (
        f"{name:<10}{len(rows):>7}{len(hits):>6}{mean(hits)}{mean(misses)}{share(below)}"
        f"{share([s for *_, s in rows])}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--steps", type=int, default=10, help="batches of rollouts to score")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.help:
        print(__doc__)
        return 0
    try:
        if args.steps < 1:
            raise InputError(f"--steps {args.steps}: must be at least 1")
        cfg = parse_config(rest)[0]
        data = prepare.default_data(cfg.task)
        train_q, _ = loaders.split_validation(
            loaders.load_questions(cfg.train_data or data["train"]), cfg.val_questions
        )
        corpus = cfg.corpus or data["corpus"]
        search = make_search(corpus, cfg.retriever_url, cfg.topk, cfg.doc_words or None)
        model, tokenizer = loaders.load_model(cfg.model or prepare.default_model())
        device = next(model.parameters()).device
        compute = rl.choose_compute(cfg.fast, device, lm.amp_dtype(cfg.precision, device))
        gen_data = torch.Generator().manual_seed(cfg.seed)
        gen_sample = torch.Generator(device=device).manual_seed(cfg.seed + 2)
        rows = {"batch": [], "others": []}
        model.eval()
        for k in range(args.steps):
            qs = rl.sample_questions(train_q, cfg, gen_data)
            trajs = rl.generate_rollouts(model, tokenizer, qs, search, cfg, gen_sample, compute)
            golds = [q["golden_answers"] for q in qs]
            outcome = rl.rewards(trajs, golds)
            for pool in rows:
                c = dataclasses.replace(cfg, ig_pool=pool, outcome_only=False, step_reward="ig")
                seed = cfg.seed + 1 + 1000 * k  # the same draws' generator for both pools
                draws = rl.counterfactual_draws(trajs, c, torch.Generator().manual_seed(seed))
                gains = rl.step_bonus(
                    model,
                    tokenizer,
                    trajs,
                    golds,
                    outcome,
                    c,
                    torch.Generator().manual_seed(seed),
                    compute,
                ).gains
                rows[pool] += group_figures(trajs, gains, outcome.hits, draws, cfg.group_size)
            print(f"batch {k + 1}/{args.steps}: {sum(map(len, outcome.hits))} searches", flush=True)
    except (InputError, RetrieverError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{'pool':<10}{'steps':>7}{'hits':>6}{'IG hit':>8}{'IG miss':>8}{'<group':>8}{'sibling':>8}"
    )
    for pool, r in rows.items():
        print(report(pool, r))
    print(
        "IG hit / IG miss: mean IG (nats) of scored steps whose documents hold a gold answer / do "
        "not; <group: share of hits whose IG is below their question's group mean; sibling: share "
        "of IG computations that drew a counterfactual from the step's own question"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
