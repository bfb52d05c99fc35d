"""A corpus on disk: wiki-18 JSON lines read and checked row by row, passages parsed from their
`contents`, and the BM25 index of a corpus file kept in a folder (built once, then memory-mapped).

Corpus (wiki-18, as Search-R1 and FlashRAG ship it): JSON lines {"id": "0", "contents":
"\\"Title\\"\\ntext"}.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import re
import stat
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from machinery import bm25
from machinery.errors import InputError


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


def tokenize(text: str) -> list[str]:
    """Lower-case \\w+ words; the same function for corpus and queries."""
    return re.findall(r"\w+", text.lower())


MAX_LINE_BYTES = 1 << 20  # a JSON-lines row over 1 MiB is no passage or question: refused
MAX_QUERY_WORDS = 32  # BM25 scores a query's first 32 words: bounds the work of one query


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
            except RecursionError:  # [[[[...: Python's parser gives up
                raise InputError(f"{where}: JSON nested too deep") from None
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


def check_search_args(queries: list[str], topk: int) -> None:
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
    """A SHA-256 of the whole file: a saved index belongs to this file, byte for byte (a hash of
    sampled blocks let an edit that kept the size serve the old passages)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()[:32]


def file_stamp(path: str) -> list[int]:
    """What any write to a file changes (ctime cannot be set back): size, inode, mtime, ctime."""
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def corpus_facts(corpus: str, folder: str) -> tuple[dict, list[int]]:
    """(what a saved index's meta.json must hold of the corpus, the corpus's stamp now). The whole
    file is hashed unless the saved index recorded this very stamp (a 14 GB corpus is hashed when
    it is indexed, and again only after it changed)."""
    stamp = file_stamp(corpus)
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError):
        saved = None
    if isinstance(saved, dict) and saved.get("corpus_stamp") == stamp:
        digest = saved.get("corpus_fingerprint")
    else:
        digest = fingerprint(corpus)
    return {"corpus_bytes": stamp[0], "corpus_fingerprint": digest}, stamp


def check_passage_offsets(path: str, offsets: np.ndarray, size: int) -> None:
    """passage_offsets.npy: integers, strictly increasing, within the corpus file."""
    problem = (
        f"of type {offsets.dtype}, not integers"
        if offsets.dtype.kind not in "iu"
        else "not in increasing order"
        if len(offsets) and not (np.diff(offsets) > 0).all()
        else f"outside the corpus file of {size} bytes"
        if len(offsets) and (offsets[0] < 0 or offsets[-1] != size)
        else None
    )
    if problem:
        raise InputError(f"{path}: {problem}: a damaged index (delete its folder to rebuild)")


def open_index(corpus: str, folder: str) -> tuple[bm25.BM25Index, CorpusFile]:
    """The BM25 index of a corpus file saved in folder, memory-mapped; built from the file and saved
    there first when folder does not exist or is empty. Another corpus's index is refused, and so
    is an index of this file made before an edit."""
    try:
        facts, stamp = corpus_facts(corpus, folder)
        size = facts["corpus_bytes"]
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
            "corpus_stamp": stamp,
        }

    index, extra = bm25.open_folder(folder, facts, build, ("passage_offsets",))
    if len(extra["passage_offsets"]) != len(index) + 1:
        raise InputError(
            f"{os.path.join(folder, 'passage_offsets.npy')}: {len(extra['passage_offsets'])} "
            f"entries, expected {len(index) + 1}: a damaged index (delete {folder} to rebuild)"
        )
    check_passage_offsets(
        os.path.join(folder, "passage_offsets.npy"), extra["passage_offsets"], size
    )
    return index, CorpusFile(corpus, extra["passage_offsets"])
