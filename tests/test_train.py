"""train.py and evaluate.py on a tiny local model and a ten-passage corpus."""

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import igsearch as ig
import step as rl
import train
import warmup
from machinery import lm, loaders, records
from tools import significance
from train import Config

ROOT = Path(__file__).resolve().parent.parent
PASSAGES = [
    ("Paris", "Paris is the capital of France."),
    ("Berlin", "Berlin is the capital of Germany."),
    ("Rome", "Rome is the capital of Italy."),
    ("Madrid", "Madrid is the capital of Spain."),
    ("Hamlet", "Hamlet is a tragedy by Shakespeare."),
    ("Everest", "Everest is the highest mountain."),
    ("Nile", "The Nile is a long river in Africa."),
    ("Moon", "The Moon orbits the Earth."),
    ("Python", "Python is a programming language."),
    ("Oxygen", "Oxygen is a chemical element."),
]


@pytest.fixture(scope="session")
def tiny_run_files(tmp_path_factory, tokenizer, tiny_model):
    """A tiny model folder, a ten-passage corpus and question files, as a user would name them."""
    d = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(d / "model")
    tokenizer.save_pretrained(d / "model")
    with open(d / "corpus.jsonl", "w") as f:
        for i, (title, text) in enumerate(PASSAGES):
            f.write(json.dumps({"id": str(i), "contents": f'"{title}"\n{text}'}) + "\n")
    with open(d / "qa.jsonl", "w") as f:
        for i, (title, text) in enumerate(PASSAGES):
            f.write(
                json.dumps(
                    {
                        "id": str(i),
                        "question": text.replace(title, "What"),
                        "golden_answers": [title],
                    }
                )
                + "\n"
            )
    return {
        "model": str(d / "model"),
        "corpus": str(d / "corpus.jsonl"),
        "train_data": str(d / "qa.jsonl"),
        "test_data": str(d / "qa.jsonl"),
    }


def tiny_config(files, out_dir, **kw) -> Config:
    base = dict(
        questions_per_step=2,
        group_size=2,
        max_searches=1,
        max_turn_tokens=6,
        eval_questions=0,
        steps=2,
        save_every=1,
        lr=1e-3,
        out_dir=str(out_dir),
        precision="fp32",  # the tests compare runs at fp32 tolerances; test_bf16 runs bf16
        **files,
    )
    base.update(kw)
    return Config(**base)


def step_record(rolls: list, stats: dict) -> dict:
    """The log line of step 1 over rolls (records.RolloutStats), groups of 2, timings 0."""
    times = records.PhaseTimes(0.0, 0.0, 0.0)
    return records.step_record(
        step=0, rollouts=rolls, group_size=2, stats=stats, times=times, device=torch.device("cpu")
    )


def strip_times(records):
    return [
        {k: v for k, v in r.items() if not k.startswith("t_") and k != "mem_gb"} for r in records
    ]


