"""Question files and models, loaded and checked at run time (prepare.py builds the offline
default's files once; this reads any FlashRAG or Search-R1 file, and any model folder or Hub name).

Every problem with a file stops with one line naming it (FILE:LINE: problem): a row that is not a
question, an answer that normalises to nothing, text that is not valid Unicode, a model folder whose
weights were cut short.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import unicodedata
from pathlib import Path

from machinery.corpus import read_lines
from machinery.errors import InputError

MISSING_DATA = "python prepare.py --flashrag DIR fetches the benchmarks"


def normalize_answer(s: str) -> str:
    """Search-R1 / SQuAD normalisation: lower-case, drop punctuation and articles, collapse
    whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def visible(text: str) -> bool:
    """Whether text holds a letter, digit or symbol: zero-width characters, controls, marks and
    spaces alone show nothing (an answer of U+200B only was accepted, and matched by U+200B)."""
    return any(unicodedata.category(ch)[0] in "LNS" for ch in text)


def split_validation(questions: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): the n questions whose text has the smallest SHA-1 are the validation
    split.

    Fixed by the data alone (not by the seed), so every run of an experiment trains on the same
    questions and is validated on the same held-out ones; file order is kept within each part.
    """
    # a noisy question is carved as its plain twin
    digest = [
        hashlib.sha1(q.get("plain_question", q["question"]).encode("utf-8")).hexdigest()
        for q in questions
    ]
    val = set(sorted(range(len(questions)), key=digest.__getitem__)[:n])
    return (
        [q for i, q in enumerate(questions) if i not in val],
        [q for i, q in enumerate(questions) if i in val],
    )


def load_model(
    name_or_path: str, device: str | None = None, trust_remote_code: bool = False, dtype=None
):
    """(model, tokenizer) from a Hub name or a local folder (prepare.default_model() gives the
    offline default's).

    fp32 on CPU, bf16 on CUDA, unless dtype says otherwise (train.py keeps fp32 weights on CUDA
    too). No code shipped with the model runs unless trust_remote_code. A folder that does not exist
    and does not look like a Hub name 'org/model' stops with one line.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = name_or_path
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise InputError(f"{path}: model folder not found")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    check_weights(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        ).to(device)
    except (OSError, ValueError) as e:  # no weights, no tokenizer files, an unknown config, ...
        raise InputError(
            f"{path}: cannot load the model ({str(e).strip().splitlines()[0][:300]})"
        ) from None
    if tokenizer.pad_token_id is None:
        # padding is masked by position, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_weights(folder: str) -> None:
    """Every *.safetensors file of a local model folder is whole: its header reads and its tensors
    lie inside the file (a save cut short by a crash or a full disk, or garbage), else one line
    naming the file, before anything is loaded."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")) if os.path.isdir(folder) else []:
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError)
            raise InputError(f"{path}: not a whole safetensors file ({str(e)[:160]})") from None


def load_questions(path: str) -> list[dict]:
    """Read FlashRAG JSON lines (or Search-R1 parquet, by the .parquet suffix) ->
    [{"id": str, "question": str, "golden_answers": [str, ...]}].

    Accepts a UTF-8 BOM and CRLF, skips blank lines; a missing id is the row's index.
    Every problem raises InputError("FILE:LINE: problem").
    """
    if str(path).endswith(".parquet"):
        return _load_parquet(path)
    rows: list[dict] = []
    try:
        for lineno, raw in read_lines(path):  # a regular file, lines of at most 1 MiB
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig drops a BOM
            if line.strip():  # (the \r of CRLF is JSON whitespace)
                rows.append(
                    check_question_row(
                        _json_object(line, f"{path}:{lineno}"), f"{path}:{lineno}", len(rows)
                    )
                )
    except FileNotFoundError:
        raise InputError(f"{path}: no such file ({MISSING_DATA})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    if not rows:
        raise InputError(f"{path}: no questions")
    return rows


def _load_parquet(path: str) -> list[dict]:
    """Search-R1's parquet: the `question` and `golden_answers` columns when present, else the text
    after "Question: " in the prompt (its instruction ends there) and
    reward_model.ground_truth.target."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file ({MISSING_DATA})")
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow.ArrowInvalid for a file that is not parquet, OSError
        raise InputError(
            f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]})"
        ) from None
    rows = []
    for i, rec in enumerate(records):
        question, answers = rec.get("question"), rec.get("golden_answers")
        if question is None:
            # [{"role": "user", "content": instruction + "Question: q"}] or text
            prompt = rec.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
                prompt = prompt[-1].get("content")
            question = (
                prompt.split("Question: ", 1)[-1].strip() if isinstance(prompt, str) else None
            )
        if answers is None:
            answers = ((rec.get("reward_model") or {}).get("ground_truth") or {}).get("target")
        answers = [answers] if isinstance(answers, str) else answers
        doc_id = rec.get("id") if rec.get("id") is not None else i
        row = {"id": doc_id, "question": question, "golden_answers": answers}
        rows.append(check_question_row(row, f"{path}:row {i + 1}", i))
    if not rows:
        raise InputError(f"{path}: no questions")
    return rows


