"""IG-Search: step-level information-gain rewards for search-augmented reasoning.

Liang et al., 2026 (arXiv 2604.15148). The policy writes

    <think>..</think> <search> q </search> [<documents> inserted </documents>] <refine>..</refine> .. <answer> a </answer>

and for every search step t of rollout i the reward model is the policy itself:

    IG_t = s(a* | C_t^real) - (1/N) sum_j s(a* | C_t^rand,j)          (information gain, N = 3)
    A_i = (R_i - mean_G R) / (std_G R + eps)                           (group baseline, R = exact match)
    A_{i,p} = A_i + alpha * IG~_t / |Q_t|     for p in Q_t (the query tokens of step t), else A_i
    loss = - sum_p mask_p * A_{i,p} * log pi(y_p | y_<p) / sum_p mask_p   (+ kl_coef * k3 KL)

The sections below follow that order: 1 protocol, 2 rollout, 3 answers and rewards,
4 information gain, 5 shaping and advantages, 6 loss.

Departures from the paper and its official code, and why:

1. Padding is by position: attention masks come from sequence lengths, never from comparing ids
   with the pad id. The official code compares with the pad id, which hides real `<|im_end|>` /
   `<|endoftext|>` tokens (they are the pad token of SmolLM2 and Qwen) from attention.
2. The blocks of an IG context are taken from what the rollout recorded (the generated query and
   refine text, the inserted documents) instead of a regex over the decoded response, so a
   document that contains `</documents>` or `<refine>` cannot shift a block boundary. The search
   block is rebuilt as `<search>q</search>` with q stripped.
3. Retrieved text is sanitised before insertion: protocol tags (`<answer>`, `</documents>`, ...)
   become `(answer)`, `(/documents)`, and special-token strings (`<|im_end|>`) lose their bars, so a
   hostile passage can neither close the documents block, supply the answer, nor end the turn.
4. The query tokens Q_t are the generated tokens whose text overlaps the query between `<search>`
   and `</search>` (the tags themselves keep A_i): the paper says "query tokens" without more.
5. The empty-context baseline (`ig_baseline="empty"`, the paper's ablation) keeps step t's search
   block and replaces its (documents, refine) pair by an empty documents block; one context, N = 1.
6. A step whose counterfactual pool (other steps' pairs of the batch) is empty gets no IG.
7. Policy log-probs and IG scores run the LM head only at the positions whose log-prob is used
   (the trained response tokens; the answer tokens), which is exact and saves most of the head's
   time and memory.
"""
from __future__ import annotations

import copy
import inspect
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

# ----------------------------------------------------------------------------- 1. protocol

IGSEARCH_INSTRUCTION = (
    "Answer the question. Think in <think> </think>. To search, write <search> query </search>; results "
    "come in <documents> </documents>. Write the useful facts in <refine> </refine>. Give the final answer, "
    "a few words, in <answer> </answer>. Question: "
)
SEARCHR1_INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every "
    "time you get new information. After reasoning, if you find you lack some knowledge, you can call "
    "a search engine by <search> query </search> and it will return the top searched results between "
    "<information> and </information>. You can search as many times as your want. If you find no "
    "further external knowledge needed, you can directly provide the answer inside <answer> and "
    "</answer>, without detailed illustrations. For example, <answer> Beijing </answer>. Question: "
)
# Search-R1's observation for a turn with neither a search nor an answer.
INVALID_ACTION = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> "
    "and </search>. If I want to give the final answer, I should put the answer between <answer> "
    "and </answer>. Let me try again.\n"
)
PROTOCOL_TAGS = ("think", "search", "documents", "information", "refine", "answer")


@dataclass(frozen=True)
class Template:
    name: str
    instruction: str
    doc_tag: str  # the tag around inserted documents
    refine: bool  # whether refine blocks enter the IG context


TEMPLATES = {
    "igsearch": Template("igsearch", IGSEARCH_INSTRUCTION, "documents", True),
    "searchr1": Template("searchr1", SEARCHR1_INSTRUCTION, "information", False),
}


def build_prompt(tokenizer, question: str, template: Template) -> str:
    """The chat-templated prompt text (generation prompt included) for one question.

    The instruction goes in the system turn, so templates that add a default system prompt
    (SmolLM2, Qwen2.5) do not add theirs: fewer tokens, same content.
    """
    instruction, question = template.instruction.removesuffix("Question: ").strip(), question.strip()
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": "Question: " + question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{instruction}\nQuestion: {question}\n"