def read_metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_reproduces_the_uninterrupted_one(tiny_run_files, tmp_path):
    train.train(tiny_config(tiny_run_files, tmp_path / "full", steps=3))
    train.train(tiny_config(tiny_run_files, tmp_path / "cut", steps=1))
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "reward"')  # a partial line, as a crash mid-write leaves it
    cfg, resume, _ = train.parse_config(["--resume", str(tmp_path / "cut"), "--steps", "3"])
    assert cfg.steps == 3 and cfg.lr == 1e-3  # the run's own config, overridden on the command line
    train.train(cfg, resume)
    full, cut = (
        strip_times(read_metrics(tmp_path / "full")),
        strip_times(read_metrics(tmp_path / "cut")),
    )
    assert [r["step"] for r in cut] == [1, 2, 3]
    assert cut == full
    state = torch.load(tmp_path / "cut" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 3


def test_before_after_table_rows_and_the_time_estimate(tiny_run_files, tmp_path, capsys):
    table = train.train(
        tiny_config(
            tiny_run_files,
            tmp_path / "a",
            steps=1,
            eval_questions=3,
            warmup_examples=2,
            warmup_batch=2,
            max_turn_tokens=3,
        )
    )
    assert (
        list(table) == ["start model", "after warm-up", "IG-Search"]
        and table["IG-Search"]["n"] == 3
    )
    assert "average" not in capsys.readouterr().out  # three models on one test set: no average row
    table = train.train(
        tiny_config(
            tiny_run_files,
            tmp_path / "b",
            steps=1,
            eval_questions=3,
            eval_start=False,
            warmup_examples=0,
            outcome_only=True,
            max_turn_tokens=3,
        )
    )
    assert list(table) == [
        "outcome-only"
    ]  # a shared start checkpoint is evaluated once, by its own run
    assert json.loads((tmp_path / "b" / "table.json").read_text()) == table
    for run, row in (
        ("a", "start model"),
        ("a", "after warm-up"),
        ("a", "IG-Search"),
        ("b", "outcome-only"),
    ):  # one record a test question, where significance.py looks for it, agreeing with the row
        name = significance.ROW_FILES.get(row, significance.QUESTIONS_FILE)
        got = [json.loads(line) for line in (tmp_path / run / name).read_text().splitlines()]
        rows = json.loads((tmp_path / run / "table.json").read_text())
        assert [r["id"] for r in got] == ["0", "1", "2"]
        assert sum(r["em"] for r in got) / 3 == pytest.approx(rows[row]["em"])
        assert all(r["hit1"] == (bool(r["hits"]) and r["hits"][0]) for r in got)
    cfg, c = Config(), config.CPU_SECONDS
    more = dataclasses.replace(cfg, steps=cfg.steps + 1)
    assert train.estimate_seconds(more) - train.estimate_seconds(cfg) == pytest.approx(
        cfg.questions_per_step * cfg.group_size * c["rollout"]
    )  # one more step costs one step's rollouts


def test_evaluate_writes_one_record_a_question_beside_its_results(tiny_run_files, tmp_path):
    """evaluate.py's per-question records: every question of every file, named by its dataset
    (the second copy of a file gets its row's name), their EM averaging to the table's."""
    import evaluate

    out = tmp_path / "e.eval.json"
    data = tiny_run_files["train_data"]
    argv = ["--model", tiny_run_files["model"], "--corpus", tiny_run_files["corpus"]]
    argv += ["--data", data, data, "--limit", "3", "--max_turn_tokens", "3", "--out", str(out)]
    assert evaluate.main(argv) == 0
    got = [json.loads(line) for line in (tmp_path / "e.eval.questions.jsonl").open()]
    rows = json.loads(out.read_text())["results"]
    assert list(rows) == ["qa", "qa_2"]
    assert [(r["dataset"], r["id"]) for r in got] == [(d, i) for d in rows for i in "012"]
    for name, row in rows.items():
        ems = [r["em"] for r in got if r["dataset"] == name]
        assert sum(ems) / len(ems) == pytest.approx(row["em"])
    assert {"prediction", "searches", "first_query", "hits", "hit1"} <= set(got[0])


def test_validation_curve_is_held_out_and_logged_with_query_quality(
    tiny_run_files, tmp_path, monkeypatch
):
    """Validation at step 0, every eval_every steps and at the end; its questions never reach the
    warm-up or an RL rollout; every step logs the share of search steps whose documents hold the
    gold."""
    questions = [
        json.loads(line) for line in Path(tiny_run_files["train_data"]).read_text().splitlines()
    ]
    _, val = loaders.split_validation(questions, 3)
    trained, real_rollout, real_warmup = [], ig.rollout, train.warmup
    monkeypatch.setattr(
        ig,
        "rollout",
        lambda m, t, prompts, *a, **kw: (
            (trained.extend(prompts) if kw.get("temperature", 1.0) > 0 else None)
            or real_rollout(m, t, prompts, *a, **kw)
        ),
    )
    monkeypatch.setattr(
        train,
        "warmup",
        lambda m, t, qs, *a: trained.extend(q["question"] for q in qs) or real_warmup(m, t, qs, *a),
    )
    cfg = tiny_config(
        tiny_run_files,
        tmp_path / "v",
        steps=3,
        eval_every=2,
        val_questions=3,
        warmup_examples=2,
        warmup_batch=2,
        max_turn_tokens=4,
    )
    train.train(cfg)
    recs = read_metrics(tmp_path / "v")
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert [("val_em" in r) for r in recs] == [
        True,
        False,
        True,
        True,
    ]  # step 0, every 2 steps, the end
    assert all(recs[0]["val_" + k] is not None for k in ("em", "f1", "hit", "searches", "valid"))
    assert all(0 <= r["hit"] <= 1 and "ig_hit" in r and "ig_miss" in r for r in recs[1:])
    assert trained and not [p for p in trained for q in val if q["question"] in p]
    with pytest.raises(train.InputError, match="leaves no training questions"):
        train.train(tiny_config(tiny_run_files, tmp_path / "w", eval_every=1, val_questions=10))


def test_table_row_names_the_method_and_every_departure_from_the_paper():
    name = lambda **kw: train.method_name(dataclasses.asdict(Config(**kw)))
    assert name() == "IG-Search" and name(outcome_only=True) == "outcome-only"
    assert name(ig_baseline="empty") == "IG-Search (empty baseline)"
    assert name(ig_center=True, ig_alpha=1.0) == "IG-Search (centred, alpha 1)"
    assert name(step_reward="hit") == "hit bonus"  # the query preset centres it: say so
    assert name(step_reward="hit", ig_center=True, ig_alpha=1.0) == "hit bonus (centred, alpha 1)"


def test_outcome_only_gives_query_tokens_the_rollout_advantage(
    tiny_run_files, tmp_path, monkeypatch, scripted
):
    """Rollouts come from a scripted policy that always searches; IG is scored and the update run by
    the tiny model. With IG the query tokens' advantages differ from A_i; with --outcome_only
    they do not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_run_files["model"])
    keys = [
        p[1].split()[-1] for p in PASSAGES
    ]  # each question's last word: different documents per question
    scripts = {k: [f"<search> {k.strip('.')} </search>", "<answer> Paris </answer>"] for k in keys}
    real_rollout, seen = ig.rollout, {}

    def scripted_rollout(model, tokenizer, prompts, search, **kw):
        return real_rollout(
            scripted(tok, scripts), tokenizer, prompts, search, **{**kw, "temperature": 0.0}
        )

    def spy_update(model, ref, tokenizer, trajs, tok_adv, optimizer, cfg, compute=None):
        seen.setdefault(cfg.outcome_only, []).append((trajs, tok_adv))
        return real_update(model, ref, tokenizer, trajs, tok_adv, optimizer, cfg, compute)

    real_update = rl.update
    monkeypatch.setattr(ig, "rollout", scripted_rollout)
    monkeypatch.setattr(rl, "update", spy_update)
    for outcome_only in (False, True):
        train.train(
            tiny_config(
                tiny_run_files,
                tmp_path / str(outcome_only),
                steps=1,
                outcome_only=outcome_only,
                questions_per_step=3,
                max_turn_tokens=24,
            )
        )
    for outcome_only, differs in ((True, False), (False, True)):
        trajs, tok_adv = seen[outcome_only][-1]  # the RL step comes after the warm-up's updates
        deltas = []
        for t, a in zip(trajs, tok_adv):
            lo, hi = t.steps[0].query_span
            deltas.append(float((a[lo:hi] - a[0]).abs().sum()))
        assert (max(deltas) > 1e-6) == differs


def test_update_moves_the_policy_towards_rewarded_trajectories(tokenizer, tiny_model):
    model = copy.deepcopy(tiny_model)
    good, bad = (
        warmup.supervised_trajectory(tokenizer, "Question?", [(f"<answer> {a} </answer>", True)])
        for a in ("Paris", "Berlin")
    )
    adv = ig.group_advantages(torch.tensor([1.0, 0.0]), 2)
    tok_adv = ig.token_advantages([good, bad], adv, [[], []], alpha=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = Config(micro_batch=1)

    def seq_logp():
        with torch.no_grad():
            logp, _ = ig.policy_logprobs(
                model, lm.response_batch([good, bad], tokenizer.pad_token_id)
            )
        return logp.sum(-1)

    before = seq_logp()
    for _ in range(5):
        stats = rl.update(model, None, tokenizer, [good, bad], tok_adv, opt, cfg)
    after = seq_logp()
    assert not stats["skipped"] and after[0] > before[0] and after[1] < before[1]


def test_query_entropy_and_bonus_share_are_taken_over_query_tokens(tokenizer, tiny_model):
    """The health metric that shows whether IG has anything to act on: entropy on the query tokens
    only."""
    model = copy.deepcopy(tiny_model)
    trajs = [
        warmup.supervised_trajectory(
            tokenizer,
            "Question?",
            [
                (f"<search> {q} </search>", True),
                ("<documents> d </documents>", False),
                ("<answer> x </answer>", True),
            ],
        )
        for q in ("capital city", "a")
    ]
    for t, q in zip(trajs, ("capital city", "a")):  # the query's span, as the rollout records it
        lo = len(tokenizer("<search> ", add_special_tokens=False).input_ids)
        t.steps.append(
            ig.Step(q, "d", (lo, lo + len(tokenizer(q, add_special_tokens=False).input_ids)))
        )
    batch = lm.response_batch(trajs, tokenizer.pad_token_id)
    with torch.no_grad():
        _, ent = ig.policy_logprobs(model, batch)  # (B, R)
    R = ent.shape[1]
    expect = [
        float(ent[b, R - len(t.response_ids) + lo : R - len(t.response_ids) + hi].mean())
        for b, t in enumerate(trajs)
        for lo, hi in [t.steps[0].query_span]
    ]
    n = [t.steps[0].query_span[1] - t.steps[0].query_span[0] for t in trajs]
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    stats = rl.update(
        model,
        None,
        tokenizer,
        trajs,
        [torch.zeros(len(t.response_ids)) for t in trajs],
        opt,
        Config(micro_batch=1),
    )
    rewards = torch.tensor([1.0, 0.0])
    a = ig.group_advantages(rewards, 2)  # (2,) A_i = +-0.707
    tok_adv = [torch.full((len(t.response_ids),), float(a[b])) for b, t in enumerate(trajs)]
    for b, t in enumerate(trajs):  # a bonus of 0.5 over each query: 0.5 / |Q_t| a token
        lo, hi = t.steps[0].query_span
        tok_adv[b][lo:hi] += 0.5 / (hi - lo)
    rolls = [
        records.rollout_stats(
            traj=t,
            reward=float(rewards[i]),
            answered=False,
            hits=[False],
            igs=[None],
            entropy=stats["token_entropy"][i],
            token_adv=tok_adv[i],
            a_i=float(a[i]),
        )
        for i, t in enumerate(trajs)
    ]
    rec = step_record(rolls, stats)  # the log line computes it from the update's entropies
    assert rec["query_entropy"] == pytest.approx(
        (expect[0] * n[0] + expect[1] * n[1]) / sum(n), rel=1e-4
    )
    assert rec["query_entropy"] != pytest.approx(rec["entropy"], rel=1e-3)  # not the all-token mean
    # IG's share of the query tokens' push: the bonus is spread over |Q_t|, A_i counts per token
    assert rec["query_tokens"] == sum(n) / 2
    assert rec["bonus_share"] == pytest.approx(1.0 / (1.0 + float(a.abs()[0]) * sum(n)), rel=1e-5)


from test_fast import flat, updated_weights  # noqa: E402


def test_grad_checkpointing_and_rollout_chunks_change_no_result(tokenizer, tiny_model):
    """The one-GPU memory switches: recomputed activations give the same update, chunked rollouts
    the same greedy trajectories."""
    plain, recomputed = (
        updated_weights(tiny_model, tokenizer, setup)
        for setup in (None, train.enable_checkpointing)
    )
    assert torch.allclose(plain, recomputed, atol=1e-6) and not torch.equal(plain, flat(tiny_model))
    questions = [{"question": q} for q in ("Who?", "What city?", "Where?")]
    search = lambda queries: (
        ['Doc 1(Title: "Paris") Paris is the capital of France.'] * len(queries)
    )
    runs = [
        rl.generate_rollouts(
            tiny_model,
            tokenizer,
            questions,
            search,
            Config(rollout_batch=n, temperature=0.0, max_searches=1, max_turn_tokens=8),
            None,
        )
        for n in (0, 2)
    ]
    assert [t.response_ids for t in runs[0]] == [t.response_ids for t in runs[1]]


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_run_files, tmp_path, monkeypatch):
    monkeypatch.setattr(
        ig,
        "policy_loss",
        lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), torch.tensor(0.0)),
    )
    with pytest.raises(
        train.TrainingError, match="non-finite.*no checkpoint was saved before them"
    ):
        train.train(
            tiny_config(
                tiny_run_files, tmp_path / "nan", steps=5, max_bad_steps=2, warmup_examples=0
            )
        )  # (a non-finite warm-up step stops at once)
    records = read_metrics(tmp_path / "nan")
    assert [r["skipped"] for r in records] == [True, True]
    # issue 29: step 1 was skipped, and a checkpoint saved after it was called "the last good one"
    assert not (tmp_path / "nan" / "checkpoint").exists()


def run_cli(*args):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--group_size", "1"], "group_size"),
        (["--ig_alpha", "-1"], "ig_alpha"),
        (["--topk", "0"], "topk"),
        (["--no_such_field", "3"], "no_such_field"),
        (["--steps", "many"], "steps"),
        (["--model", "./no/such/model"], "no/such/model"),
        (["--resume", "/nonexistent/run"], "not a run folder"),
    ],
)
def test_bad_config_gets_one_line_and_exit_2(args, needle, tiny_run_files, tmp_path):
    files = [
        "--corpus",
        tiny_run_files["corpus"],
        "--train_data",
        tiny_run_files["train_data"],
        "--out_dir",
        str(tmp_path / "run"),
    ]  # never the user's runs/default
    r = run_cli("train.py", *files, *args)
    assert r.returncode == 2 and needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_question_file_names_file_and_line(tiny_run_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "golden_answers": ["Paris"]}\n{"question": "q2"}\n')
    r = run_cli(
        "evaluate.py",
        "--model",
        tiny_run_files["model"],
        "--corpus",
        tiny_run_files["corpus"],
        "--data",
        str(bad),
    )
    assert r.returncode == 2 and f"{bad}:2:" in r.stderr and "golden_answers" in r.stderr
    assert "Traceback" not in r.stderr


def test_evaluate_writes_table_and_shows_trajectories(tiny_run_files, tmp_path):
    out = tmp_path / "res.json"
    r = run_cli(
        "evaluate.py",
        "--model",
        tiny_run_files["model"],
        "--corpus",
        tiny_run_files["corpus"],
        "--data",
        tiny_run_files["test_data"],
        tiny_run_files["test_data"],
        "--limit",
        "3",
        "--max_turn_tokens",
        "4",
        "--show",
        "2",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Q: ") == 2 and "average" in r.stdout and "IG per search step" in r.stdout
    res = json.loads(out.read_text())
    assert res["topk"] == 3 and "BM25" in res["retriever"] and res["results"]["qa"]["n"] == 3


def test_evaluate_reports_the_share_of_search_steps_that_find_the_gold(tokenizer, scripted):
    import evaluate

    scripts = {
        "capital of France": [
            "<search> capital France </search>",
            "<search> Paris </search>",
            "<answer> Paris </answer>",
        ],
        "wrote Hamlet": ["<answer> Shakespeare </answer>"],
    }
    questions = [
        {"question": "capital of France", "golden_answers": ["Paris"]},
        {"question": "wrote Hamlet", "golden_answers": ["Shakespeare"]},
    ]
    search = lambda qs: [f'Doc 1(Title: "{q}") text about {q}.' for q in qs]
    summary, _ = evaluate.evaluate(
        scripted(tokenizer, scripts),
        tokenizer,
        questions,
        search,
        Config(max_searches=2, max_turn_tokens=24, max_response_tokens=4096),
        rl.choose_compute(True, torch.device("cpu")),
    )
    assert summary["em"] == 1.0 and summary["searches"] == 1.0
    assert summary["hit"] == 0.5  # of the two search steps only the second retrieved "Paris"
    assert evaluate.format_table({"x": summary}).splitlines()[1].split()[-1] == "0.50"


def test_ig_by_retrieval_splits_steps_on_whether_the_documents_hold_the_gold():
    import evaluate

    q = {"question": "?", "golden_answers": ["The Nile"]}

    def answered(*steps):
        t = ig.Trajectory([1], "p")
        t.steps = [ig.Step(query="q", documents=d, query_span=(0, 1)) for d, _ in steps]
        gains = [None if v is None else ig.Gain(v, []) for _, v in steps]
        return evaluate.Answered(q, t, gains)

    pairs = [
        answered(('Doc 1(Title: "Nile") The Nile is long.', 3.0), ("Doc 1 Rome", -1.0)),
        answered(("Doc 1 nile river", 1.0), ("Doc 1 Paris", 0.5), ("Doc 1 Oslo", None)),
    ]
    line = evaluate.ig_by_retrieval(pairs)
    assert (
        "gold in the documents +2.00 nats over 2 steps (100% > 0)" in line
    )  # normalised: "the" dropped
    assert (
        "gold not in them -0.25 nats over 2 steps (50% > 0)" in line
    )  # the unscored step is left out


def test_compare_runs_mean_and_spread(tmp_path):
    from tools import compare

    for k, em in enumerate((0.4, 0.6)):
        run = tmp_path / f"run{k}"
        run.mkdir()
        row = {"n": 10, "em": em, "f1": em, "searches": 1.0, "valid": 1.0}
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(Config())))
        (run / "table.json").write_text(json.dumps({"IG-Search": row}))
    (tmp_path / "val_only").mkdir()  # a run that evaluated no test questions has no table row
    (tmp_path / "val_only" / "config.json").write_text("{}")
    read = lambda *names: [compare.Run.read(str(tmp_path / n)) for n in names]
    text = compare.report(read("run0", "run1", "val_only"))
    table, runs = text.split("\n\n")[:2]
    assert (
        "IG-Search" in table
        and "0.500 ± 0.100" in table
        and "0.400-0.600" in table
        and len(table.splitlines()) == 2
    )
    assert runs.splitlines()[1].split()[:6] == [
        "run0",
        "IG-Search",
        "0",
        "-",
        "0.400",
        "-",
    ]  # no wall.json, no hit
    (tmp_path / "run1" / "wall.json").write_text(json.dumps({"wall_seconds": 1234}))
    assert "1234" in compare.per_run(read("run1"))[1]
    start = {**row, "em": 0.0}
    (tmp_path / "run1" / "table.json").write_text(
        json.dumps({"start model": start, "IG-Search": row})
    )
    assert compare.per_run(read("run1"))[1].split()[4] == "0.600"  # the trained model's row
    (tmp_path / "run1").rename(tmp_path / "sel-outcome-s0-lr5e-6")  # longer than the column
    line = compare.per_run(read("sel-outcome-s0-lr5e-6"))[1]
    assert line.split()[:2] == ["sel-outcome-s0-lr5e-6", "IG-Search"]
    long = "IG-Search (empty baseline, centred) [noisy]"  # longer than the method column
    (tmp_path / "sel-outcome-s0-lr5e-6" / "table.json").write_text(json.dumps({long: row}))
    header, line = compare.held_out_table(read("sel-outcome-s0-lr5e-6"))[:2]
    assert line.startswith(long + "  ") and line[header.index("runs") + 3] == "1"  # aligned
    with pytest.raises(compare.InputError, match="config.json"):
        read("missing")


def test_compare_piped_into_a_reader_that_stops_early_ends_without_a_traceback(tmp_path):
    for k in range(
        2000
    ):  # 160 KB of lines: more than a pipe holds, so writes go on after head exits
        (tmp_path / f"r{k}").mkdir()
        (tmp_path / f"r{k}" / "config.json").write_text("{}")
    proc = subprocess.run(
        f"cd {tmp_path} && {sys.executable} {ROOT / 'tools' / 'compare.py'} r* | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.startswith("method") and proc.stderr == ""


def test_compare_runs_prints_training_means_per_method(tmp_path):
    from tools import compare

    def run(name, rewards, **config):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps(dataclasses.asdict(Config(**config)))
        )
        recs = [
            {"step": s + 1, "reward": r, "hit": 0.5, "ig_pos": 0.0, "ig_miss": None if s else 2.0}
            for s, r in enumerate(rewards)
        ] + [{"step": len(rewards), "val_em": 0.9}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return compare.Run.read(str(tmp_path / name))

    runs = [
        run("ig0", [0.0] * 3 + [1.0] * 3),
        run("ig1", [0.5] * 6),
        run("oo", [0.25] * 6, outcome_only=True),
    ]
    lines = compare.training_means(runs, window=3)
    assert lines[1].split() == ["quantity", "IG-Search", "outcome-only"]
    reward = next(line for line in lines if line.startswith("training reward"))
    # IG-Search: first 3 steps -> last 3 (all steps), each a mean over its two runs; then outcome-
    # only
    assert reward.split()[-8:] == ["0.25", "->", "0.75", "(0.50)", "0.25", "->", "0.25", "(0.25)"]
    miss = next(line for line in lines if line.startswith("mean IG of steps that miss"))
    assert miss.split()[-5:] == [
        "2.00",
        "->",
        "2.00",
        "(2.00)",
        "-",
    ]  # None left out; no IG for outcome-only
    assert compare.training_means([run("warm", [])]) == []  # no RL steps: no block
    # a method's name longer than a column still stands apart from its neighbours
    long = [runs[2], run("a3", [0.5] * 3, ig_center=True, ig_alpha=3.0, task="noisy")]
    head = compare.training_means(long, window=3)[1]
    assert head.endswith(" IG-Search (centred, alpha 3) [noisy]") and "outcome-only " in head


def test_learning_curves_average_seeds_per_method_from_the_shared_warmup(tmp_path, capsys):
    from tools import compare

    def run(name, table, records, **config):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps(dataclasses.asdict(Config(**config)))
        )
        (tmp_path / name / "table.json").write_text(json.dumps(table))
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
        return str(tmp_path / name)

    row = {"n": 1, "em": 0, "f1": 0, "searches": 1, "valid": 1}
    warm = run("warm", {"after warm-up": row}, [{"step": 0, "val_em": 0.3, "val_hit": 0.5}])
    ig_runs = [
        run(
            f"ig{k}",
            {"IG-Search": row},
            [
                {"step": s, "reward": r, "hit": 0.5, "val_em": v}
                for s, r, v in ((1, 0.0, None), (2, 1.0, 0.4 + k / 10))
            ],
        )
        for k in range(2)
    ]
    for k in range(2):  # step 1 was not validated
        lines = (Path(ig_runs[k]) / "metrics.jsonl").read_text().replace(', "val_em": null', "")
        (Path(ig_runs[k]) / "metrics.jsonl").write_text(lines)
    out = run("oo", {"outcome-only": row}, [{"step": 1, "reward": 0.5}], outcome_only=True)
    runs = [compare.Run.read(r) for r in (warm, *ig_runs, out)]
    curves = compare.learning_curves(runs)
    assert set(curves) == {
        "IG-Search",
        "outcome-only",
    }  # the warm-up is no method: it starts each curve
    assert curves["IG-Search"]["val_em"] == {0: [0.3], 2: [0.4, 0.5]}
    assert curves["IG-Search"]["reward"] == {
        1: [0.0, 0.0],
        2: [0.5, 0.5],
    }  # a trailing mean over steps
    assert "val_em" not in curves["outcome-only"] and "val_hit" not in curves["IG-Search"]
    (Path(warm) / "table.json").unlink()  # a warm-up that tested nothing (--eval_questions 0)
    assert compare.Run.read(warm).method == "after warm-up"
    assert compare.learning_curves([compare.Run.read(warm), *runs[1:]]) == curves
    pytest.importorskip("matplotlib")
    assert compare.main([warm, *ig_runs, out, "--plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(compare.InputError, match="no learning curves"):
        compare.plot(runs[:1], str(tmp_path / "d.png"))
    assert compare.main([str(tmp_path / "nothing"), "--plot", str(tmp_path / "d.png")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_varied_warmup_queries_are_keywords_of_the_question(tiny_model, tokenizer, monkeypatch):
    import warmup

    gen = torch.Generator().manual_seed(0)
    forms = warmup.query_forms("Who is this: Spiritual leader of Tibet since 1940?", gen)
    assert forms[:2] == [
        "Who is this: Spiritual leader of Tibet since 1940?",
        "Spiritual leader Tibet since 1940",
    ]
    assert set(forms[2].split()) <= set(forms[1].split()) and forms[2]
    questions = [
        {"question": f"What is this: capital number {i} of a country?", "golden_answers": [f"C{i}"]}
        for i in range(40)
    ]
    asked, targets = [], []

    def search(queries):
        asked.extend(queries)
        return ["Doc 1 " + " ".join(f'(Title: "C{i}")' for i in range(40))] * len(
            queries
        )  # every gold found

    def update(model, ref, tok, batch, adv, opt, cfg, compute=None):
        targets.extend(tok.decode(t.response_ids) for t in batch)
        return {"loss": 0.0, "grad_norm": 0.0, "skipped": False, "token_entropy": []}

    monkeypatch.setattr(rl, "update", update)
    for mode in ("question", "varied"):
        asked.clear()
        warmup.warmup(
            tiny_model,
            tokenizer,
            questions,
            search,
            Config(warmup_examples=8, warmup_query=mode),
            rl.choose_compute(True, torch.device("cpu")),
            torch.Generator().manual_seed(0),
        )
        verbatim = sum(q.startswith("What is this") for q in asked)
        assert verbatim == len(asked) if mode == "question" else 0 < verbatim < len(asked) / 2
    assert any(
        "<search> capital number" in t for t in targets
    )  # the varied query is what the model is taught


def test_retry_warmup_forms_read_only_the_question_text():
    """No oracle: every form is built from the text the policy sees. Two questions with the same
    text but distractors of other lengths (plain_question differs) get the very same warm-up
    searches."""
    text = "… lies near the Mekong river in the south … What is this: Capital of Laos?"
    forms = warmup.retry_forms(text, torch.Generator().manual_seed(3))
    keys = warmup.query_forms(text, torch.Generator().manual_seed(3))[1].split()
    assert forms[0] == text and forms[1] == " ".join(keys)
    assert forms[3] == " ".join(keys[: len(forms[3].split())]) and forms[4] == " ".join(
        keys[-len(forms[4].split()) :]
    )
    # prefix and suffix lengths are spread over every length, not stopped at the distractor's end
    lengths = {
        len(warmup.retry_forms(text, torch.Generator().manual_seed(s))[4].split())
        for s in range(200)
    }
    assert lengths == set(range(1, len(keys) + 1))
    a = {
        "question": text,
        "golden_answers": ["Vientiane"],
        "plain_question": "What is this: Capital of Laos?",
    }
    b = {**a, "plain_question": "Capital of Laos?"}
    docs = lambda queries: [
        'Doc 1(Title: "Vientiane") x' if "Laos" in q else 'Doc 1(Title: "Mekong")' for q in queries
    ]
    cfg = Config(warmup_query="retry", max_searches=2, warmup_examples=4)
    runs = [
        warmup.example_searches([q] * 6, docs, cfg, torch.Generator().manual_seed(0))
        for q in (a, b)
    ]
    assert runs[0] == runs[1]


def test_retry_warmup_keeps_misses_before_the_hit(tokenizer):
    """A two-search example: the first query missed, the second found the gold; both queries are
    trained, both documents masked, and nothing is kept where no form finds the gold."""
    qs = [
        {"question": f"noise words here What is this: thing {i}?", "golden_answers": [f"T{i}"]}
        for i in range(30)
    ]
    search = lambda queries: [
        f'Doc 1(Title: "T{q.split()[-1].strip("?")}")' if len(q.split()) == 1 else "Doc 1 nothing"
        for q in queries
    ]  # only a one-word query (a short prefix or suffix) finds it
    cfg = Config(warmup_query="retry", max_searches=2, warmup_examples=50)
    trajs = warmup.warmup_trajectories(tokenizer, qs, search, cfg, torch.Generator().manual_seed(0))
    assert 0 < len(trajs) < 30
    two = [t for t in trajs if sum("<search>" in s[3] for s in t.segments) == 2]
    assert two, "some examples must teach the retry form"
    for t in trajs:
        trained = [s for s in t.segments if s[2]]
        assert all("<search>" in s[3] for s in trained[:-1]) and "<answer>" in trained[-1][3]
        assert len(trained[-2][3].split()) == 3  # the query that hit: "<search> WORD </search>"
        assert all(not s[2] for s in t.segments if "<documents>" in s[3])


def test_hit_bonus_lands_on_the_query_tokens_only(tokenizer):
    trajs = [
        warmup.supervised_trajectory(
            tokenizer,
            "Question?",
            [
                ("<think> x </think> <search> capital of France </search>", True),
                ("\n<documents>Paris</documents>\n", False),
                ("<answer> Paris </answer>", True),
            ],
        )
        for _ in range(2)
    ]
    for t in trajs:
        start = t.response_text.index("capital")
        span = ig.char_span_to_tokens(
            tokenizer, t.response_ids[: t.segments[0][1]], start, start + len("capital of France")
        )
        t.steps.append(ig.Step("capital of France", "Paris", span))
    adv = torch.tensor([0.5, -0.5])
    golds = [["Paris"], ["Rome"]]  # rollout 0's documents hold its gold, rollout 1's do not
    cfg = Config(step_reward="hit", group_size=2)
    bonus = rl.step_bonus(None, tokenizer, trajs, golds, rl.rewards(trajs, golds), cfg, None)
    assert bonus.gains == [[None], [None]]  # nothing is scored: no IG at all
    out = ig.token_advantages(trajs, adv, bonus.bonus, alpha=0.3)
    for t, a, hit, tok in zip(trajs, adv.tolist(), (1.0, 0.0), out):
        lo, hi = t.steps[0].query_span
        inside = torch.zeros(len(t.response_ids), dtype=torch.bool)
        inside[lo:hi] = True
        assert hi > lo and torch.allclose(tok[~inside], torch.tensor(a))
        assert torch.allclose(tok[inside], torch.tensor(a + 0.3 * hit / (hi - lo)))  # the hit


def test_task_is_recorded_and_kept_on_resume(tiny_run_files, tmp_path, monkeypatch):
    import prepare

    asked = []  # the offline default's data is asked for by task: stand the tiny files in for it
    files = {k: v for k, v in tiny_run_files.items() if k not in ("test_data", "train_data")}
    monkeypatch.setattr(
        prepare,
        "default_data",
        lambda task="plain": (
            asked.append(task)
            or {
                "corpus": tiny_run_files["corpus"],
                "train": tiny_run_files["train_data"],
                "test": tiny_run_files["test_data"],
            }
        ),
    )
    train.train(tiny_config(files, tmp_path / "r", steps=1, task="noisy", step_reward="hit"))
    assert json.loads((tmp_path / "r" / "config.json").read_text())[
        "task"
    ] == "noisy" and asked == ["noisy"]
    cfg, resume, _ = train.parse_config(["--resume", str(tmp_path / "r"), "--steps", "2"])
    assert cfg.task == "noisy" and cfg.step_reward == "hit"
    train.train(cfg, resume)
    assert asked == ["noisy", "noisy"] and [r["step"] for r in read_metrics(tmp_path / "r")] == [
        1,
        2,
    ]
    assert all(
        "hit1" in r and r["ig_mean"] is None for r in read_metrics(tmp_path / "r")
    )  # the hit bonus scores no IG: its mean IG is undefined (null), not 0


def test_compare_reports_first_search_hits_per_task_and_when_they_reach_outcome_only(tmp_path):
    """The query task's measure: validation hit1 curves by method, never averaged across tasks, and
    the first step at which a method reaches outcome-only's final level on the same task."""
    from tools import compare

    def run(name, table, records, **config):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps(dataclasses.asdict(Config(**config)))
        )
        (tmp_path / name / "table.json").write_text(json.dumps(table))
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (tmp_path / name / "metrics.jsonl").write_text(lines)
        return compare.Run.read(str(tmp_path / name))

    row = {"n": 4, "em": 0.5, "f1": 0.5, "searches": 1.5, "valid": 1, "hit": 0.5, "hit1": 0.25}
    curve = lambda vals: [{"step": s, "reward": 0.5, "val_em": 0.1, "val_hit1": v} for s, v in vals]
    runs = [
        run("warm", {"after warm-up": row}, [{"step": 0, "val_hit1": 0.2}], task="noisy"),
        run(
            "oo",
            {"outcome-only": row},
            curve([(10, 0.3), (20, 0.5)]),
            task="noisy",
            outcome_only=True,
        ),
        run("ig", {"IG-Search": row}, curve([(10, 0.6), (20, 0.7)]), task="noisy"),
        run("plain", {"IG-Search": {**row, "hit1": 0.75}}, curve([(10, 0.1), (20, 0.2)])),
        run("hit", {"x": row}, curve([(10, 0.3), (20, 0.4)]), task="noisy", step_reward="hit"),
    ]
    table = compare.held_out_table(runs)
    assert any(line.startswith("IG-Search [noisy]") and line.endswith("0.25") for line in table)
    assert any(line.startswith("IG-Search   ") and line.endswith("0.75") for line in table)
    lines = compare.first_search_hits(runs)
    ig_line = next(line for line in lines if line.startswith("IG-Search [noisy]"))
    assert "0:0.200 10:0.600 20:0.700" in ig_line and "final 0.500 reached at step 10" in ig_line
    low = next(line for line in lines if "0:0.200 10:0.300 20:0.400" in line)
    assert low.endswith("outcome-only's final 0.500 not reached")  # never a bare "step None"
    plain = next(line for line in lines if line.startswith("IG-Search ") and "[" not in line)
    assert (
        "reached" not in plain and "0:0.200" not in plain.split()
    )  # no plain outcome-only, no noisy warm-up


