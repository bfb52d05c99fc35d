"""IG-Search: step-level information-gain rewards for search-augmented reasoning.

Liang et al., 2026 (arXiv 2604.15148). The policy writes

    <think> .. </think> <search> q </search> [<documents> inserted </documents>]
    <refine> .. </refine> .. <answer> a </answer>

and for every search step t of rollout i the reward model is the policy itself:

    IG_t = s(a* | C_t^real) - (1/N) sum_j s(a* | C_t^rand,j)             information gain, N = 3
    s(a* | C) = (1/L) sum_k w_k log pi(a*_k | C, a*_<k)                   score of the gold answer
    A_i = (R_i - mean_G R) / (std_G R + eps)                              group baseline, R = EM
    A_{i,p} = A_i + alpha * IG~_t / |Q_t|   for p in Q_t (step t's query tokens), else A_i
    loss = - sum_p mask_p A_{i,p} log pi(y_p | y_<p) / sum_p mask_p        (+ kl_coef * k3 KL)

The sections follow that order: 1 protocol, 2 rollout, 3 answers and rewards, 4 information gain,
5 shaping and advantages, 6 loss. Every function here is the plain version of its idea, pure (no
config, no ranks); step.py calls them with the run's config. machinery/fast.py holds twins of two
of them, answer_logprobs and policy_logprobs, and of machinery/lm.py's generate_turn (the same
results up to float rounding, tested), which runs use unless `--fast false`.

Departures from the paper and its official code (reasons in docs/departures.md, cited by number):
1. attention masks come from sequence lengths, never from comparing ids with the pad id;
2. IG contexts are built from the blocks the rollout recorded, not from a regex over the response;
3. retrieved text is sanitised: protocol tags and special-token strings cannot act as such;
4. the query tokens Q_t are the generated tokens whose text overlaps the query;
5. the empty-context baseline keeps step t's search block and empties its documents;
6. a step with no counterfactual pool (no other step of the batch) gets no IG;
7. LoRA adapters instead of every weight, with --lora_rank (off by default);
8. the instruction goes in the system turn, the question in the user turn;
9. the offline default starts with a supervised format warm-up (warmup.py);
10. the pool keeps documents of at least 10 characters (official code); empty documents get no IG;
11. only the first gold answer is scored unless --ig_all_golds;
12. --ig_center (not the paper's): IG centred in its question's group;
13. --step_reward hit (not the paper's): the hit itself as the step bonus, a baseline;
14. bf16 autocast where the device has bf16 matrix units, fp32 weights and log-softmax;
15. --ig_pool others (not the paper's, not the default): the own question left out of the pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from machinery.lm import generate_turn, pad_token_id, tail_logprobs, token_logprobs, truncate_left
from machinery.loaders import normalize_answer  # SQuAD/FlashRAG normalisation
from machinery.text import plain_text, sanitize_documents, special_strings

# ------------------------------------------------------------------------------------ 1. protocol

IGSEARCH_INSTRUCTION = (
    "Answer the question. Think in <think> </think>. To search, write <search> query </search>; "
    "results come in <documents> </documents>. Write the useful facts in <refine> </refine>. Give "
    "the final answer, a few words, in <answer> </answer>. Question: "
)
SEARCHR1_INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, you "
    "can call a search engine by <search> query </search> and it will return the top searched "
    "results between <information> and </information>. You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer inside "
    "<answer> and </answer>, without detailed illustrations. For example, <answer> Beijing "
    "</answer>. Question: "
)
# Search-R1's observation for a turn with neither a search nor an answer.
INVALID_ACTION = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> "
    "and </search>. If I want to give the final answer, I should put the answer between <answer> "
    "and </answer>. Let me try again.\n"
)


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
    instruction = template.instruction.removesuffix("Question: ").strip()
    question = plain_text(question.strip(), special_strings(tokenizer))  # the template's stay
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": instruction},
            {"role": "user", "content": "Question: " + question},
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{instruction}\nQuestion: {question}\n"


def observation_text(documents: str, template: Template) -> str:
    """What the environment appends after `</search>`."""
    return f"\n\n<{template.doc_tag}>{documents}</{template.doc_tag}>\n\n"


class Observation(NamedTuple):
    """What the environment appends after `</search>`, fitted to the response budget."""

    documents: str  # the documents as inserted (their tail cut when they did not fit)
    text: str  # the observation text around them
    ids: list[int]  # its token ids
    cut: int  # document tokens cut


def fit_documents(tokenizer, documents: str, template: Template, room: int) -> Observation:
    """The observation of `documents`, their tail cut until it holds at most `room` tokens (or the
    documents are empty), so no retriever, however long its passages, grows a response past
    max_response_tokens."""

    def encode(text: str) -> list[int]:  # inserted text: special-token strings stay plain text
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    obs = observation_text(documents, template)
    obs_ids = encode(obs)
    if len(obs_ids) <= room:
        return Observation(documents, obs, obs_ids, 0)
    doc_ids = encode(documents)
    keep = max(0, len(doc_ids) - (len(obs_ids) - room))
    while True:  # re-encoding at the cut may merge differently: cut again until it fits
        documents = tokenizer.decode(doc_ids[:keep])
        obs = observation_text(documents, template)
        obs_ids = encode(obs)
        if len(obs_ids) <= room or keep == 0:
            return Observation(documents, obs, obs_ids, len(doc_ids) - keep)
        keep = max(0, keep - (len(obs_ids) - room))


def find_block(text: str, tag: str, last: bool = False) -> re.Match | None:
    """First (or last) closed `<tag> ... </tag>` block in text, or None."""
    matches = list(re.finditer(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL))
    if not matches:
        return None
    return matches[-1] if last else matches[0]


# ------------------------------------------------------------------------------------- 2. rollout


@dataclass
class Step:
    """One search step: what the policy asked, what came back, what it kept."""

    query: str
    documents: str  # inner text of the documents block, as inserted
    query_span: tuple[int, int]  # token span [start, end) in response_ids of the query Q_t
    refine: str | None = None  # inner text of the first refine block after the documents
    cut: int = 0  # document tokens dropped so that the response stays within its budget


class Segment(NamedTuple):
    """One appended piece of a response: tokens [start, end) of response_ids and their text."""

    start: int
    end: int
    sampled: bool  # written by the policy (trained), or inserted by the environment
    text: str


@dataclass
class Trajectory:
    """A prompt and its response as token ids; the loss mask is built as tokens are appended."""

    prompt_ids: list[int]
    prompt_text: str
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)  # 1 sampled by the policy, 0 inserted
    segments: list[Segment] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    prefix_text: str | None = None  # prompt + response up to the first <search>, stripped (IG)
    done: bool = False
    truncated: bool = False

    def append(self, ids: list[int], text: str, generated: bool) -> tuple[int, int]:
        start = len(self.response_ids)
        self.response_ids += ids
        self.loss_mask += [int(generated)] * len(ids)
        self.segments.append(Segment(start, len(self.response_ids), generated, text))
        return start, len(self.response_ids)

    @property
    def response_text(self) -> str:
        return "".join(seg.text for seg in self.segments)

    @property
    def generated_texts(self) -> list[str]:
        return [seg.text for seg in self.segments if seg.sampled]


class PendingSearch(NamedTuple):
    """A search the policy wrote this turn, waiting for its documents."""

    traj: Trajectory
    query: str
    query_span: tuple[int, int]  # Q_t in response_ids


def char_span_to_tokens(tokenizer, ids: list[int], start: int, end: int) -> tuple[int, int]:
    """Token span [i, j) of the ids whose decoded text overlaps characters [start, end): the
    query tokens Q_t of a search (departure 4)."""
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]  # char end of token k
    starts = [0] + ends[:-1]
    hit = [k for k in range(len(ids)) if starts[k] < end and ends[k] > start]
    return (hit[0], hit[-1] + 1) if hit else (0, 0)


@torch.no_grad()
def rollout(
    model,
    tokenizer,
    prompts: list[str],
    search: Callable[[list[str]], list[str]],
    *,
    template: Template = TEMPLATES["igsearch"],
    max_searches: int = 5,
    max_turn_tokens: int = 512,
    max_response_tokens: int = 4096,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    turn: Callable = generate_turn,
) -> list[Trajectory]:
    """Multi-turn batched rollout. `search(queries) -> documents text` is called once per turn.

    At most max_searches searches; the turn after the last allowed search must answer. `turn`
    samples one turn (generate_turn, or fast.CachedTurns(): the same ids, the KV cache kept).
    """
    specials = special_strings(tokenizer)
    trajs = [Trajectory(tokenizer(p, add_special_tokens=False).input_ids, p) for p in prompts]
    for n_turn in range(max_searches + 1):
        active = [t for t in trajs if not t.done]
        if not active:
            break
        new = turn(
            model,
            tokenizer,
            [t.prompt_ids + t.response_ids for t in active],
            max_turn_tokens,
            temperature,
            generator,
            ("</search>", "</answer>"),
        )
        searching: list[PendingSearch] = []
        for traj, ids in zip(active, new):
            text = tokenizer.decode(ids)
            prior_text = traj.response_text
            start, _ = traj.append(ids, text, generated=True)
            if traj.steps and traj.steps[-1].refine is None:  # a refine block follows documents
                ref = find_block(text, "refine")
                traj.steps[-1].refine = ref.group(1).strip() if ref else ""
            query = find_block(text, "search", last=True)
            if find_block(text, "answer") is not None or n_turn == max_searches:
                traj.done = True
            elif query is not None:
                if traj.prefix_text is None:
                    prefix = traj.prompt_text + prior_text + text[: query.start()]
                    traj.prefix_text = prefix.rstrip()
                span = char_span_to_tokens(tokenizer, ids, query.start(1), query.end(1))
                q_span = (start + span[0], start + span[1])
                searching.append(PendingSearch(traj, query.group(1).strip(), q_span))
            else:  # neither a search nor an answer: Search-R1's invalid-action observation
                invalid_ids = tokenizer(INVALID_ACTION, add_special_tokens=False).input_ids
                traj.append(invalid_ids, INVALID_ACTION, False)
        if searching:
            docs = search([p.query for p in searching])  # one batched retrieval per turn
            for (traj, query, span), d in zip(searching, docs):
                # the documents may fill the budget but leave room for one more turn
                room = max_response_tokens - max_turn_tokens - len(traj.response_ids)
                obs = fit_documents(tokenizer, sanitize_documents(d, specials), template, room)
                traj.append(obs.ids, obs.text, generated=False)  # loss mask 0: inserted tokens
                traj.steps.append(
                    Step(query=query, documents=obs.documents, query_span=span, cut=obs.cut)
                )
                if len(obs.ids) > room:  # not even the empty documents block fits: no more turns
                    traj.done = traj.truncated = True
        for traj in trajs:
            if not traj.done and len(traj.response_ids) >= max_response_tokens:
                traj.done = traj.truncated = True
    for traj in trajs:
        if traj.steps and traj.steps[-1].refine is None:
            traj.steps[-1].refine = ""
    return trajs


# ------------------------------------------------------------------------ 3. answers and rewards


def extract_answer(traj: Trajectory) -> str | None:
    """The last closed <answer> block written by the policy; inserted text never counts."""
    for text in reversed(traj.generated_texts):
        m = find_block(text, "answer", last=True)
        if m:
            return m.group(1).strip()
    return None


def exact_match(prediction: str | None, golds: list[str]) -> float:
    """EM = 1 if the normalised prediction equals any normalised gold answer."""
    if prediction is None:
        return 0.0
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def documents_hold_answer(documents: str, golds: list[str]) -> bool:
    """Whether retrieved text holds a gold answer as whole words, both normalised: the query found
    it. The one hit test of the project: the warm-up keeps its examples by it, training logs it as
    `hit`, evaluation reports it, and the hit-bonus baseline (`--step_reward hit`) rewards it."""
    text = f" {normalize_answer(documents)} "
    return any(f" {g} " in text for g in map(normalize_answer, golds) if g)


# -------------------------------------------------------------------------- 4. information gain


class Evidence(NamedTuple):
    """What a search step brought into the context: its documents and the refine block after them.
    IG's counterfactuals swap this pair jointly."""

    documents: str
    refine: str


