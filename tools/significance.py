"""Is a difference in test EM between two methods more than chance? Computed from run folders alone.

    PYTHONPATH=. python tools/significance.py results/query/query-*/

Runs are grouped into methods as compare.py groups them (config.method_name, the task, and any
setting their configs differ in); each run counts by the test EM of its last table row (the trained
model's). For every pair of methods with at least two runs each it prints:

- the means over seeds and their difference, in EM points (first minus second, the higher first);
- Welch's t test over seeds: t, its degrees of freedom, the two-sided p and the 95 % confidence
  interval of the difference (Student's t through the regularized incomplete beta function);
- the exact permutation test over seeds: of all ways to relabel the pooled runs into two groups of
  the same sizes, how many give a difference as large or larger in the direction observed
  (one-sided; e.g. 2/20 at three seeds each);
- the gap 80 % power would need at 3 and 10 seeds a method (two-sided 5 %, normal approximation,
  these sample standard deviations);
- when every run of both methods holds questions.jsonl (one {"id": ..., "em": 0 or 1} a test
  question), the paired permutation test over questions: the per-question EM averaged over each
  method's seeds, the signs of the paired differences flipped at random. It counts the spread of
  questions, not of seeds: the trained models are held fixed. Without the files it is skipped and
  the output says so.

Beside the tests, one descriptive line a run whose per-question file records first queries: the
share of test questions it searched for and the mean words of its first queries (on the query
task, what the policy learned to do with the noise clause), its first-search hit and EM, and its
EM over the questions whose first search hit (how well it reads what it found, apart from how well
it asks).

A run that trained no RL step but tested a model (its start or warmed-up model, e.g. `train.py
--steps 0 --eval_start true`) is a reference: every method's mean test EM and first-search hit is
given against it, with the same paired test over questions (its questions-start.jsonl or
questions-warmup.jsonl).
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import sys
from pathlib import Path
from statistics import NormalDist
from typing import Iterator, NamedTuple

import numpy as np

from machinery.errors import InputError, OneLineParser

try:  # imported as tools.significance (the tests), or run as `python tools/significance.py`
    from tools.compare import Run, run_labels
except ModuleNotFoundError:  # (then tools/ is sys.path[0])
    from compare import Run, run_labels

QUESTIONS_FILE = "questions.jsonl"
# the per-question file of a table row that is not the trained model's (train.py's names)
ROW_FILES = {"start model": "questions-start.jsonl", "after warm-up": "questions-warmup.jsonl"}


# ----------------------------------------------------------------------------- Student's t


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
    Lentz), on the side of x where it converges fast."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x = {x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):  # the fraction converges slowly here: I_x(a,b) = 1 - I_1-x(b,a)
        return 1.0 - betainc(b, a, 1.0 - x)
    # I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d1 / (1 + d2 / (1 + ...)))
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 10_000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # d_2m
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # d_2m+1
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * frac / a


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom (df need not be whole: Welch's)."""
    # P(|T| > |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2)
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with t_cdf(t, df) = p, by bisection (t_cdf is increasing)."""
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


# ----------------------------------------------------------------------------- the tests


class Welch(NamedTuple):
    diff: float  # mean(a) - mean(b)
    t: float
    df: float
    p: float  # two-sided
    low: float  # the 95 % confidence interval of diff
    high: float


def welch(a: list[float], b: list[float], level: float = 0.95) -> Welch | None:
    """Welch's unequal-variance t test of mean(a) - mean(b); a and b need two values each. None
    when every value of a is the same and every value of b too (no spread: t is undefined)."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)  # squared standard errors
    diff, se = float(np.mean(a) - np.mean(b)), math.sqrt(va + vb)
    if se == 0:
        return None
    # Welch-Satterthwaite: df = (va + vb)^2 / (va^2 / (na - 1) + vb^2 / (nb - 1))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    half = t_quantile(0.5 + level / 2, df) * se
    return Welch(diff, t, df, 2 * t_cdf(-abs(t), df), diff - half, diff + half)


