"""BM25 from an inverted index: rank_bm25's BM25Okapi scores, bit for bit, at a fraction of the
cost.

rank_bm25 (the definition; retriever.BM25Retriever(corpus, backend="rank_bm25") keeps it) scores
each document d of N for the query words q_1..q_m (a repeated word counts each time) as

    score(d) = sum_i idf(q_i) tf(q_i, d) (k1 + 1) / (tf(q_i, d) + k1 (1 - b + b |d| / avgdl))
    idf(t)   = log(N - df(t) + 0.5) - log(df(t) + 0.5), or epsilon * mean(idf) where negative

with k1 = 1.5, b = 0.75, epsilon = 0.25. The index keeps, per word, the documents that hold it
(ascending) and its tf in each, so a query touches only its words' postings. The same float64
operations run on them in the same order (word by word, in query order; a document without the word
gains +0.0 in rank_bm25, which changes no sum), so the scores equal rank_bm25's bitwise, and top_k
orders them exactly as np.argsort(-scores, kind="stable") does: ties in corpus order.

build() writes the arrays (int32 document ids, uint16 tf) to a folder when given one; load() maps
them back (np.load mmap_mode="r"), so a corpus of millions of passages is indexed once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
from itertools import chain, islice
from typing import Callable, Iterable

import numpy as np

from machinery.errors import InputError

K1, B, EPSILON = 1.5, 0.75, 0.25  # rank_bm25.BM25Okapi's defaults
FORMAT = "igsearch-bm25-1"  # written into meta.json; any other value is refused at load
ARRAYS = ("offsets", "doc_ids", "tfs", "doc_len")
# kept term weights of common words (recomputing them is most of a query's work)
CACHE_BYTES = 1 << 30


class BM25Index:
    """Word t's postings: doc_ids[offsets[t]:offsets[t + 1]], with tfs; doc_len holds |d|."""

    def __init__(
        self,
        words: list[str],
        offsets: np.ndarray,
        doc_ids: np.ndarray,
        tfs: np.ndarray,
        doc_len: np.ndarray,
        cache_bytes: int = CACHE_BYTES,
    ):
        self.words, self.offsets, self.doc_ids, self.tfs, self.doc_len = (
            words,
            offsets,
            doc_ids,
            tfs,
            doc_len,
        )
        self.term_ids = {w: t for t, w in enumerate(words)}  # numbered in order of first appearance
        n = len(doc_len)
        self.avgdl = int(doc_len.sum(dtype=np.int64)) / n
        df = np.diff(offsets)  # (V,)
        # math.log as rank_bm25 (np.log may differ in the last bit), once per distinct df; the mean
        # adds
        # the idfs in order of first appearance, as rank_bm25's dict does (np.cumsum adds in order)
        logs = {d: math.log(n - d + 0.5) - math.log(d + 0.5) for d in np.unique(df).tolist()}
        idf = np.array([logs[d] for d in df.tolist()], dtype=np.float64)  # (V,)
        average_idf = float(np.cumsum(idf)[-1]) / len(idf) if len(idf) else 0.0
        self.idf = np.where(idf < 0, EPSILON * average_idf, idf)  # (V,)
        # (N,) k1 (1 - b + b |d| / avgdl)
        self.norm = K1 * (1 - B + B * doc_len.astype(np.int64) / self.avgdl)
        self.cache, self.cache_left, self.lock = {}, cache_bytes, threading.Lock()

    def __len__(self) -> int:
        return len(self.doc_len)

    def weights(self, t: int) -> tuple[np.ndarray | None, np.ndarray]:
        """(documents holding word t, their BM25 term), rank_bm25's expression operation for
        operation; for a word in an eighth of the documents or more, (None, the (N,) dense term:
        0 elsewhere)."""
        if t in self.cache:
            return self.cache[t]
        a, b = self.offsets[t], self.offsets[t + 1]
        docs, tf = self.doc_ids[a:b], self.tfs[a:b].astype(np.float64)  # (n_t,)
        w = self.idf[t] * (tf * (K1 + 1) / (tf + self.norm[docs]))  # (n_t,)
        if 8 * len(docs) >= len(self):  # adding a dense row beats scattering this many
            dense = np.zeros(len(self))  # (N,)
            dense[docs] = w
            docs, w = None, dense
        if 64 * (b - a) >= len(self):  # a common word: worth keeping, within the budget
            with self.lock:
                if w.nbytes <= self.cache_left:
                    self.cache[t], self.cache_left = (docs, w), self.cache_left - w.nbytes
        return docs, w

    def get_scores(self, words: list[str]) -> np.ndarray:
        """(N,) float64 BM25 scores of every document: rank_bm25's get_scores(words), bitwise."""
        scores = np.zeros(len(self))  # (N,)
        for word in words:
            t = self.term_ids.get(word)
            if t is None or self.idf[t] == 0:  # rank_bm25 adds 0 * (...) = 0 for these
                continue
            docs, w = self.weights(t)
            if docs is None:
                scores += w
            else:
                # each document at most once per word: same sums as rank_bm25
                np.add.at(scores, docs, w)
        return scores


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """np.argsort(-scores, kind="stable")[:k] (ties in corpus order) without sorting all N."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    # a subset: its k-th best is <= the k-th best of all
    sample = scores[:: max(1, len(scores) // 1024)]
    bound = np.partition(sample, len(sample) - k)[len(sample) - k] if len(sample) >= k else -np.inf
    cand = np.flatnonzero(scores >= bound)  # (C,) ascending; holds the top k and all its ties
    s = scores[cand]  # (C,)
    kth = np.partition(s, len(s) - k)[len(s) - k]  # the k-th best score
    above = cand[s > kth]  # fewer than k: all of them in
    tied = cand[s == kth][: k - len(above)]  # then the k-th best's ties in corpus order
    return np.concatenate([above[np.argsort(-scores[above], kind="stable")], tied])


class _Numbering(dict):
    """word -> id; an unseen word gets the next id (looked up in C: the build's inner loop)."""

    def __missing__(self, word: str) -> int:
        self[word] = len(self)
        return self[word]


def _array(folder: str | None, name: str, shape: int, dtype) -> np.ndarray:
    """An empty array, in memory or as folder/name.npy mapped from disk."""
    if folder is None:
        return np.empty(shape, dtype)
    return np.lib.format.open_memmap(
        os.path.join(folder, f"{name}.npy"), "w+", dtype, (int(shape),)
    )


def _spill(folder: str, name: str, array: np.ndarray) -> np.ndarray:
    np.save(os.path.join(folder, f"{name}.npy"), array)
    return np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")


def build(
    token_lists: Iterable[list[str]], folder: str | None = None, chunk: int = 50_000
) -> BM25Index:
    """Index documents given as token lists, chunk documents at a time. With a folder, each chunk's
    postings and the index's arrays live there (then call save_meta) and memory holds only the
    words."""
    term_ids = _Numbering()
    # per chunk: df of each word, postings sorted by word then document
    parts, lengths, n = [], [], 0
    it = iter(token_lists)
    while batch := list(islice(it, chunk)):
        lens = np.fromiter(map(len, batch), np.int64, len(batch))  # (n_c,)
        # (tokens,) word ids
        ids = np.fromiter(
            map(term_ids.__getitem__, chain.from_iterable(batch)), np.int64, int(lens.sum())
        )
        docs = np.repeat(np.arange(n, n + len(batch), dtype=np.int64), lens)  # (tokens,)
        # one key per (word, doc), sorted
        keys, tf = np.unique(ids << 32 | docs, return_counts=True)
        docs_c, tf_c = (keys & 0xFFFFFFFF).astype(np.int32), tf.astype(np.uint32)  # (P_c,)
        if folder is not None:  # to disk: a wiki-18 build holds ~1.5 G postings
            docs_c, tf_c = (
                _spill(folder, f"part{len(parts)}{x}", a)
                for x, a in (("docs", docs_c), ("tf", tf_c))
            )
        parts.append((np.bincount(keys >> 32, minlength=len(term_ids)), docs_c, tf_c))
        lengths.append(lens.astype(np.int32))
        n += len(batch)
    df = np.zeros(len(term_ids), dtype=np.int64)  # (V,)
    for df_c, _, _ in parts:
        df[: len(df_c)] += df_c
    offsets = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)  # (V + 1,)
    big = max((int(tf.max()) for _, _, tf in parts if len(tf)), default=0) > np.iinfo(np.uint16).max
    doc_ids = _array(folder, "doc_ids", offsets[-1], np.int32)  # (P,)
    tfs = _array(folder, "tfs", offsets[-1], np.uint32 if big else np.uint16)  # (P,)
    # (V,) where each word's next postings go: chunks come in doc order
    cursor = offsets[:-1].copy()
    for c, (df_c, docs, tf) in enumerate(parts):
        terms = np.repeat(np.arange(len(df_c)), df_c)  # (P_c,) the word of each posting
        pos = cursor[terms] + np.arange(len(docs)) - (np.cumsum(df_c) - df_c)[terms]  # (P_c,)
        doc_ids[pos], tfs[pos] = docs, tf
        cursor[: len(df_c)] += df_c
        parts[c] = None
        if folder is not None:
            for x in ("docs", "tf"):
                os.remove(os.path.join(folder, f"part{c}{x}.npy"))
    doc_len = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)  # (N,)
    if folder is not None:
        for name, array in (("offsets", offsets), ("doc_len", doc_len)):
            np.save(os.path.join(folder, f"{name}.npy"), array)
        doc_ids.flush(), tfs.flush()
    return BM25Index(list(term_ids), offsets, doc_ids, tfs, doc_len)


