"""fast.py against its plain twins: each speed-up gives what the plain function gives."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import igsearch as ig
import step as rl
import warmup
from igsearch import TEMPLATES, ScoreRequest, Step, Trajectory
from machinery import fast, lm
from train import Config

ROOT = Path(__file__).resolve().parent.parent
TPL = TEMPLATES["igsearch"]


def requests_of(ctxs: list[list[int]], answers: list[list[int]]) -> list[ScoreRequest]:
    """Each (context, answer) pair as a one-context request of one rollout (trajectory 0)."""
    return [ScoreRequest(0, k, [c], a) for k, (c, a) in enumerate(zip(ctxs, answers))]


@pytest.fixture(params=["full", "lora"])
def policy(request, tiny_model):
    """The tiny model, and the same with a LoRA adapter whose B is nonzero (as after training): each
    speed-up must stay exact under --lora_rank too."""
    if request.param == "full":
        return tiny_model
    pytest.importorskip("peft")
    from machinery import lora

    model = copy.deepcopy(tiny_model)
    lora.add_adapter(model, 4, 8.0, Config().lora_targets)
    gen = torch.Generator().manual_seed(1)
    for layer in lora.adapter_layers(model):
        layer.lora_B["default"].weight.data.normal_(0, 0.05, generator=gen)
    return model.eval()


# ------------------------------------------------------------------ 1. CachedTurns = generate_turn


@pytest.mark.parametrize("keep", [[0, 1, 2], [0, 2]])
def test_cached_turns_continue_exactly_like_a_fresh_prefill(tokenizer, policy, keep):
    """The next turn on the kept cache (rows that stopped early fed filler, one row dropped) samples
    what generate_turn's fresh prefill of the whole sequences samples."""
    texts = ("What is the capital of France? Paris is", "Hamlet", "Who wrote")
    seqs = [tokenizer(t).input_ids for t in texts]
    probe = lm.generate_turn(policy, tokenizer, seqs, 8, 0.0, None, ())
    words = [tokenizer.decode([t]) for t in probe[0][:-1]]  # row 0 stops early, the others run on
    stop = (
        next(
            w
            for w in words
            if w.strip().isalpha() and all(w not in tokenizer.decode(p) for p in probe[1:])
        ),
    )
    turns = fast.CachedTurns()
    new = turns(policy, tokenizer, seqs, 8, 0.0, None, stop)
    assert new == lm.generate_turn(policy, tokenizer, seqs, 8, 0.0, None, stop)
    assert len(new[0]) < max(len(n) for n in new)  # row 0's later positions hold filler
    docs = [tokenizer(t).input_ids for t in (" Doc 1 Paris", " Berlin is a city in Germany.", " x")]
    cont = [seqs[b] + new[b] + docs[b] for b in keep]
    assert turns.rows_continued(cont) == keep
    cached = turns(policy, tokenizer, cont, 6, 0.0, None, ())
    assert cached == lm.generate_turn(policy, tokenizer, cont, 6, 0.0, None, ())
    assert turns.rows_continued([seqs[0] + [5]]) is None  # not a continuation: a fresh prefill


def test_greedy_rollouts_are_the_same_with_the_cache_kept_across_turns(tokenizer, policy):
    prompts = [ig.build_prompt(tokenizer, q, TPL) for q in ("Who?", "What city?", "Where is it?")]
    search = lambda queries: ['Doc 1(Title: "Paris") Paris is the capital.'] * len(queries)
    runs = [
        ig.rollout(
            policy,
            tokenizer,
            prompts,
            search,
            max_searches=2,
            max_turn_tokens=10,
            temperature=0.0,
            turn=turn,
        )
        for turn in (lm.generate_turn, fast.CachedTurns())
    ]
    assert [t.response_ids for t in runs[0]] == [t.response_ids for t in runs[1]]
    assert [t.loss_mask for t in runs[0]] == [t.loss_mask for t in runs[1]]


# ------------------------------------------- 2. answer_logprobs_shared_prefix = answer_logprobs


