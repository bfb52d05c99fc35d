"""Exact-match evaluation of a search policy on FlashRAG question files.

    python evaluate.py                                  # the offline default model on the held-out wiki split
    python evaluate.py --model runs/default/checkpoint --data nq.jsonl hotpotqa.jsonl --show 2

Greedy rollouts through the same loop as training; prints dataset, n, EM, F1, searches per
question and valid-answer rate, with an average row, and writes the results (config, retriever,
corpus and top-k stated) atomically to a JSON file. `--show N` prints N trajectories with the
information gain of each search step against the gold answer.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import fast
import igsearch as ig
import prepare
from checkpoint import check_writable, load_metrics, read_json, write_json
from errors import InputError, OneLineParser
from retriever import BM25Retriever, RemoteRetriever, RetrieverError, format_passages


def make_search(corpus: str, retriever_url: str, topk: int, doc_words: int | None, timeout: float = 30.0,
                retries: int = 3):
    """A `search(queries) -> documents text` function over BM25 (corpus) or a Search-R1 server (url)."""
    backend = RemoteRetriever(retriever_url, timeout, retries) if retriever_url else BM25Retriever(corpus)
    return lambda queries: [format_passages(p, doc_words) for p in backend.search(queries, topk)]


def f1_score(prediction: str | None, golds: list[str]) -> float:
    """Word-level F1 against the best gold answer."""
    if prediction is None:
        return 0.0
    best, pred = 0.0, ig.normalize_answer(prediction).split()
    for g in golds:
        gold = ig.normalize_answer(g).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def documents_hold_answer(documents: str, golds: list[str]) -> bool:
    """Whether retrieved text holds a gold answer as whole words, both normalised: the query found
    it. Not a reward; the measure of query quality that train.py logs as `hit`."""
    text = f" {ig.normalize_answer(documents)} "
    return any(f" {g} " in text for g in map(ig.normalize_answer, golds) if g)


@torch.no_grad()
def evaluate(model, tokenizer, questions: list[dict], search, *, batch_size: int = 16,
             with_ig: bool = False, template: str = "igsearch", desc: str = "eval",
             use_fast: bool = True, **rollout_kw) -> tuple[dict, list]:
    """Greedy rollouts on every question. Returns the summary and the (question, trajectory) pairs.

    with_ig: also the IG of every search step against the gold (counterfactuals from the same batch).
    use_fast: the exact speed-ups of fast.py (the same rollouts and scores).
    """
    tpl = ig.TEMPLATES[template]
    was_training = model.training
    model.eval()
    pairs, em, f1 = [], [], []
    for k in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False):
        batch = questions[k: k + batch_size]
        prompts = [ig.build_prompt(tokenizer, q["question"], tpl) for q in batch]
        trajs = ig.rollout(model, tokenizer, prompts, search, template=tpl, temperature=0.0,
                           turn=fast.CachedTurns() if use_fast else ig.generate_turn, **rollout_kw)
        if with_ig:
            golds = [q["golden_answers"] for q in batch]
            draws = ig.plan_counterfactuals([ig.step_pairs(t) for t in trajs])
            ig.information_gain(model, tokenizer, trajs, golds, draws, template=tpl,
                                score=fast.answer_scores_shared_prefix if use_fast else ig.answer_scores)
        for q, t in zip(batch, trajs):
            pred = ig.extract_answer(t)
            em.append(ig.exact_match(pred, q["golden_answers"]))
            f1.append(f1_score(pred, q["golden_answers"]))
            pairs.append((q, t))
    model.train(was_training)
    n = len(pairs)
    hits = [documents_hold_answer(s.documents, q["golden_answers"]) for q, t in pairs for s in t.steps]
    summary = {"n": n, "em": sum(em) / n, "f1": sum(f1) / n,
               "searches": sum(len(t.steps) for _, t in pairs) / n,
               "valid": sum(ig.extract_answer(t) is not None for _, t in pairs) / n,
               "hit": sum(hits) / max(len(hits), 1)}  # share of search steps whose documents hold the gold
    return summary, pairs


def format_table(rows: dict[str, dict], average: bool = True, first: str = "dataset") -> str:
    """Dataset | n | EM | F1 | searches | valid | hit, with an average row when there are several datasets.

    hit: the share of search steps whose documents hold a gold answer (query quality)."""
    lines = [f"{first:<24}{'n':>6}{'EM':>8}{'F1':>8}{'search/q':>10}{'valid':>8}{'hit':>8}"]
    rows = dict(rows)
    if average and len(rows) > 1:
        keys = ("em", "f1", "searches", "valid", "hit")
        rows["average"] = {"n": sum(r["n"] for r in rows.values()),
                           **{k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}}
    for name, r in rows.items():
        hit = f"{r['hit']:>8.2f}" if "hit" in r else f"{'-':>8}"  # tables written before hit was measured
        lines.append(f"{name:<24}{r['n']:>6}{r['em']:>8.3f}{r['f1']:>8.3f}{r['searches']:>10.2f}{r['valid']:>8.2f}{hit}")
    return "\n".join(lines)


# Exact match of Qwen2.5-3B rows, quoted from the IG-Search paper (arXiv 2604.15148), in the order of
# prepare.BENCHMARKS, then the average. None: a cell our copy of the table (SPEC.md 5b) does not give.
PAPER_EM = {
    "Direct inference": (.106, .288, .108, .149, .244, .020, .024, .134),
    "RAG": (.348, .544, .387, .255, .226, .047, .080, .270),
    "Search-R1 base GRPO": (.421, .583, .413, .297, .274, .066, .128, .312),
    "AutoRefine base": (.467, .620, .450, .405, .393, .157, .344, .405),
    "MR-Search base": (.477, .635, .460, .419, .401, .165, .344, .414),
    "GiGPO instruct": (.420, .595, .424, .369, .370, .126, .641, .421),
    "IG-Search base": (None, None, None, None, None, None, .424, .430),
}
PAPER_COLUMNS = ("NQ", "TriviaQA", "PopQA", "HotpotQA", "2wiki", "MuSiQue", "Bamboogle", "avg")


def format_paper_table(rows: dict[str, dict], name: str = "this evaluation") -> str | None:
    """EM in the paper's layout (7 benchmarks and the average), our row above the paper's rows.

    rows: dataset name (file stem) -> summary with "em". None unless every name is one of the seven
    benchmarks (prepare.BENCHMARKS); a benchmark not evaluated is left blank, and our average is
    then over the ones evaluated (marked *).
    """
    if not rows or any(k not in prepare.BENCHMARKS for k in rows):
        return None
    ours = [rows[b]["em"] if b in rows else None for b in prepare.BENCHMARKS]
    done = [v for v in ours if v is not None]
    cell = lambda v: f"{'':>10}" if v is None else f"{v:>10.3f}"  # noqa: E731
    line = lambda label, values: f"{label[:24]:<24}" + "".join(cell(v) for v in values)  # noqa: E731
    out = ["EM in the paper's layout: our row (this model, retriever and top-k), then rows quoted from the paper",
           f"{'method':<24}" + "".join(f"{c:>10}" for c in PAPER_COLUMNS),
           line(name, ours + [sum(done) / len(done)]) + ("" if len(done) == len(ours) else " *"),
           "quoted from the paper (Qwen2.5-3B, E5 over wiki-18, top-3):"]
    out += [line(method, list(values)) for method, values in PAPER_EM.items()]
    if len(done) < len(ours):
        out.append(f"* our average is over the {len(done)} benchmarks evaluated; the paper's is over all 7")
    return "\n".join(out)


def method_name(config: dict) -> str:
    """The name of a run's method (its table row), from its config: the method and every IG setting that
    departs from the paper's formulation."""
    if config.get("outcome_only") or config.get("ig_alpha") == 0:
        return "outcome-only"
    marks = [("empty baseline", config.get("ig_baseline") == "empty"), ("centred", config.get("ig_center")),
             (f"alpha {config.get('ig_alpha'):g}", config.get("ig_alpha", 0.3) != 0.3),
             (f"dead zone {config.get('ig_dead_zone'):g}", config.get("ig_dead_zone", 0) > 0),
             (f"neg x{config.get('ig_neg_scale'):g}", config.get("ig_neg_scale", 1) != 1),
             (f"clip {config.get('ig_clip'):g}", config.get("ig_clip", 0) > 0)]
    marks = [m for m, on in marks if on]
    return "IG-Search" + (f" ({', '.join(marks)})" if marks else "")