def save_meta(folder: str, index: BM25Index, meta: dict) -> None:
    """Finish a folder that build() wrote: its words and meta.json (the caller's facts, e.g. of the
    corpus)."""
    with open(os.path.join(folder, "words.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(index.words))  # \w+ words: never a newline inside one
    meta = {
        "format": FORMAT,
        "passages": len(index),
        "words": len(index.words),
        "postings": int(index.offsets[-1]),
        **meta,
    }
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load(folder: str, expect: dict, extra: tuple[str, ...] = ()) -> tuple[BM25Index, dict, dict]:
    """(index, the extra arrays, meta) of a saved folder, memory-mapped. Refused with one line
    naming the file: one that is missing or damaged, of another format, or whose meta disagrees
    with expect."""
    path = os.path.join(folder, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        for key, value in {"format": FORMAT, **expect}.items():
            if not isinstance(meta, dict) or meta.get(key) != value:
                raise InputError(
                    f"{path}: {key} is {meta.get(key) if isinstance(meta, dict) else None!r}, "
                    f"expected {value!r}: the index of another corpus or version; delete "
                    f"{folder} to build it again"
                )
        arrays = {}
        for name in ARRAYS + extra:
            path = os.path.join(folder, f"{name}.npy")
            arrays[name] = np.load(path, mmap_mode="r")
        path = os.path.join(folder, "words.txt")
        with open(path, encoding="utf-8") as f:
            words = f.read().split("\n") if meta["words"] else []
        n, v, p = meta["passages"], meta["words"], meta["postings"]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (n, v, p)):
            path = os.path.join(folder, "meta.json")
            raise InputError(
                f"{path}: passages, words and postings must be counts, got {n!r}, {v!r}, {p!r}: "
                f"a damaged index; delete {folder} to build it again"
            )
    # missing, truncated, not JSON, not .npy, nested too deep
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(
            f"{path}: unreadable saved index ({type(e).__name__}: {e}); delete {folder} "
            "to build it again"
        ) from None
    sizes = {
        "offsets.npy": (len(arrays["offsets"]), v + 1),
        "doc_ids.npy": (len(arrays["doc_ids"]), p),
        "tfs.npy": (len(arrays["tfs"]), p),
        "doc_len.npy": (len(arrays["doc_len"]), n),
        "words.txt": (len(words), v),
    }
    for name, (got, size) in sizes.items():
        if got != size or (
            name == "offsets.npy" and (arrays["offsets"][-1] != p or arrays["offsets"][0] != 0)
        ):
            raise InputError(
                f"{os.path.join(folder, name)}: {got} entries, expected {size}: a damaged "
                f"index; delete {folder} to build it again"
            )
    check_arrays(folder, arrays)
    index = BM25Index(words, *(arrays[name] for name in ARRAYS))
    return index, {name: arrays[name] for name in extra}, meta


def check_arrays(folder: str, arrays: dict[str, np.ndarray], chunk: int = 1 << 26) -> None:
    """Arrays that would serve wrong passages, NaN scores or an IndexError are refused naming the
    file: a field of the wrong type, offsets out of order, a document id out of range (negative
    ids index from the end), negative lengths, or no word in any document (avgdl 0)."""
    offsets, doc_ids, doc_len = arrays["offsets"], arrays["doc_ids"], arrays["doc_len"]
    n = len(doc_len)

    def ids_out_of_range() -> bool:  # read in chunks: a wiki-18 index holds ~1.5 G ids
        return any(
            len(part) and (part.min() < 0 or part.max() >= n)
            for part in (doc_ids[i : i + chunk] for i in range(0, len(doc_ids), chunk))
        )

    checks = [
        *(
            (name, f"of type {arrays[name].dtype}, not integers", arrays[name].dtype.kind in "iu")
            for name in ARRAYS
        ),
        ("offsets", "not in increasing order", lambda: (np.diff(offsets) >= 0).all()),
        ("doc_len", "a negative length", lambda: not n or doc_len.min() >= 0),
        ("doc_len", "no document holds a word (all lengths 0)", lambda: not n or doc_len.any()),
        ("doc_ids", f"an id outside 0..{n - 1}", lambda: not ids_out_of_range()),
    ]
    for name, problem, ok in checks:
        if not (ok() if callable(ok) else ok):
            raise InputError(
                f"{os.path.join(folder, name + '.npy')}: {problem}: a damaged index; delete "
                f"{folder} to build it again"
            )


def open_folder(
    folder: str, facts: dict, build_into: Callable[[str], dict], extra: tuple[str, ...] = ()
) -> tuple[BM25Index, dict]:
    """(index, its extra arrays) saved in folder, whose meta.json must hold facts; when folder does
    not exist or is empty, build_into(a new folder) -> {"index", *extra arrays, *more facts}
    first, and that folder becomes folder once complete: a folder holds a whole index or none."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"{folder}: not a folder")
    if not os.path.exists(os.path.join(folder, "meta.json")):
        if os.path.isdir(folder) and os.listdir(folder):
            raise InputError(
                f"{folder}: neither a saved index (no meta.json) nor empty; give a new folder"
            )
        parent = os.path.dirname(os.path.abspath(folder))
        work = None
        try:
            os.makedirs(parent, exist_ok=True)
            work = tempfile.mkdtemp(prefix=".bm25-", dir=parent)
            made = build_into(work)
            for name in extra:
                np.save(os.path.join(work, f"{name}.npy"), made.pop(name))
            save_meta(work, made.pop("index"), {**facts, **made})
            try:
                os.replace(work, folder)
            except OSError:  # another build of the same index finished first: use it, if whole
                if not os.path.exists(os.path.join(folder, "meta.json")):
                    raise
        except OSError as e:  # a parent that is a file, a full disk, no permission
            raise InputError(
                f"{folder}: cannot build the index there ({e.strerror or e}); nothing was kept"
            ) from None
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
    index, arrays, meta = load(folder, facts, extra)
    return index, arrays
