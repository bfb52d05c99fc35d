"""What a training step costs, where the time goes, and how close IG scoring comes to its floor.

    python tools/bench.py                          # train.py's default shape, 4 rollouts a step
    python tools/bench.py --shape paper --batch 1  # 512-token turns, up to 5 searches (~1 h, CPU)
    python tools/bench.py --only ig,precision      # sections: step update memory ig rollout
                                                   # retrieval precision

A step is train.py's phase functions called with its preset's config, the policy scripted
(ScriptedPolicy) and lr 0: every repeat samples the same rollouts. Each figure stands beside its
floor or comparison from the same run: medians of --repeats runs, in alternated order. BM25 as the
corpus grows is tools/bench_bm25.py.
"""

import dataclasses
import math
import re
import statistics
import sys
import threading
import time
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

import igsearch as ig
import prepare
import step as rl
import train
from config import PRESETS, Config
from machinery import fast, lm, loaders, lora, static_turns
from machinery import memory_estimate as memory
from machinery.corpus import load_corpus
from machinery.errors import InputError, OneLineParser
from machinery.remote import RemoteRetriever
from machinery.server import make_server
from retriever import BM25Retriever, make_search

# in the order they run
SECTIONS = ("step", "update", "memory", "ig", "rollout", "retrieval", "precision")
PHASES = ("rollout", "retrieval", "IG", "reward", "update")


def synchronize(device: torch.device) -> float:
    """Wait for the device's queued work; returns the time then (a timer that sees GPU work)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def proc_gb(field: str) -> float:
    """This process's VmRSS (resident memory) or VmHWM (its peak since clear_refs), in GiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 2**20


def measure(device: torch.device, fn, *args) -> tuple[object, float, float]:
    """(fn's result, seconds, peak GiB during fn: the CUDA allocator's, or the process's RSS)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # restarts VmHWM
    start = synchronize(device)
    out, seconds = fn(*args), synchronize(device) - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else proc_gb("VmHWM")
    return out, seconds, peak


def alternated(device: torch.device, runs: dict, repeats: int) -> dict[str, list[tuple]]:
    """measure each run `repeats` times, the order rotating: a linear drift in speed cancels."""
    names, out = list(runs), {k: [] for k in runs}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(measure(device, runs[name]))
    return out


def med(results: list, i: int = 1) -> float:  # the median of measure's seconds (1) or GiB (2)
    return statistics.median(x[i] for x in results)


def table(title: str, header: list[str], rows: list[list], *notes: str) -> None:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    print(f"\n== {title}")
    for r in cells:
        print("  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))))
    print("".join(f"  {note}\n" for note in notes), end="")


def target(name: str, ok: bool) -> str:
    return f"target {name}: {'met' if ok else 'NOT met'}"


class ScriptedPolicy(torch.nn.Module):
    """The real model's forward passes (the untrained model seldom searches), their logits one-hot
    on a script: each turn a think block up to its budget, then a search after a refine block, the
    answer at the last turn. Each token costs a free sample; each rollout uses the whole budget."""

    def __init__(self, model, tokenizer, prompts: dict[str, dict], cfg: Config):
        super().__init__()
        self.model, self.tok, self.prompts, self.cfg = model, tokenizer, prompts, cfg
        self.tag, self.t_documents = ig.TEMPLATES[cfg.template].doc_tag, 0.0

    def script(self, text: str) -> list[int]:
        """The ids of a row's next turn; it searches the question, then a title it retrieved."""
        prompt = next(p for p in self.prompts if text.startswith(p))
        q, response, head = self.prompts[prompt], text[len(prompt) :], ""
        turn, docs = response.count(f"</{self.tag}>"), ig.find_block(response, self.tag, True)
        query = q["question"]
        if docs:  # the refine block: the start of Doc 1's text
            query = (re.findall(r'Title: "([^"]*)"', docs.group(1)) or [query] * 9)[turn - 1]
            head = f"<refine> {' '.join(docs.group(1).split(') ', 1)[-1].split()[:6])} </refine>\n"
        tail = (
            f"<search> {query} </search>"
            if turn < self.cfg.max_searches
            else f"<answer> {q['golden_answers'][0]} </answer>"
        )
        think = f"<think> {f'I should check {query}. ' * self.cfg.max_turn_tokens}"
        head, think, tail, close = (
            self.tok(s, add_special_tokens=False).input_ids
            for s in (head, think, tail, " </think>\n")
        )
        room = self.cfg.max_turn_tokens - len(head) - len(tail) - len(close)
        head, room = (head, room) if room >= 0 else ([], room + len(head))  # a short turn
        return head + (think[:room] + close if room >= 4 else []) + tail

    def forward(self, input_ids, attention_mask=None, cache=None, **kw):
        start, later = synchronize(input_ids.device), cache is not None and input_ids.shape[1] > 1
        kw.update({lm.cache_keyword(self.model): cache} if cache is not None else {})
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        self.t_documents += (synchronize(input_ids.device) - start) * later  # a later prefill
        if cache is None:  # a new cache: the rows that leave it (batch_select_indices) leave seen
            kv = out.cache if hasattr(out, "cache") else out.past_key_values
            self.seen, select = [[] for _ in input_ids], kv.batch_select_indices
            kv.batch_select_indices = lambda idx: (
                setattr(self, "seen", [self.seen[i] for i in idx.tolist()]),
                select(idx),
            )
        fed = attention_mask[:, -input_ids.shape[1] :].bool()  # (B, L) stopped rows' filler: 0
        self.seen = [s + row[m].tolist() for s, row, m in zip(self.seen, input_ids, fed)]
        if input_ids.shape[1] > 1:  # a prefill: a new turn starts on every row
            self.turns = [self.script(self.tok.decode(s)) for s in self.seen]
        out.logits = torch.full_like(out.logits, -1e4)  # (B, 1, V)
        for b, ids in enumerate(self.turns):
            out.logits[b, -1, ids.pop(0) if ids else self.tok.eos_token_id] = 0.0
        return out


