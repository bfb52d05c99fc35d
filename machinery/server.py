"""A Search-R1 compatible retrieval server (`python retriever.py serve`): POST /retrieve over any
retriever with `search(queries, topk) -> [[Passage]]`, every request's work, the searches and the
connections at once, and the time to read a request bounded.
"""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading

from machinery.corpus import Passage
from machinery.errors import InputError
from machinery.remote import (
    MAX_CONNECTIONS,
    MAX_QUERIES,
    MAX_QUERY_CHARS,
    MAX_THREADS,
    MAX_TOPK,
    MAX_WAIT,
    READ_TIMEOUT,
)


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
    retriever,
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
        except RecursionError:  # [[[[...: Python's parser gives up; a 400 like any bad body
            raise ValueError("body is JSON nested too deep") from None
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
        # connections the kernel queues while max_connections are read (socketserver's 5 reset
        # 22-30 % of a burst of 100-200 clients)
        request_queue_size = 1024
        slots = threading.BoundedSemaphore(max_connections)

        def process_request(self, request, client_address):
            self.slots.acquire()  # at most max_connections in flight; the accept loop waits
            super().process_request(request, client_address)

        def handle_error(self, request, client_address) -> None:
            """A connection cut (by the watchdog, or the client gone) is no error; anything else
            is one line on stderr, not a traceback."""
            error = sys.exc_info()[1]
            if not isinstance(error, OSError):
                print(
                    f"error: request from {client_address[0]}: {type(error).__name__}: {error}",
                    file=sys.stderr,
                )

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

    return BoundedServer((host, port), Handler)