def permutation_over_seeds(a: list[float], b: list[float]) -> tuple[int, int]:
    """Exact one-sided permutation test of mean(a) > mean(b): (relabelings of the pooled values
    into groups of len(a) and len(b) whose difference is at least the observed one, all
    relabelings). The observed labelling is one of them, so the first number is at least 1."""
    pooled, n = list(a) + list(b), len(a)
    diff = lambda idx: (
        np.mean([pooled[i] for i in idx])
        - np.mean([pooled[i] for i in range(len(pooled)) if i not in idx])
    )
    observed = diff(range(n))
    splits = list(itertools.combinations(range(len(pooled)), n))
    extreme = sum(diff(idx) >= observed - 1e-12 for idx in splits)  # ties count as extreme
    return extreme, len(splits)


def power_gap(sd_a: float, sd_b: float, seeds: int, power: float = 0.8, alpha: float = 0.05):
    """The difference a two-sided test at level alpha detects with the given power at `seeds`
    runs a method (normal approximation): (z_{1-alpha/2} + z_power) * sqrt(sd_a^2/n + sd_b^2/n)."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * math.sqrt((sd_a**2 + sd_b**2) / seeds)


def paired_permutation(d: np.ndarray, rounds: int = 20_000, seed: int = 0) -> tuple[float, str]:
    """Two-sided sign-flip test of mean(d) = 0 over paired differences d (one a question): the
    share of sign flips whose |mean| is at least the observed one. Exact (every flip) for up to 16
    pairs; else `rounds` random flips, counting the observed one: (1 + extreme) / (1 + rounds)."""
    observed = abs(float(d.mean()))
    if len(d) <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))  # (2^n, n)
        extreme = int((np.abs(signs @ d / len(d)) >= observed - 1e-12).sum())
        return extreme / len(signs), f"{extreme}/{len(signs)} sign flips, exact"
    gen, extreme, left = np.random.default_rng(seed), 0, rounds
    while left:
        chunk = min(left, 2_000)
        signs = gen.choice((1.0, -1.0), size=(chunk, len(d)))  # (chunk, n)
        extreme += int((np.abs(signs @ d / len(d)) >= observed - 1e-12).sum())
        left -= chunk
    return (1 + extreme) / (1 + rounds), f"{rounds} random sign flips"


# ----------------------------------------------------------------------------- run folders


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """The per-question file's records with their line numbers; blank lines skipped, a line that is
    not JSON a file:line error."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
        except RecursionError:
            raise InputError(f"{path}:{n}: JSON nested too deep") from None


def read_questions(path: Path, key: str = "em") -> dict[str, float]:
    """questions.jsonl: question id -> EM (0 or 1, or a share), one JSON object a line; key "hit1":
    whether its first search found the gold (files written before hit1 was recorded lack it)."""
    got: dict[str, float] = {}
    for n, rec in json_lines(path):
        em = rec.get(key) if isinstance(rec, dict) else None  # hit1 is written true or false
        if not isinstance(rec, dict) or "id" not in rec or not isinstance(em, (int, float)):
            raise InputError(f"{path}:{n}: not an object with an 'id' and a number '{key}'")
        if str(rec["id"]) in got:
            raise InputError(f"{path}:{n}: question id {rec['id']!r} appears twice")
        got[str(rec["id"])] = float(em)
    return got


class FirstQueries(NamedTuple):
    questions: int
    searched: int  # questions with a first query
    words: float  # mean words of a first query
    em_hit1: float | None  # EM over the questions whose first search hit; None without hit1


def first_queries(path: Path, em: dict[str, float]) -> FirstQueries | None:
    """questions.jsonl's first queries. The query task's noise clause makes a question's first
    query long; a policy that learns to drop it writes short ones (docs/experiments.md), so the
    length says what a run learned. EM = P(first search hit) x EM given a hit, near enough (a miss
    is rarely answered), so EM given a hit says how well the run reads what it found, apart from
    how well it asks. `em`: the file's EM by question id, as read_questions read and checked it.
    None for a file written before first queries were recorded, or one without records."""
    words: list[int] = []
    em_of_hits: list[float] = []
    n, has_hit1 = 0, True
    for i, rec in json_lines(path):
        if not isinstance(rec, dict) or "first_query" not in rec:
            return None
        query = rec["first_query"]
        if query is not None and not isinstance(query, str):
            raise InputError(f"{path}:{i}: 'first_query' is {query!r}, not a string or null")
        n += 1
        if query is not None:
            words.append(len(query.split()))
        has_hit1 = has_hit1 and "hit1" in rec
        if rec.get("hit1"):
            em_of_hits.append(em[str(rec["id"])])
    if not n:
        return None
    em_hit1 = (float(np.mean(em_of_hits)) if em_of_hits else math.nan) if has_hit1 else None
    return FirstQueries(n, len(words), float(np.mean(words)) if words else math.nan, em_hit1)