def sanitize_documents(text: str, special_tokens: list[str] = ()) -> str:
    """Neutralise protocol tags and special-token strings inside retrieved text (departure 3)."""
    text = re.sub(r"<(/?)(%s)>" % "|".join(PROTOCOL_TAGS), r"(\1\2)", text)
    for tok in special_tokens:
        if len(tok) > 1:
            text = text.replace(tok, tok.replace("|", ""))
    return text


def observation_text(documents: str, template: Template) -> str:
    """What the environment appends after `</search>`."""
    return f"\n\n<{template.doc_tag}>{documents}</{template.doc_tag}>\n\n"


def find_block(text: str, tag: str, last: bool = False) -> re.Match | None:
    """First (or last) closed `<tag> ... </tag>` block in text, or None."""
    matches = list(re.finditer(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL))
    if not matches:
        return None
    return matches[-1] if last else matches[0]


# ----------------------------------------------------------------------------- 2. rollout


@dataclass
class Step:
    """One search step: what the policy asked, what came back, what it kept."""

    query: str
    documents: str  # inner text of the documents block, as inserted
    query_span: tuple[int, int]  # token span [start, end) in response_ids of the query Q_t
    refine: str | None = None  # inner text of the first refine block after the documents
    ig: float | None = None  # raw information gain, None when not scored


@dataclass
class Trajectory:
    """A prompt and its response as token ids; the loss mask is built as tokens are appended."""

    prompt_ids: list[int]
    prompt_text: str
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)  # 1 sampled by the policy, 0 inserted
    segments: list[tuple[int, int, bool, str]] = field(default_factory=list)  # (start, end, generated, text)
    steps: list[Step] = field(default_factory=list)
    prefix_text: str | None = None  # prompt + response up to the first <search>, stripped (IG prefix)
    done: bool = False
    truncated: bool = False

    def append(self, ids: list[int], text: str, generated: bool) -> tuple[int, int]:
        start = len(self.response_ids)
        self.response_ids += ids
        self.loss_mask += [int(generated)] * len(ids)
        self.segments.append((start, len(self.response_ids), generated, text))
        return start, len(self.response_ids)

    @property
    def response_text(self) -> str:
        return "".join(seg[3] for seg in self.segments)

    @property
    def generated_texts(self) -> list[str]:
        return [seg[3] for seg in self.segments if seg[2]]


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad id lists. Returns ids, attention mask and position ids, all (B, T).

    The mask comes from each sequence's length, never from comparing ids with pad_id.
    """
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, T - len(s):] = torch.tensor(s)
            mask[b, T - len(s):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) 0 at the first real token
    return ids.to(device), mask.to(device), position_ids.to(device)


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids; greedy when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class TurnCache:
    """A rollout's KV cache kept between turns, so that a turn prefills only what was added since the
    last one (the documents, the invalid-action note) instead of the whole sequence again.

    Row b holds the first n[b] tokens of its sequence. mask is 0 on padding and on the filler tokens
    fed to rows that had already stopped while others sampled on: they sit in the cache, unattended.
    """

    kv: object  # the transformers Cache, one row per sequence
    mask: torch.Tensor  # (B, T) attention mask over the cached positions
    n: list[int]  # tokens of each sequence in the cache

    def select(self, rows: list[int]) -> TurnCache:
        """Keep only these rows (trajectories that answered leave the batch)."""
        idx = torch.tensor(rows, device=self.mask.device)
        self.kv.batch_select_indices(idx)
        return TurnCache(self.kv, self.mask[idx], [self.n[r] for r in rows])


@torch.no_grad()
def generate_turn(model, tokenizer, seqs: list[list[int]], max_new_tokens: int, temperature: float,
                  generator: torch.Generator | None, stop: tuple[str, ...],
                  cache: TurnCache | None = None) -> tuple[list[list[int]], TurnCache]:
    """Sample one turn for every sequence, on the KV cache, until a stop string, EOS or the limit.

    With `cache` (from the previous turn, same rows) only the tokens of seqs not yet in it are fed.
    Returns the new ids of each row, the stop token included (it is trained), and the cache.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = {tokenizer.eos_token_id, pad_id} - {None}
    # transformers 5.2x calls the KV cache argument `cache`; earlier releases `past_key_values`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if cache is None:
        ids, mask, pos = left_pad(seqs, pad_id, device)  # (B, T)
        kv = {}
    else:
        pending = [s[k:] for s, k in zip(seqs, cache.n)]  # the last turn's unfed token, documents, ...
        assert all(pending), "every continuing row has new tokens"
        ids, added, _ = left_pad(pending, pad_id, device)  # (B, P)
        mask = torch.cat([cache.mask, added], dim=1)  # (B, T+P)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # (B, P) positions count real tokens only
        kv = {cache_kw: cache.kv}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kv)
    past = out.cache if hasattr(out, "cache") else out.past_key_values  # one object, grown in place by each call
    n = [len(s) for s in seqs]
    new: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    for _ in range(max_new_tokens):
        next_ids = sample_token(out.logits[:, -1, :], temperature, generator)  # (B,)
        fed = [not d for d in done]  # rows still running: their token is real, the others' is filler
        for b, tok in enumerate(next_ids.tolist()):
            if done[b]:
                continue
            new[b].append(tok)
            tail = tokenizer.decode(new[b][-12:])
            done[b] = tok in eos_ids or any(s in tail for s in stop)
        if all(done):
            break
        mask = torch.cat([mask, torch.tensor(fed, device=device, dtype=mask.dtype)[:, None]], dim=1)  # (B, T+1)
        n = [k + f for k, f in zip(n, fed)]
        pos = pos[:, -1:] + 1  # (B, 1)
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    **{cache_kw: past})
    return new, TurnCache(past, mask, n)