def bench_setup(args) -> SimpleNamespace:
    """The preset's config; model, data and retriever made as train.set_up makes them."""
    group = 2 if args.batch % 2 == 0 else 1  # the group sets the advantage baseline only
    cfg = Config(
        **{
            **PRESETS[args.shape],
            "model": args.model,
            "group_size": group,
            "questions_per_step": args.batch // group,
            "normalize_std": group > 1,
            "lora_rank": args.lora_rank,
        }
    )
    model, tok = loaders.load_model(
        args.model or prepare.default_model(), args.device, dtype=torch.float32
    )
    if cfg.lora_rank:  # as train.set_up: the base frozen, the adapter trains
        lora.add_adapter(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.grad_checkpointing:
        train.enable_checkpointing(model)
    data = prepare.default_data(cfg.task)
    qs = rl.sample_questions(
        loaders.load_questions(data["train"]), cfg, torch.Generator().manual_seed(cfg.seed)
    )
    prompts = [ig.build_prompt(tok, q["question"], ig.TEMPLATES[cfg.template]) for q in qs]
    backend = make_search(data["corpus"], "", cfg.topk, cfg.doc_words or None)
    b = SimpleNamespace(
        args=args,
        cfg=cfg,
        model=model,
        tok=tok,
        device=model.device,
        data=data,
        qs=qs,
        prompts=prompts,
        golds=[q["golden_answers"] for q in qs],
        t_search=0.0,
        trajs=None,
        policy=ScriptedPolicy(model, tok, dict(zip(prompts, qs)), cfg),
        undo_lean=fast.lean_backward(model) if cfg.fast else None,  # as train.set_up
        compute=rl.choose_compute(cfg.fast, model.device),
        ref=train.reference_model(model, cfg, model.device),
        opt=torch.optim.AdamW(  # lr 0: the weights stay
            [w for w in model.parameters() if w.requires_grad], lr=0.0, weight_decay=0.0
        ),
    )

    def search(queries: list[str]) -> list[str]:  # the retriever, its time counted
        start = time.perf_counter()
        docs = backend(queries)
        b.t_search += time.perf_counter() - start
        return docs

    b.search = search
    return b


def timed_rollouts(b, cfg: Config, compute: rl.Compute | None = None) -> list[ig.Trajectory]:
    """step.generate_rollouts of the step's questions, the policy scripted (compute: the run's)."""
    b.model.eval()
    b.policy.t_documents = 0.0
    return rl.generate_rollouts(
        b.policy,
        b.tok,
        b.qs,
        b.search,
        cfg,
        torch.Generator(device=b.device).manual_seed(cfg.seed + 2),
        compute or compute_of(b, cfg),
    )


def compute_of(b, cfg: Config) -> rl.Compute:
    """The run's Compute, with cfg's plain-or-fast choice."""
    return rl.choose_compute(cfg.fast, b.device, b.compute.amp_dtype)


def timed_bonus(
    b, trajs: list[ig.Trajectory], cfg: Config, compute: rl.Compute | None = None
) -> list[list[float | None]]:
    """step.step_bonus of the rollouts, the same counterfactual draws at every call: [i][t] IG_t."""
    outcome = rl.rewards(trajs, b.golds)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return rl.step_bonus(
        b.model, b.tok, trajs, b.golds, outcome, cfg, gen, compute or compute_of(b, cfg)
    ).bonus


def timed_update(
    b,
    trajs: list[ig.Trajectory],
    tok_adv: list[torch.Tensor] | None = None,
    cfg: Config | None = None,
    compute: rl.Compute | None = None,
) -> dict:
    """step.update of the rollouts at lr 0 (the weights stay); token advantages 0 unless given."""
    tok_adv = tok_adv or [torch.zeros(len(t.response_ids)) for t in trajs]
    cfg = cfg or b.cfg
    compute = compute or compute_of(b, cfg)
    return rl.update(b.model, b.ref, b.tok, trajs, tok_adv, b.opt, cfg, compute)


def timed_step(b, with_ig: bool) -> dict:
    """One step in train.train's order (outcome-only: alpha 0): seconds and peak GiB per phase."""
    cfg, rec = b.cfg if with_ig else dataclasses.replace(b.cfg, outcome_only=True), {}
    b.t_search, (trajs, seconds, rec["mem rollout"]) = (
        0.0,
        measure(b.device, timed_rollouts, b, cfg),
    )
    rec["retrieval"], rec["rollout"] = b.t_search, seconds - b.t_search
    bonus, rec["IG"], rec["mem IG"] = measure(b.device, timed_bonus, b, trajs, cfg)
    (_, tok_adv), rec["reward"], _ = measure(
        b.device, lambda: rl.advantages(trajs, rl.rewards(trajs, b.golds).rewards, bonus, cfg)
    )
    _, rec["update"], rec["mem update"] = measure(b.device, timed_update, b, trajs, tok_adv, cfg)
    b.trajs, rec["total"] = trajs, sum(rec[k] for k in PHASES)
    print(f"  step ({'IG' if with_ig else 'outcome-only'}): {rec['total']:.1f} s")
    return rec


def run_steps(b) -> dict[str, list[dict]]:
    """A warm-up (allocator, optimizer state), then steps with IG and outcome-only, alternated."""
    timed_update(b, timed_rollouts(b, dataclasses.replace(b.cfg, max_turn_tokens=8)))
    runs = alternated(
        b.device,
        {"IG": lambda: timed_step(b, True), "outcome": lambda: timed_step(b, False)},
        b.args.repeats,
    )
    return {k: [rec for rec, _, _ in v] for k, v in runs.items()}


def bench_step(b, steps: dict[str, list[dict]]) -> None:
    """The phase split of a step with IG; the outcome-only step beside it."""
    m = {k: statistics.median(s[k] for s in steps["IG"]) for k in PHASES + ("total",)}
    n, per_rollout = len(b.trajs), lambda f: sum(map(f, b.trajs)) / len(b.trajs)
    table(
        f"1. training step with IG ({n} rollouts, median of {b.args.repeats})",
        ["phase", "seconds", "share"],
        [[k, m[k], f"{100 * m[k] / m['total']:.1f}%"] for k in PHASES]
        + [["step", m["total"], "100%"]],
        f"per rollout: {per_rollout(lambda t: len(t.steps)):.1f} searches, "
        f"{per_rollout(lambda t: sum(t.loss_mask)):.0f} generated tokens, "
        f"{per_rollout(lambda t: len(t.response_ids)):.0f} response tokens (documents included)",
    )
    t_ig, t_out = m["total"], statistics.median(s["total"] for s in steps["outcome"])
    direct = m["IG"] / (t_ig - m["IG"])  # t_outcome taken within the IG step: less noise
    table(
        "2. IG overhead (steps alternated, same rollouts)",
        ["", "value"],
        [
            ["step with IG (s)", t_ig],
            ["step outcome-only (s)", t_out],
            ["(t_IG - t_outcome) / t_outcome", f"{100 * (t_ig - t_out) / t_out:.1f}%"],
            ["IG scoring / rest of the same step", f"{100 * direct:.1f}%"],
        ],
        *[target("<= 6.4% at the paper shape (IG scoring / rest of the step)", direct <= 0.064)]
        * (b.args.shape == "paper"),
    )


def bench_update(b, steps: dict[str, list[dict]]) -> None:
    """The update's model FLOP/s beside this machine's torch.mm peak in the update's dtype."""
    tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in b.trajs)
    trained = sum(sum(t.loss_mask) for t in b.trajs)
    emb, head = b.model.get_input_embeddings().weight, b.model.get_output_embeddings().weight
    body = sum(p.numel() for p in b.model.parameters()) - emb.numel() * (1 + (head is not emb))
    # 6 N T: the body on every token, the LM head on trained tokens only (+2 N T: the KL reference)
    flops = (6 + 2 * (b.ref is not None)) * (body * tokens + head.numel() * trained)
    n, dtype = (8192, torch.bfloat16) if b.device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, dtype=dtype, device=b.device)
    peak = 2 * n**3 / med([measure(b.device, torch.mm, a, a) for _ in range(6)])
    t = statistics.median(s["update"] for s in steps["IG"] + steps["outcome"])
    table(
        "3. update efficiency (model FLOPs; attention not counted)",
        ["", "value"],
        [
            ["update (s)", t],
            ["tokens (trained)", f"{tokens} ({trained})"],
            ["achieved GFLOP/s", flops / t / 1e9],
            [f"torch.mm {n}x{n} {str(dtype)[6:]} GFLOP/s", peak / 1e9],
            ["ratio", f"{100 * flops / t / peak:.0f}%"],
        ],
    )


