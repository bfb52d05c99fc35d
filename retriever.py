"""Retrieval for igsearch: BM25 over a wiki-18 style corpus, and the Search-R1 HTTP server.

Corpus (wiki-18, as Search-R1 and FlashRAG ship it): JSON lines {"id": "0", "contents":
"\\"Title\\"\\ntext"}. Server and client speak the Search-R1 schema: POST /retrieve with {"queries":
[str], "topk": int, "return_scores": true} -> {"result": [[{"document": {"id", "contents"}, "score":
float}, ...], ...]}. Passages render as Search-R1 does: 'Doc i(Title: "T") text', one per line.

    python retriever.py serve --corpus corpus.jsonl --port 8000
    python retriever.py search --corpus corpus.jsonl --topk 3 "who wrote hamlet"
    python retriever.py serve --corpus wiki-18.jsonl --index wiki-18.bm25  # built once, then mapped
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import http.server
import itertools
import json
import os
import re
import socket
import stat
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace

import numpy as np
from rank_bm25 import BM25Okapi
from tqdm import tqdm

import bm25
from errors import InputError, OneLineParser


class RetrieverError(RuntimeError):
    """The remote retriever could not answer; message names the URL and the last error."""


@dataclass
class Passage:
    id: str
    title: str
    text: str
    score: float


def parse_contents(contents: str) -> tuple[str, str]:
    """'"Title"\\ntext' -> ("Title", "text"); without a newline the whole string is the text."""
    title, newline, text = contents.partition("\n")
    if not newline:
        return "", contents
    title = title.strip()
    # remove one pair only: titles may hold quotes
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1]
    return title, text


def format_passages(passages: list[Passage], max_words: int | None = None) -> str:
    """Search-R1 rendering; max_words keeps each text's first words (short CPU runs)."""
    lines = []
    for i, p in enumerate(passages, 1):
        text = p.text
        if max_words is not None and len(text.split()) > max_words:
            text = " ".join(text.split()[:max_words])
        lines.append(f'Doc {i}(Title: "{p.title}") {text}')
    return "\n".join(lines)


def tokenize(text: str) -> list[str]:
    """Lower-case \\w+ words; the same function for corpus and queries."""
    return re.findall(r"\w+", text.lower())


MAX_LINE_BYTES = 1 << 20  # a JSON-lines row over 1 MiB is no passage or question: refused
MAX_QUERY_WORDS = 32  # BM25 scores a query's first 32 words: bounds the work of one query
# what `retriever.py serve` accepts by default, and what RemoteRetriever splits its batches to
MAX_QUERIES, MAX_QUERY_CHARS, MAX_TOPK, MAX_THREADS = 64, 2000, 50, 4
MAX_CONNECTIONS, READ_TIMEOUT = 64, 10.0  # connections read at once; seconds to read one request
MAX_WAIT = 86400  # the longest deadline accepted, in seconds (a day)
MAX_RESPONSE_BYTES = 1 << 28  # an answer over 256 MiB is refused, not held in memory