def scores(logprobs: list[list[torch.Tensor]]) -> list[list[float]]:
    """s(a*|C) of every context's answer log-probs (igsearch.answer_score)."""
    return [[ig.answer_score(lp) for lp in row] for row in logprobs]


def igs(gains) -> list[float | None]:
    """IG_t of every step, flat (None where not scored)."""
    return [g and g.ig for row in gains for g in row]


def test_shared_prefix_scores_equal_full_contexts(tokenizer, policy):
    """The prefix computed once and its cache repeated (left-padded prefixes and continuations of
    different lengths, answers of different lengths) gives the scores of each full context."""
    prefixes = [
        "PROMPT What is the capital of France? <search> capital </search>",
        "Who wrote Hamlet? <search> a </search>",
    ]
    docs = [
        "<documents> Doc 1 Paris is the capital of France </documents>",
        "<documents> x </documents>",
        "<documents> Berlin is in Germany, the largest city </documents> <refine> Berlin </refine>",
    ]
    requests = [
        ScoreRequest(
            k,
            0,
            [tokenizer(p + d + "\n<answer> ").input_ids for d in docs],
            tokenizer(ans).input_ids,
        )
        for k, (p, ans) in enumerate(zip(prefixes, ["Paris", "William Shakespeare the writer"]))
    ]
    requests.append(
        ScoreRequest(2, 0, [tokenizer("alone <answer> ").input_ids], tokenizer("x").input_ids)
    )
    pad = tokenizer.pad_token_id
    for max_len, batch_size in [
        (512, 16),
        (512, 3),
        (20, 16),
    ]:  # 20: left truncation, nothing shared
        full = scores(ig.answer_logprobs(policy, requests, pad, max_len, batch_size=1))
        shared = scores(
            fast.answer_logprobs_shared_prefix(policy, requests, pad, max_len, batch_size)
        )
        assert [len(s) for s in shared] == [3, 3, 1]
        assert sum(shared, []) == pytest.approx(sum(full, []), abs=1e-4)


def test_trunk_shares_nest_the_steps_of_a_rollout():
    """A rollout's step-2 contexts hold step 1's real blocks: the group's trunk (its longest
    context) is shared by each request up to where it departs, less one token kept to predict the
    first answer token; a request that shares nothing gets 0, and the trunk is cut to the longest
    share."""
    contexts = [
        [1, 2, 3, 10, 11, 50],
        [1, 2, 3, 20, 50],  # step 1: real documents 10 11, random 20
        [1, 2, 3, 10, 11, 4, 12, 13, 50],
        [1, 2, 3, 10, 11, 4, 21, 22, 23, 50],  # step 2
        [9, 50],
    ]  # shares nothing
    answers = [[7]] * 5
    seqs = [c + a for c, a in zip(contexts, answers)]
    [(idx, trunk, shares)] = fast.trunk_shares(seqs, answers, [5])
    assert idx == [0, 1, 2, 3, 4] and shares == [5, 3, 6, 9, 0]
    assert trunk == [1, 2, 3, 10, 11, 4, 21, 22, 23]
    split = fast.trunk_shares(
        seqs, answers, [2, 3]
    )  # one group per step: step 1's blocks run twice
    assert [g[1] for g in split] == [[1, 2, 3, 10, 11], trunk]
    assert [g[2] for g in split] == [[5, 3], [6, 9, 0]]
    requests = [
        ScoreRequest(i, t, [[1]] * 4, [7]) for i, t in ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2))
    ]
    assert fast.rollout_groups(requests, 8) == [8, 8, 4]  # a rollout's steps, up to 8 rows a group


