"""BM25 as the corpus grows: rank_bm25 against the inverted index of machinery/bm25.py, in memory
and saved into a folder then memory-mapped, on synthetic corpora. Needs no model.

    python tools/bench_bm25.py                                        # 10,000 and 100,000 passages
    python tools/bench_bm25.py --retrieval_sizes 10000,100000,1000000

Each retriever is built (or loaded) in a fresh process, so that process's RSS growth is the index's
size; it answers the offline default's train questions in batches of 16 and 1,024.
"""

import json
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import prepare
from machinery import loaders
from machinery.corpus import iter_corpus, load_corpus, parse_contents, tokenize
from machinery.errors import InputError, OneLineParser
from retriever import BM25Retriever


def proc_gb(field: str) -> float:
    """This process's VmRSS (resident memory) or VmHWM (its peak), in GiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 2**20


def timed(fn, *args) -> tuple[object, float]:
    """(fn's result, seconds)."""
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    print(f"\n== {title}")
    for r in cells:
        print("  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))))


def synthetic_corpus(n: int, corpus: str, path: str) -> None:
    """n synthetic passages (a 2-word title, 100 words) drawn from the corpus's word stream, to
    path."""
    words = np.array([w for line in open(corpus, encoding="utf-8") for w in tokenize(line)])
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for k in range(0, n, 10_000):
            for i, p in enumerate(rng.integers(len(words), size=(min(10_000, n - k), 102)), k):
                f.write(
                    json.dumps(
                        {
                            "id": str(i),
                            "contents": f'"{words[p[0]]} {words[p[1]]}"\n'
                            + " ".join(words[p[2:]].tolist()),
                        }
                    )
                    + "\n"
                )


def bm25_child(kind: str, path: str, queries: list[str], out) -> None:
    """In a fresh process (its RSS delta is the index's): build or load one BM25 retriever of the
    corpus file, then time query batches of 16 and 1,024. Puts (name, value) pairs as they come."""
    before, start = proc_gb("VmRSS"), time.perf_counter()
    if kind == "tokenize":  # reading and tokenising alone: the part of a build that is pure Python
        for _, row in iter_corpus(path):
            tokenize(" ".join(parse_contents(row["contents"])))
        out.put(("tokenize s", time.perf_counter() - start))
        return
    if kind == "folder":  # the index built into a folder (then mapped): the path for big corpora
        BM25Retriever(path, index=path + ".index")
        out.put(("build s", time.perf_counter() - start))
        out.put(("disk GiB", sum(e.stat().st_size for e in os.scandir(path + ".index")) / 2**30))
        return
    local = (
        BM25Retriever(path, index=path + ".index")
        if kind == "mapped"
        else BM25Retriever(load_corpus(path), backend=kind)
    )
    out.put(("load s" if kind == "mapped" else "build s", time.perf_counter() - start))
    out.put(("GiB", proc_gb("VmRSS") - before))
    for batch in (16, 1024):
        if batch > len(queries):
            break
        runs = [timed(local.search, queries[:batch]) for _ in range(3 if batch == 16 else 1)]
        out.put((f"ms/q {batch}", 1000 * statistics.median(r[1] for r in runs) / batch))
        out.put((f"top3 {batch}", [[p.id for p in hits[:3]] for hits in runs[0][0]]))
    out.put(("RSS GiB after", proc_gb("VmRSS")))


def bench_bm25(args) -> None:
    """rank_bm25 against the inverted index (in memory, and saved then memory-mapped) on synthetic
    corpora of each of args.retrieval_sizes."""
    data = prepare.default_data()
    queries = [q["question"] for q in loaders.load_questions(data["train"])[:1024]]
    ctx, rows, notes, work = (
        multiprocessing.get_context("spawn"),
        [],
        [],
        tempfile.mkdtemp(prefix="bench-bm25-"),
    )
    for n in args.retrieval_sizes:
        path, got = os.path.join(work, f"{n}.jsonl"), {}
        synthetic_corpus(n, data["corpus"], path)
        kinds = (["rank_bm25"] if n <= args.rank_bm25_max else []) + (
            ["index"] if n <= 100_000 else []
        )
        for kind in kinds + ["tokenize", "folder", "mapped"]:
            # 1,024 would take minutes
            qs = queries if kind != "rank_bm25" or n <= 10_000 else queries[:16]
            out, got[kind] = ctx.Queue(), {}
            child = ctx.Process(target=bm25_child, args=(kind, path, qs, out))
            child.start()
            deadline = time.time() + args.retrieval_timeout
            while child.is_alive() or not out.empty():
                try:  # a child too slow (or killed for memory) leaves its row incomplete
                    key, value = out.get(timeout=max(0.1, min(5.0, deadline - time.time())))
                    got[kind][key] = value
                except Exception:
                    if time.time() > deadline:
                        notes.append(f"{kind} at {n}: stopped after {args.retrieval_timeout} s")
                        break
            child.kill()
            child.join()
        ref = got.get("rank_bm25", {})
        for kind in kinds + ["mapped"]:
            g = got[kind]
            same = [
                g.get(f"top3 {b}") == ref.get(f"top3 {b}") for b in (16, 1024) if f"top3 {b}" in ref
            ]
            rows.append(
                [
                    n,
                    kind,
                    g.get("build s", g.get("load s", "-")),
                    g.get("GiB", "-"),
                    g.get("ms/q 16", "-"),
                    g.get("ms/q 1024", "-"),
                    f"{ref['ms/q 16'] / g['ms/q 16']:.0f}x"
                    if "ms/q 16" in ref and "ms/q 16" in g
                    else "-",
                    ("yes" if all(same) else "NO") if same and kind != "rank_bm25" else "-",
                ]
            )
        f = got["folder"]
        notes.append(
            f"{n}: folder build {f.get('build s', float('nan')):.1f} s (of which reading and "
            f"tokenising {got['tokenize'].get('tokenize s', float('nan')):.1f} s), "
            f"{f.get('disk GiB', float('nan')):.3f} GiB on disk; mapped: RSS "
            f"{got['mapped'].get('RSS GiB after', float('nan')):.2f} GiB after the queries"
        )
        os.remove(path)
    table(
        "BM25 on synthetic passages (100 words): rank_bm25 against the index of bm25.py; "
        "ms/query in batches of 16 and 1,024 train questions",
        [
            "passages",
            "retriever",
            "build/load s",
            "index GiB",
            "ms/q @16",
            "ms/q @1024",
            "speed-up",
            "same top-3 as rank_bm25",
        ],
        rows,
    )
    for line in notes:
        print(f"  {line}")
    n, f, m = args.retrieval_sizes[-1], got["folder"], got["mapped"]
    # linear in N: every chunk and postings list grows with N
    if "build s" in f and "ms/q 1024" in m:
        x = 21_000_000 / n
        print(
            f"  wiki-18 (21 M passages), linear from {n}: build {f['build s']:.0f} s x {x:.0f} = "
            f"{f['build s'] * x / 60:.0f} min, disk {f['disk GiB']:.2f} x {x:.0f} = "
            f"{f['disk GiB'] * x:.0f} GiB, {m['ms/q 1024']:.1f} ms/query x {x:.0f} = "
            f"{m['ms/q 1024'] * x:.0f} ms/query"
        )
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--retrieval_sizes", default="10000,100000", help="synthetic corpus sizes (passages)"
    )
    p.add_argument("--retrieval_timeout", type=int, default=600, help="seconds allowed per size")
    p.add_argument(
        "--rank_bm25_max", type=int, default=100_000, help="largest corpus for rank_bm25"
    )
    try:
        args = p.parse_args(argv)
        args.retrieval_sizes = [int(n) for n in args.retrieval_sizes.split(",")]
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.time()
    bench_bm25(args)
    print(f"\nbench_bm25 wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