Draws = list[list[list[Evidence]]]  # draws[i][t]: the counterfactuals of step t of rollout i


def ig_context(
    traj: Trajectory, t: int, template: Template, replace: Evidence | None = None
) -> str:
    """C_t: prefix, the (search, documents, refine) blocks of steps s <= t joined by "\\n", then
    "\\n<answer> ". Think blocks between steps and all steps after t are dropped. `replace` swaps
    step t's (documents, refine) pair for another one: the counterfactual C_t^rand. The blocks are
    what the rollout recorded, not a regex over the response (departure 2).
    """
    parts = [traj.prefix_text or traj.prompt_text.rstrip()]
    for s, step in enumerate(traj.steps[: t + 1]):
        docs, refine = (step.documents, step.refine)
        if s == t and replace is not None:
            docs, refine = replace
        parts.append(f"<search>{step.query}</search>")
        parts.append(f"<{template.doc_tag}>{docs}</{template.doc_tag}>")
        if template.refine and refine:
            parts.append(f"<refine>{refine}</refine>")
    return "\n".join(parts) + "\n<answer> "


def step_pairs(traj: Trajectory) -> list[Evidence]:
    """The (documents, refine) pair of every search step of a trajectory."""
    return [Evidence(s.documents, s.refine or "") for s in traj.steps]