def bench_memory(b, steps: dict[str, list[dict]]) -> None:
    """The peak memory of each phase beside memory.py's estimate of it (train.py's check before a
    run); the update with fast.lean_backward beside it without."""
    cfg = dataclasses.replace(b.cfg, eval_questions=0, eval_every=0)  # bench evaluates nothing
    shape, bf16 = memory.model_shape(b.model.config), b.compute.amp_dtype is not None
    est = memory.estimate(cfg, shape, b.device.type, bf16=bf16)
    rows = []
    for k in ("rollout", "IG", "update"):
        got, want = statistics.median(s[f"mem {k}"] for s in steps["IG"]), sum(est[k].values())
        rows.append(
            [f"{k} (median of the IG steps)", got, want / memory.GiB, got * memory.GiB / want]
        )
    cpu_default = b.device.type == "cpu" and b.args.shape == "default"
    what = "process RSS" if b.device.type == "cpu" else "CUDA allocated"
    table(
        f"4. peak memory per phase (GiB, {what}"
        f"{f', LoRA rank {cfg.lora_rank}' if cfg.lora_rank else ''})",
        ["", "GiB", "estimate", "measured / estimate"],
        rows,
        "estimate: memory.estimate, sequences at full budget as the scripted policy makes them"
        + (
            "; CUDA allocated leaves out the CUDA context that its runtime term holds"
            * (b.device.type == "cuda")
        ),
        *[target("<= 3 GiB for the default run on CPU", max(r[1] for r in rows) <= 3)]
        * cpu_default,
    )
    if b.undo_lean:
        b.undo_lean()
    ones = [torch.ones(len(t.response_ids)) for t in b.trajs]
    lean = lambda: (fast.lean_backward(b.model), timed_update(b, b.trajs, ones))[0]()  # noqa: E731
    runs = alternated(
        b.device,
        {"without": lambda: timed_update(b, b.trajs, ones), "with (as train.py)": lean},
        b.args.repeats,
    )
    b.undo_lean = fast.lean_backward(b.model) if b.cfg.fast else None
    table(
        f"4b. update with and without fast.lean_backward (median of {b.args.repeats}, alternated)",
        ["", "seconds", "peak GiB"],
        [[k, med(v), med(v, 2)] for k, v in reversed(runs.items())],
    )