def read_lines(path: str, max_bytes: int = MAX_LINE_BYTES):
    """Yield (line number, bytes) of a regular file, each line at most max_bytes.

    A FIFO (which would wait for a writer forever), a device such as /dev/zero (one endless line)
    or a runaway line is refused with an InputError, never read without bound.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise InputError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        for lineno in itertools.count(1):
            raw = f.readline(max_bytes + 2)  # + 2: a line of max_bytes may end in "\r\n"
            if not raw:
                return
            if len(raw.rstrip(b"\r\n")) > max_bytes:
                raise InputError(f"{path}:{lineno}: line longer than {max_bytes} bytes, refused")
            yield lineno, raw


def load_corpus(path: str) -> list[dict]:
    """Read and check a JSON-lines corpus -> [{"id": str, "contents": str}]; a missing id is the row
    index."""
    return [row for _, row in iter_corpus(path)]


def iter_corpus(path: str):
    """Yield (byte offset of its line, {"id": str, "contents": str}) for each row of a checked
    corpus."""
    rows, offset = 0, 0
    first_line: dict[str, int] = {}  # id -> line it was first seen on, for the duplicate message
    try:
        for lineno, raw in read_lines(path):  # bytes, decoded per line: a bad byte gets its line
            offset += len(raw)
            where = f"{path}:{lineno}"
            try:  # a BOM may open the file; the \r of CRLF is JSON whitespace
                line = raw.removeprefix(codecs.BOM_UTF8 if lineno == 1 else b"").decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{where}: not UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            contents = row.get("contents")
            if not isinstance(contents, str) or not contents.strip():
                raise InputError(f"{where}: 'contents' missing, empty or not a string")
            try:  # a lone surrogate (\ud800 is valid JSON) would stop a tokenizer mid-run
                contents.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(
                    f"{where}: 'contents' holds {contents[e.start]!r} at character "
                    f"{e.start}, not valid Unicode (a lone surrogate)"
                ) from None
            doc_id = row.get("id", rows)
            if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
                raise InputError(f"{where}: 'id' must be a string or an integer")
            doc_id = str(doc_id)
            if doc_id in first_line:
                raise InputError(
                    f"{where}: duplicate id '{doc_id}' (first on line {first_line[doc_id]})"
                )
            first_line[doc_id] = lineno
            rows += 1
            yield offset - len(raw), {"id": doc_id, "contents": contents}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:  # a directory, no permission, ...
        raise InputError(f"{path}: {e.strerror}") from None
    if not rows:
        raise InputError(f"{path}: corpus is empty")


def _check_args(queries: list[str], topk: int) -> None:
    if isinstance(queries, str):  # a bare string would be searched character by character
        raise TypeError("queries must be a list of strings, not a string")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")


class CorpusFile:
    """The passages of a corpus file, each read when asked for at its byte offset: 21 M passages as
    Python objects would not fit in memory. offsets: (N + 1,), the last one the file's size."""

    def __init__(self, path: str, offsets: np.ndarray):
        self.path, self.offsets = path, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Passage:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            raw = f.read(int(self.offsets[i + 1] - self.offsets[i])).split(b"\n", 1)[0]
        row = json.loads(raw.removeprefix(codecs.BOM_UTF8))  # the file was checked when indexed
        return Passage(str(row.get("id", i)), *parse_contents(row["contents"]), 0.0)


def fingerprint(path: str) -> str:
    """A hash of a file's size and of 16 blocks of 64 KiB spread over it: a check, cheap on a 14 GB
    corpus, that a saved index belongs to this file."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(16):
            f.seek(size * k // 16)
            digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def open_index(corpus: str, folder: str) -> tuple[bm25.BM25Index, CorpusFile]:
    """The BM25 index of a corpus file saved in folder, memory-mapped; built from the file and saved
    there first when folder does not exist or is empty. Another corpus's index is refused."""
    try:
        size = os.path.getsize(corpus)
        facts = {"corpus_bytes": size, "corpus_fingerprint": fingerprint(corpus)}
    except OSError as e:
        raise InputError(f"{corpus}: {e.strerror}") from None

    def build(work: str) -> dict:
        offsets = []  # of each row's line, then the file's end
        rows = tqdm(
            iter_corpus(corpus),
            desc=f"indexing {corpus}",
            unit=" passages",
            mininterval=10,
            disable=None,
        )
        index = bm25.build(
            (
                offsets.append(at) or tokenize(" ".join(parse_contents(row["contents"])))
                for at, row in rows
            ),
            work,
        )
        if index.offsets[-1] == 0:
            raise InputError(f"{corpus}: corpus has no words")
        return {
            "index": index,
            "passage_offsets": np.array(offsets + [size]),
            "corpus": os.path.abspath(corpus),
        }

    index, extra = bm25.open_folder(folder, facts, build, ("passage_offsets",))
    if len(extra["passage_offsets"]) != len(index) + 1:
        raise InputError(
            f"{os.path.join(folder, 'passage_offsets.npy')}: {len(extra['passage_offsets'])} "
            f"entries, expected {len(index) + 1}: a damaged index (delete {folder} to rebuild)"
        )
    return index, CorpusFile(corpus, extra["passage_offsets"])