def read_run(run: str) -> tuple[dict, dict, list[dict]]:
    """A run folder's config.json, table.json (held-out rows; {} when the run evaluated no test questions)
    and metrics.jsonl records (none without RL steps)."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise InputError(f"{path}: no such file (is {run} a run folder?)")
    table = Path(run) / "table.json"
    return (read_json(path), read_json(table) if table.exists() else {},
            load_metrics(Path(run) / "metrics.jsonl", upto=math.inf))


def compare_runs(runs: list[str]) -> str:
    """Held-out results of several runs (their table.json), grouped by row name: mean +- std (population)
    and the lowest and highest EM over runs."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        for name, row in read_run(run)[1].items():
            groups.setdefault(name, []).append(row)
    lines = [f"{'method':<30}{'runs':>5}{'EM':>15}{'EM min-max':>13}{'F1':>15}{'search/q':>10}{'valid':>8}{'hit':>8}"]
    for name, rows in groups.items():
        stat = {k: torch.tensor([float(r[k]) for r in rows]) for k in ("em", "f1", "searches", "valid")}
        pm = {k: f"{v.mean():.3f} ± {v.std(unbiased=False):.3f}" for k, v in stat.items()}
        hit = f"{sum(r['hit'] for r in rows) / len(rows):>8.2f}" if all("hit" in r for r in rows) else f"{'-':>8}"
        spread = f"{stat['em'].min():.3f}-{stat['em'].max():.3f}"  # seeds' spreads overlap or not
        lines.append(f"{name:<30}{len(rows):>5}{pm['em']:>15}{spread:>13}{pm['f1']:>15}"
                     f"{stat['searches'].mean():>10.2f}{stat['valid'].mean():>8.2f}{hit}")
    means = training_means(runs)
    return "\n".join(lines + [""] + per_run(runs) + ([""] + means if means else []))