def char_span_to_tokens(tokenizer, ids: list[int], start: int, end: int) -> tuple[int, int]:
    """Token span [i, j) of the ids whose decoded text overlaps characters [start, end)."""
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]  # char end of token k
    starts = [0] + ends[:-1]
    hit = [k for k in range(len(ids)) if starts[k] < end and ends[k] > start]
    return (hit[0], hit[-1] + 1) if hit else (0, 0)


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], search: Callable[[list[str]], list[str]], *,
            template: Template = TEMPLATES["igsearch"], max_searches: int = 5, max_turn_tokens: int = 512,
            max_response_tokens: int = 4096, temperature: float = 1.0,
            generator: torch.Generator | None = None) -> list[Trajectory]:
    """Multi-turn batched rollout. `search(queries) -> documents text` is called once per turn.

    At most max_searches searches; the turn after the last allowed search must answer.
    """
    specials = list(tokenizer.all_special_tokens)
    trajs = [Trajectory(tokenizer(p, add_special_tokens=False).input_ids, p) for p in prompts]
    active, cache = trajs, None
    for turn in range(max_searches + 1):
        keep = [i for i, t in enumerate(active) if not t.done]
        if not keep:
            break
        if cache is not None and len(keep) < len(active):  # the rows that answered leave the cache
            cache = cache.select(keep)
        active = [active[i] for i in keep]
        new, cache = generate_turn(model, tokenizer, [t.prompt_ids + t.response_ids for t in active],
                                   max_turn_tokens, temperature, generator, ("</search>", "</answer>"), cache)
        searching: list[tuple[Trajectory, str, tuple[int, int]]] = []
        for traj, ids in zip(active, new):
            text = tokenizer.decode(ids)
            prior_text = traj.response_text
            start, _ = traj.append(ids, text, generated=True)
            if traj.steps and traj.steps[-1].refine is None:  # the refine block follows the documents
                ref = find_block(text, "refine")
                traj.steps[-1].refine = ref.group(1).strip() if ref else ""
            query = find_block(text, "search", last=True)
            answered = find_block(text, "answer") is not None
            if answered or turn == max_searches:
                traj.done = True
            elif query is not None:
                if traj.prefix_text is None:
                    traj.prefix_text = (traj.prompt_text + prior_text + text[: query.start()]).rstrip()
                span = char_span_to_tokens(tokenizer, ids, query.start(1), query.end(1))
                searching.append((traj, query.group(1).strip(), (start + span[0], start + span[1])))
            else:  # neither a search nor an answer: Search-R1's invalid-action observation
                traj.append(tokenizer(INVALID_ACTION, add_special_tokens=False).input_ids, INVALID_ACTION, False)
        if searching:
            docs = search([q for _, q, _ in searching])  # one batched retrieval per turn
            for (traj, q, span), d in zip(searching, docs):
                d = sanitize_documents(d, specials)
                obs = observation_text(d, template)
                obs_ids = tokenizer(obs, add_special_tokens=False, split_special_tokens=True).input_ids
                traj.append(obs_ids, obs, generated=False)
                traj.steps.append(Step(query=q, documents=d, query_span=span))
        for traj in trajs:
            if not traj.done and len(traj.response_ids) >= max_response_tokens:
                traj.done = traj.truncated = True
    for traj in trajs:
        if traj.steps and traj.steps[-1].refine is None:
            traj.steps[-1].refine = ""
    return trajs


