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

import pytest

import retriever
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
    # 10 equal passages among 40: numpy's default (quick)sort would shuffle them, the stable sort must not
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
    """Against a server that answers as Search-R1's retrieval_server.py does (FastAPI, e5 over wiki-18):
    the request body is exactly {"queries", "topk", "return_scores": true} as JSON on POST /retrieve, and
    the passages render as Search-R1's _passages2string (title line kept with its quotes, rest as text)."""
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
