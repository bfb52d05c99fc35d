"""static_turns.StaticTurns against its plain twin lm.generate_turn: the same ids, greedy and
sampled, under the same generator, over rollouts whose rows search, read documents of different
lengths and stop at different turns."""

import shutil

import pytest
import torch

import igsearch as ig
from machinery import lm
from machinery import static_turns as st

TPL = ig.TEMPLATES["igsearch"]
relayout = st.relayout


class Steered(torch.nn.Module):
    """The tiny Llama, its last logits plus a bias chosen by the last input token (a bigram): it
    writes `<search> Paris` after a newline, then either closes the search (weight `close`) or
    wanders. A function of the ids alone, so it runs inside a static cache and a captured step."""

    def __init__(self, model, tokenizer, close: float = 14.0):
        super().__init__()
        self.model, self.config = model, model.config
        one = lambda s: tokenizer(s, add_special_tokens=False).input_ids[0]  # noqa: E731
        bias = torch.zeros(len(tokenizer), len(tokenizer))  # (V, V) previous id -> next logits
        for a, b in [("\n", "<"), ("\n\n", "<"), ("<", "search"), ("search", ">")]:
            bias[one(a), one(b)] = 40.0
        bias[one(">"), one(" Paris")], bias[one(" </"), one("search")] = 40.0, 40.0
        bias[one(" Paris"), one(" </")] = close
        self.register_buffer("bias", bias)

    def forward(self, input_ids, cache=None, **kw):
        out = self.model(input_ids=input_ids, cache=cache, **kw)
        out.logits = out.logits + self.bias[input_ids[:, -1:]]  # (B, 1, V)
        return out


def rollouts(policy, tokenizer, turn, temperature: float, seed: int = 0):
    """Four rows; documents longer for later rows and later turns, so rows reach the response
    budget (and stop) at different turns. Returns the trajectories and the generator after."""
    prompts = [ig.build_prompt(tokenizer, q, TPL) for q in ("Who?", "What city?", "Where?", "Why?")]
    calls = []

    def search(queries):
        calls.append(len(queries))
        return [
            f'Doc 1(Title: "Paris") {"Paris is a city. " * (1 + 3 * i + len(calls))}'
            for i in range(len(queries))
        ]

    gen = torch.Generator().manual_seed(seed)
    trajs = ig.rollout(
        policy,
        tokenizer,
        prompts,
        search,
        max_searches=3,
        max_turn_tokens=12,
        max_response_tokens=150,
        temperature=temperature,
        generator=gen,
        turn=turn,
    )
    return trajs, gen


def longest(trajs) -> int:
    return max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)


def test_multinomial_is_an_exponential_race():
    """The identity the twin's sampling rests on: torch.multinomial(probs, 1) picks
    argmax(probs / E) with E the generator's exponential draw of probs' shape, and leaves the
    generator where that draw does. A PyTorch that changes its sampler fails here first."""
    for seed in range(20):
        logits = torch.randn(3, 600, generator=torch.Generator().manual_seed(100 + seed)) * 4
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        plain = lm.sample_token(logits, 0.7, g1)
        twin = st.pick_tokens(logits, 0.7, st.exponential_noise(3, 600, "cpu", g2))
        assert torch.equal(plain, twin) and torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("check_every", [1, 5])