def supervised_trajectory(tokenizer, prompt: str, pieces: list[tuple[str, bool]]) -> Trajectory:
    """A trajectory from given (text, trained) pieces, for the format warm-up: trained pieces get
    mask 1, inserted documents mask 0, exactly as in a rollout."""
    traj = Trajectory(tokenizer(prompt, add_special_tokens=False).input_ids, prompt)
    for text, trained in pieces:
        traj.append(tokenizer(text, add_special_tokens=False, split_special_tokens=not trained).input_ids,
                    text, trained)
    traj.done = True
    return traj


# ----------------------------------------------------------------------------- 3. answers and rewards


def extract_answer(traj: Trajectory) -> str | None:
    """The last closed <answer> block written by the policy; inserted text never counts."""
    for text in reversed(traj.generated_texts):
        m = find_block(text, "answer", last=True)
        if m:
            return m.group(1).strip()
    return None


def normalize_answer(s: str) -> str:
    """Search-R1 / SQuAD normalisation: lower-case, drop punctuation and articles, collapse spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str | None, golds: list[str]) -> float:
    """EM = 1 if the normalised prediction equals any normalised gold answer."""
    if prediction is None:
        return 0.0
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def documents_hold_answer(documents: str, golds: list[str]) -> bool:
    """Whether retrieved text contains a gold answer as whole words, both normalised: the query found it."""
    text = f" {normalize_answer(documents)} "
    return any(f" {g} " in text for g in map(normalize_answer, golds) if g)


def f1_score(prediction: str | None, golds: list[str]) -> float:
    """Word-level F1 against the best gold answer."""
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


# ----------------------------------------------------------------------------- 4. information gain


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy: bool = False):
    """log p(target) from (B, T, V) logits and (B, T) targets -> (B, T); log-softmax in fp32.

    With entropy=True also returns the entropy -sum_v p log p (B, T), without gradient, from the
    same log-softmax (a second one would double the largest tensor of the update).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if not entropy:
        return picked
    with torch.no_grad():
        return picked, -(logp.exp() * logp).sum(-1)  # (B, T), (B, T)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (over all of them when dim is None)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def tail_logprobs(model, seqs: list[list[int]], n_tail: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the last n_tail[b] tokens of each sequence, with the LM head on those positions only.

    Left padding puts every tail at the right edge, so one `logits_to_keep` covers all rows.
    Returns logp and mask, both (B, L) with L = max(n_tail), right-aligned.
    """
    device = next(model.parameters()).device
    ids, attn, pos = left_pad(seqs, pad_id, device)  # (B, T)
    L = max(n_tail)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=L + 1).logits  # (B, L+1, V)
    logp = token_logprobs(logits[:, :-1], ids[:, -L:])  # (B, L): position p predicts token p+1
    tail_mask = torch.arange(L, device=device)[None, :] >= (L - torch.tensor(n_tail, device=device))[:, None]
    return logp, tail_mask.long()  # (B, L), (B, L)


def head_weights(n: int, head_tokens: int = 3, head_weight: float = 3.0) -> torch.Tensor:
    """w_k = head_weight on the first min(head_tokens, n) answer tokens, 1 after; divided by their mean."""
    w = torch.ones(n)
    w[: min(head_tokens, n)] = head_weight
    return w / w.mean()  # (n,)


def length_chunks(lengths: list[int], size: int) -> list[list[int]]:
    """Indices sorted by length, in chunks of at most `size`; a chunk also ends where the next length
    is over twice its shortest, so that left padding wastes little."""
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not chunks or len(chunks[-1]) == size or lengths[i] > 2 * lengths[chunks[-1][0]]:
            chunks.append([])
        chunks[-1].append(i)
    return chunks


@torch.no_grad()
def answer_scores(model, contexts: list[list[int]], answers: list[list[int]], pad_id: int, max_len: int,
                  batch_size: int = 16, head_tokens: int = 3, head_weight: float = 3.0) -> list[float]:
    """s(a* | C) for each (context ids, answer ids) pair, batched.

    s = (1/L) sum_k w_k log p(a*_k | C, a*_<k); contexts are left-truncated so context + answer fit
    max_len. Pairs are sorted by length so each mini-batch pads little (length_chunks).
    """
    seqs = [c[max(0, len(c) + len(a) - max_len):] + a for c, a in zip(contexts, answers)]
    scores = [0.0] * len(seqs)
    for idx in length_chunks([len(s) for s in seqs], batch_size):
        n_tail = [len(answers[i]) for i in idx]
        logp, mask = tail_logprobs(model, [seqs[i] for i in idx], n_tail, pad_id)  # (b, L)
        for row, i in enumerate(idx):
            lp = logp[row, mask[row].bool()].cpu()  # (n,) the answer tokens in order
            scores[i] = float((head_weights(len(lp), head_tokens, head_weight) * lp).mean())
    return scores


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Number of leading tokens that all sequences share."""
    n = min(len(s) for s in seqs)
    return next((k for k in range(n) if any(s[k] != seqs[0][k] for s in seqs)), n)


