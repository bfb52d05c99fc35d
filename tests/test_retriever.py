"""Tests for retriever.py on a ten-passage corpus and loopback servers (127.0.0.1 only)."""

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import prepare
import retriever
from machinery import bm25 as inverted  # "bm25" names the fixture below
from machinery import loaders
from retriever import (
    BM25Retriever,
    InputError,
    Passage,
    RemoteRetriever,
    RetrieverError,
    format_passages,
    load_corpus,
    make_server,
    parse_contents,
)

PASSAGES = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Berlin", "Berlin is the capital of Germany and its largest city."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("Mount Everest", "Mount Everest is the highest mountain above sea level, in the Himalayas."),
    (
        "Python (programming language)",
        "Python is a programming language created by Guido van Rossum.",
    ),
    ("Amazon River", "The Amazon is the largest river by discharge volume of water in the world."),
    ("Marie Curie", "Marie Curie was a physicist and chemist who won two Nobel Prizes."),
    (
        "Great Wall of China",
        "The Great Wall of China is a series of fortifications in northern China.",
    ),
    ("Photosynthesis", "Photosynthesis converts light energy into chemical energy in plants."),
    ("Moon", "The Moon is the only natural satellite of the Earth."),
]
QUERIES = [
    "who wrote hamlet",
    "capital of germany",
    "highest mountain",
    "Nobel prize physicist",
    "zzz unknown",
    "",
]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def corpus_file(tmp_path: Path) -> str:
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": str(i), "contents": f'"{t}"\n{x}'}) + "\n"
            for i, (t, x) in enumerate(PASSAGES)
        ),
        encoding="utf-8",
    )
    return str(path)


@pytest.fixture
def bm25(corpus_file: str) -> BM25Retriever:
    return BM25Retriever(corpus_file)


def serve(server: http.server.HTTPServer) -> str:
    """Run server in a daemon thread; return its URL."""
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return f"http://127.0.0.1:{server.server_address[1]}/retrieve"


@pytest.fixture
def server_url(bm25: BM25Retriever):
    server = make_server(bm25, port=0, max_queries=4, max_query_chars=50, max_topk=5)
    yield serve(server)
    server.shutdown()
    server.server_close()