MAX_QUESTION_CHARS = 2000  # a question or gold answer longer than this is refused (NQ's: < 200)
MAX_ANSWERS = 1000  # gold answers per question (TriviaQA's alias lists are the longest)


def _json_object(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not JSON ({e.msg})") from None
    except RecursionError:  # [[[[...: Python's parser gives up, the line is no question
        raise InputError(f"{where}: JSON nested too deep") from None


def check_question_row(row: object, where: str, index: int) -> dict:
    """One parsed row -> a checked question row; `where` is 'FILE:LINE' for the error message."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: 'question' missing, empty or not a string")
    if not visible(question):
        raise InputError(f"{where}: 'question' {question!r} has no visible character")
    if len(question) > MAX_QUESTION_CHARS:  # the prompt holds it whole: bound it
        raise InputError(
            f"{where}: 'question' is {len(question)} characters, more than {MAX_QUESTION_CHARS}"
        )
    check_unicode(question, f"{where}: 'question'")
    answers = row.get("golden_answers")
    if not isinstance(answers, list) or not answers:
        raise InputError(f"{where}: 'golden_answers' must be a non-empty list of strings")
    if len(answers) > MAX_ANSWERS:  # --ig_all_golds scores every one of them at every step
        raise InputError(f"{where}: {len(answers)} gold answers, more than {MAX_ANSWERS}")
    for answer in answers:
        if not isinstance(answer, str) or not answer.strip():
            raise InputError(f"{where}: 'golden_answers' holds {answer!r}, not a non-empty string")
        if len(answer) > MAX_QUESTION_CHARS:  # IG scores it as a continuation: bound it
            raise InputError(
                f"{where}: a gold answer is {len(answer)} characters, more than "
                f"{MAX_QUESTION_CHARS}"
            )
        check_unicode(answer, f"{where}: gold answer")
        if not visible(normalize_answer(answer)):  # "the", "?!", "\u200b": nothing to match
            raise InputError(
                f"{where}: gold answer {answer!r} is empty once normalised "
                f"(articles and punctuation removed) or has no visible character"
            )
    doc_id = row.get("id", index)
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise InputError(f"{where}: 'id' must be a string or an integer")
    checked = {"id": str(doc_id), "question": question, "golden_answers": answers}
    plain = row.get("plain_question")  # the noisy task's question without its distractor
    if plain is not None:
        if not isinstance(plain, str) or not plain.strip() or len(plain) > MAX_QUESTION_CHARS:
            raise InputError(
                f"{where}: 'plain_question' must be a non-empty string of at most "
                f"{MAX_QUESTION_CHARS} characters"
            )
        checked["plain_question"] = plain
    return checked


def check_unicode(text: str, what: str) -> None:
    """Text that cannot be written as UTF-8 (a lone surrogate such as \\ud800, which JSON allows)
    is refused where it is read, not when a tokenizer meets it mid-run."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{what} holds {text[e.start]!r} at character {e.start}, not valid "
            f"Unicode (a lone surrogate)"
        ) from None