def trunk_shares(seqs: list[list[int]], answers: list[list[int]], group_sizes: list[int]
                 ) -> list[tuple[list[int], list[int], list[int]]]:
    """Per group: its request indices, its trunk, and how many leading tokens each request shares with it.

    group_sizes[g] consecutive requests form group g. The trunk is the group's longest context (the
    sequence without its answer); a request shares its common prefix with the trunk, but keeps at least
    one context token for its continuation (that token predicts the first answer token). The trunk is
    cut to the longest share: no request reads past it.
    """
    out, first = [], 0
    for n in group_sizes:
        idx = list(range(first, first + n))
        first += n
        trunk = max((seqs[i][: len(seqs[i]) - len(answers[i])] for i in idx), key=len)
        shares = [max(0, min(common_prefix_len([seqs[i], trunk]), len(seqs[i]) - len(answers[i]) - 1)) for i in idx]
        out.append((idx, trunk[: max(shares)], shares))
    return out


@torch.no_grad()
def answer_scores_shared_prefix(model, contexts: list[list[int]], answers: list[list[int]], group_sizes: list[int],
                                pad_id: int, max_len: int, batch_size: int = 16, head_tokens: int = 3,
                                head_weight: float = 3.0) -> list[float]:
    """answer_scores, with the tokens that a group of contexts shares computed once.

    group_sizes[g] consecutive (context, answer) pairs form group g, e.g. the 1 + N contexts of the
    search steps of one rollout: step t's contexts are equal up to step t's documents, and each holds
    the real blocks of every earlier step. The group's trunk (trunk_shares) runs once; its key/value
    cache is repeated for the group's continuations (the rest of each context, then the answer), which
    run batched, left-padded, each attending to the part of the trunk its context shares, with positions
    continuing after it; a chunk of continuations gets the trunk's cache cut after the last position
    that one of them reads. Same scores as answer_scores (same truncation and positions); batch_size
    counts continuation rows. A model that returns no cache (the test fakes) is scored by answer_scores.
    """
    device = next(model.parameters()).device
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    seqs = [c[max(0, len(c) + len(a) - max_len):] + a for c, a in zip(contexts, answers)]
    groups = trunk_shares(seqs, answers, group_sizes)  # (request indices, trunk, shares)
    scores = [0.0] * len(seqs)
    loose = [i for idx, trunk, _ in groups if not trunk for i in idx]  # nothing shared: score them whole
    batches: list[list[tuple[list[int], list[int], list[int]]]] = []
    for g in sorted((g for g in groups if g[1]), key=lambda g: max(len(seqs[i]) for i in g[0])):
        if not batches or sum(len(idx) for idx, *_ in batches[-1]) + len(g[0]) > batch_size:
            batches.append([])  # groups sorted by length, as many per batch as batch_size rows allow
        batches[-1].append(g)
    for batch in batches:
        ids, attn, pos = left_pad([trunk for _, trunk, _ in batch], pad_id, device)  # (G, P)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None:
            return answer_scores(model, contexts, answers, pad_id, max_len, batch_size, head_tokens, head_weight)
        start = ids.shape[1] - attn.sum(-1)  # (G,) where each trunk begins, after its left padding
        rows = [(g, i, k) for g, (idx, _, ks) in enumerate(batch) for i, k in zip(idx, ks)]  # (group, request, share)
        # A real context continues the trunk for a few tokens, a counterfactual for its documents; an early
        # step's rows read a short part of the trunk. Chunks by continuation length, then by length read.
        conts = [len(seqs[i]) - k for _, i, k in rows]
        chunks = [[c[j] for j in sub] for c in length_chunks(conts, batch_size)
                  for sub in length_chunks([rows[r][2] + conts[r] for r in c], batch_size)]
        for n, chunk in enumerate(chunks):
            part = [rows[r] for r in chunk]
            kv = cache if n == len(chunks) - 1 else copy.deepcopy(cache)  # each chunk extends its own copy
            group = torch.tensor([g for g, _, _ in part], device=device)  # (rows,)
            kv.batch_select_indices(group)  # (G, ...) -> (rows, ...): the trunk repeated for its continuations
            shares = torch.tensor([k for _, _, k in part], device=device)  # (rows,)
            at = torch.arange(ids.shape[1], device=device)[None, :] - start[group][:, None]  # (rows, P) index in trunk
            seen = ((at >= 0) & (at < shares[:, None])).long()  # (rows, P) the trunk tokens each row's context holds
            end = int((start[group] + shares).max())  # no row of this chunk reads the trunk past here
            if end < ids.shape[1]:
                kv.crop(end - ids.shape[1])  # a negative count: drop that many positions from the end
                seen = seen[:, :end]  # (rows, end)
            cont_ids, cont_attn, cont_pos = left_pad([seqs[i][k:] for _, i, k in part], pad_id, device)  # (rows, C)
            L = max(len(answers[i]) for _, i, _ in part)
            logits = model(input_ids=cont_ids, attention_mask=torch.cat([seen, cont_attn], 1),  # (rows, P + C)
                           position_ids=cont_pos + shares[:, None],  # positions continue after the shared part
                           logits_to_keep=L + 1, **{cache_kw: kv}).logits  # (rows, L+1, V)
            logp = token_logprobs(logits[:, :-1], cont_ids[:, -L:])  # (rows, L): position p predicts token p+1
            for row, (_, i, _) in enumerate(part):
                lp = logp[row, L - len(answers[i]):].cpu()  # (n,) the answer tokens in order
                scores[i] = float((head_weights(len(lp), head_tokens, head_weight) * lp).mean())
    if loose:
        for i, s in zip(loose, answer_scores(model, [contexts[i] for i in loose], [answers[i] for i in loose], pad_id,
                                             max_len, batch_size, head_tokens, head_weight)):
            scores[i] = s
    return scores