def per_run(runs: list[str]) -> list[str]:
    """One line per run: its folder, method, seed, wall time (wall.json, when the run was timed), test EM
    and hit of its table row, and validation EM at every validated step."""
    lines = [f"{'run':<14}{'method':<30}{'seed':>5}{'wall s':>8}{'test EM':>9}{'hit':>6}  validation EM by step"]
    for run in runs:
        config, table, recs = read_run(run)
        wall = Path(run) / "wall.json"
        seconds = f"{read_json(wall).get('wall_seconds', '-')}" if wall.exists() else "-"
        row = next(iter(table.values()), {})
        em, hit = (f"{row[k]:.3f}" if k in row else "-" for k in ("em", "hit"))
        val = " ".join(f"{r['step']}:{r['val_em']:.3f}" for r in recs if "val_em" in r)
        name = method_name(config) if any(r.get("step", 0) > 0 for r in recs) else next(iter(table), "-")
        lines.append(f"{Path(run).name:<14}{name:<30}{config.get('seed', '-'):>5}{seconds:>8}{em:>9}{hit:>6}  {val}")
    return lines


TRAIN_KEYS = (("reward", "training reward (EM)"), ("hit", "hit share of search steps"),
              ("query_entropy", "query entropy"), ("zero_adv_groups", "groups with zero outcome advantage"),
              ("ig_pos", "share of search steps with IG > 0"), ("ig_hit", "mean IG of steps that hit"),
              ("ig_miss", "mean IG of steps that miss"))


