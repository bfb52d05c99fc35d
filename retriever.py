"""What the rollout calls of retrieval: `make_search` gives `search(queries) -> documents text`,
over BM25 on a corpus file or a Search-R1 server; passages render as Search-R1 does,
'Doc i(Title: "T") text', one per line.

    python retriever.py serve --corpus corpus.jsonl --port 8000
    python retriever.py search --corpus corpus.jsonl --topk 3 "who wrote hamlet"
    python retriever.py serve --corpus wiki-18.jsonl --index wiki-18.bm25  # built once, then mapped

The machinery behind it (reading and checking a corpus, the inverted index, the HTTP client and
server) is in machinery/corpus.py, bm25.py, remote.py and server.py.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
from rank_bm25 import BM25Okapi

from machinery import bm25
from machinery.corpus import (
    MAX_QUERY_WORDS,
    Passage,
    check_search_args,
    load_corpus,
    open_index,
    parse_contents,
    tokenize,
)
from machinery.errors import InputError, OneLineParser, RetrieverError
from machinery.remote import (
    MAX_CONNECTIONS,
    MAX_QUERIES,
    MAX_QUERY_CHARS,
    MAX_THREADS,
    MAX_TOPK,
    READ_TIMEOUT,
    RemoteRetriever,
)
from machinery.server import check_server_limits, make_server


def format_passages(passages: list[Passage], max_words: int | None = None) -> str:
    """Search-R1 rendering; max_words keeps each text's first words (short CPU runs)."""
    lines = []
    for i, p in enumerate(passages, 1):
        text = p.text
        if max_words is not None and len(text.split()) > max_words:
            text = " ".join(text.split()[:max_words])
        lines.append(f'Doc {i}(Title: "{p.title}") {text}')
    return "\n".join(lines)


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
        check_search_args(queries, topk)
        results = []
        for query in queries:
            scores = self.bm25.get_scores(tokenize(query)[:MAX_QUERY_WORDS])  # (N,)
            if self.backend == "rank_bm25":
                order = np.argsort(-scores, kind="stable")[:topk]  # ties: corpus order
            else:
                order = bm25.top_k(scores, topk)  # the same order, without sorting all N
            results.append([replace(self.passages[i], score=float(scores[i])) for i in order])
        return results


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
    except (InputError, RetrieverError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # reading the corpus or its index (not the socket: below)
        print(f"error: {e.filename or args.corpus}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
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
    except OSError as e:  # from make_server: port in use, unknown host
        print(
            f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr
        )
        return 2
    except (OverflowError, ValueError) as e:  # a host name that cannot be encoded
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
