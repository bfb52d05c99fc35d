"""Bad input, second round: every length bounded, every config value checked, resume that cannot
lose or mislead, evaluate.py's model and output checked first, a retriever whose work per request
and number of threads are bounded. Each case ends in one line and exit 2 before work starts."""

import json
import os
import threading

import pytest
from test_reliability import train_args
from test_retriever import PASSAGES, serve
from test_train import tiny_run_files  # noqa: F401 (a fixture)

import compare
import config
import evaluate
import igsearch as ig
import prepare
import retriever
import train
from retriever import BM25Retriever, InputError, RemoteRetriever, load_corpus, make_server

GOOD_Q = '{"question": "Who?", "golden_answers": ["X"]}\n'


def one_line_error(capsys, code: int) -> str:
    """The exit code is 2 and stderr holds exactly one line, `error: ...`; returns that line."""
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------- 1. lengths


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)  # opening it for reading would wait for a writer forever
    return str(path)


@pytest.mark.parametrize("load", [prepare.load_questions, load_corpus], ids=["questions", "corpus"])
def test_devices_and_fifos_are_refused_not_read(load, fifo):
    for path in ("/dev/zero", fifo):  # one endless line; a reader that never returns
        with pytest.raises(InputError, match=f"^{path}: not a regular file$"):
            load(path)


def test_train_with_dev_zero_as_question_file_stops_in_one_line(tiny_run_files, tmp_path, capsys):  # noqa: F811
    args = train_args({**tiny_run_files, "train_data": "/dev/zero"}, tmp_path / "run", 1)
    assert "/dev/zero: not a regular file" in one_line_error(capsys, train.main(args))


@pytest.mark.parametrize("load", [prepare.load_questions, load_corpus], ids=["questions", "corpus"])
def test_a_line_over_one_mebibyte_is_refused_with_its_line(load, tmp_path):
    path = tmp_path / "long.jsonl"
    row = {"question": "Who?", "golden_answers": ["X"], "contents": "x"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "pad": "y" * (1 << 20)}) + "\n")
    with pytest.raises(InputError, match=f"^{path}:2: line longer than {1 << 20} bytes"):
        load(str(path))


@pytest.mark.parametrize("end", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_a_line_of_exactly_the_limit_is_one_line_and_the_next_keeps_its_number(end, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes(b"x" * 10 + end + b"y" * 10 + end + b"z" * 11 + end)
    read = retriever.read_lines(str(path), max_bytes=10)
    assert [next(read), next(read)] == [(1, b"x" * 10 + end), (2, b"y" * 10 + end)]
    with pytest.raises(InputError, match=f"^{path}:3: line longer than 10 bytes"):
        next(read)


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"question": "W" * 2001, "golden_answers": ["X"]}, "'question' is 2001 characters"),
        (
            {"question": "Who?", "golden_answers": ["X", "Y" * 2001]},
            "a gold answer is 2001 characters",
        ),
    ],
)
def test_a_question_or_answer_over_the_bound_is_refused(tmp_path, row, problem):
    path = tmp_path / "q.jsonl"
    path.write_text(GOOD_Q + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=f"^{path}:2: {problem}, more than 2000$"):
        prepare.load_questions(str(path))