def ig_context(traj: Trajectory, t: int, template: Template, replace: tuple[str, str] | None = None) -> str:
    """C_t: prefix, the (search, documents, refine) blocks of steps s <= t joined by "\\n", then "\\n<answer> ".

    Think blocks between steps and all steps after t are dropped. `replace` swaps step t's
    (documents, refine) pair for another one (the counterfactual).
    """
    parts = [traj.prefix_text or traj.prompt_text.rstrip()]
    for s, step in enumerate(traj.steps[: t + 1]):
        docs, refine = replace if (s == t and replace is not None) else (step.documents, step.refine)
        parts.append(f"<search>{step.query}</search>")
        parts.append(f"<{template.doc_tag}>{docs}</{template.doc_tag}>")
        if template.refine and refine:
            parts.append(f"<refine>{refine}</refine>")
    return "\n".join(parts) + "\n<answer> "


def draw_counterfactuals(own: tuple[str, str], pool: list[tuple[str, str]], n: int,
                         generator: torch.Generator) -> list[tuple[str, str]]:
    """N (documents, refine) pairs from the batch pool, never equal to the step's own pair; without
    replacement unless fewer than N remain."""
    others = [p for p in pool if p != own]
    if not others:
        return []
    if len(others) >= n:
        idx = torch.randperm(len(others), generator=generator)[:n].tolist()
    else:
        idx = torch.randint(len(others), (n,), generator=generator).tolist()
    return [others[i] for i in idx]


def step_pairs(traj: Trajectory) -> list[tuple[str, str]]:
    """The (documents, refine) pair of every search step of a trajectory."""
    return [(s.documents, s.refine or "") for s in traj.steps]


