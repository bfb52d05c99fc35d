"""Text: answers compared as SQuAD and FlashRAG compare them (word-level F1; the normalisation is
machinery/loaders.py's, which checks gold answers with it), and text from outside the policy made
safe to insert: special-token strings broken up, protocol tags neutralised (igsearch.py's
departure 3), so a question, a gold answer or a retrieved passage can never end a turn, close the
documents block or supply an answer."""

from __future__ import annotations

import re
from collections import Counter

from machinery.loaders import normalize_answer

PROTOCOL_TAGS = ("think", "search", "documents", "information", "refine", "answer")


def special_strings(tokenizer) -> list[str]:
    """The strings a tokenizer turns into control ids: special tokens and added tokens."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    return sorted(set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True)


def plain_text(text: str, special_tokens: list[str]) -> str:
    """Text from a user or a retriever with every special-token string broken up ('|' removed,
    else a space after its first character): no tokenisation of it yields a control id."""
    for _ in range(4):  # a token's broken form could spell another: at most a few rounds
        hits = [tok for tok in special_tokens if len(tok) > 1 and tok in text]
        if not hits:
            break
        for tok in hits:
            text = text.replace(tok, tok.replace("|", "") if "|" in tok else f"{tok[0]} {tok[1:]}")
    return text


def sanitize_documents(text: str, special_tokens: list[str] = ()) -> str:
    """Neutralise protocol tags and special-token strings inside retrieved text (departure 3)."""
    text = re.sub(r"<(/?)(%s)>" % "|".join(PROTOCOL_TAGS), r"(\1\2)", text)
    return plain_text(text, special_tokens)


def f1_score(prediction: str | None, golds: list[str]) -> float:
    """Word-level F1 against the best gold answer (a measure, not the reward)."""
    if prediction is None:
        return 0.0
    best, pred = 0.0, normalize_answer(prediction).split()
    for g in golds:
        gold = normalize_answer(g).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best