def test_an_ig_mean_over_no_step_is_logged_as_null_not_zero():
    """Issue 47: a step with no hit logged ig_hit = 0.0 (the mean of an empty list), which
    compare.py then averaged in. Undefined means are None; defined ones are the mean."""
    traj = ig.Trajectory([1], "p")
    traj.response_ids, traj.loss_mask = [5, 6, 7], [1, 1, 1]
    traj.steps = [ig.Step("q", "d", (0, 1))]
    stats = {"loss": 0.0, "kl": 0.0, "grad_norm": 0.0, "skipped": False}

    def record(hits, igs):
        rolls = [
            records.rollout_stats(
                traj=traj,
                reward=0.0,
                answered=True,
                hits=h,
                igs=v,
                entropy=torch.zeros(3),
                token_adv=torch.zeros(3),
                a_i=0.0,
            )
            for h, v in zip(hits, igs)
        ]
        return step_record(rolls, stats)

    rec = record([[False], [False]], [[1.5], [-0.5]])  # no step hit
    assert rec["ig_hit"] is None and rec["ig_miss"] == 0.5 and rec["ig_mean"] == 0.5
    rec = record([[True], [False]], [[None], [None]])  # nothing scored (outcome-only)
    assert rec["ig_hit"] is rec["ig_miss"] is rec["ig_mean"] is rec["ig_pos"] is None
    assert rec["hit"] == 0.5
    assert json.loads(json.dumps(rec))["ig_hit"] is None  # JSON null in metrics.jsonl


def test_a_test_evaluation_keeps_one_record_a_question(tiny_run_files, tmp_path):
    """Issue 47: no per-question outputs were kept, so no paired test across questions was
    possible. The trained model's test evaluation writes questions.jsonl, whose EM averages to the
    table's row, with each question's searches, first query and hits."""
    run = tmp_path / "run"
    cfg = tiny_config(
        tiny_run_files, run, steps=1, eval_questions=3, eval_start=False, warmup_examples=0
    )
    table = train.train(cfg)
    rows = [json.loads(line) for line in (run / "questions.jsonl").read_text().splitlines()]
    (trained,) = table.values()
    assert len(rows) == 3 == trained["n"]
    assert sum(r["em"] for r in rows) / 3 == pytest.approx(trained["em"])
    assert sum(r["searches"] for r in rows) / 3 == pytest.approx(trained["searches"])
    assert all(
        len(r["hits"]) == r["searches"] and r["hit1"] == bool(r["hits"][:1] == [True]) for r in rows
    )
    assert [r["id"] for r in rows] == [
        json.loads(line)["id"]
        for line in Path(tiny_run_files["test_data"]).read_text().splitlines()
    ][:3]
