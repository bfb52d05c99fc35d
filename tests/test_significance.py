"""tools/significance.py (the tests of a difference in test EM) and compare.py's undefined means."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import train
from tools import compare, significance
from tools.significance import betainc, t_cdf, t_quantile

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- Student's t


def test_betainc_matches_its_closed_forms():
    """I_x(1, 1) = x, I_x(a, 1) = x^a, I_x(1, b) = 1 - (1 - x)^b, and I_x(a, b) = 1 - I_1-x(b, a),
    on both sides of the point where betainc switches to the symmetric form."""
    for x in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-12)
        assert betainc(2.5, 1, x) == pytest.approx(x**2.5, abs=1e-12)
        assert betainc(1, 3.5, x) == pytest.approx(1 - (1 - x) ** 3.5, abs=1e-12)
        assert betainc(0.65, 0.5, x) == pytest.approx(1 - betainc(0.5, 0.65, 1 - x), abs=1e-12)


def test_t_cdf_and_quantile_match_known_values():
    """Student's t without scipy: the closed forms at df 1 (Cauchy) and 2, and the two-sided 5 %
    critical values of the printed tables (df 1, 2, 10, 30); df need not be whole (Welch)."""
    for t in (-3.0, -0.4, 0.0, 1.3, 7.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    for df, crit in ((1, 12.706205), (2, 4.302653), (10, 2.228139), (30, 2.042272)):
        assert t_quantile(0.975, df) == pytest.approx(crit, abs=1e-6)
        assert t_cdf(crit, df) == pytest.approx(0.975, abs=1e-7)
    assert t_cdf(1.0, 2.5) == pytest.approx(1 - t_cdf(-1.0, 2.5), abs=1e-12)
    assert t_cdf(1.0, 2) < t_cdf(1.0, 2.5) < t_cdf(1.0, 3)  # heavier tails at fewer df


def test_welch_and_the_permutation_over_seeds_on_small_samples():
    """Welch at equal variances and sizes is Student's t: [4, 5, 6] against [1, 2, 3] gives
    t = 3 / sqrt(2 / 3), df 4, p 0.0213; the exact permutation test finds the one labelling of 20
    as extreme, and counts ties as extreme."""
    w = significance.welch([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])
    assert w.t == pytest.approx(3 / math.sqrt(2 / 3)) and w.df == pytest.approx(4)
    assert w.p == pytest.approx(0.021312, abs=1e-5)
    half = 2.776445 * math.sqrt(2 / 3)  # t_{0.975, 4} times the standard error
    assert (w.low, w.high) == pytest.approx((3 - half, 3 + half), abs=1e-5)
    assert significance.permutation_over_seeds([4, 5, 6], [1, 2, 3]) == (1, 20)
    assert significance.permutation_over_seeds([1, 1], [1, 1]) == (6, 6)  # all ties: p = 1


def test_the_query_task_figures_come_from_the_committed_runs(capsys):
    """Issue 47: the README's 'not significant' rests on figures computed by a command in the repo.
    On results/query: IG-Search 0.239 against outcome-only 0.158 (8.0 points from the unrounded
    means, not 8.1), Welch t 2.02, p 0.17, 95 % CI -7.7 to +23.8 points, 2/20 relabelings."""
    runs = sorted(str(p) for p in (ROOT / "results" / "query").glob("query-*"))
    assert significance.main([str(ROOT / "results" / "query" / "warmup"), *runs]) == 0
    out = capsys.readouterr().out
    pair = out[out.index("IG-Search (centred) [noisy] (3 runs) against outcome-only") :]
    assert "means 0.2388 and 0.1585, difference +8.0 points" in pair
    assert (
        "Welch t 2.02, df 2.2, two-sided p 0.170, 95 % CI of the difference -7.7 to +23.8" in pair
    )
    assert "2/20 relabelings as extreme, p 0.10" in pair
    assert ": 11.2 at 3, 6.1 at 10 seeds a method" in pair
    assert "paired permutation over questions: skipped: no questions.jsonl in 6 of 6 runs" in pair
    empty = out[out.index("against IG-Search (empty baseline, centred) [noisy] (2 runs)") :]
    assert "two-sided p 0.505" in empty
    ref = out[out.index("results/query/warmup (after warm-up): test EM 0.1571") :]
    assert "IG-Search (centred) [noisy]: EM +8.2 points (mean over 3 runs)" in ref
    assert "skipped: no questions-warmup.jsonl or questions.jsonl in 4 of 4 runs" in ref


# ----------------------------------------------------------------------------- run folders


def fake_run(folder: Path, seed: int, em: list[float] | None, **config) -> str:
    """A finished run folder: config, one RL step, a test row; questions.jsonl when em is given
    (question i right when em[i] is 1)."""
    folder.mkdir(parents=True)
    cfg = {**train.dataclasses.asdict(train.Config()), "seed": seed, "out_dir": str(folder)}
    cfg.update(config)
    mean = sum(em) / len(em) if em else 0.1 * seed
    row = {"n": len(em or [0]), "em": mean, "f1": mean, "searches": 1, "valid": 1}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "table.json").write_text(json.dumps({compare.method_name(cfg): row}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": mean}) + "\n")
    if em is not None:
        lines = [json.dumps({"id": f"q{i}", "em": e}) for i, e in enumerate(em)]
        (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_paired_permutation_over_questions_on_synthetic_runs(tmp_path, capsys):
    """With questions.jsonl in every run the same command pairs the methods question by question
    (EM averaged over seeds): IG-Search right on 30 more of 60 questions is far past chance, two
    methods with the same answers give p = 1, and one run without the file skips the test. Seeds
    that score alike leave Welch's t undefined, which is said, not divided by zero."""
    right = [1.0] * 40 + [0.0] * 20
    wrong = [1.0] * 10 + [0.0] * 50
    ig = [fake_run(tmp_path / f"ig-s{s}", s, right) for s in (0, 1)]
    outcome = [fake_run(tmp_path / f"out-s{s}", s, wrong, outcome_only=True) for s in (0, 1)]
    assert significance.main(ig + outcome + ["--rounds", "2000"]) == 0
    out = capsys.readouterr().out
    assert (
        "paired permutation over questions: 60 questions, mean difference +50.0 points, "
        "two-sided p 0.0005 (2000 random sign flips)" in out
    )  # (1 + 0) / (1 + 2000): no flip reaches the observed difference
    assert "Welch t: undefined (every run of each method scored the same)" in out

    same = [fake_run(tmp_path / f"same-s{s}", s, right, outcome_only=True) for s in (0, 1)]
    assert significance.main(ig + same) == 0
    assert "mean difference +0.0 points, two-sided p 1" in capsys.readouterr().out

    (tmp_path / "out-s1" / "questions.jsonl").unlink()
    assert significance.main(ig + outcome) == 0
    assert "questions: skipped: no questions.jsonl in 1 of 4 runs" in capsys.readouterr().out