def test_evaluate_refuses_a_one_megabyte_question_before_loading_a_model(
    tmp_path, capsys, monkeypatch
):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "why " * 250_000, "golden_answers": ["X"]}) + "\n")
    monkeypatch.setattr(prepare, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code = evaluate.main(["--data", str(path), "--corpus", str(path), "--out", str(tmp_path / "o")])
    assert f"{path}:1: 'question' is 1000000 characters" in one_line_error(capsys, code)


def test_long_documents_are_cut_to_the_response_budget_and_the_answer_turn_still_fits(
    tokenizer, scripted
):
    """A retriever that returns 20,000 words: the documents are cut so that the response stays
    within max_response_tokens and one more turn fits, the step says how much was cut, and the
    policy still answers after them."""
    scripts = {"Q1": ["<search> capital </search>", "<answer> Paris </answer>"]}
    prompt = ig.build_prompt(tokenizer, "Q1", ig.TEMPLATES["igsearch"])
    search = lambda queries: ["Paris " * 20_000 for _ in queries]  # noqa: E731
    for budget in (60, 200):
        (traj,) = ig.rollout(
            scripted(tokenizer, scripts),
            tokenizer,
            [prompt],
            search,
            max_searches=2,
            max_turn_tokens=12,
            max_response_tokens=budget,
            temperature=0.0,
        )
        assert len(traj.response_ids) <= budget and not traj.truncated, budget
        assert ig.extract_answer(traj) == "Paris", budget
        step = traj.steps[0]
        kept = len(tokenizer(step.documents, add_special_tokens=False).input_ids)
        assert step.cut > 0 and kept + step.cut >= 20_000 and kept < budget, budget
        assert f"<documents>{step.documents}</documents>" in traj.response_text


def test_documents_that_fit_are_not_touched(tokenizer, scripted):
    scripts = {"Q1": ["<search> capital </search>", "<answer> Paris </answer>"]}
    prompt = ig.build_prompt(tokenizer, "Q1", ig.TEMPLATES["igsearch"])
    doc = 'Doc 1(Title: "Paris") Paris is the capital of France.'
    (traj,) = ig.rollout(
        scripted(tokenizer, scripts),
        tokenizer,
        [prompt],
        lambda q: [doc] * len(q),
        max_searches=2,
        max_turn_tokens=12,
        max_response_tokens=400,
    )
    assert traj.steps[0].documents == doc and traj.steps[0].cut == 0


# ----------------------------------------------------------------------------- 2. config values


@pytest.mark.parametrize(
    "name, value",
    [
        ("save_every", "0"),
        ("max_bad_steps", "0"),
        ("steps", "-1"),
        ("lr", "inf"),
        ("lr", "nan"),
        ("doc_words", "-5"),
        ("ig_clip", "-1"),
        ("grad_clip", "-1"),
        ("grad_clip", "0"),
        ("outcome_only", "on"),
        ("fast", "maybe"),
        ("seed", "-1"),
        ("eval_batch", "0"),
        ("warmup_batch", "0"),
        ("ig_batch_size", "0"),
        ("ig_max_len", "1"),
        ("kl_coef", "-1"),
        ("ig_neg_scale", "-1"),
        ("ig_dead_zone", "-0.1"),
        ("temperature", "inf"),
        ("max_response_tokens", "0"),
        ("max_response_tokens", "5"),
        ("warmup_examples", "-1"),
        ("warmup_lr", "0"),
        ("eval_questions", "-3"),
        ("ig_alpha", "inf"),
        ("ig_head_weight", "0"),
        ("retriever_timeout", "inf"),
        ("out_dir", ""),
    ],
)
def test_every_out_of_range_value_stops_before_work(
    name,
    value,
    tiny_run_files,
    tmp_path,  # noqa: F811
    capsys,
):
    run = tmp_path / "run"
    code = train.main(train_args(tiny_run_files, run, 1) + [f"--{name}", value])
    assert f"{name}" in one_line_error(capsys, code)
    assert not run.exists()  # nothing was started


def test_every_float_field_must_be_finite():
    for f in train.dataclasses.fields(train.Config):
        if f.type == "float":
            with pytest.raises(InputError, match=f"config: {f.name}=inf is out of range"):
                train.check_config(train.Config(**{f.name: float("inf")}))


@pytest.mark.parametrize(
    "text, value",
    [("true", True), ("Yes", True), ("1", True), ("false", False), ("NO", False), ("0", False)],
)
def test_booleans_accept_six_words(text, value):
    assert config.parse_bool(text) is value


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_an_out_dir_that_cannot_be_a_folder_stops_before_work(
    where,
    tiny_run_files,
    tmp_path,  # noqa: F811
    capsys,
):
    (tmp_path / "f").write_text("mine")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    code = train.main(train_args(tiny_run_files, out, 1))
    assert f"{out}: cannot write the run folder" in one_line_error(capsys, code)
    assert (tmp_path / "f").read_text() == "mine"


# ----------------------------------------------------------------------------- 3. resume


def test_resume_without_a_checkpoint_is_refused_not_looked_up_on_the_hub(
    tmp_path, capsys, monkeypatch
):
    run = tmp_path / "myrun"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"steps": 3}))
    monkeypatch.setattr(prepare, "load_model", lambda *a, **k: pytest.fail("looked for a model"))
    code = train.main(["--resume", str(run)])
    assert f"{run}: no checkpoint to resume from" in one_line_error(capsys, code)