def test_a_rollouts_steps_scored_on_one_trunk_equal_full_contexts(tokenizer, policy):
    """One group over two search steps, a stranger that shares nothing and a row per gold: each row
    attends to its own share of the trunk, with its own positions, and scores as its full
    context."""
    s1 = "PROMPT Who? <search> a </search>\n<documents> Doc 1 Paris is the capital </documents>"
    texts = [
        s1,
        "PROMPT Who? <search> a </search>\n<documents> x </documents>",
        s1 + "\n<refine> Paris </refine>\n<search> b </search>\n"
        "<documents> Lyon is a city </documents>",
        s1 + "\n<refine> Paris </refine>\n<search> b </search>\n"
        "<documents> Berlin, Germany </documents>",
        "unrelated",
    ]
    ctxs = [tokenizer(t + "\n<answer> ").input_ids for t in texts]
    answers = [
        tokenizer(a).input_ids for a in ["Paris", "Paris", "Paris France", "Paris France", "x"]
    ]
    ctxs.append(ctxs[0])  # a second gold of step 1
    answers.append(tokenizer("the city of Paris").input_ids)
    pad, requests = tokenizer.pad_token_id, requests_of(ctxs, answers)
    for max_len, batch_size in [(512, 16), (512, 2), (24, 16)]:  # 24: contexts truncated unequally
        full = scores(ig.answer_logprobs(policy, requests, pad, max_len, batch_size=1))
        shared = scores(
            fast.answer_logprobs_shared_prefix(
                policy, requests, pad, max_len, batch_size, group_sizes=[6]
            )
        )
        assert sum(shared, []) == pytest.approx(sum(full, []), abs=1e-4)


def test_information_gain_on_shared_prefixes_equals_full_contexts(tokenizer, policy):
    trajs = []
    for k, has in enumerate([True, False, False, True, False]):
        t = Trajectory([], f"Question {k}?")
        t.prefix_text = f"Question {k}?"
        docs = (
            'Doc 1(Title: "Paris") Paris is the capital' if has else f'Doc 1(Title: "Berlin") {k}'
        )
        t.steps = [
            Step("capital", docs, (0, 0), ""),  # a second step: the prefix holds a whole step
            Step("second", f'Doc 1(Title: "Rome") Rome is in Italy {k}', (0, 0), "Rome"),
        ]
        trajs.append(t)
    golds = [["Paris"], ["Paris"], ["Berlin Germany"], ["Paris"], ["Rome"]]
    draws = ig.plan_counterfactuals([ig.step_pairs(t) for t in trajs])
    kw = dict(template=TPL, max_len=512, batch_size=8)
    full = igs(ig.information_gain(policy, tokenizer, trajs, golds, draws, **kw))
    shared = igs(
        ig.information_gain(
            policy,
            tokenizer,
            trajs,
            golds,
            draws,
            logprobs=fast.answer_logprobs_shared_prefix,
            **kw,
        )
    )
    assert sum(v is not None for v in full) == 10
    assert shared == pytest.approx(full, abs=1e-4)


# --------------------------------------------------- 3. fast.policy_logprobs = policy_logprobs


def test_lm_head_on_trained_positions_only_gives_the_same_logprobs(tokenizer, policy):
    trajs = []
    for q, a in [
        ("Question?", "<answer> a </answer>"),
        ("A much longer question?", "<answer> Paris </answer>"),
    ]:
        t = Trajectory(tokenizer(q).input_ids, q)
        t.append(tokenizer("<search> q </search>").input_ids, "", True)
        t.append(tokenizer("<documents> d </documents>").input_ids, "", False)
        t.append(tokenizer(a).input_ids, "", True)
        trajs.append(t)
    batch = lm.response_batch(trajs, tokenizer.pad_token_id)
    plain_logp, plain_ent = ig.policy_logprobs(policy, batch)
    logp, ent = fast.policy_logprobs(policy, batch)
    assert torch.allclose(logp, plain_logp, atol=1e-5) and torch.allclose(ent, plain_ent, atol=1e-5)
    assert torch.all(logp[batch["loss_mask"] == 0] == 0) and torch.all(
        ent[batch["loss_mask"] == 1] > 0
    )


# ------------------------------------------------------ 4. lean_backward: the same update, leaner