def test_paired_permutation_is_exact_on_few_questions():
    """Up to 16 questions every sign flip is counted: three differences of +1 are as extreme as
    the observed mean in 2 of 8 flips (all +, all -)."""
    p, how = significance.paired_permutation(np.array([1.0, 1.0, 1.0]))
    assert p == pytest.approx(0.25) and how == "2/8 sign flips, exact"


def test_a_broken_questions_file_is_one_line(tmp_path, capsys):
    """A questions.jsonl line without an em is refused in one line naming the file and line."""
    runs = [fake_run(tmp_path / f"ig-s{s}", s, [1.0, 0.0]) for s in (0, 1)]
    runs += [fake_run(tmp_path / f"out-s{s}", s, [0.0, 0.0], outcome_only=True) for s in (0, 1)]
    (tmp_path / "out-s0" / "questions.jsonl").write_text('{"id": "q0", "em": 0}\n{"id": "q1"}\n')
    assert significance.main(runs) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/out-s0/questions.jsonl:2: not an object" in err


# ----------------------------------------------------------------------------- compare.py


def ig_run(folder: Path, records: list[dict], **config) -> compare.Run:
    folder.mkdir()
    cfg = {**train.dataclasses.asdict(train.Config()), "out_dir": str(folder), **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return compare.Run.read(str(folder))


def means_line(lines: list[str], title: str) -> str:
    return next(line for line in lines if line.startswith(title))[38:].strip()


def test_compare_leaves_an_undefined_mean_out_instead_of_averaging_a_zero(tmp_path):
    """Issue 47: train.py logged the mean IG of the steps that hit as 0.0 on a step where none hit
    (mean([]) = 0.0), and compare.py averaged those zeros in: IG-Search's 'mean IG of steps that
    hit' on the query task read 5.2 where the steps that hit averaged 5.6. A step with hit 0 has no
    ig_hit, one with hit 1 no ig_miss, and null (the logging that replaces 0.0) is no value."""
    base = {"reward": 0.5, "searches": 1.0, "ig_mean": 1.0, "ig_pos": 0.5}
    records = [
        {**base, "step": 1, "hit": 0.5, "ig_hit": 6.0, "ig_miss": -1.0},
        {**base, "step": 2, "hit": 0.0, "ig_hit": 0.0, "ig_miss": 2.0},  # none hit: the old 0.0
        {**base, "step": 3, "hit": 1.0, "ig_hit": 4.0, "ig_miss": 0.0},  # all hit: the old 0.0
        {**base, "step": 4, "hit": 0.0, "ig_hit": None, "ig_miss": 3.0},  # none hit, logged null
    ]
    lines = compare.training_means([ig_run(tmp_path / "ig", records)], window=1)
    assert means_line(lines, "mean IG of steps that hit") == "6.00 -> 4.00 (5.00)"
    assert means_line(lines, "mean IG of steps that miss") == "-1.00 -> 3.00 (1.33)"


def test_compare_shows_a_mean_no_step_defines_as_a_dash(tmp_path):
    """A run that scores no IG (outcome-only, the hit bonus) or a step that scored none (its four
    IG means all 0.0 in the old logging, null in the new) has no IG figure: the old zeros are not
    averaged in, and a method without any shows '-', not 0.00."""
    zeros = {"ig_mean": 0.0, "ig_pos": 0.0, "ig_hit": 0.0, "ig_miss": 0.0}
    nulls = dict.fromkeys(zeros)
    step = lambda n, hit, **ig: {"step": n, "reward": 0.5, "searches": 1.0, "hit": hit, **ig}
    ig = ig_run(
        tmp_path / "ig",
        [
            step(1, 0.5, ig_mean=2.0, ig_pos=1.0, ig_hit=3.0, ig_miss=1.0),
            step(2, 0.5, **zeros),  # no step scored, old logging
            step(3, 0.5, **nulls),  # no step scored, new logging
        ],
    )
    hit_bonus = ig_run(
        tmp_path / "hit", [step(1, 0.5, **zeros), step(2, 0.0, **nulls)], step_reward="hit"
    )
    lines = compare.training_means([ig, hit_bonus], window=10)
    for title, ig_means in (
        ("share of search steps with IG > 0", "1.00 -> 1.00 (1.00)"),
        ("mean IG of steps that hit", "3.00 -> 3.00 (3.00)"),
        ("mean IG of steps that miss", "1.00 -> 1.00 (1.00)"),
    ):
        assert means_line(lines, title).split() == [*ig_means.split(), "-"]


def test_first_search_hit_is_tested_beside_em_when_the_runs_record_it(tmp_path, capsys):
    """Issue 47 point 5: first-search hit gets the same tests as EM: Welch over the seeds' test
    rows and the paired permutation over questions' hit1."""
    runs = []
    for name, hits, extra in (("ig", [1.0] * 30 + [0.0] * 30, {}), ("out", [0.0] * 60, {})):
        for s in (0, 1):
            folder = tmp_path / f"{name}-s{s}"
            kw = {"outcome_only": True} if name == "out" else {}
            runs.append(fake_run(folder, s, [0.0, 1.0] * 30, **kw))
            table = json.loads((folder / "table.json").read_text())
            row = next(iter(table.values()))
            row["hit1"] = sum(hits) / 60 + 0.01 * s  # seeds differ a little: Welch is defined
            (folder / "table.json").write_text(json.dumps(table))
            lines = [
                json.dumps({"id": f"q{i}", "em": e, "hit1": h})
                for i, (e, h) in enumerate(zip([0.0, 1.0] * 30, hits))
            ]
            (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    assert significance.main(runs + ["--rounds", "2000"]) == 0
    out = capsys.readouterr().out
    assert "first-search hit: means 0.505 and 0.005, Welch two-sided p 0.000" in out
    assert (
        "over questions: 60 questions, mean difference +50.0 points, two-sided p 0.0005" in out
    )  # hit1 pairs as EM does; the EM of both is equal question by question
    assert "paired permutation over questions: 60 questions, mean difference +0.0 points" in out


def test_a_run_without_rl_steps_is_the_reference_each_method_is_tested_against(tmp_path, capsys):
    """Issue 47's hit target is against the warm-up: a --steps 0 run that tested its start model
    is a reference, paired over questions through its questions-start.jsonl (30 of 60 questions
    more right is far past chance; the same answers give p = 1), first-search hit beside EM."""
    runs = [fake_run(tmp_path / f"ig-s{s}", s, [0.0, 1.0] * 30) for s in (0, 1)]
    ref = tmp_path / "warm"
    fake_run(ref, 0, None)
    (ref / "metrics.jsonl").write_text("")  # no RL step
    (ref / "table.json").write_text(
        json.dumps(
            {
                "start model": {
                    "n": 60,
                    "em": 0.0,
                    "f1": 0.0,
                    "searches": 1,
                    "valid": 1,
                    "hit1": 0.25,
                }
            }
        )
    )
    lines = [json.dumps({"id": f"q{i}", "em": 0.0, "hit1": i % 4 == 0}) for i in range(60)]
    (ref / "questions-start.jsonl").write_text("\n".join(lines) + "\n")
    for s in (0, 1):  # the trained runs' first-search hit: the same questions as the reference's
        folder = tmp_path / f"ig-s{s}"
        table = json.loads((folder / "table.json").read_text())
        next(iter(table.values()))["hit1"] = 0.25
        (folder / "table.json").write_text(json.dumps(table))
        recs = [json.loads(x) for x in (folder / "questions.jsonl").read_text().splitlines()]
        body = [json.dumps({**r, "hit1": i % 4 == 0}) for i, r in enumerate(recs)]
        (folder / "questions.jsonl").write_text("\n".join(body) + "\n")
    assert significance.main([str(ref), *runs, "--rounds", "2000"]) == 0
    out = capsys.readouterr().out
    part = out[out.index(f"against {ref} (start model): test EM 0.0000") :]
    assert (
        ": EM +50.0 points (mean over 2 runs); over questions: 60 questions, mean difference "
        in part
    )
    assert "+50.0 points, two-sided p 0.0005" in part
    assert (
        "first-search hit 0.250 against 0.250 (+0.000); over questions: 60 questions, mean " in part
    )
    assert "difference +0.0 points, two-sided p 1" in part
    (ref / "questions-start.jsonl").unlink()
    assert significance.main([str(ref), *runs, "--rounds", "2000"]) == 0
    assert "skipped: no questions-start.jsonl in 1 of 3 runs" in capsys.readouterr().out


def test_a_folder_named_twice_counts_once(tmp_path, capsys):
    """`significance.py results/fair/test-warmup results/fair/test-*` names the warm-up twice: read
    twice, a run would be two seeds of its method (a made-up sd of 0 and a test on one run's
    figure twice), and the reference's block would print twice."""
    a = fake_run(tmp_path / "ig-s0", 0, [1.0, 0.0] * 4)
    b = fake_run(tmp_path / "out-s0", 0, [0.0, 1.0] * 4, outcome_only=True)
    runs = compare.Run.read_all([a, b, str(tmp_path / "." / "ig-s0"), a])
    assert [r.path for r in runs] == [Path(a), Path(b)]
    assert significance.main([a, b, a]) == 0
    out = capsys.readouterr().out
    assert "fewer than two runs, no test" in out  # one run a method, not two
    assert compare.main([a, a, b]) == 0
    assert compare.report([compare.Run.read(a), compare.Run.read(b)]) in capsys.readouterr().out


def test_the_fair_test_figures_come_from_the_committed_runs(capsys):
    """Issue 47, step 5: the README's fair-test sentence rests on the committed test runs.
    IG-Search 0.2101 against outcome-only 0.1598 over 4 seeds each: +5.0 points, significant over
    the 751 questions (models fixed) but not over seeds (Welch p 0.571); first-search hit 0.530
    against 0.380 and the warm-up's 0.321; the seeds that learned the query and lost the answer."""
    fair = ROOT / "results" / "fair"
    runs = sorted(str(p) for m in ("ig", "outcome") for p in fair.glob(f"test-{m}-s*"))
    assert len(runs) == 8
    assert significance.main([str(fair / "test-warmup"), *runs]) == 0
    out = capsys.readouterr().out
    pair = out[out.index("IG-Search (centred, alpha 1, neg x0) [noisy] (4 runs) against") :]
    assert "means 0.2101 and 0.1598, difference +5.0 points" in pair
    assert "two-sided p 0.571, 95 % CI of the difference -17.5 to +27.5 points" in pair
    assert "mean difference +5.0 points, two-sided p 5e-05" in pair
    assert "first-search hit: means 0.530 and 0.380, Welch two-sided p 0.083" in pair
    assert "first-search hit 0.530 against 0.321 (+0.209)" in out
    assert "EM 0.188  EM given a first hit 0.335" in out  # seed 12: found, then lost the answer
    assert "EM 0.075  EM given a first hit 0.130" in out  # seed 13


def test_the_hit_bonus_control_figures_come_from_the_committed_runs(capsys):
    """Issue 47, the control: the README's and docs/experiments.md's hit-bonus figures come from
    all ten committed test runs through the command they show. The hit bonus 0.1997 EM over its 2
    seeds, first-search hit 0.411; IG-Search's EM not different from it (paired p 0.328), its
    first-search hit higher (+11.9 points, paired p 5e-05)."""
    fair = ROOT / "results" / "fair"
    runs = sorted(str(p) for p in fair.glob("test-*-s*"))
    assert len(runs) == 10
    assert significance.main([str(fair / "test-warmup"), *runs]) == 0
    out = capsys.readouterr().out
    assert (
        "hit bonus (centred, alpha 1, neg x0) [noisy]   2 runs  0.1997  sd 0.021  0.214 0.185"
        in out
    )
    ig = out[out.index("[noisy] (4 runs) against hit bonus") :]
    assert "means 0.2101 and 0.1997, difference +1.0 points" in ig
    assert "mean difference +1.0 points, two-sided p 0.328" in ig
    assert (
        "first-search hit: means 0.530 and 0.411, Welch two-sided p 0.139; over questions: 751 "
        "questions, mean difference +11.9 points, two-sided p 5e-05"
    ) in ig
    hit = out[out.index("[noisy] (2 runs) against outcome-only") :]
    assert "means 0.1997 and 0.1598, difference +4.0 points" in hit
    assert "two-sided p 0.323, 95 % CI of the difference -5.9 to +13.9 points" in hit
    assert "first-search hit: means 0.411 and 0.380, Welch two-sided p 0.452" in hit
    assert "mean difference +3.0 points, two-sided p 0.00195" in hit
    assert "EM 0.214  EM given a first hit 0.548" in out  # test-hit-s10
    assert "mean words   6.7  first-search hit 0.430  EM 0.185  EM given a first hit 0.430" in out


def test_the_first_queries_of_each_run_are_described_from_its_questions_file(tmp_path, capsys):
    """What a run learned on the query task shows in its first queries' length: per run, the share
    of questions searched and the mean words of a first query, counted from questions.jsonl; a file
    without first queries (written before they were recorded) is left out; a first query that is
    neither text nor null is a one-line error naming the file and line. Where the records say
    whether the first search hit, the line gives the EM of the questions that hit."""
    runs = [fake_run(tmp_path / f"ig-s{s}", s, [1.0, 0.0, 1.0, 0.0]) for s in (0, 1, 2)]
    queries = ["a b c", None, "one two three four five", "x"]  # 3 searched, (3 + 5 + 1) / 3 words
    path = tmp_path / "ig-s0" / "questions.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    body = [json.dumps({**r, "first_query": q}) for r, q in zip(recs, queries)]
    path.write_text("\n".join(body) + "\n")
    hits = [True, True, False, False]  # EM 1, 0 on the two hits: 0.5; the miss answered counts not
    with_hits = [{**r, "first_query": q, "hit1": h} for r, q, h in zip(recs, queries, hits)]
    (tmp_path / "ig-s2" / "questions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in with_hits)
    )
    assert significance.main(runs + ["--rounds", "100"]) == 0
    out = capsys.readouterr().out
    line = "searched 0.750  mean words   3.0  first-search hit -  EM 0.500  EM given a first hit"
    assert f"  ig-s0  {line} -\n" in out  # no hit1 in its records
    assert f"  ig-s2  {line} 0.500\n" in out
    assert "  ig-s1 " not in out  # its file has no first queries
    body[2] = json.dumps({**recs[2], "first_query": 7})
    path.write_text("\n".join(body) + "\n")
    assert significance.main(runs) == 2
    assert capsys.readouterr().err == f"error: {path}:3: 'first_query' is 7, not a string or null\n"


def test_first_queries_takes_the_em_that_read_questions_checked(tmp_path):
    """first_queries takes each question's EM from read_questions, which checks it (an EM that is
    not a number is a file:line error there), rather than reading it again from the file."""
    path = tmp_path / "questions.jsonl"
    recs = [
        {"id": "q1", "em": 1, "first_query": "a b", "hit1": True},
        {"id": "q2", "em": "yes", "first_query": "c", "hit1": True},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(significance.InputError, match=rf"^{path}:2: not an object .* number 'em'$"):
        significance.read_questions(path)
    path.write_text(json.dumps(recs[0]) + "\n")
    em = significance.read_questions(path)
    assert significance.first_queries(path, em) == significance.FirstQueries(1, 1, 2.0, 1.0)
    # the EM given a first hit is the one passed in, by question id
    assert significance.first_queries(path, {"q1": 0.0}).em_hit1 == 0.0