def plan_counterfactuals(pairs: list[list[tuple[str, str]]], n_random: int = 3, baseline: str = "random",
                         generator: torch.Generator | None = None) -> list[list[list[tuple[str, str]]]]:
    """The baselines of every step: draws[i][t] replaces step t of trajectory i ([] = the step gets no IG).

    pairs[i] = step_pairs(trajectory i) over the whole batch. The pool is every pair whose documents hold
    at least 10 characters; steps draw in batch order from one generator, so ranks of a data-parallel
    run that plan over the same gathered list draw exactly what a single process draws.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    pool = [p for steps in pairs for p in steps if len(p[0].strip()) >= 10]
    draws = []
    for steps in pairs:
        row = []
        for own in steps:
            if len(own[0].strip()) == 0:
                row.append([])  # steps whose documents are empty get no IG
            elif baseline == "empty":
                row.append([("", "")])
            else:
                row.append(draw_counterfactuals(own, pool, n_random, generator))
        draws.append(row)
    return draws


def ig_requests(tokenizer, trajs: list[Trajectory], golds: list[list[str]], *, template: Template,
                n_random: int = 3, baseline: str = "random", all_golds: bool = False,
                generator: torch.Generator | None = None, draws: list[list[list[tuple[str, str]]]] | None = None
                ) -> tuple[list[list[int]], list[list[int]], list[tuple]]:
    """The scoring work of a batch: context ids, answer ids, and a plan of (i, t, first request, 1 + N).

    draws: the counterfactuals of each step (plan_counterfactuals); planned over trajs when None.
    The 1 + N requests of one (step, gold) are consecutive: the real context first, then the baselines.
    """
    if draws is None:
        draws = plan_counterfactuals([step_pairs(t) for t in trajs], n_random, baseline, generator)
    requests: list[tuple[str, list[int]]] = []  # (context text, answer ids)
    plan = []  # (traj, step, index of the real request, number of requests)
    for i, traj in enumerate(trajs):
        for t, step in enumerate(traj.steps):
            step.ig = None
            others = draws[i][t]
            if not others:
                continue
            contexts = [ig_context(traj, t, template)] + [ig_context(traj, t, template, o) for o in others]
            for g, gold in enumerate(golds[i] if all_golds else golds[i][:1]):
                ans = tokenizer(gold.strip(), add_special_tokens=False).input_ids
                first = len(requests)
                requests += [(c, ans) for c in contexts]
                plan.append((i, t, first, len(contexts)))
    ctx_ids = {c: tokenizer(c, add_special_tokens=False).input_ids for c in {r[0] for r in requests}}
    return [ctx_ids[c] for c, _ in requests], [a for _, a in requests], plan


def trajectory_groups(plan: list[tuple], batch_size: int) -> list[int]:
    """Group sizes for answer_scores_shared_prefix: the requests of one rollout's search steps, in plan
    order, as many steps per group as batch_size rows allow. Step t's contexts hold every earlier step's
    real blocks, so a rollout's steps share one trunk: computed once instead of once per step."""
    sizes: list[int] = []
    for k, (i, _, _, n) in enumerate(plan):
        if sizes and plan[k - 1][0] == i and sizes[-1] + n <= batch_size:
            sizes[-1] += n
        else:
            sizes.append(n)
    return sizes


@torch.no_grad()
def information_gain(model, tokenizer, trajs: list[Trajectory], golds: list[list[str]], *,
                     template: Template = TEMPLATES["igsearch"], n_random: int = 3, baseline: str = "random",
                     all_golds: bool = False, max_len: int = 2048, batch_size: int = 16,
                     head_tokens: int = 3, head_weight: float = 3.0, shared_prefix: bool = True,
                     generator: torch.Generator | None = None,
                     draws: list[list[list[tuple[str, str]]]] | None = None) -> list[list[float | None]]:
    """IG_t = s(a*|C_t^real) - (1/N) sum_j s(a*|C_t^rand,j) for every search step; sets step.ig.

    Two parts: plan_counterfactuals draws the baselines (given as `draws`, e.g. planned over the
    global batch of a data-parallel run; else planned here over trajs), then scoring. All scoring
    sequences of the batch go through the model together (mini-batches); with shared_prefix the
    part that a rollout's contexts share runs once (same values).
    Returns, per trajectory, the list of raw IG values (None where a step gets no IG).
    """
    contexts, answers, plan = ig_requests(tokenizer, trajs, golds, template=template, n_random=n_random,
                                          baseline=baseline, all_golds=all_golds, generator=generator, draws=draws)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if shared_prefix:
        scores = answer_scores_shared_prefix(model, contexts, answers, trajectory_groups(plan, batch_size), pad_id,
                                             max_len, batch_size, head_tokens, head_weight)
    else:
        scores = answer_scores(model, contexts, answers, pad_id, max_len, batch_size, head_tokens, head_weight)
    best: dict[tuple[int, int], tuple[float, float]] = {}  # (i, t) -> (real score, IG) of the best gold
    for i, t, first, n in plan:
        real, rand = scores[first], scores[first + 1: first + n]
        ig = real - sum(rand) / len(rand)  # IG_t = s(real) - mean_j s(rand_j)
        if (i, t) not in best or real > best[(i, t)][0]:  # several golds: keep the best real score
            best[(i, t)] = (real, ig)
    for (i, t), (_, ig) in best.items():
        trajs[i].steps[t].ig = ig
    return [[s.ig for s in traj.steps] for traj in trajs]


# ----------------------------------------------------------------------------- 5. shaping and advantages