class BM25Retriever:
    """BM25 over tokenize(title + " " + text), scored from an inverted index (bm25.py) equal to
    rank_bm25.BM25Okapi bitwise; backend="rank_bm25" runs that library itself (the readable twin,
    ~50x slower). index: a folder for the index of a corpus file, built there once, then
    memory-mapped."""

    def __init__(self, corpus: str | list[dict], backend: str = "index", index: str | None = None):
        if backend not in ("index", "rank_bm25") or (
            index and (backend != "index" or not isinstance(corpus, str))
        ):
            raise ValueError(
                f"backend {backend!r} with index {index!r}: a saved index is of a corpus file"
            )
        self.backend = backend
        if index:
            self.bm25, self.passages = open_index(corpus, index)
            return
        rows = load_corpus(corpus) if isinstance(corpus, str) else corpus
        if not rows:
            raise InputError("corpus is empty")
        self.passages = [
            Passage(str(r.get("id", i)), *parse_contents(r["contents"]), 0.0)
            for i, r in enumerate(rows)
        ]
        tokens = [tokenize(p.title + " " + p.text) for p in self.passages]
        if not any(tokens):  # BM25Okapi would divide by the (zero) vocabulary size
            raise InputError(
                f"{corpus if isinstance(corpus, str) else 'corpus'}: corpus has no words"
            )
        self.bm25 = BM25Okapi(tokens) if backend == "rank_bm25" else bm25.build(tokens)

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, queries: list[str], topk: int = 3) -> list[list[Passage]]:
        """Top-k passages per query (its first MAX_QUERY_WORDS words); ties (and an empty query: all
        zeros) keep corpus order."""
        _check_args(queries, topk)
        results = []
        for query in queries:
            scores = self.bm25.get_scores(tokenize(query)[:MAX_QUERY_WORDS])  # (N,)
            if self.backend == "rank_bm25":
                order = np.argsort(-scores, kind="stable")[:topk]  # ties: corpus order
            else:
                order = bm25.top_k(scores, topk)  # the same order, without sorting all N
            results.append([replace(self.passages[i], score=float(scores[i])) for i in order])
        return results


def _parse_result(payload: object, n_queries: int, topk: int) -> list[list[Passage]]:
    """Validate a Search-R1 response; items are {"document", "score"} or bare documents."""
    result = payload.get("result") if isinstance(payload, dict) else None
    if not isinstance(result, list) or len(result) != n_queries:
        raise ValueError(f"expected 'result' as a list of {n_queries} lists")
    out = []
    for hits in result:
        if not isinstance(hits, list):
            raise ValueError("expected 'result' as a list of lists")
        passages = []
        for item in hits[:topk]:  # a server that ignores topk must not inflate the context
            if isinstance(item, dict) and isinstance(item.get("document"), dict):
                doc, score = item["document"], item.get("score", 0.0)
            # return_scores=false servers: bare documents
            elif isinstance(item, dict) and "contents" in item:
                doc, score = item, 0.0
            else:
                raise ValueError("a result item is neither {document, score} nor a document")
            if not isinstance(doc.get("contents"), str):
                raise ValueError("a result document has no 'contents' string")
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise ValueError(f"score is not a number: {score!r}")
            passages.append(
                Passage(str(doc.get("id", "")), *parse_contents(doc["contents"]), float(score))
            )
        out.append(passages)
    return out


class HTTPStatusError(Exception):
    def __init__(self, code: int, reason: str, body: bytes):
        super().__init__(f"HTTP {code} {reason}: {body[:200].decode('utf-8', 'replace')}")
        self.code = code


