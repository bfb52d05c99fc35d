"""The client of a Search-R1 retrieval server: POST /retrieve with {"queries": [str], "topk":
int, "return_scores": true} -> {"result": [[{"document": {"id", "contents"}, "score": float}, ...],
...]}, each exchange bounded in time and size, retried on what a retry can mend.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse

from machinery.corpus import Passage, check_search_args, parse_contents
from machinery.errors import InputError, RetrieverError

# what `retriever.py serve` accepts by default, and what RemoteRetriever splits its batches to
MAX_QUERIES, MAX_QUERY_CHARS, MAX_TOPK, MAX_THREADS = 64, 2000, 50, 4
MAX_CONNECTIONS, READ_TIMEOUT = 64, 10.0  # connections read at once; seconds to read one request
MAX_WAIT = 86400  # the longest deadline accepted, in seconds (a day)
MAX_RESPONSE_BYTES = 1 << 28  # an answer over 256 MiB is refused, not held in memory


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
        max_query_chars: int = MAX_QUERY_CHARS,
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
        # a query is sent cut to the server's cap (its 400 on a longer one ended a training run);
        # BM25 scores a query's first 32 words, well within it
        self.max_query_chars = max_query_chars

    def search(self, queries: list[str], topk: int = 3) -> list[list[Passage]]:
        """POST the batch in requests of at most max_queries queries (each request retried on
        connection errors, timeouts, 5xx and bad bodies, never on 4xx). Each try has `timeout`
        seconds from connect to the last byte."""
        check_search_args(queries, topk)
        queries = [q[: self.max_query_chars] for q in queries]
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
            except (ValueError, RecursionError) as e:  # not JSON, nested too deep, wrong shape
                last = f"bad response: {e}"
        raise RetrieverError(f"retriever {self.url}: {last} (after {attempt + 1} tries)")