def shape_ig(ig: float, dead_zone: float = 0.0, neg_scale: float = 1.0, clip: float | None = None) -> float:
    """IG~: 0 inside the dead zone |IG| < delta, eta * IG when negative, then clipped to [-clip, clip]."""
    if abs(ig) < dead_zone:
        return 0.0
    if ig < 0:
        ig = neg_scale * ig
    return max(-clip, min(clip, ig)) if clip is not None else ig


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i - mean_G R) / (std_G R + eps) over consecutive groups of G rollouts; (B,) -> (B,)."""
    r = rewards.view(-1, group_size)  # (B/G, G)
    adv = r - r.mean(-1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)  # (B,)


def center_in_groups(igs: list[list[float | None]], group_size: int) -> list[list[float | None]]:
    """IG_t minus the mean IG of the scored steps of its group (the G rollouts of one question).

    Not in the paper (a variant, `--ig_center`): with random documents as the baseline almost every
    query gets IG > 0, so the raw bonus pushes up every sampled query; centred, it ranks a question's
    queries against each other, as the group baseline does for the outcome. None stays None.
    """
    out = []
    for g in range(0, len(igs), group_size):
        scored = [v for row in igs[g: g + group_size] for v in row if v is not None]
        mean = sum(scored) / len(scored) if scored else 0.0
        out += [[None if v is None else v - mean for v in row] for row in igs[g: g + group_size]]
    return out


def token_advantages(trajs: list[Trajectory], adv: torch.Tensor, alpha: float, dead_zone: float = 0.0,
                     neg_scale: float = 1.0, clip: float | None = None, center_groups: int = 0) -> list[torch.Tensor]:
    """Per-token advantages: A_{i,p} = A_i + alpha * IG~_t / |Q_t| for p in Q_t, else A_i.

    center_groups = G centres IG within each group of G rollouts before shaping (center_in_groups).
    Returns one (R_i,) tensor per trajectory, aligned with its response_ids.
    """
    igs = [[s.ig for s in t.steps] for t in trajs]
    if center_groups:
        igs = center_in_groups(igs, center_groups)
    out = []
    for traj, a, step_igs in zip(trajs, adv.tolist(), igs):
        tok = torch.full((len(traj.response_ids),), a)  # (R,)
        for step, v in zip(traj.steps, step_igs):
            lo, hi = step.query_span
            if v is not None and hi > lo and alpha != 0:
                tok[lo:hi] += alpha * shape_ig(v, dead_zone, neg_scale, clip) / (hi - lo)
        out.append(tok)
    return out


# ----------------------------------------------------------------------------- 6. loss


def response_batch(trajs: list[Trajectory], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Left-padded prompt+response ids and the right-aligned response targets and loss mask.

    Every response ends at the right edge, so the last R positions hold all generated tokens.
    """
    seqs = [t.prompt_ids + t.response_ids for t in trajs]
    ids, attn, pos = left_pad(seqs, pad_id, device)  # (B, T)
    R = max(len(t.response_ids) for t in trajs)
    mask, _, _ = left_pad([t.loss_mask for t in trajs], 0, device)  # (B, R)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "targets": ids[:, -R:],
            "loss_mask": mask}


def policy_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_p | y_<p) at the trained response positions, and the policy entropy there.

    The LM head runs only on the hidden states whose log-prob the loss uses (loss_mask 1): with a
    49k vocabulary the head over every position would cost more time and memory than the body.
    Returns logp (B, R) with gradient and entropy (B, R) without, both 0 where the mask is 0.
    """
    R = batch["targets"].shape[1]
    # through the model's own forward (an FSDP root gathers its weights there), the head on 1 position only
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                position_ids=batch["position_ids"], logits_to_keep=1, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -R - 1:-1]  # (B, R, H), after the final norm: position p predicts token p + 1
    sel = batch["loss_mask"].bool()  # (B, R)
    logits = model.get_output_embeddings()(hidden[sel])  # (M, V), M = number of trained tokens
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style soft-capping, applied as the model's own forward would
        logits = torch.tanh(logits / cap) * cap
    lp, ent = token_logprobs(logits[None], batch["targets"][sel][None], entropy=True)  # (1, M) each
    logp = torch.zeros(sel.shape, dtype=lp.dtype, device=lp.device).masked_scatter(sel, lp[0])  # (B, R)
    entropy = torch.zeros_like(logp).detach().masked_scatter(sel, ent[0])  # (B, R)
    return logp, entropy


def policy_loss(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0, n_tokens: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE with a baseline: loss = - sum_p mask_p A_p log pi_p / sum_p mask_p (+ kl_coef * KL).

    KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1, on the same tokens. All (B, R).
    n_tokens is sum_p mask_p over the whole batch when this is one micro-batch of it, so the
    accumulated gradient equals the full batch's. Returns the loss and the KL (0 without a reference).
    """
    mask = mask.to(logp.dtype)
    denom = n_tokens if n_tokens is not None else mask.sum().clamp(min=1)
    loss = -(mask * adv * logp).sum() / denom
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp  # (B, R)
        kl = (mask * (torch.exp(d) - d - 1)).sum() / denom  # k3 estimator of KL(pi || ref)
        loss = loss + kl_coef * kl
    return loss, kl.detach()