class Method(NamedTuple):
    name: str
    runs: list[Run]
    em: list[float]  # each run's test EM


def last_row(run: Run) -> str:
    """The run's last table row: the trained model's, or the model a run without RL steps made."""
    return next(reversed(run.table))


def last_figure(run: Run, key: str) -> float | None:
    """A figure (em, hit1) of the run's last table row; None where the row lacks it."""
    return run.table[last_row(run)].get(key)


def questions_file(run: Run) -> Path:
    """The per-question file of the run's last table row: the trained model's, or for a run
    without RL steps its start model's or warmed-up model's."""
    return run.path / ROW_FILES.get(last_row(run), QUESTIONS_FILE)


def references(runs: list[Run]) -> list[Method]:
    """The runs that trained no RL step but tested a model (e.g. --steps 0 --eval_start true): each
    a reference, by its last table row, that every method is measured against."""
    found = [r for r in runs if r.table and not r.rl_steps]
    return [Method(f"{r.path} ({last_row(r)})", [r], [float(last_figure(r, "em"))]) for r in found]


def methods(runs: list[Run]) -> tuple[list[Method], list[str]]:
    """The RL runs with a test figure, grouped as compare.py groups them; and notes on runs left
    out."""
    notes = [f"{r.path}: left out (no table.json)" for r in runs if r.rl_steps and not r.table]
    notes += [
        f"{r.path}: no RL steps and no test row: left out ({r.method})"
        for r in runs
        if not r.table and not r.rl_steps
    ]
    tested = [r for r in runs if r.rl_steps and r.table]
    labels, label_notes = run_labels(tested)
    groups: dict[str, list[Run]] = {}
    for run in tested:
        groups.setdefault(labels[id(run)], []).append(run)
    found = [
        Method(name, rs, [float(last_figure(r, "em")) for r in rs]) for name, rs in groups.items()
    ]
    return sorted(found, key=lambda m: -float(np.mean(m.em))), notes + label_notes


def question_test(a: Method, b: Method, rounds: int, key: str = "em") -> str:
    """The paired permutation test over questions of per-question `key` (em, or hit1) averaged over
    each method's seeds, or why it was skipped."""
    missing = [r for r in a.runs + b.runs if not questions_file(r).exists()]
    if missing:
        names = sorted({questions_file(r).name for r in missing})
        return f"skipped: no {' or '.join(names)} in {len(missing)} of {len(a.runs + b.runs)} runs"
    per_run = lambda m: [read_questions(questions_file(r), key) for r in m.runs]
    qa, qb = per_run(a), per_run(b)
    common = sorted(set.intersection(*(set(q) for q in qa + qb)))
    if not common:
        return "skipped: the runs share no question id"
    mean_em = lambda qs: np.array([np.mean([q[i] for q in qs]) for i in common])  # (n,)
    d = mean_em(qa) - mean_em(qb)  # (n,) paired differences, one a question
    p, how = paired_permutation(d, rounds)
    left_out = max(len(q) for q in qa + qb) - len(common)
    note = f"; {left_out} ids not in every run left out" if left_out else ""
    return (
        f"{len(common)} questions, mean difference {100 * d.mean():+.1f} points, "
        f"two-sided p {p:.3g} ({how}{note})"
    )