def answer_trajectories(tokenizer):
    """Four supervised answer trajectories of different lengths, and per-token advantages."""
    trajs = [
        warmup.supervised_trajectory(
            tokenizer, f"Question {k}?", [(f"<answer> {a} </answer>", True)]
        )
        for k, a in enumerate(["Paris", "Berlin Germany", "Rome", "x"])
    ]
    return trajs, [torch.linspace(-1, 1, len(t.response_ids)) for t in trajs]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def updated_weights(model, tokenizer, setup=None, **cfg) -> torch.Tensor:
    """The weights after one SGD update of a copy (setup(copy) first) over two micro-batches."""
    model = copy.deepcopy(model)
    if setup:
        setup(model)
    trajs, tok_adv = answer_trajectories(tokenizer)
    rl.update(
        model,
        None,
        tokenizer,
        trajs,
        tok_adv,
        torch.optim.SGD(model.parameters(), lr=0.1),
        Config(micro_batch=2, **cfg),
    )
    return flat(model)


def test_the_fast_update_equals_the_plain_one(tokenizer, policy):
    plain = updated_weights(policy, tokenizer, fast=False)
    lean = updated_weights(policy, tokenizer, fast.lean_backward, fast=True)
    assert torch.allclose(plain, lean, atol=1e-6) and not torch.equal(plain, flat(policy))


def test_lean_backward_keeps_the_gradient_and_trims_every_k_layers(
    tokenizer, tiny_model, monkeypatch
):
    """lean_backward: a tied embedding's sparse gradient gives the same update as the dense one
    (over two micro-batches, so it also adds into an existing .grad); an untied model keeps a
    dense embedding gradient (AdamW takes no sparse one); the heap is trimmed once per
    `trim_every` layers a backward pass goes through."""
    from transformers import LlamaForCausalLM

    trajs, tok_adv = answer_trajectories(tokenizer)
    plain, lean = (
        updated_weights(tiny_model, tokenizer, setup) for setup in (None, fast.lean_backward)
    )
    assert torch.allclose(plain, lean, atol=1e-6) and not torch.equal(plain, flat(tiny_model))
    config = {**tiny_model.config.to_dict(), "tie_word_embeddings": False}
    untied = LlamaForCausalLM(tiny_model.config.__class__(**config))
    fast.lean_backward(untied)
    assert not untied.get_input_embeddings().sparse
    stats = rl.update(
        untied, None, tokenizer, trajs, tok_adv, torch.optim.AdamW(untied.parameters()), Config()
    )
    assert not stats["skipped"]
    for every, expected in ((1, 2), (2, 1)):  # the tiny model has 2 decoder layers
        model, trims = copy.deepcopy(tiny_model), []
        fast.lean_backward(model, trim_every=every)
        assert model.get_input_embeddings().sparse  # tied: the head's weight is the embedding's
        monkeypatch.setattr(fast, "release_freed_memory", lambda: trims.append(1))
        model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
        assert len(trims) == expected
    model = copy.deepcopy(tiny_model)
    undo = fast.lean_backward(model, trim_every=1)  # bench.py's comparison: off again, as before
    undo()
    trims.clear()
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    assert trims == [] and not model.get_input_embeddings().sparse


HEAP_PROBE = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from machinery import fast
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**30
big = torch.ones(8 << 18); del big  # a freed 8 MiB block: glibc raises its mmap threshold
base = rss()
# 1 MiB tensors, small ones between
pairs = [(torch.ones(1 << 18), torch.ones(1 << 12)) for _ in range(300)]
kept = [small for _, small in pairs]
del pairs  # 300 MiB freed in the middle of the heap
if sys.argv[1] == 'release':
    fast.release_freed_memory()
print(rss() - base)
"""


@pytest.mark.skipif(fast.LIBC is None or not hasattr(fast.LIBC, "malloc_trim"), reason="glibc only")
def test_freed_tensors_go_back_to_the_os():
    """release_freed_memory: 300 MiB of freed tensors held between live ones leave the process."""
    held = {
        mode: float(
            subprocess.run(
                [sys.executable, "-c", HEAP_PROBE, mode, str(ROOT)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for mode in ("keep", "release")
    }
    assert held["keep"] > 0.2  # glibc keeps them: the behaviour the call exists for
    assert held["release"] < 0.05