@pytest.fixture(scope="module")
def finished_run(tiny_run_files, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("resume") / "run"
    assert train.main(train_args(tiny_run_files, run, 1)) == 0
    return run


@pytest.mark.parametrize(
    "file, text, problem",
    [
        ("config.json", '{"steps": 3', "config.json:1: not JSON"),
        ("config.json", "[1, 2]", "config.json: expected a JSON object, got list"),
        ("config.json", '{"stepz": 3}', "config.json: unknown config field 'stepz'"),
        ("config.json", '{"steps": "3"}', "config.json: 'steps' is '3', not of type int"),
        ("config.json", '{"fast": 1}', "config.json: 'fast' is 1, not of type bool"),
        ("table.json", '{"start model": ', "table.json:1: not JSON"),
    ],
)
def test_a_broken_run_file_on_resume_is_one_line(
    finished_run, tmp_path, capsys, file, text, problem
):
    run = tmp_path / "copy"
    os.system(f"cp -r {finished_run} {run}")
    (run / file).write_text(text)
    code = train.main(["--resume", str(run), "--steps", "2"])
    assert f"{run}/{problem}" in one_line_error(capsys, code)


@pytest.mark.parametrize(
    "flag, value",
    [("--model", "HuggingFaceTB/SmolLM2-135M"), ("--out_dir", "elsewhere"), ("--preset", "learn")],
)
def test_resume_refuses_to_change_the_model_or_folder_and_leaves_config_as_it_was(
    finished_run, capsys, flag, value
):
    before = (finished_run / "config.json").read_bytes()
    code = train.main(["--resume", str(finished_run), flag, value])
    assert f"{flag} cannot" in one_line_error(capsys, code)
    assert (finished_run / "config.json").read_bytes() == before


def test_resume_honours_a_new_step_count_and_records_it(finished_run, tmp_path):
    run = tmp_path / "copy"
    os.system(f"cp -r {finished_run} {run}")
    assert train.main(["--resume", str(run), "--steps", "2"]) == 0
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# ----------------------------------------------------------------------------- 4. evaluate.py


def test_evaluate_a_model_folder_without_tokenizer_is_one_line(
    tiny_model,
    tiny_run_files,  # noqa: F811
    tmp_path,
    capsys,
):
    folder = tmp_path / "weights_only"
    tiny_model.save_pretrained(folder)
    capsys.readouterr()
    code = evaluate.main(
        [
            "--model",
            str(folder),
            "--data",
            tiny_run_files["train_data"],
            "--corpus",
            tiny_run_files["corpus"],
            "--out",
            str(tmp_path / "o.json"),
        ]
    )
    assert f"{folder}: cannot load the model" in one_line_error(capsys, code)


def test_evaluate_checks_its_output_before_the_evaluation(
    tiny_run_files,
    tmp_path,
    capsys,  # noqa: F811
    monkeypatch,
):
    (tmp_path / "f").write_text("")
    monkeypatch.setattr(prepare, "load_model", lambda *a, **k: pytest.fail("evaluated first"))
    for out in (tmp_path / "f" / "eval.json", tmp_path):  # under a file; a folder in the way
        code = evaluate.main(
            [
                "--data",
                tiny_run_files["train_data"],
                "--corpus",
                tiny_run_files["corpus"],
                "--out",
                str(out),
            ]
        )
        assert f"{out}: cannot be written" in one_line_error(capsys, code)


def test_compare_with_a_broken_table_is_one_line(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    os.system(f"cp -r {finished_run} {run}")
    (run / "table.json").write_text("{")
    code = compare.main([str(run)])
    assert f"{run}/table.json:1: not JSON" in one_line_error(capsys, code)


# ----------------------------------------------------------------------------- 5. the retriever


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": str(i), "contents": f'"{t}"\n{x}'}) + "\n"
            for i, (t, x) in enumerate(PASSAGES)
        )
    )
    return str(path)


def test_bm25_scores_only_the_first_query_words(corpus, monkeypatch):
    bm25 = BM25Retriever(corpus)
    seen = []
    scores = bm25.bm25.get_scores
    monkeypatch.setattr(
        bm25.bm25, "get_scores", lambda words: seen.append(len(words)) or scores(words)
    )
    bm25.search(["capital " * 1990, "capital of France"])
    assert seen == [retriever.MAX_QUERY_WORDS, 3]


def test_server_handles_at_most_max_threads_requests_at_once(corpus):
    bm25 = BM25Retriever(corpus)
    release, lock, now, peak = threading.Event(), threading.Lock(), [0], [0]
    search = bm25.search

    def slow_search(queries, topk=3):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        release.wait(5)
        with lock:
            now[0] -= 1
        return search(queries, topk)

    bm25.search = slow_search
    server = make_server(bm25, port=0, max_threads=2)
    url = serve(server)
    client = RemoteRetriever(url, timeout=10, retries=1)
    threads = [threading.Thread(target=client.search, args=(["capital"],)) for _ in range(5)]
    for t in threads:
        t.start()
    for _ in range(100):  # wait until the two slots are taken
        if now[0] == 2:
            break
        threading.Event().wait(0.02)
    threading.Event().wait(0.3)  # the other three would have started by now if unbounded
    assert now[0] == 2
    release.set()
    for t in threads:
        t.join()
    server.shutdown()
    server.server_close()
    assert peak[0] == 2


def test_client_splits_a_batch_to_the_servers_cap(corpus):
    bm25 = BM25Retriever(corpus)
    server = make_server(bm25, port=0, max_queries=4)
    url = serve(server)
    queries = [f"capital {i}" for i in range(10)] + ["Hamlet", "river"]
    assert RemoteRetriever(url, max_queries=4).search(queries) == bm25.search(queries)
    with pytest.raises(retriever.RetrieverError, match="HTTP 400"):  # unsplit: refused
        RemoteRetriever(url, max_queries=100, retries=1).search(queries)
    server.shutdown()
    server.server_close()
    # the project's client never sends what the project's server refuses
    assert RemoteRetriever("http://x").max_queries == retriever.MAX_QUERIES