def floor_rows(
    contexts: list[list[int]], answers: list[list[int]], group_sizes: list[int], max_len: int
) -> tuple[list[list[int]], list[int]]:
    """The least IG can compute: per group (fast.trunk_shares: a rollout's contexts, or a step's
    1 + N) its trunk once, then each continuation (rest of the context + answer). Returns those
    rows and, per row, how many last positions need the LM head (its answer; 0 on a trunk row)."""
    seqs = [ig.truncate_left(c, a, max_len) + a for c, a in zip(contexts, answers)]
    rows, heads = [], []
    for idx, trunk, shares in fast.trunk_shares(seqs, answers, group_sizes):
        rows += ([trunk] if trunk else []) + [seqs[i][k:] for i, k in zip(idx, shares)]
        heads += ([0] if trunk else []) + [len(answers[i]) for i in idx]
    return rows, heads


@torch.no_grad()
def plain_forward(
    model,
    rows: list[list[int]],
    heads: list[int],
    batch_size: int,
    full_head: bool = False,
    chunk: int = 512,
) -> None:
    """No-grad forward over exactly the rows' tokens, packed into chunks of `chunk` (no padding),
    then the LM head and log-softmax on sum(heads) hidden states (on all of them if full_head)."""
    flat = torch.tensor([t for row in rows for t in row], device=next(model.parameters()).device)
    n, left = len(flat) // chunk, sum(heads)
    batches = list(flat[: n * chunk].view(n, chunk).split(batch_size))  # (b, chunk) each
    for ids in batches + ([flat[n * chunk :][None]] if len(flat) % chunk else []):  # + (1, rest)
        hidden = model.base_model(input_ids=ids).last_hidden_state.flatten(0, 1)  # (b * chunk, H)
        take = hidden if full_head else hidden[:left]
        left -= len(take)
        torch.log_softmax(model.get_output_embeddings()(take).float(), dim=-1)  # (M, V)