def test_rollouts_equal_the_plain_loop(
    tokenizer, tiny_model, temperature, check_every, monkeypatch
):
    """Token for token the plain loop's rollout, the generator left in the same state: rows that
    search, read documents of different lengths, stop within a turn at different steps (steps
    run past the last stop undone) and leave the batch at different turns; the batch padded to
    6 rows and the cache near the longest sequence's size: rows move left (relayout), never grow."""
    policy = Steered(tiny_model, tokenizer).eval()
    plain, g_plain = rollouts(policy, tokenizer, lm.generate_turn, temperature)
    moves = []
    monkeypatch.setattr(st, "relayout", lambda *a: moves.append(a[2]) or relayout(*a))
    turns = st.StaticTurns(rows=6, max_len=longest(plain) + 60, check_every=check_every)
    twin, g_twin = rollouts(policy, tokenizer, turns, temperature)
    assert set(moves) <= {longest(plain) + 60}  # moved within the same shape
    assert [t.response_ids for t in twin] == [t.response_ids for t in plain]
    assert [t.loss_mask for t in twin] == [t.loss_mask for t in plain]
    assert torch.equal(g_twin.get_state(), g_plain.get_state())
    turn_counts = [len(t.generated_texts) for t in plain]
    assert len(set(turn_counts)) > 1  # rows left at different turns
    assert sum(len(t.steps) for t in plain) >= 4  # documents were inserted
    doc_lengths = {g.end - g.start for t in plain for g in t.segments if not g.sampled}
    assert len(doc_lengths) > 1


def test_step_logits_equal_a_fresh_prefill(tokenizer, tiny_model, monkeypatch):
    """Each step's logits, on a continued cache (holes from padding, a row that stopped early and
    a row that left, then rows moved left and the cache grown), equal a fresh forward of the row's
    whole sequence so far, to 1e-4 (logits up to ~10)."""
    moves = []
    monkeypatch.setattr(st, "relayout", lambda *a: moves.append(a[2]) or relayout(*a))
    seqs = [
        tokenizer(t).input_ids for t in ("What is the capital of France? Paris is", "Hamlet", "Who")
    ]
    record = []
    turns = st.StaticTurns(rows=4, max_len=24, check_every=3, record=record)
    first = turns(tiny_model, tokenizer, seqs, 8, 0.0, None, ())
    docs = [tokenizer(t).input_ids for t in (" Doc 1 Paris", " Berlin is a city in Germany.", "x")]
    cont = [seqs[b] + first[b] + docs[b] for b in (0, 2)]
    record.clear()
    new = turns(tiny_model, tokenizer, cont, 6, 0.0, None, ("Paris",))
    assert new == lm.generate_turn(tiny_model, tokenizer, cont, 6, 0.0, None, ("Paris",))
    checked = 0
    for t, logits in enumerate(record):
        for r, (s, n) in enumerate(zip(cont, new)):
            if t < len(n):  # steps after a row's stop are filler: not compared
                ref = tiny_model(input_ids=torch.tensor([s + n[:t]])).logits[0, -1]
                assert torch.allclose(logits[r], ref, atol=1e-4, rtol=1e-5)
                checked += 1
    assert checked >= 8 and moves  # rows were moved (and the cache grown)


def inductor_available() -> bool:
    return shutil.which("g++") is not None or shutil.which("clang++") is not None


@pytest.mark.parametrize(
    "backend",
    [
        "eager",
        pytest.param(
            "inductor",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    not inductor_available(), reason="inductor on the CPU needs a C++ compiler"
                ),
            ],
        ),
    ],
)
def test_one_graph_and_no_recompiles_over_a_rollout(tokenizer, tiny_model, backend):
    """torch.compile(fullgraph=True) of the decode step captures one graph for the whole sampled
    rollout (several turns, documents, a relayout, rows leaving) and the next rollout on the same
    instance: no recompile. eager: dynamo's capture alone (1 s); inductor: compiled (~70 s)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    count = CompileCounterWithBackend(backend)
    policy = Steered(tiny_model, tokenizer).eval()
    plain, _ = rollouts(policy, tokenizer, lm.generate_turn, 1.0)
    size = max(longest(plain), longest(rollouts(policy, tokenizer, lm.generate_turn, 1.0, 1)[0]))
    turns = st.StaticTurns(rows=4, max_len=size + 60, compile=count, check_every=4)
    twin, _ = rollouts(policy, tokenizer, turns, 1.0)
    assert [t.response_ids for t in twin] == [t.response_ids for t in plain]
    rollouts(policy, tokenizer, turns, 1.0, seed=1)  # a second rollout, the same buffers
    assert count.frame_count == 1 and counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