def draw_counterfactuals(
    own: Evidence, pool: list[Evidence], n: int, generator: torch.Generator
) -> list[Evidence]:
    """N (documents, refine) pairs from the batch pool, never equal to the step's own pair; without
    replacement unless fewer than N remain."""
    others = [p for p in pool if p != own]
    if not others:
        return []  # no pool: no IG (departure 6)
    if len(others) >= n:
        idx = torch.randperm(len(others), generator=generator)[:n].tolist()
    else:
        idx = torch.randint(len(others), (n,), generator=generator).tolist()
    return [others[i] for i in idx]


def plan_counterfactuals(
    pairs: list[list[Evidence]],
    n_random: int = 3,
    baseline: str = "random",
    generator: torch.Generator | None = None,
    group_size: int = 0,
) -> Draws:
    """The baselines of every step: draws[i][t] replaces step t of trajectory i ([] = no IG).

    pairs[i] = step_pairs(trajectory i) over the whole batch. The pool is every pair whose documents
    hold at least 10 characters; steps draw in batch order from one generator, so ranks of a
    data-parallel run that plan over the same gathered list draw exactly what one process draws.
    group_size = G leaves the step's own question (its G rollouts) out of its pool (departure 15):
    at a small batch they are a large share of it and may hold the same gold; 0: the whole batch.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    pool = [(i, p) for i, steps in enumerate(pairs) for p in steps if len(p[0].strip()) >= 10]
    same = lambda i, j: group_size > 0 and i // group_size == j // group_size
    draws = []
    for i, steps in enumerate(pairs):
        row = []
        for own in steps:
            if len(own[0].strip()) == 0:
                row.append([])  # steps whose documents are empty get no IG
            elif baseline == "empty":
                row.append([Evidence("", "")])  # departure 5
            else:
                mine = [p for j, p in pool if not same(i, j)]  # the pool this step draws from
                row.append(draw_counterfactuals(own, mine, n_random, generator))
        draws.append(row)
    return draws


@dataclass
class ScoreRequest:
    """The scoring work of search step t of trajectory i against one gold answer: the contexts
    C_t^real, C_t^rand,1..N and the answer, each tokenised on its own (as the official code)."""

    traj: int
    step: int
    context_ids: list[list[int]]  # the real context first, then the N counterfactuals
    answer_ids: list[int]


def score_requests(
    tokenizer,
    trajs: list[Trajectory],
    golds: list[list[str]],
    draws: Draws,
    template: Template,
    all_golds: bool = False,
) -> list[ScoreRequest]:
    """One ScoreRequest per scored step and gold (only the first gold unless all_golds)."""
    requests, ids = [], {}  # ids: each distinct text tokenised once
    tokenize = lambda text: ids.setdefault(
        text, tokenizer(text, add_special_tokens=False).input_ids
    )
    # a gold answer is plain text, its special-token strings too
    answer = lambda text: (
        tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    )
    for i, traj in enumerate(trajs):
        for t, step in enumerate(traj.steps):
            if not draws[i][t]:
                continue
            contexts = [ig_context(traj, t, template)]
            contexts += [ig_context(traj, t, template, pair) for pair in draws[i][t]]
            for gold in golds[i] if all_golds else golds[i][:1]:
                requests.append(
                    ScoreRequest(i, t, [tokenize(c) for c in contexts], answer(gold.strip()))
                )
    return requests


def answer_score(logp: torch.Tensor, head_tokens: int = 3, head_weight: float = 3.0) -> float:
    """s(a* | C) = (1/L) sum_k w_k log p_k from the answer tokens' log-probs (L,): w_k = head_weight
    on the first min(head_tokens, L) tokens, 1 after, divided by their mean (official code: 3, 3;
    head_weight 1 is the plain mean)."""
    w = torch.ones(len(logp))
    w[: min(head_tokens, len(logp))] = head_weight
    w = w / w.mean()  # (L,)
    return float((w * logp.cpu()).mean())


@torch.no_grad()
def answer_logprobs(
    model, requests: list[ScoreRequest], pad_id: int, max_len: int, batch_size: int = 16
) -> list[list[torch.Tensor]]:
    """log pi(a*_k | C, a*_<k) of the answer tokens after every context of every request: one list
    of 1 + N (L,) tensors per request, the real context first.

    Each context is cut from the left so that context + answer fit max_len; the answer's ids follow
    the context's (the two are never tokenised together). lm.tail_logprobs runs the sequences
    teacher-forced, left-padded in batches of similar length, the LM head on the answer only.
    """
    seqs = [
        truncate_left(c, r.answer_ids, max_len) + r.answer_ids
        for r in requests
        for c in r.context_ids
    ]
    n_answer = [len(r.answer_ids) for r in requests for _ in r.context_ids]
    flat = tail_logprobs(model, seqs, n_answer, pad_id, batch_size)  # one (L,) per sequence
    out, k = [], 0
    for r in requests:
        out.append(flat[k : k + len(r.context_ids)])
        k += len(r.context_ids)
    return out


class Gain(NamedTuple):
    """The information gain of one search step and the scores it came from."""

    ig: float  # IG_t
    scores: list[float]  # s(a*|C) of the kept gold: C_t^real, then C_t^rand,1..N


@torch.no_grad()
def information_gain(
    model,
    tokenizer,
    trajs: list[Trajectory],
    golds: list[list[str]],
    draws: Draws,
    *,
    template: Template = TEMPLATES["igsearch"],
    all_golds: bool = False,
    max_len: int = 2048,
    batch_size: int = 16,
    head_tokens: int = 3,
    head_weight: float = 3.0,
    logprobs: Callable = answer_logprobs,
) -> list[list[Gain | None]]:
    """IG_t = s(a*|C_t^real) - (1/N) sum_j s(a*|C_t^rand,j) for every search step: gains[i][t],
    None where step t of trajectory i gets no IG (no counterfactual, or empty documents).

    draws: the counterfactuals of each step (plan_counterfactuals). `logprobs` is answer_logprobs,
    or its twin fast.answer_logprobs_shared_prefix (the same log-probs up to float rounding; the
    context that a rollout's requests share runs once). With several golds, the one with the best
    real score is kept.
    """
    requests = score_requests(tokenizer, trajs, golds, draws, template, all_golds)
    answer_logp = logprobs(model, requests, pad_token_id(tokenizer), max_len, batch_size)
    gains: list[list[Gain | None]] = [[None] * len(t.steps) for t in trajs]
    for r, per_context in zip(requests, answer_logp):
        real, *rand = [answer_score(lp, head_tokens, head_weight) for lp in per_context]
        kept = gains[r.traj][r.step]
        if kept is None or real > kept.scores[0]:  # the gold with the best real score
            gains[r.traj][r.step] = Gain(real - sum(rand) / len(rand), [real, *rand])  # IG_t
    return gains


# ----------------------------------------------------------------- 5. shaping and advantages


def shape_ig(
    ig: float, dead_zone: float = 0.0, neg_scale: float = 1.0, clip: float | None = None
) -> float:
    """IG~: 0 inside the dead zone |IG| < delta, eta * IG when negative, then clipped to [-c, c]."""
    if abs(ig) < dead_zone:
        return 0.0
    if ig < 0:
        ig = neg_scale * ig
    return max(-clip, min(clip, ig)) if clip is not None else ig


def center_in_groups(
    step_bonus: list[list[float | None]], group_size: int
) -> list[list[float | None]]:
    """IG_t minus the mean IG of the scored steps of its group (the G rollouts of one question).

    Not in the paper (`--ig_center`): with random documents as the baseline almost every query gets
    IG > 0; centred, the bonus ranks a question's queries as the group baseline ranks outcomes.
    """
    out = []
    for g in range(0, len(step_bonus), group_size):
        group = step_bonus[g : g + group_size]
        scored = [v for row in group for v in row if v is not None]
        mean = sum(scored) / len(scored) if scored else 0.0
        out += [[None if v is None else v - mean for v in row] for row in group]
    return out


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (R_i - mean_G R) / (std_G R + eps) over consecutive groups of G rollouts.

    (B,) -> (B,)."""
    r = rewards.view(-1, group_size)  # (B/G, G)
    adv = r - r.mean(-1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)  # (B,)


def token_advantages(
    trajs: list[Trajectory],
    outcome_adv: torch.Tensor,
    step_bonus: list[list[float | None]],
    *,
    alpha: float,
    dead_zone: float = 0.0,
    neg_scale: float = 1.0,
    clip: float | None = None,
) -> list[torch.Tensor]:
    """Per-token advantages: A_{i,p} = A_i + alpha * IG~_t / |Q_t| for p in Q_t, else A_i.

    outcome_adv (B,) is A_i; step_bonus[i][t] the value alpha weighs on step t's query tokens: IG_t
    in the paper (None: the step gets no bonus), shaped by shape_ig. Returns one (R_i,) tensor per
    trajectory, aligned with its response_ids.
    """
    out = []
    for traj, a_i, bonus in zip(trajs, outcome_adv.tolist(), step_bonus):
        tok = torch.full((len(traj.response_ids),), a_i)  # (R,)
        for step, v in zip(traj.steps, bonus):
            lo, hi = step.query_span
            if v is not None and hi > lo and alpha != 0:
                tok[lo:hi] += alpha * shape_ig(v, dead_zone, neg_scale, clip) / (hi - lo)
        out.append(tok)
    return out


# ------------------------------------------------------------------------------------- 6. loss


def policy_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_p | y_<p) at the response positions, and the policy entropy there, both (B, R) and
    0 where the loss mask is 0; logp keeps its gradient, the entropy has none."""
    R = batch["targets"].shape[1]
    # (B, R, V): p predicts token p + 1
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=R + 1,
    ).logits[:, :-1]
    logp, entropy = token_logprobs(logits, batch["targets"], entropy=True)  # (B, R) each
    mask = batch["loss_mask"].to(logp.dtype)
    return logp * mask, entropy * mask


def loss_tokens(trajs: list[Trajectory]) -> int:
    """sum_p mask_p over a batch: the loss's denominator (the tokens the policy sampled)."""
    return sum(sum(t.loss_mask) for t in trajs)


def policy_loss(
    logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE with a baseline: loss = - sum_p mask_p A_p log pi_p / sum_p mask_p (+ kl_coef KL).

    KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1, on the same tokens. All (B, R).
    n_tokens is sum_p mask_p over the whole batch when this is one micro-batch of it, so the
    accumulated gradient equals the full batch's. Returns the loss and the KL (0 without a
    reference).
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