@pytest.fixture
def stub():
    """stub(replies) -> (url, hits): a server answering the i-th request with replies[min(i, last)],
    each reply (status, body bytes, seconds to sleep first); hits[0] counts the requests."""
    servers = []

    def start(replies: list[tuple[int, bytes, float]]):
        hits = [0]

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                status, body, delay = replies[min(hits[0], len(replies) - 1)]
                hits[0] += 1
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client timed out and left
                    pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        return serve(server), hits

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def post(url: str, body: bytes) -> tuple[int, dict]:
    """Raw POST: (status, JSON body), for requests RemoteRetriever would refuse to send."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=body, method="POST"), timeout=5
        ) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ok_body(n_queries: int) -> bytes:
    hit = {"document": {"id": "9", "contents": '"T"\nx'}, "score": 1.5}
    return json.dumps({"result": [[hit]] * n_queries}).encode()


def test_parse_contents():
    assert parse_contents('"Paris"\nParis is a city.') == ("Paris", "Paris is a city.")
    assert parse_contents("no newline here") == ("", "no newline here")
    assert parse_contents('"Say "Hi""\ntext\nmore') == (
        'Say "Hi"',
        "text\nmore",
    )  # only the outer quotes go


def test_format_passages_search_r1_form():
    ps = [Passage("0", "T1", "one two three four", 1.0), Passage("1", "T2", "five six", 0.5)]
    assert (
        format_passages(ps) == 'Doc 1(Title: "T1") one two three four\nDoc 2(Title: "T2") five six'
    )
    assert (
        format_passages(ps, max_words=2)
        == 'Doc 1(Title: "T1") one two\nDoc 2(Title: "T2") five six'
    )
    assert format_passages([]) == ""


def test_bm25_rare_word_first(bm25: BM25Retriever):
    assert len(bm25) == 10
    assert bm25.search(["Shakespeare"])[0][0].title == "Hamlet"
    top = bm25.search(["who discovered photosynthesis in plants"], topk=1)[0]
    assert [p.id for p in top] == ["8"] and top[0].score > 0


def test_bm25_batch_equals_single_and_topk(bm25: BM25Retriever):
    batch = bm25.search(QUERIES, topk=4)
    assert batch == [bm25.search([q], topk=4)[0] for q in QUERIES]
    assert batch == bm25.search(QUERIES, topk=4)  # deterministic
    assert [len(hits) for hits in batch] == [4] * len(QUERIES)
    assert len(bm25.search(["moon"], topk=50)[0]) == 10
    for hits in batch:
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_bm25_empty_query_and_ties_keep_corpus_order(bm25: BM25Retriever):
    for query in ["", "   ", "?!"]:
        hits = bm25.search([query], topk=3)[0]
        assert [p.id for p in hits] == ["0", "1", "2"] and all(p.score == 0.0 for p in hits)
    # 10 equal passages among 40: numpy's default (quick)sort would shuffle them, the stable sort
    # must not
    rows = [
        {"id": str(i), "contents": "needle here" if i % 4 == 0 else f"filler{i} text"}
        for i in range(40)
    ]
    assert [p.id for p in BM25Retriever(rows).search(["needle"], topk=10)[0]] == [
        str(i) for i in range(0, 40, 4)
    ]


def test_bm25_rejects_bad_arguments(bm25: BM25Retriever):
    with pytest.raises(TypeError):  # a bare string would otherwise be searched letter by letter
        bm25.search("hamlet")
    with pytest.raises(ValueError):
        bm25.search(["hamlet"], topk=0)
    assert bm25.search([]) == []


def test_remote_equals_in_memory(bm25: BM25Retriever, server_url: str):
    remote = RemoteRetriever(server_url, timeout=5)
    queries = QUERIES[:4]
    got, want = remote.search(queries, topk=3), bm25.search(queries, topk=3)
    for got_hits, want_hits in zip(got, want, strict=True):
        assert [(p.id, p.title, p.text) for p in got_hits] == [
            (p.id, p.title, p.text) for p in want_hits
        ]
        assert got_hits[0].score == pytest.approx(want_hits[0].score, abs=1e-9)
        assert all(abs(g.score - w.score) <= 1e-9 for g, w in zip(got_hits, want_hits))


def test_server_schema_and_return_scores_false(bm25: BM25Retriever, server_url: str):
    status, body = post(
        server_url, json.dumps({"queries": ["hamlet"], "topk": 1, "return_scores": True}).encode()
    )
    assert status == 200
    assert body["result"][0][0]["document"] == {
        "id": "2",
        "contents": f'"Hamlet"\n{PASSAGES[2][1]}',
    }
    assert isinstance(body["result"][0][0]["score"], float)
    status, body = post(
        server_url, json.dumps({"queries": ["hamlet"]}).encode()
    )  # Search-R1 defaults
    assert status == 200 and len(body["result"][0]) == 3 and body["result"][0][0]["id"] == "2"


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"not json", "not JSON"),
        (b'{"topk": 3}', "queries"),
        (b'{"queries": "hamlet"}', "queries"),
        (b'{"queries": ["ok", 3]}', "queries"),
        (b'{"queries": ["a", "b", "c", "d", "e"]}', "too many"),
        (json.dumps({"queries": ["x" * 51]}).encode(), "longer than 50"),
        (b'{"queries": ["a"], "topk": 0}', "topk"),
        (b'{"queries": ["a"], "topk": 6}', "topk"),
        (b'{"queries": ["a"], "topk": "3"}', "topk"),
        (b'{"queries": ["a"], "topk": true}', "topk"),
    ],
)
def test_server_rejects_bad_requests_and_keeps_serving(server_url: str, body: bytes, reason: str):
    status, answer = post(server_url, body)
    assert status == 400 and reason in answer["error"]
    assert len(RemoteRetriever(server_url, timeout=5).search(["hamlet"], topk=5)[0]) == 5


def test_server_unknown_path_404(server_url: str):
    assert post(server_url.replace("/retrieve", "/search"), b'{"queries": ["a"]}')[0] == 404


def test_remote_connection_refused_names_url():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/retrieve"
    with pytest.raises(RetrieverError, match=r"after 3 tries") as err:
        RemoteRetriever(url, timeout=1, retries=3, backoff=0.01).search(["q"])
    assert url in str(err.value)


def test_remote_retries_500_then_succeeds(stub):
    url, hits = stub([(500, b'{"error": "boom"}', 0), (200, ok_body(2), 0)])
    result = RemoteRetriever(url, timeout=2, retries=3, backoff=0.01).search(["a", "b"])
    assert hits[0] == 2 and result[1] == [Passage("9", "T", "x", 1.5)]


def test_remote_4xx_not_retried(stub):
    url, hits = stub([(400, b'{"error": "bad topk"}', 0)])
    with pytest.raises(RetrieverError, match=r"HTTP 400.*bad topk.*after 1 tries"):
        RemoteRetriever(url, timeout=2, retries=3, backoff=0.01).search(["a"])
    assert hits[0] == 1


@pytest.mark.parametrize(
    "body",
    [
        b"<html>not json</html>",
        b'{"results": []}',  # misspelt key
        b'{"result": [[]]}',  # one list for two queries
        b'{"result": [{"document": {"id": "1", "contents": "x"}}, []]}',  # not a list of lists
        b'{"result": [[{"document": {"id": "1"}}], []]}',  # no contents
        b'{"result": [[{"document": {"id": "1", "contents": "x"}, "score": "high"}], []]}',
    ],
)
def test_remote_bad_bodies_raise_after_retries(stub, body: bytes):
    url, hits = stub([(200, body, 0)])
    with pytest.raises(RetrieverError, match="after 2 tries"):
        RemoteRetriever(url, timeout=2, retries=2, backoff=0.01).search(["a", "b"])
    assert hits[0] == 2


def test_remote_accepts_bare_documents(stub):
    url, _ = stub([(200, b'{"result": [[{"id": "4", "contents": "\\"M\\"\\nmoon"}]]}', 0)])
    assert RemoteRetriever(url, timeout=2).search(["a"]) == [[Passage("4", "M", "moon", 0.0)]]


def test_remote_timeout(stub):
    url, hits = stub([(200, ok_body(1), 1.0)])
    start = time.monotonic()
    with pytest.raises(RetrieverError, match=url):
        RemoteRetriever(url, timeout=0.2, retries=2, backoff=0.01).search(["a"])
    assert hits[0] == 2 and time.monotonic() - start < 1.9  # waiting out both replies takes 2 s


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ('{"id": "0", "contents": "a"}\n{"id": "1", "contents": \n', 2, "not JSON"),
        ('{"id": "0", "contents": "a"}\n\n["a", "b"]\n', 3, "JSON object"),
        ('{"id": "0", "title": "a"}\n', 1, "contents"),
        ('{"id": "0", "contents": "a"}\n{"id": "1", "contents": "  "}\n', 2, "contents"),
        ('{"id": "0", "contents": 5}\n', 1, "contents"),
        (
            '{"id": "7", "contents": "a"}\n\n{"id": 7, "contents": "b"}\n',
            3,
            "duplicate id '7' (first on line 1)",
        ),
    ],
)
def test_load_corpus_errors_name_file_and_line(tmp_path: Path, text: str, line: int, problem: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_corpus(str(path))
    assert str(err.value).startswith(f"{path}:{line}: ") and problem in str(err.value)
    assert "\n" not in str(err.value)


def test_load_corpus_empty_and_missing(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match=r"empty\.jsonl: corpus is empty"):
        load_corpus(str(tmp_path / "empty.jsonl"))
    with pytest.raises(InputError, match=r"nope\.jsonl: no such file"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    (tmp_path / "punct.jsonl").write_text('{"contents": "?!"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"punct\.jsonl: corpus has no words"):
        BM25Retriever(str(tmp_path / "punct.jsonl"))


def test_load_corpus_bom_crlf_and_missing_id(tmp_path: Path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": "x", "contents": "\\"A\\"\\nfirst"}\r\n\r\n{"contents": "second"}\r\n'
    )
    rows = load_corpus(str(path))
    assert rows == [{"id": "x", "contents": '"A"\nfirst'}, {"id": "1", "contents": "second"}]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "retriever.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_bad_corpus_one_line_error(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "0", "contents": "a"}\n{oops\n', encoding="utf-8")
    done = run_cli("search", "--corpus", str(bad), "x")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {bad}:2: ")
    assert "Traceback" not in done.stderr


def test_cli_search_prints_passages(corpus_file: str):
    done = run_cli("search", "--corpus", corpus_file, "--topk", "2", "Shakespeare")
    assert done.returncode == 0
    assert (
        'Doc 1(Title: "Hamlet") Hamlet is a tragedy' in done.stdout and "Doc 3(" not in done.stdout
    )


def test_cli_search_remote(server_url: str):
    done = run_cli("search", "--url", server_url, "--topk", "1", "Shakespeare", "Everest")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Doc 1(") == 2 and 'Doc 1(Title: "Mount Everest")' in done.stdout


def test_module_runs_nothing_at_import():
    assert retriever.__name__ == "retriever" and callable(retriever.main)


def test_client_speaks_search_r1_schema_and_renders_as_search_r1():
    """Against a server that answers as Search-R1's retrieval_server.py does (FastAPI, e5 over
    wiki-18): the request body is exactly {"queries", "topk", "return_scores": true} as JSON on
    POST /retrieve, and the passages render as Search-R1's _passages2string (title line kept with
    its quotes, rest as text)."""
    seen = []
    wiki18 = [
        {"id": "12", "contents": '"Evan Morris"\nEvan L. Morris (1977-2015) was a lobbyist.'},
        {"id": "7", "contents": '"Hamlet"\nHamlet is a tragedy.\nIt was written by Shakespeare.'},
    ]

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers["Content-Type"], body))
            result = [
                [
                    {"document": doc, "score": 0.9 - 0.1 * i}
                    for i, doc in enumerate(wiki18[: body["topk"]])
                ]
                for _ in body["queries"]
            ]
            data = json.dumps({"result": result}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    try:
        url = serve(server)
        hits = RemoteRetriever(url, timeout=5).search(["who was evan morris", "hamlet"], topk=2)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [
        (
            "/retrieve",
            "application/json",
            {"queries": ["who was evan morris", "hamlet"], "topk": 2, "return_scores": True},
        )
    ]
    assert [p.score for p in hits[0]] == pytest.approx([0.9, 0.8])
    search_r1 = "".join(
        f"Doc {i + 1}(Title: {d['contents'].split(chr(10))[0]}) "
        f"{chr(10).join(d['contents'].split(chr(10))[1:])}\n"
        for i, d in enumerate(wiki18)
    )
    assert (
        format_passages(hits[1]) == search_r1.strip()
    )  # Search-R1 strips the block before inserting it


# The inverted index (bm25.py): BM25Retriever's default, held equal to rank_bm25, its readable twin.


def offline_data() -> dict:
    try:
        return prepare.default_data()
    except InputError as e:  # the data package is missing: nothing to compare on
        pytest.skip(str(e))


@pytest.mark.slow
def test_index_equals_rank_bm25_on_the_offline_default():
    """Every committed result used rank_bm25: on the offline corpus the index must give the same
    top-k, in the same order with the same scores, for all 751 test and the first 1,000 train
    questions, and the same score for every passage (bitwise) on 200 of them."""
    data = offline_data()
    rows = load_corpus(data["corpus"])
    fast, twin = BM25Retriever(rows), BM25Retriever(rows, backend="rank_bm25")
    questions = [q["question"] for q in loaders.load_questions(data["test"])]
    questions += [q["question"] for q in loaders.load_questions(data["train"])[:1000]]
    assert len(questions) == 1751
    assert fast.search(questions, topk=5) == twin.search(questions, topk=5)
    for q in questions[::9]:
        words = retriever.tokenize(q)[: retriever.MAX_QUERY_WORDS]
        assert np.array_equal(fast.bm25.get_scores(words), twin.bm25.get_scores(words)), q


@pytest.mark.parametrize(
    "texts",
    [
        # "common" in 5 of 6 passages: a negative idf, floored to epsilon * mean idf; equal passages
        # tie
        [
            "common rare one",
            "common two",
            "common two",
            "common three three",
            "common",
            "other words here",
        ],
        # most words in most passages: the mean idf, and so the floor, is negative; a passage
        # without the
        # query's words (score 0) then ranks above those with them (negative scores)
        ["x y v", "x y v", "x y v z", "w", "x y v"],
    ],
)
def test_index_equals_rank_bm25_with_negative_idf_ties_and_repeated_words(texts: list[str]):
    rows = [{"id": str(i), "contents": t} for i, t in enumerate(texts)]
    fast, twin = BM25Retriever(rows), BM25Retriever(rows, backend="rank_bm25")
    queries = [
        "common",
        "common common rare",
        "two three",
        "x",
        "x x y",
        "y z",
        "unknown",
        "",
        "w x",
        "rare " * 40 + "two",
    ]  # the first 32 words only: "two" is not scored
    for q in queries:
        words = retriever.tokenize(q)[: retriever.MAX_QUERY_WORDS]
        assert np.array_equal(fast.bm25.get_scores(words), twin.bm25.get_scores(words)), q
        for k in range(1, len(rows) + 2):
            assert fast.search([q], topk=k) == twin.search([q], topk=k), (q, k)
    if texts[0] == "x y v":  # the floor is negative: "w" (no x) first, then the longest passage
        assert fast.bm25.idf[fast.bm25.term_ids["x"]] < 0 and [
            p.id for p in fast.search(["x"], 2)[0]
        ] == ["3", "2"]


def test_top_k_is_the_stable_argsort_with_ties_zeros_and_negatives():
    """bm25.top_k skips sorting all N (a sampled bound, then the candidates above it): it must still
    pick exactly np.argsort(-scores, kind="stable")[:k], ties in corpus order."""
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 5000))
        scores = rng.integers(-2, 4, n).astype(float) * rng.choice(
            [1.0, 0.5]
        )  # few values: many ties
        if trial % 3 == 0:
            scores[rng.random(n) < 0.9] = 0.0  # mostly untouched passages
        for k in (1, 3, 50, n - 1, n, n + 5):
            if k >= 1:
                assert np.array_equal(
                    inverted.top_k(scores, k), np.argsort(-scores, kind="stable")[:k]
                ), (n, k)


def test_build_in_chunks_and_into_a_folder_gives_the_same_index(tmp_path: Path):
    """The build merges per-chunk postings; three passages a chunk give the one-chunk arrays."""
    tokens = [retriever.tokenize(f"{t} {x}") for t, x in PASSAGES] * 3
    one = inverted.build(tokens)
    for index in (inverted.build(tokens, chunk=3), inverted.build(tokens, str(tmp_path), chunk=3)):
        assert index.words == one.words
        for name in inverted.ARRAYS:
            assert np.array_equal(getattr(index, name), getattr(one, name)), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{name}.npy" for name in inverted.ARRAYS
    )


def test_saved_index_is_memory_mapped_and_answers_as_the_in_memory_one(tmp_path: Path):
    from machinery.corpus import CorpusFile  # (the corpus_file fixture hides the module's name)

    path = (
        tmp_path / "win.jsonl"
    )  # a BOM, CRLF, a blank line, a missing id: read back from the file
    path.write_bytes(
        b'\xef\xbb\xbf{"id": "x", "contents": "\\"A\\"\\nfirst words"}\r\n\r\n'
        + "".join(json.dumps({"contents": f'"{t}"\n{x}'}) + "\r\n" for t, x in PASSAGES).encode()
    )
    folder = str(tmp_path / "index")
    built = BM25Retriever(str(path), index=folder)
    loaded = BM25Retriever(str(path), index=folder)  # the second time: loaded, not built
    assert isinstance(loaded.bm25.doc_ids, np.memmap) and isinstance(loaded.passages, CorpusFile)
    memory = BM25Retriever(str(path))
    for k in (1, 3, 11, 20):
        assert (
            built.search(QUERIES + ["first"], k)
            == loaded.search(QUERIES + ["first"], k)
            == memory.search(QUERIES + ["first"], k)
        )
    assert [loaded.passages[i].id for i in (0, 1, 10)] == ["x", "1", "10"]
    assert loaded.passages[0].title == "A" and loaded.passages[3].text == PASSAGES[2][1]


def test_saved_index_of_another_corpus_or_damaged_is_refused_in_one_line(
    tmp_path: Path, corpus_file: str
):
    folder = tmp_path / "index"
    BM25Retriever(corpus_file, index=str(folder))
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "0", "contents": "another corpus"}\n', encoding="utf-8")
    cases = []
    with pytest.raises(InputError) as err:
        BM25Retriever(str(other), index=str(folder))
    cases.append((err, "meta.json: corpus_bytes"))
    (folder / "words.txt").write_text("too\nfew", encoding="utf-8")
    with pytest.raises(InputError) as err:
        BM25Retriever(corpus_file, index=str(folder))
    cases.append((err, "words.txt: 2 entries"))
    doc_ids = folder / "doc_ids.npy"
    doc_ids.write_bytes(doc_ids.read_bytes()[:-8])  # truncated
    with pytest.raises(InputError) as err:
        BM25Retriever(corpus_file, index=str(folder))
    cases.append((err, "doc_ids.npy: unreadable saved index"))
    (folder / "meta.json").unlink()
    with pytest.raises(InputError) as err:  # a folder with files but no index: not overwritten
        BM25Retriever(corpus_file, index=str(folder))
    cases.append((err, "neither a saved index"))
    with pytest.raises(InputError) as err:
        BM25Retriever(corpus_file, index=corpus_file)
    cases.append((err, "not a folder"))
    for err, problem in cases:
        assert problem in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert (folder / "doc_ids.npy").exists()  # nothing deleted


def test_cli_search_and_serve_with_an_index_folder(tmp_path: Path, corpus_file: str):
    folder = str(tmp_path / "index")
    for _ in range(2):  # built, then loaded
        done = run_cli(
            "search", "--corpus", corpus_file, "--index", folder, "--topk", "1", "Shakespeare"
        )
        assert done.returncode == 0, done.stderr
        assert 'Doc 1(Title: "Hamlet")' in done.stdout and "Doc 2(" not in done.stdout
    for args in (
        ["search", "--url", "http://127.0.0.1:9/retrieve", "--index", folder, "x"],
        ["search", "--corpus", corpus_file, "--index", "", "x"],
        ["serve", "--corpus", corpus_file, "--index", corpus_file],
    ):
        done = run_cli(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
