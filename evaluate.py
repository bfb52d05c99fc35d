"""Exact-match evaluation of a search policy on FlashRAG question files.

    python evaluate.py            # the offline default model on the held-out wiki split
    python evaluate.py --model runs/default/checkpoint --data nq.jsonl hotpotqa.jsonl --show 2

Greedy rollouts through the same loop as training; prints dataset, n, EM, F1, searches per
question and valid-answer rate, with an average row, and writes the results (config, retriever,
corpus and top-k stated) atomically to a JSON file, with one record a question beside it
(x.questions.jsonl: id, prediction, EM, searches, first query, each search's hit). `--show N`
prints N trajectories with the information gain of each search step against the gold answer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

import igsearch as ig
import prepare
import step as rl
from config import TASKS, Config, checked_fields, parse_bool
from machinery import credit_page, lm, loaders
from machinery.errors import InputError, OneLineParser, RetrieverError
from machinery.run_folder import check_not_input, check_writable, read_json, write_json, write_lines
from machinery.tables import format_paper_table, format_table
from machinery.text import f1_score
from retriever import make_search


def questions_path(out: str) -> Path:
    """The per-question records beside the results JSON: x.eval.json -> x.eval.questions.jsonl."""
    path = Path(out)
    return path.with_name(path.stem + ".questions.jsonl")


def default_out(model: str) -> str:
    """Beside a model folder, never inside it (a checkpoint folder is replaced whole by each save):
    runs/x/checkpoint -> runs/x/checkpoint.eval.json; runs/eval.json for a Hub name or the
    default."""
    if not os.path.isdir(model):
        return "runs/eval.json"
    folder = Path(model).resolve()
    return str(folder.with_name(folder.name + ".eval.json"))


class Answered(NamedTuple):
    """One evaluated question: its rollout, and the IG of each search step when asked for."""

    question: dict
    traj: ig.Trajectory
    gains: list[ig.Gain | None]  # [t]: IG_t of search step t (None: not scored)


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    questions: list[dict],
    search,
    cfg: Config,
    compute: rl.Compute,
    *,
    with_ig: bool = False,
    desc: str = "eval",
) -> tuple[dict, list[Answered]]:
    """Greedy rollouts (step.generate_rollouts at temperature 0, cfg's template and budgets) on
    every question, cfg.eval_batch at a time. Returns the summary and every Answered.

    with_ig: also the IG of every search step against the gold (counterfactuals from the same
    batch, igsearch's defaults).
    """
    was_training = model.training
    model.eval()
    answered: list[Answered] = []
    for k in tqdm(range(0, len(questions), cfg.eval_batch), desc=desc, leave=False):
        batch = questions[k : k + cfg.eval_batch]
        trajs = rl.generate_rollouts(
            model, tokenizer, batch, search, cfg, None, compute, temperature=0.0
        )
        gains = [[None] * len(t.steps) for t in trajs]
        if with_ig:
            draws = ig.plan_counterfactuals([ig.step_pairs(t) for t in trajs])
            with compute.autocast(cache=False):
                gains = ig.information_gain(
                    model,
                    tokenizer,
                    trajs,
                    [q["golden_answers"] for q in batch],
                    draws,
                    template=ig.TEMPLATES[cfg.template],
                    logprobs=compute.answer_logprobs,
                )
        answered += [Answered(q, t, g) for q, t, g in zip(batch, trajs, gains)]
    model.train(was_training)
    return summarize(answered), answered


def question_records(answered: list[Answered]) -> list[dict]:
    """One record per evaluated question, for tests across questions (tools/significance.py) and
    for reading what a policy wrote: id, prediction, EM, searches, first query, each search's
    hit."""
    out = []
    for q, traj, _ in answered:
        pred, golds = ig.extract_answer(traj), q["golden_answers"]
        hits = [ig.documents_hold_answer(s.documents, golds) for s in traj.steps]
        out.append(
            {
                "id": q.get("id", ""),
                "prediction": pred,
                "em": ig.exact_match(pred, golds),
                "searches": len(traj.steps),
                "first_query": traj.steps[0].query if traj.steps else None,
                "hits": hits,
                "hit1": bool(hits) and hits[0],
            }
        )
    return out


def summarize(answered: list[Answered]) -> dict:
    """n, EM, F1, searches a question, valid-answer rate, hit and hit1 over evaluated questions."""
    n = len(answered)
    preds = [ig.extract_answer(a.traj) for a in answered]
    golds = [a.question["golden_answers"] for a in answered]
    hits = [
        [ig.documents_hold_answer(s.documents, g) for s in a.traj.steps]
        for a, g in zip(answered, golds)
    ]
    n_steps = sum(len(h) for h in hits)
    return {
        "n": n,
        "em": sum(ig.exact_match(p, g) for p, g in zip(preds, golds)) / n,
        "f1": sum(f1_score(p, g) for p, g in zip(preds, golds)) / n,
        "searches": n_steps / n,
        "valid": sum(p is not None for p in preds) / n,
        # share of search steps whose documents hold the gold
        "hit": sum(sum(h) for h in hits) / max(n_steps, 1),
        # share of questions whose first search finds the gold (no search: a miss)
        "hit1": sum(bool(h) and h[0] for h in hits) / n,
    }


def ig_by_retrieval(answered: list[Answered]) -> str:
    """Mean IG of the scored search steps whose documents hold a gold answer, against those whose do
    not: whether IG tells a query that found the answer from one that did not."""
    found: dict[bool, list[float]] = {True: [], False: []}
    for q, t, gains in answered:
        for step, gain in zip(t.steps, gains):
            if gain is not None:
                found[ig.documents_hold_answer(step.documents, q["golden_answers"])].append(gain.ig)
    part = [
        f"{name} {sum(v) / len(v):+.2f} nats over {len(v)} steps "
        f"({sum(x > 0 for x in v) / len(v):.0%} > 0)"
        if v
        else f"{name} none"
        for name, v in (("gold in the documents", found[True]), ("gold not in them", found[False]))
    ]
    return "IG per search step: " + "; ".join(part)


def show_trajectory(answered: Answered) -> str:
    """A trajectory as a reader should see it: each search step with its query, passages and IG."""
    question, traj, gains = answered
    out = [f"Q: {question['question']}   gold: {question['golden_answers']}"]
    for t, (step, gain) in enumerate(zip(traj.steps, gains)):
        igv = "n/a" if gain is None else f"{gain.ig:+.3f}"
        out.append(f"  step {t + 1}: <search> {step.query} </search>   IG = {igv}")
        out += ["      " + line for line in step.documents.strip().splitlines()]
        if step.refine:
            out.append(f"      refine: {step.refine}")
    pred = ig.extract_answer(traj)
    out.append(f"  answer: {pred!r}   EM = {ig.exact_match(pred, question['golden_answers']):.0f}")
    out.append("  --- full response ---\n" + traj.response_text.strip())
    return "\n".join(out)


def run_config(model: str) -> tuple[Config, str]:
    """(Config, where it came from): the run's config.json when the model is a run's
    checkpoint (RUN/checkpoint beside RUN/config.json), else train.py's defaults."""
    saved = Path(model).parent / "config.json"
    if model and saved.exists():
        return Config(**checked_fields(read_json(saved), saved)), str(saved)
    return Config(), "train.py's defaults"


def question_page(
    model, tokenizer, search, model_name: str, question: str, golds: list[str], path: str | Path
) -> tuple[Path, tuple]:
    """The credit page of one question as a training step would make it: G rollouts at the run's
    temperature, EM rewards, IG with counterfactuals from the group, the advantages, all by
    step.py's own phases with the run's settings and seeds. Prints and returns the page's path,
    and returns (trajs, outcome, bonus, adv)."""
    check_writable(path)  # before the sampling
    cfg, source = run_config(model_name)
    device, G = next(model.parameters()).device, cfg.group_size
    compute = rl.choose_compute(cfg.fast, device, lm.amp_dtype(cfg.precision, device))
    gen_ig = torch.Generator().manual_seed(cfg.seed + 1)  # the seeds of train.set_up
    gen_sample = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    questions = [{"question": question, "golden_answers": golds}] * G
    model.eval()
    trajs = rl.generate_rollouts(model, tokenizer, questions, search, cfg, gen_sample, compute)
    outcome = rl.rewards(trajs, [golds] * G)
    bonus = rl.step_bonus(model, tokenizer, trajs, [golds] * G, outcome, cfg, gen_ig, compute)
    adv = rl.advantages(trajs, outcome.rewards, bonus.bonus, cfg)
    title = (
        f"{G} rollouts of one question, {model_name or 'the offline default model'} "
        f"(settings: {source})"
    )
    page = credit_page.write_step_page(
        path,
        tokenizer,
        questions=questions,
        trajs=trajs,
        outcome=outcome,
        gains=bonus.gains,
        adv=adv,
        cfg=cfg,
        title=title,
    )
    igs = [g and g.ig for row in bonus.gains for g in row]
    print(f"wrote {page}: rewards {outcome.rewards.tolist()}, IG {igs}")
    return page, (trajs, outcome, bonus, adv)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF model name or folder; '' = offline default")
    p.add_argument("--trust_remote_code", action="store_true", help="run the model's own code")
    p.add_argument("--data", nargs="*", default=[], help="FlashRAG JSON-lines files")
    p.add_argument("--task", default="plain", choices=TASKS, help="the offline test split")
    p.add_argument("--corpus", default="", help="wiki-18 JSON lines for BM25")
    p.add_argument("--retriever_url", default="", help="Search-R1 /retrieve endpoint")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--doc_words", type=int, default=30, help="words kept per passage (0 = all)")
    p.add_argument("--limit", type=int, default=0, help="first N questions of each file (0 = all)")
    p.add_argument("--template", default="igsearch", choices=sorted(ig.TEMPLATES))
    p.add_argument("--max_searches", type=int, default=2)
    p.add_argument("--max_turn_tokens", type=int, default=32)
    p.add_argument("--max_response_tokens", type=int, default=4096, help="documents included")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--fast", type=parse_bool, default=True, help="machinery/fast.py's twins")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--show", type=int, default=0, help="print N trajectories with per-step IG")
    p.add_argument("--out", default="", help="results JSON (default: beside the model folder)")
    p.add_argument("--html", default="", help="with --question, --answer: a page of credit")
    p.add_argument("--question", default="", help="the question of the --html page")
    p.add_argument("--answer", nargs="+", default=[], help="gold answer(s) of --question")
    try:
        args = p.parse_args(argv)
        for name in ("topk", "batch_size", "max_turn_tokens", "max_response_tokens"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name} {getattr(args, name)}: must be at least 1")
        for name in ("doc_words", "limit", "max_searches", "show"):
            if getattr(args, name) < 0:
                raise InputError(f"--{name} {getattr(args, name)}: must be at least 0")
        if bool(args.html) != bool(args.question and args.answer):
            raise InputError("--html, --question and --answer go together")
        if args.html:  # the checks of a question file's row: an answer "The" scored EM 1
            row = {"question": args.question, "golden_answers": args.answer}
            loaders.check_question_row(row, "--question/--answer", 0)
        own = args.data and (args.corpus or args.retriever_url)  # nothing of the offline default
        data = {} if own else prepare.default_data(args.task)
        files = args.data or [data["test"]]
        question_sets = [loaders.load_questions(path)[: args.limit or None] for path in files]
        out = args.out or default_out(args.model)
        inputs = [*files, args.corpus]
        for flag, path in (("--out", out), ("--out", questions_path(out)), ("--html", args.html)):
            if path:  # never over an input, a model's file or a run's file; before the work
                check_not_input(path, flag, inputs, args.model)
        check_writable(out)  # before the evaluation, which may take an hour
        search = make_search(
            args.corpus or data.get("corpus", ""),
            args.retriever_url,
            args.topk,
            args.doc_words or None,
        )
        model, tokenizer = loaders.load_model(
            args.model or prepare.default_model(), trust_remote_code=args.trust_remote_code
        )
        if args.html:  # instead of the evaluation: G sampled rollouts of one question, their credit
            question_page(
                model, tokenizer, search, args.model, args.question, args.answer, args.html
            )
            return 0
        cfg = Config(
            template=args.template,
            max_searches=args.max_searches,
            max_turn_tokens=args.max_turn_tokens,
            max_response_tokens=args.max_response_tokens,
            eval_batch=args.batch_size,
        )
        device = next(model.parameters()).device
        compute = rl.choose_compute(args.fast, device, lm.amp_dtype(args.precision, device))
        rows, everything, records = {}, [], []
        for path, questions in zip(files, question_sets):
            name = Path(path).stem
            summary, answered = evaluate(
                model, tokenizer, questions, search, cfg, compute, with_ig=args.show > 0, desc=name
            )
            name = name if name not in rows else f"{name}_{len(rows) + 1}"
            rows[name] = summary
            records += [{"dataset": name, **r} for r in question_records(answered)]
            everything += answered
    except (InputError, RetrieverError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for a in everything[: args.show]:  # the first N trajectories, across the files
        print(show_trajectory(a) + "\n")
    if args.show:
        print(ig_by_retrieval(everything) + "\n")
    print(format_table(rows))
    paper = format_paper_table(rows, Path(args.model).name or "offline default")
    if paper:
        print("\n" + paper)
    write_json(
        out,
        {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "model": args.model or "offline default",
            "retriever": args.retriever_url or f"BM25 over {args.corpus or data.get('corpus')}",
            "topk": args.topk,
            "doc_words": args.doc_words,
            "config": vars(args),
            "results": rows,
        },
    )
    write_lines(questions_path(out), [json.dumps(r) for r in records])
    print(f"results written to {out}, one record a question to {questions_path(out)}")
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `evaluate.py ... | head` ends quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