def training_means(runs: list[str], window: int = 10) -> list[str]:
    """Lines of per-method means of the RL steps' metrics.jsonl: first `window` steps -> last `window` steps,
    and over all steps (each run's mean, then the mean over the method's runs). Steps where a quantity is
    undefined (no step hit, say) are left out of its means."""
    per: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for run in runs:
        config, _, recs = read_run(run)
        recs = [r for r in recs if r.get("step", 0) > 0 and "reward" in r]
        method = method_name(config) if recs else ""
        for key, _ in TRAIN_KEYS:
            if key.startswith("ig_") and method == "outcome-only":
                continue  # IG is not computed without the IG reward: its logged zeros mean nothing
            vals = [float(r[key]) for r in recs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if vals:
                first, last = vals[:window], vals[-window:]
                per.setdefault(method, {}).setdefault(key, []).append(
                    (sum(first) / len(first), sum(last) / len(last), sum(vals) / len(vals)))
    if not per:
        return []
    lines = [f"training means over each run's RL steps (first {window} -> last {window}, all), mean over runs:"]
    lines.append(f"{'quantity':<38}" + "".join(f"{m:>26}" for m in per))
    for key, title in TRAIN_KEYS:
        cells = []
        for stats in per.values():
            got = stats.get(key)
            mean = [sum(x[i] for x in got) / len(got) for i in range(3)] if got else None
            cells.append(f"{mean[0]:.2f} -> {mean[1]:.2f} ({mean[2]:.2f})" if mean else "-")
        lines.append(f"{title:<38}" + "".join(f"{c:>26}" for c in cells))
    return lines


PLOT_PANELS = (("val_em", "validation EM"), ("val_hit", "validation: search steps that find the gold"),
               ("reward", "training reward (5-step mean)"), ("hit", "training: steps that find the gold (5-step mean)"))


def learning_curves(runs: list[str]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """method -> metric -> RL step -> one value per run, for the keys of PLOT_PANELS.

    A run's method is method_name of its config (e.g. "IG-Search"). Training metrics are noisy (16 rollouts a
    step): each run's are a trailing 5-step mean. A run without RL steps (the shared warm-up) gives every
    method its step-0 validation point."""
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    start: dict[str, float] = {}
    for run in runs:
        config, _, recs = read_run(run)
        if not any(r.get("step", 0) > 0 for r in recs):
            start.update({k: v for r in recs for k, v in r.items() if k.startswith("val_")})
            continue
        per_key = curves.setdefault(method_name(config), {})
        for key, _ in PLOT_PANELS:
            points = [(r["step"], r[key]) for r in recs if key in r]
            if not key.startswith("val_"):
                points = [(s, sum(v for _, v in points[max(0, k - 4): k + 1]) / len(points[max(0, k - 4): k + 1]))
                          for k, (s, _) in enumerate(points)]
            for s, v in points:
                per_key.setdefault(key, {}).setdefault(s, []).append(v)
    for per_key in curves.values():
        for key, value in start.items():
            if key in per_key:
                per_key[key].setdefault(0, [value])
    return curves


def plot_runs(runs: list[str], out: str) -> None:
    """learning_curves drawn to a PNG: per method, the mean over its runs (seeds), shaded from the lowest
    to the highest run, against RL step. Panels without data are left out."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install matplotlib") from None
    curves = learning_curves(runs)
    panels = [(k, title) for k, title in PLOT_PANELS if any(k in c for c in curves.values())]
    if not panels:
        raise InputError("no learning curves: none of the runs has RL steps in its metrics.jsonl")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for method, per_key in curves.items():
            steps = sorted(per_key.get(key, {}))
            values = [torch.tensor(per_key[key][s]) for s in steps]
            if not steps:
                continue
            line, = ax.plot(steps, [float(v.mean()) for v in values], marker="o" if key.startswith("val_") else None,
                            markersize=3, label=f"{method} ({max(len(v) for v in values)} runs)")
            ax.fill_between(steps, [float(v.min()) for v in values], [float(v.max()) for v in values],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def ig_by_retrieval(pairs: list) -> str:
    """Mean IG of the scored search steps whose documents hold a gold answer, against those whose do not:
    whether IG tells a query that found the answer from one that did not."""
    found: dict[bool, list[float]] = {True: [], False: []}
    for q, t in pairs:
        for step in t.steps:
            if step.ig is not None:
                found[documents_hold_answer(step.documents, q["golden_answers"])].append(step.ig)
    part = [f"{name} {sum(v) / len(v):+.2f} nats over {len(v)} steps ({sum(x > 0 for x in v) / len(v):.0%} > 0)"
            if v else f"{name} none" for name, v in (("gold in the documents", found[True]),
                                                     ("gold not in them", found[False]))]
    return "IG per search step: " + "; ".join(part)


def show_trajectory(question: dict, traj: ig.Trajectory) -> str:
    """A trajectory as a reader should see it: each search step with its query, passages and IG."""
    out = [f"Q: {question['question']}   gold: {question['golden_answers']}"]
    for t, step in enumerate(traj.steps):
        igv = "n/a" if step.ig is None else f"{step.ig:+.3f}"
        out.append(f"  step {t + 1}: <search> {step.query} </search>   IG = {igv}")
        out += ["      " + line for line in step.documents.strip().splitlines()]
        if step.refine:
            out.append(f"      refine: {step.refine}")
    pred = ig.extract_answer(traj)
    out.append(f"  answer: {pred!r}   EM = {ig.exact_match(pred, question['golden_answers']):.0f}")
    out.append("  --- full response ---\n" + traj.response_text.strip())
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF model name or folder; empty = the offline default")
    p.add_argument("--trust_remote_code", action="store_true", help="run Python code shipped with the model")
    p.add_argument("--data", nargs="*", default=[], help="FlashRAG JSON-lines files; empty = offline test split")
    p.add_argument("--corpus", default="", help="wiki-18 JSON lines for BM25; empty = offline corpus")
    p.add_argument("--retriever_url", default="", help="Search-R1 /retrieve endpoint (replaces --corpus)")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--doc_words", type=int, default=30, help="words kept per passage (0 = all)")
    p.add_argument("--limit", type=int, default=0, help="first N questions of each file (0 = all)")
    p.add_argument("--template", default="igsearch", choices=sorted(ig.TEMPLATES))
    p.add_argument("--max_searches", type=int, default=2)
    p.add_argument("--max_turn_tokens", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--show", type=int, default=0, help="print N trajectories with per-step IG")
    p.add_argument("--out", default="", help="results JSON (default: beside the model, or runs/eval.json)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="print the held-out table of finished runs, no model")
    p.add_argument("--plot", metavar="PNG", help="with --compare: also draw the runs' training curves to PNG")
    try:
        args = p.parse_args(argv)
        if args.compare:
            print(compare_runs(args.compare))
            if args.plot:
                plot_runs(args.compare, args.plot)
                print(f"curves written to {args.plot}")
            return 0
        for name in ("topk", "batch_size", "max_turn_tokens"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name} {getattr(args, name)}: must be at least 1")
        for name in ("doc_words", "limit", "max_searches", "show"):
            if getattr(args, name) < 0:
                raise InputError(f"--{name} {getattr(args, name)}: must be at least 0")
        data = prepare.default_data() if not (args.data and args.corpus) else {}
        files = args.data or [data["test"]]
        question_sets = [prepare.load_questions(path)[: args.limit or None] for path in files]
        out = args.out or (str(Path(args.model) / "eval.json") if os.path.isdir(args.model) else "runs/eval.json")
        check_writable(out)  # before the evaluation, which may take an hour
        search = make_search(args.corpus or data.get("corpus", ""), args.retriever_url, args.topk, args.doc_words or None)
        model, tokenizer = prepare.load_model(args.model, trust_remote_code=args.trust_remote_code)
        rows, shown, all_pairs = {}, [], []
        for path, questions in zip(files, question_sets):
            summary, pairs = evaluate(model, tokenizer, questions, search, batch_size=args.batch_size,
                                      with_ig=args.show > 0, template=args.template, max_searches=args.max_searches,
                                      max_turn_tokens=args.max_turn_tokens, desc=Path(path).stem)
            name = Path(path).stem
            rows[name if name not in rows else f"{name}_{len(rows) + 1}"] = summary
            shown += pairs[: max(0, args.show - len(shown))]
            all_pairs += pairs
    except (InputError, RetrieverError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for q, t in shown:
        print(show_trajectory(q, t) + "\n")
    if args.show:
        print(ig_by_retrieval(all_pairs) + "\n")
    print(format_table(rows))
    paper = format_paper_table(rows, Path(args.model).name or "offline default")
    if paper:
        print("\n" + paper)
    write_json(out, {"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model or "offline default",
                     "retriever": args.retriever_url or f"BM25 over {args.corpus or data.get('corpus')}",
                     "topk": args.topk, "doc_words": args.doc_words, "config": vars(args), "results": rows})
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `evaluate.py --compare ... | head` ends quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