def bench_ig(b) -> None:
    """step.step_bonus (one trunk per rollout) beside full contexts and the floors."""
    c, bs, trajs, L = b.cfg, b.cfg.ig_batch_size, b.trajs, b.cfg.ig_max_len
    draws = rl.counterfactual_draws(trajs, c, torch.Generator().manual_seed(c.seed + 1))
    reqs = ig.score_requests(b.tok, trajs, b.golds, draws, ig.TEMPLATES[c.template], c.ig_all_golds)
    contexts = [x for r in reqs for x in r.context_ids]
    answers = [r.answer_ids for r in reqs for _ in r.context_ids]
    steps = [len(r.context_ids) for r in reqs]  # one group per search step
    rows, heads = floor_rows(contexts, answers, fast.rollout_groups(reqs, bs), L)
    step_rows, step_heads = floor_rows(contexts, answers, steps, L)
    full = [lm.truncate_left(x, a, L) + a for x, a in zip(contexts, answers)]
    runs = {  # name: (what it runs, the rows of tokens it runs)
        "full contexts (answer_logprobs: fast off)": (
            lambda: timed_bonus(b, trajs, dataclasses.replace(c, fast=False)),
            full,
        ),
        "one trunk per rollout (step.step_bonus)": (lambda: timed_bonus(b, trajs, c), rows),
        "one prefix per search step": (
            lambda: fast.answer_logprobs_shared_prefix(
                b.model, reqs, b.tok.pad_token_id, L, bs, group_sizes=steps
            ),
            step_rows,
        ),
        "floor: packed plain forward, LM head at answers": (
            lambda: plain_forward(b.model, rows, heads, bs),
            rows,
        ),
        "floor, LM head at every position": (
            lambda: plain_forward(b.model, rows, heads, bs, full_head=True),
            rows,
        ),
        "floor with a prefix per step": (
            lambda: plain_forward(b.model, step_rows, step_heads, bs),
            step_rows,
        ),
    }
    with b.compute.autocast():
        out = alternated(b.device, {k: fn for k, (fn, _) in runs.items()}, b.args.repeats)
    t_full, t_shared, t_step, floor = (med(v) for v in list(out.values())[:4])
    table(
        f"5. IG scoring against its floor ({len(reqs)} search steps, {len(contexts)} contexts)",
        ["", "tokens", "seconds", "x floor"],
        [[k, sum(map(len, runs[k][1])), med(v), med(v) / floor] for k, v in out.items()],
        target("IG <= 1.25 x floor", t_shared / floor <= 1.25),
    )
    a, s = (
        np.array([v for row in out[k][-1][0] for v in row if v is not None], dtype=float)
        for k in list(runs)[:2]
    )
    diff = float(np.abs(a - s).max()) if len(a) else 0.0
    table(
        "6. shared-prefix scoring",
        ["", "value"],
        [
            ["max |IG shared - IG full|", f"{diff:.1e}"],
            ["IG time saved", f"{100 * (1 - t_shared / t_full):.0f}%"],
            [
                "of which by one trunk per rollout (vs a prefix per step)",
                f"{100 * (1 - t_shared / t_step):.0f}%",
            ],
            ["kept (exact to 1e-4 and saves >= 15%)", diff <= 1e-4 and t_shared <= 0.85 * t_full],
        ],
    )


def bench_rollout(b) -> None:
    """step.generate_rollouts' tokens/s beside one model.generate call of as many new tokens; and
    the model's own rollout (unscripted: the twins need a real model) with each turn function."""
    # (B, T)
    ids, mask, _ = lm.left_pad(
        [b.tok(p, add_special_tokens=False).input_ids for p in b.prompts],
        b.tok.pad_token_id,
        b.device,
    )
    per_row = math.ceil(sum(sum(t.loss_mask) for t in b.trajs) / len(b.prompts))
    sample = {"do_sample": True, "temperature": b.cfg.temperature, "top_k": None, "top_p": None}
    c, static = b.cfg, static_turns.StaticTurns(rows=len(b.prompts))  # one per run: one capture

    def own(turn):  # the same seed for each turn function: the same tokens
        gen = torch.Generator(device=b.device).manual_seed(c.seed + 2)
        return ig.rollout(
            b.model,
            b.tok,
            b.prompts,
            b.search,
            template=ig.TEMPLATES[c.template],
            max_searches=c.max_searches,
            max_turn_tokens=c.max_turn_tokens,
            max_response_tokens=c.max_response_tokens,
            temperature=c.temperature,
            generator=gen,
            turn=turn,
        )

    with b.compute.autocast():
        b.model.eval()
        out = alternated(
            b.device,
            {
                "loop": lambda: (timed_rollouts(b, b.cfg), b.policy.t_documents),
                "plain": lambda: own(lm.generate_turn),
                "cached": lambda: own(fast.CachedTurns()),
                "static": lambda: own(static),
                "generate": lambda: b.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=per_row,
                    min_new_tokens=per_row,
                    pad_token_id=b.tok.pad_token_id,
                    **sample if b.cfg.temperature > 0 else {},
                ),
            },
            b.args.repeats,
        )
    hf = per_row * len(b.prompts) / med(out["generate"])
    own_rate = {
        k: statistics.median(sum(sum(t.loss_mask) for t in trajs) / s for trajs, s, _ in out[k])
        for k in ("plain", "cached", "static")
    }
    same = len({str([t.response_ids for t in out[k][0][0]]) for k in own_rate}) == 1
    runs = [(sum(sum(t.loss_mask) for t in trajs), s, docs) for (trajs, docs), s, _ in out["loop"]]
    loop, bare, docs = (
        statistics.median(f(*x) for x in runs)
        for f in (lambda n, s, d: n / s, lambda n, s, d: n / (s - d), lambda n, s, d: d / s)
    )
    table(
        "7. rollout throughput (generated tokens/s; same prompts, same number of new tokens)",
        ["", "tokens/s"],
        [
            ["step.generate_rollouts (turns, retrieval, documents prefilled)", loop],
            ["model.generate (one call)", hf],
            ["ratio", f"{loop / hf:.2f}"],
            [
                "share of the loop spent reading later turns' documents (generate has none)",
                f"{100 * docs:.0f}%",
            ],
            [
                "ratio with that prefill left out: the loop's own cost (bookkeeping, retrieval, "
                "turn starts)",
                f"{bare / hf:.2f}",
            ],
        ],
        target("ratio >= 0.8", loop / hf >= 0.8),
    )
    table(
        "7b. the model's own rollout (unscripted, retrieval included) by turn function",
        ["", "tokens/s", "x plain", "x model.generate"],
        [
            [name, own_rate[k], own_rate[k] / own_rate["plain"], own_rate[k] / hf]
            for k, name in [
                ("plain", "lm.generate_turn (the plain loop)"),
                ("cached", "fast.CachedTurns (the cache kept across turns)"),
                ("static", "static_turns.StaticTurns (one static cache, one decode shape)"),
            ]
        ],
        f"the three give the same tokens: {'yes' if same else 'NO'}; "
        f"{statistics.median(sum(map(sum, (t.loss_mask for t in x[0]))) for x in out['plain']):.0f}"
        " generated tokens a rollout",
    )