def post_within(
    url: str, body: bytes, timeout: float, max_bytes: int = MAX_RESPONSE_BYTES
) -> bytes:
    """POST body and return the response body, the whole exchange (connect, send, headers, every
    byte of the body) within `timeout` seconds: a socket timeout alone bounds each read, and a
    server that sends a byte a second would never trip it. A timer shuts the socket down at the
    deadline, which ends whatever read is waiting."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port, timeout=timeout)
    expired, sock = threading.Event(), []  # sock: the connected socket (conn lets go of it early)

    def expire() -> None:
        expired.set()
        for s in sock:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.connect()  # (bounded by the socket timeout)
        sock.append(conn.sock)
        if expired.is_set():
            raise TimeoutError
        conn.request("POST", path or "/", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"the answer is longer than {max_bytes} bytes")
        if expired.is_set():
            raise TimeoutError
        if response.status >= 400:
            raise HTTPStatusError(response.status, response.reason, data)
        return data
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set():
            raise TimeoutError(f"no whole answer within {timeout:g} s") from None
        raise e
    finally:
        timer.cancel()
        conn.close()


class RemoteRetriever:
    """Client of a Search-R1 retrieval server; url is the full endpoint (…/retrieve)."""

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_queries: int = MAX_QUERIES,
        max_bytes: int = MAX_RESPONSE_BYTES,
    ):
        if retries < 1:
            raise ValueError("retries counts tries and must be at least 1")
        if not 0 < timeout <= MAX_WAIT:  # (a timer of more than ~9e9 s fails in its thread)
            raise InputError(
                f"retriever timeout {timeout!r}: out of range (accepted: seconds in "
                f"(0, {MAX_WAIT}])"
            )
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"retriever URL {url!r}: not http(s)://HOST[:PORT]/PATH")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.max_queries = max_queries  # a request holds at most this many (the server's cap)
        self.max_bytes = max_bytes  # the largest answer read

    def search(self, queries: list[str], topk: int = 3) -> list[list[Passage]]:
        """POST the batch in requests of at most max_queries queries (each request retried on
        connection errors, timeouts, 5xx and bad bodies, never on 4xx). Each try has `timeout`
        seconds from connect to the last byte."""
        _check_args(queries, topk)
        return [
            hits
            for k in range(0, len(queries), self.max_queries)
            for hits in self._post(queries[k : k + self.max_queries], topk)
        ]

    def _post(self, queries: list[str], topk: int) -> list[list[Passage]]:
        body = json.dumps({"queries": list(queries), "topk": topk, "return_scores": True}).encode()
        last = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = post_within(self.url, body, self.timeout, self.max_bytes)
                return _parse_result(json.loads(answer), len(queries), topk)
            except HTTPStatusError as e:
                last = str(e)
                if e.code < 500:  # the request itself is wrong: asking again will not help
                    break
            except (OSError, http.client.HTTPException) as e:  # refused, timed out, dropped
                last = (
                    f"{type(e).__name__}: {e.strerror or e}"
                    if isinstance(e, OSError)
                    else f"{type(e).__name__}: {e}"
                )
            except ValueError as e:  # non-JSON body (JSONDecodeError) or wrong shape
                last = f"bad response: {e}"
        raise RetrieverError(f"retriever {self.url}: {last} (after {attempt + 1} tries)")


def check_server_limits(limits: dict) -> None:
    """Every limit of make_server in range, else one line naming it (max_threads 0 would serve
    nothing, a negative read_timeout would cut every request)."""
    for name, value in limits.items():
        low = 0 if name == "port" else 1
        if name == "read_timeout":
            ok = isinstance(value, (int, float)) and 0 < value <= MAX_WAIT
        else:
            ok = isinstance(value, int) and low <= value <= (65535 if name == "port" else 10**6)
        if not ok:
            accepted = (
                f"seconds in (0, {MAX_WAIT}]"
                if name == "read_timeout"
                else ("0..65535 (0: a free port)" if name == "port" else "an integer >= 1")
            )
            raise InputError(f"--{name} {value!r}: out of range (accepted: {accepted})")


def make_server(
    retriever: BM25Retriever,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_queries: int = MAX_QUERIES,
    max_query_chars: int = MAX_QUERY_CHARS,
    max_topk: int = MAX_TOPK,
    max_threads: int = MAX_THREADS,
    max_connections: int = MAX_CONNECTIONS,
    read_timeout: float = READ_TIMEOUT,
) -> http.server.ThreadingHTTPServer:
    """A Search-R1 compatible POST /retrieve server (not started: call serve_forever).

    The work of one request is bounded (max_queries queries of their first MAX_QUERY_WORDS words,
    top-k at most max_topk), and so are the searches run at once (max_threads: the next request
    waits for a slot), the connections read at once (max_connections: the next one waits to be
    accepted) and the time to read one request, headers and body (read_timeout seconds, then the
    connection is cut): clients that trickle their requests cannot hold the searches."""
    check_server_limits(
        dict(
            port=port,
            max_queries=max_queries,
            max_query_chars=max_query_chars,
            max_topk=max_topk,
            max_threads=max_threads,
            max_connections=max_connections,
            read_timeout=read_timeout,
        )
    )
    searches = threading.BoundedSemaphore(max_threads)

    def document(p: Passage) -> dict:
        """A wiki-18 row again: the inverse of parse_contents."""
        return {"id": p.id, "contents": f'"{p.title}"\n{p.text}'}

    def read_request(body: bytes) -> tuple[list[str], int, bool]:
        """Validate a request body; ValueError's message becomes the 400 reason."""
        try:
            request = json.loads(body)
        except ValueError:
            raise ValueError("body is not JSON") from None
        queries = request.get("queries") if isinstance(request, dict) else None
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise ValueError("'queries' must be a list of strings")
        if len(queries) > max_queries:
            raise ValueError(f"too many queries: {len(queries)} > {max_queries}")
        if any(len(q) > max_query_chars for q in queries):
            raise ValueError(f"a query is longer than {max_query_chars} characters")
        topk = request.get("topk", 3)  # optional in Search-R1: the server's default when absent
        topk = 3 if topk is None else topk
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= max_topk:
            raise ValueError(f"'topk' must be an integer in 1..{max_topk}")
        return_scores = request.get("return_scores", False)  # Search-R1's default
        if not isinstance(return_scores, bool):
            raise ValueError("'return_scores' must be true or false")
        return queries, topk, return_scores

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = read_timeout  # per socket operation; the watchdog bounds the whole read

        def setup(self) -> None:
            super().setup()
            self.watchdog = threading.Timer(read_timeout, self.cut)
            self.watchdog.daemon = True
            self.watchdog.start()

        def cut(self) -> None:
            """The request was not read within read_timeout: end the connection (a trickle of a
            byte a second would pass every per-read timeout)."""
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def finish(self) -> None:
            self.watchdog.cancel()
            super().finish()

        # one stderr line per request is noise
        def log_message(self, format: str, *args: object) -> None:
            pass

        def reply(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (its timeout) or was cut: no one to tell
                pass

        def do_GET(self) -> None:
            self.reply(405 if self.path == "/retrieve" else 404, {"error": "use POST /retrieve"})

        def do_POST(self) -> None:
            if self.path != "/retrieve":
                return self.reply(404, {"error": f"unknown path {self.path}"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self.reply(400, {"error": "missing or bad Content-Length"})
            # '\\uXXXX': 6 bytes a char
            if not 0 <= length <= max_queries * (6 * max_query_chars + 16) + 1024:
                return self.reply(413, {"error": "request body too large"})
            try:
                body = self.rfile.read(length)
            except OSError:  # cut by the watchdog, or the client went away
                return
            self.watchdog.cancel()  # read in time: the search may wait for a slot
            if len(body) < length:  # the connection ended first
                return
            try:
                queries, topk, return_scores = read_request(body)
            except ValueError as e:
                return self.reply(400, {"error": str(e)})
            with searches:  # at most max_threads searches at once
                hits = retriever.search(queries, topk)
            result = [
                [
                    {"document": document(p), "score": p.score} if return_scores else document(p)
                    for p in found
                ]
                for found in hits
            ]
            self.reply(200, {"result": result})

    class BoundedServer(http.server.ThreadingHTTPServer):
        daemon_threads = True  # request threads must not keep the process alive on exit
        slots = threading.BoundedSemaphore(max_connections)

        def process_request(self, request, client_address):
            self.slots.acquire()  # at most max_connections in flight; the accept loop waits
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

    return BoundedServer((host, port), Handler)


def make_search(
    corpus: str,
    retriever_url: str,
    topk: int,
    doc_words: int | None,
    timeout: float = 30.0,
    retries: int = 3,
):
    """A `search(queries) -> documents text` function over BM25 (corpus) or a Search-R1 server
    (url)."""
    backend = (
        RemoteRetriever(retriever_url, timeout, retries) if retriever_url else BM25Retriever(corpus)
    )
    return lambda queries: [format_passages(p, doc_words) for p in backend.search(queries, topk)]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description="BM25 retrieval: Search-R1 server or one-off search.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve POST /retrieve")
    serve.add_argument("--corpus", required=True, help="JSON lines {id, contents}")
    serve.add_argument(
        "--index", help="folder of the corpus's BM25 index: built there once, then memory-mapped"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--max_queries", type=int, default=MAX_QUERIES, help="queries per request")
    serve.add_argument(
        "--max_query_chars", type=int, default=MAX_QUERY_CHARS, help="characters per query"
    )
    serve.add_argument("--max_topk", type=int, default=MAX_TOPK)
    serve.add_argument("--max_threads", type=int, default=MAX_THREADS, help="searches run at once")
    serve.add_argument(
        "--max_connections", type=int, default=MAX_CONNECTIONS, help="connections read at once"
    )
    serve.add_argument(
        "--read_timeout",
        type=float,
        default=READ_TIMEOUT,
        help="seconds to read one request before the connection is cut",
    )
    search = sub.add_parser("search", help="print the top passages for each query")
    source = search.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="JSON lines {id, contents}")
    source.add_argument(
        "--url", help="a running server's endpoint, e.g. http://127.0.0.1:8000/retrieve"
    )
    search.add_argument(
        "--index", help="with --corpus: folder of its BM25 index (built there once)"
    )
    search.add_argument("--topk", type=int, default=3)
    search.add_argument("queries", nargs="+", metavar="QUERY")
    try:
        args = parser.parse_args(argv)
        if args.index is not None and (not args.index.strip() or not args.corpus):
            raise InputError("--index: needs a folder name, and --corpus (not --url)")
        if args.command == "search":
            retriever = (
                RemoteRetriever(args.url)
                if args.url
                else BM25Retriever(args.corpus, index=args.index)
            )
            for query, hits in zip(args.queries, retriever.search(args.queries, args.topk)):
                print(f"# {query}\n{format_passages(hits)}")
            return 0
        limits = (
            "port",
            "max_queries",
            "max_query_chars",
            "max_topk",
            "max_threads",
            "max_connections",
            "read_timeout",
        )
        check_server_limits({k: getattr(args, k) for k in limits})
        local = BM25Retriever(args.corpus, index=args.index)
        server = make_server(
            local,
            args.host,
            args.port,
            args.max_queries,
            args.max_query_chars,
            args.max_topk,
            args.max_threads,
            args.max_connections,
            args.read_timeout,
        )
    except (InputError, RetrieverError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # from make_server: port in use, unknown host
        print(
            f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr
        )
        return 2
    except (OverflowError, UnicodeError) as e:  # a host name that cannot be encoded
        print(f"error: cannot listen on {args.host!r}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving {len(local)} passages on http://{host}:{port}/retrieve", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