def report(runs: list[Run], rounds: int = 20_000) -> list[str]:
    found, notes = methods(runs)
    lines = ["test EM by method (mean over seeds, sample standard deviation, each run's EM):"]
    width = max([len(m.name) for m in found] + [20]) + 2
    for m in found:
        sd = f"{np.std(m.em, ddof=1):.3f}" if len(m.em) > 1 else "-"
        each = " ".join(f"{e:.3f}" for e in m.em)
        lines.append(
            f"  {m.name:<{width}}{len(m.em):>2} runs  {np.mean(m.em):.4f}  sd {sd}  {each}"
        )
    queries = []  # (run, its first queries' figures) where its per-question file records them
    refs = references(runs)
    for r in [ref.runs[0] for ref in refs] + [r for m in found for r in m.runs]:
        if questions_file(r).exists():
            em = read_questions(
                questions_file(r)
            )  # the file's shape, checked with file:line errors
            if (figures := first_queries(questions_file(r), em)) is not None:
                queries.append((r, figures))
    if queries:
        lines.append("test first queries by run (from the per-question files):")
        width = max(len(r.path.name) for r, _ in queries) + 2
        for r, q in queries:
            hit1, em_hit1 = last_figure(r, "hit1"), q.em_hit1
            lines.append(
                f"  {r.path.name:<{width}}searched {q.searched / q.questions:.3f}  "
                f"mean words {q.words:5.1f}  "
                f"first-search hit {'-' if hit1 is None else f'{hit1:.3f}'}  "
                f"EM {last_figure(r, 'em'):.3f}  "
                f"EM given a first hit {'-' if em_hit1 is None else f'{em_hit1:.3f}'}"
            )
    few = [m.name for m in found if len(m.em) < 2]
    if few:
        notes.append(f"fewer than two runs, no test: {', '.join(few)}")
    for a, b in itertools.combinations([m for m in found if len(m.em) >= 2], 2):
        w = welch(a.em, b.em)
        extreme, total = permutation_over_seeds(a.em, b.em)
        sd_a, sd_b = np.std(a.em, ddof=1), np.std(b.em, ddof=1)
        gaps = ", ".join(f"{100 * power_gap(sd_a, sd_b, n):.1f} at {n}" for n in (3, 10))
        diff = 100 * (np.mean(a.em) - np.mean(b.em))
        lines += [
            "",
            f"{a.name} ({len(a.em)} runs) against {b.name} ({len(b.em)} runs):",
            f"  means {np.mean(a.em):.4f} and {np.mean(b.em):.4f}, difference {diff:+.1f} points",
            f"  Welch t {w.t:.2f}, df {w.df:.1f}, two-sided p {w.p:.3f}, "
            f"95 % CI of the difference {100 * w.low:+.1f} to {100 * w.high:+.1f} points"
            if w
            else "  Welch t: undefined (every run of each method scored the same)",
            f"  exact permutation over seeds, one-sided ({a.name} higher): {extreme}/{total} "
            f"relabelings as extreme, p {extreme / total:.2f}",
            f"  gap for 80 % power at these SDs ({100 * sd_a:.1f}, {100 * sd_b:.1f} points): "
            f"{gaps} seeds a method (points)",
            f"  paired permutation over questions: {question_test(a, b, rounds)}",
        ]
        hit1 = [[last_figure(r, "hit1") for r in m.runs] for m in (a, b)]
        if all(v is not None for h in hit1 for v in h):
            w = welch(*hit1)
            lines.append(
                f"  first-search hit: means {np.mean(hit1[0]):.3f} and {np.mean(hit1[1]):.3f}, "
                + (f"Welch two-sided p {w.p:.3f}" if w else "Welch: undefined")
                + f"; over questions: {question_test(a, b, rounds, 'hit1')}"
            )
    for ref in refs:  # each method against a model that trained no RL step
        lines += ["", f"against {ref.name}: test EM {ref.em[0]:.4f}"]
        for m in found:
            lines.append(
                f"  {m.name}: EM {100 * (np.mean(m.em) - ref.em[0]):+.1f} points (mean over "
                f"{len(m.em)} runs); over questions: {question_test(m, ref, rounds)}"
            )
            hit1 = [last_figure(r, "hit1") for r in m.runs + ref.runs]
            if all(v is not None for v in hit1):
                lines.append(
                    f"    first-search hit {np.mean(hit1[:-1]):.3f} against {hit1[-1]:.3f} "
                    f"({np.mean(hit1[:-1]) - hit1[-1]:+.3f}); over questions: "
                    f"{question_test(m, ref, rounds, 'hit1')}"
                )
    return lines + ([""] + notes if notes else [])


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train.py --out_dir)")
    p.add_argument(
        "--rounds", type=int, default=20_000, help="random sign flips of the test over questions"
    )
    try:
        args = p.parse_args(argv)
        print("\n".join(report(Run.read_all(args.runs), args.rounds)))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