def bench_retrieval(args, corpus: str, queries: list[str], topk: int) -> None:
    """A remote retriever on loopback beside the same index in process (the HTTP overhead)."""
    cpu = torch.device("cpu")
    local = BM25Retriever(load_corpus(corpus)[:1000])  # small: the search hides no overhead
    server = make_server(local, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = RemoteRetriever(f"http://127.0.0.1:{server.server_address[1]}/retrieve")
    t = alternated(
        cpu,
        {
            "local": lambda: local.search(queries, topk),
            "remote": lambda: remote.search(queries, topk),
        },
        20,
    )
    server.shutdown()
    server.server_close()
    lo, hi = med(t["local"]), med(t["remote"])
    table(
        f"8. remote retriever on loopback ({len(local)} passages, {len(queries)} queries a batch)",
        ["", "ms"],
        [
            ["in process", 1000 * lo],
            ["HTTP round trip", 1000 * hi],
            ["overhead", f"{1000 * (hi - lo):.1f} ({100 * (hi - lo) / lo:.0f}%)"],
        ],
    )


def ranks(x: list[float]) -> np.ndarray:
    """1-based ranks of x, tied values sharing their mean rank."""
    x = np.asarray(x, dtype=float)
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of ranks; nan where one is constant."""
    rx, ry = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2  # mean rank (n + 1) / 2
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / den if den else float("nan")


class Agreement(NamedTuple):
    """How far the IG of the same search steps moves from one precision to the other."""

    mean_abs: float  # mean |IG| in the first precision: the scale of the differences
    mean_abs_diff: float  # mean |IG_b - IG_a|
    max_abs_diff: float
    same_sign: float  # share of steps whose IG has the same sign in both
    spearman: float  # rank correlation of the steps' IG
    same_ranking: bool  # the steps ordered alike (ties included)


def ig_agreement(a: list[float], b: list[float]) -> Agreement:
    """The agreement of two precisions' IG of the same steps, in the same order."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = np.abs(y - x)
    return Agreement(
        mean_abs=float(np.abs(x).mean()),
        mean_abs_diff=float(diff.mean()),
        max_abs_diff=float(diff.max()),
        same_sign=float((np.sign(x) == np.sign(y)).mean()),
        spearman=spearman(x, y),
        same_ranking=bool(np.array_equal(ranks(x), ranks(y))),
    )


def precision_step(b, trajs: list[ig.Trajectory], compute: rl.Compute) -> dict:
    """The step's phases in compute's precision: the rollout sampled anew (the scripted policy
    writes the same tokens), then IG scored and the update run on `trajs`, the rollouts built once,
    with advantage 1 on every token (the same in both precisions). Seconds and peak GiB per phase,
    the steps' IG, the update's loss and gradient norm."""
    rec, ones = {}, [torch.ones(len(t.response_ids)) for t in trajs]
    b.t_search = 0.0
    new, seconds, rec["mem rollout"] = measure(b.device, timed_rollouts, b, b.cfg, compute)
    rec["rollout"], rec["retrieval"] = seconds - b.t_search, b.t_search
    rec["same rollouts"] = [t.response_ids for t in new] == [t.response_ids for t in trajs]
    bonus, rec["IG"], rec["mem IG"] = measure(b.device, timed_bonus, b, trajs, b.cfg, compute)
    stats, rec["update"], rec["mem update"] = measure(
        b.device, timed_update, b, trajs, ones, b.cfg, compute
    )
    rec["total"] = sum(rec[k] for k in ("rollout", "retrieval", "IG", "update"))
    rec["ig"] = [v for row in bonus for v in row if v is not None]
    rec["loss"], rec["grad_norm"] = stats["loss"], stats["grad_norm"]
    name = "bf16" if compute.amp_dtype else "fp32"
    print(f"  step ({name}): {rec['total']:.1f} s")
    return rec


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")  # what bf16 matrix units speed up


def product_seconds(fn) -> tuple[float, float]:
    """(seconds in matrix products, seconds in everything else) of fn: profiler CPU self times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = prof.key_averages()
    products = sum(r.self_cpu_time_total for r in rows if r.key in PRODUCTS) / 1e6
    return products, sum(r.self_cpu_time_total for r in rows) / 1e6 - products


def amdahl(share: float, speedup: float) -> float:
    """The whole's speed-up when a share of its time gains `speedup` and the rest none."""
    return 1 / ((1 - share) + share / speedup)


def bench_ceiling(b, trajs: list[ig.Trajectory], computes: dict) -> None:
    """9d: where bf16's gain comes from: each phase profiled once in each precision, its time split
    into matrix products and the rest (attention, casts, elementwise work, sampling), and Amdahl's
    ceiling: the phase's fp32 / bf16 if its products gained what they gain here and the rest kept
    its fp32 time, 1 / ((1 - s) + s / r)."""
    c, ones = b.cfg, [torch.ones(len(t.response_ids)) for t in trajs]
    phases = {
        "rollout (sampling)": lambda x: timed_rollouts(b, c, x),
        "IG scoring": lambda x: timed_bonus(b, trajs, c, x),
        "update (lr 0)": lambda x: timed_update(b, trajs, ones, c, x),
    }
    rows, t32, t16, bound = [], 0.0, 0.0, 0.0  # bound: the step's seconds at every ceiling
    for name, run in phases.items():
        (p32, o32), (p16, o16) = (product_seconds(lambda: run(computes[x])) for x in computes)
        r = p32 / p16 if p16 else 1.0  # no products (a scripted phase): nothing to gain
        ceiling = amdahl(share=p32 / ((p32 + o32) or 1), speedup=r)
        ratio = (p32 + o32) / ((p16 + o16) or 1)
        rows.append([name, p32, p16, r, o32, o16, o32 / (o16 or 1), ratio, ceiling])
        t32, t16, bound = t32 + p32 + o32, t16 + p16 + o16, bound + (p32 + o32) / ceiling
    rows.append(["step", "", "", "", "", "", "", t32 / (t16 or 1), t32 / (bound or 1)])
    table(
        "9d. where bf16's gain comes from: matrix products and the rest, profiled (CPU self "
        "seconds, one run each), and Amdahl's ceiling",
        ["phase", "prod fp32", "prod bf16", "ratio", "rest fp32", "rest bf16", "ratio"]
        + ["fp32 / bf16", "ceiling"],
        rows,
        "ceiling = 1 / ((1 - s) + s / r), s the products' share of the fp32 time and r their "
        "fp32 / bf16: the",
        "phase's speed-up if only its products gained; a target above it needs faster products "
        "(AMX units) or less other work",
    )


def bench_precision(b) -> None:
    """The same step in fp32 and under bf16 autocast, alternated: each phase's time and the ratio,
    the IG of the same rollouts, the update's loss and gradient norm."""
    c, repeats = b.cfg, b.args.repeats
    computes = {
        "fp32": rl.choose_compute(c.fast, b.device, None),
        "bf16": rl.choose_compute(c.fast, b.device, torch.bfloat16),
    }
    trajs = b.trajs or timed_rollouts(b, c, computes["fp32"])
    short = timed_rollouts(b, dataclasses.replace(c, max_turn_tokens=8))
    for compute in computes.values():  # a warm-up of each: allocator, kernels, optimizer state
        timed_bonus(b, short, c, compute)
        timed_update(b, short, None, c, compute)
    runs = alternated(
        b.device, {k: lambda x=x: precision_step(b, trajs, x) for k, x in computes.items()}, repeats
    )
    recs = {k: [rec for rec, _, _ in v] for k, v in runs.items()}
    keys = [k for k, x in recs["fp32"][0].items() if isinstance(x, float)]
    m = {k: {p: statistics.median(r[p] for r in v) for p in keys} for k, v in recs.items()}
    fp, bf = m["fp32"], m["bf16"]
    phases = [("rollout", "rollout (sampling)"), ("retrieval", "retrieval"), ("IG", "IG scoring")]
    rows = [
        [name, fp[k], bf[k], fp[k] / bf[k] if bf[k] else "-"]
        + ([fp[f"mem {k}"], bf[f"mem {k}"]] if f"mem {k}" in fp else ["", ""])
        for k, name in phases + [("update", "update (lr 0)"), ("total", "step")]
    ]
    speedup = {k: fp[k] / bf[k] for k in ("total", "IG", "update")}
    same = all(r["same rollouts"] for v in recs.values() for r in v)
    table(
        f"9. fp32 against bf16 autocast: the same step, alternated (median of {repeats}; "
        f"bf16 matrix units: {'yes' if lm.native_bf16(b.device) else 'no'})",
        ["phase", "fp32 s", "bf16 s", "fp32 / bf16", "fp32 peak GiB", "bf16 peak GiB"],
        rows,
        f"step: the four phases above (the reward phase takes ~1 ms); the rollouts sampled in "
        f"both precisions are the same tokens: {'yes' if same else 'NO'}",
        target("step >= 2x faster in bf16", speedup["total"] >= 2),
        target("IG scoring >= 2.5x", speedup["IG"] >= 2.5),
        target("update >= 1.8x", speedup["update"] >= 1.8),
    )
    a = ig_agreement(recs["fp32"][0]["ig"], recs["bf16"][0]["ig"])
    table(
        f"9b. IG of the same {len(recs['fp32'][0]['ig'])} search steps in fp32 and bf16",
        ["", "value"],
        [
            ["mean |IG fp32|", f"{a.mean_abs:.3g}"],
            ["mean |IG bf16 - IG fp32|", f"{a.mean_abs_diff:.2e}"],
            ["max |IG bf16 - IG fp32|", f"{a.max_abs_diff:.2e}"],
            ["same sign (share of steps)", a.same_sign],
            ["Spearman rank correlation", a.spearman],
            ["same ranking of steps", "yes" if a.same_ranking else "NO"],
        ],
        target("IG ranking of steps unchanged", a.same_ranking),
    )
    table(
        "9c. the update on the same rollouts (advantage 1 on every token)",
        ["", "fp32", "bf16", "|bf16 - fp32| / fp32"],
        [
            [k, fp[k], bf[k], f"{abs(bf[k] - fp[k]) / abs(fp[k]):.1e}"]
            for k in ("loss", "grad_norm")
        ],
    )
    bench_ceiling(b, trajs, computes)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF name or folder; empty = the offline default")
    p.add_argument("--batch", type=int, default=4, help="rollouts per step")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--shape", default="default", choices=("default", "paper"), help="train preset")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each variant (median)")
    p.add_argument("--lora_rank", type=int, default=0, help="LoRA adapters of this rank (lora.py)")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    try:
        args = p.parse_args(argv)
        if set(args.only.split(",")) - set(SECTIONS):
            p.error(f"--only: unknown section in {args.only}; choose from {','.join(SECTIONS)}")
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start, only = time.time(), args.only.split(",")
    try:
        lm.bound_kernel_caches()  # before any product: section 9's bf16 runs after fp32 ones
        b = bench_setup(args)
    except InputError as e:  # a model folder or data file that is not there, a bad --lora_rank
        print(f"error: {e}", file=sys.stderr)
        return 2
    c, amp = b.cfg, "bf16 autocast" if b.compute.amp_dtype else "fp32 compute"
    fields = (
        "max_searches",
        "max_turn_tokens",
        "max_response_tokens",
        "doc_words",
        "ig_batch_size",
        "micro_batch",
        "grad_checkpointing",
        "kl_coef",
        "fast",
    )
    print(
        f"model {args.model or prepare.default_model()} ({b.model.dtype} weights, {amp}) on "
        f"{b.device}, {torch.get_num_threads()} CPU threads; shape {args.shape}: "
        f"{', '.join(f'{k} {getattr(c, k)}' for k in fields)}; {args.batch} rollouts per step"
    )
    steps = run_steps(b) if {"step", "update", "memory"} & set(only) else None
    b.trajs = b.trajs or (
        timed_rollouts(b, c) if {"ig", "rollout", "precision"} & set(only) else None
    )
    queries = [q["question"] for q in loaders.load_questions(b.data["train"])[:16]]
    sections = {
        "step": lambda: bench_step(b, steps),
        "update": lambda: bench_update(b, steps),
        "memory": lambda: bench_memory(b, steps),
        "ig": lambda: bench_ig(b),
        "rollout": lambda: bench_rollout(b),
        "retrieval": lambda: bench_retrieval(args, b.data["corpus"], queries, c.topk),
        "precision": lambda: bench_precision(b),
    }
    for name in (s for s in SECTIONS if s in only):
        sections[name]()
    print(f"\nbench wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
