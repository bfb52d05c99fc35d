"""What a training step costs, where the time goes, and how close IG scoring comes to its floor.

    python bench.py                          # train.py's default shape, 4 rollouts (~10 min on 2 idle cores)
    python bench.py --shape paper --batch 1  # 512-token turns, up to 5 searches, full passages (~1 h on CPU)
    python bench.py --only ig,retrieval      # sections: step ig rollout update memory retrieval
    python bench.py --device cuda

The untrained default model seldom writes a search, which would leave IG nothing to score. So the
policy is scripted: every forward pass is the real model's and the sampler draws from its output, but
the logits are one-hot on a script that fills each turn to its token budget with a think block and ends
it with a search (max_searches of them, each after a refine block), then answers. Each token costs what
a free sample costs; the rollouts have the shape of a policy that uses its whole search budget.
The optimizer has lr = 0: the work of training with weights that stay put, so every repeat samples the
same rollouts and a step with IG differs from one without by the IG scoring alone.
Times are medians over --repeats runs, alternated; on a shared machine trust the ratios.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import multiprocessing
import re
import resource
import statistics
import threading
import time

import numpy as np
import torch

import config
import fast
import igsearch as ig
import lm
import prepare
import train
from retriever import (
    BM25Retriever,
    RemoteRetriever,
    load_corpus,
    make_search,
    make_server,
    tokenize,
)

SECTIONS = ("step", "update", "memory", "ig", "rollout", "retrieval")  # in the order they run
PHASES = ("rollout", "retrieval", "IG", "reward", "update")


def rss_gb() -> float:
    """Resident memory now, in GiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def synchronize(device: torch.device) -> float:
    """Wait for the device's queued work; returns the time then (a timer that sees GPU work)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(device: torch.device, fn, *args, **kw) -> tuple[object, float, float]:
    """(result, seconds, peak GiB during fn): the CUDA allocator's peak, or the process's peak RSS
    (Linux VmHWM, restarted through /proc/self/clear_refs). The device is synchronised on both sides."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    start = time.perf_counter()
    out = fn(*args, **kw)
    seconds = synchronize(device) - start
    if device.type == "cuda":
        return out, seconds, torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        return out, seconds, int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 2**20


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    print(f"\n== {title}")
    for r in cells:
        print("  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))))


def target(name: str, ok: bool) -> None:
    print(f"  target {name}: {'met' if ok else 'NOT met'}")


class ScriptedPolicy(torch.nn.Module):
    """The real model's forward, its logits replaced by a one-hot on the script of each row's turn."""

    def __init__(self, model, tokenizer, questions: dict[str, dict], cfg: train.Config):
        super().__init__()
        self.model, self.tok, self.questions, self.cfg, self.turns = (
            model,
            tokenizer,
            questions,
            cfg,
            [],
        )
        self.cache_kw = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        self.t_documents = (
            0.0  # seconds of the forwards that feed a later turn's documents into the cache
        )

    def script(self, text: str) -> list[int]:
        """Ids of the next turn: [a refine of the last documents,] a think block up to the turn budget, then
        a search (the question; later the title of a retrieved passage: a lead followed) or the answer."""
        prompt = next(p for p in self.questions if text.startswith(p))
        q, response, tag = (
            self.questions[prompt],
            text[len(prompt) :],
            ig.TEMPLATES[self.cfg.template].doc_tag,
        )
        turn, docs = response.count(f"</{tag}>"), ig.find_block(response, tag, last=True)
        query, head = q["question"].split(": ", 1)[-1], ""
        if docs:
            titles = re.findall(r'Title: "([^"]*)"', docs.group(1)) or [query]
            facts = " ".join(
                docs.group(1).split(") ", 1)[-1].split()[:6]
            )  # the start of Doc 1's text
            query, head = titles[min(turn, len(titles) - 1)], f"<refine> {facts} </refine>\n"
        answer = f"<answer> {q['golden_answers'][0]} </answer>"
        tail = f"<search> {query} </search>" if turn < self.cfg.max_searches else answer
        head_ids, tail_ids, close = (
            self.tok(s, add_special_tokens=False).input_ids for s in (head, tail, " </think>\n")
        )
        budget = self.cfg.max_turn_tokens
        if len(head_ids) + len(tail_ids) > budget:  # short turns: no room for a refine block
            head_ids = []
        room = budget - len(head_ids) - len(tail_ids) - len(close)
        think = self.tok(
            "<think> " + f"I should check {query}. " * budget, add_special_tokens=False
        ).input_ids
        return head_ids + (think[:room] + close if room >= 4 else []) + tail_ids

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, **kw):
        past = {self.cache_kw: cache} if cache is not None else {}
        documents = (
            cache is not None and input_ids.shape[1] > 1
        )  # a later turn's prefill: work generate never does
        start = synchronize(input_ids.device) if documents else 0.0
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **past,
            **kw,
        )
        self.t_documents += synchronize(input_ids.device) - start if documents else 0.0
        if (
            cache is None
        ):  # a new rollout and a new cache: rows that leave it must leave our records too
            self.seen = [[] for _ in input_ids]
            kv = out.cache if hasattr(out, "cache") else out.past_key_values
            select = kv.batch_select_indices

            def select_rows(idx):
                self.seen = [self.seen[i] for i in idx.tolist()]
                select(idx)

            kv.batch_select_indices = select_rows
        fed = attention_mask[
            :, -input_ids.shape[1] :
        ].bool()  # (B, L) filler fed to stopped rows is masked
        self.seen = [s + row[m].tolist() for s, row, m in zip(self.seen, input_ids, fed)]
        if (
            input_ids.shape[1] > 1
        ):  # a prefill (decoding feeds one token): a new turn starts on every row
            self.turns = [self.script(self.tok.decode(s)) for s in self.seen]
        logits = torch.full_like(out.logits, -1e4)  # (B, 1, V)
        for b, ids in enumerate(self.turns):
            logits[b, -1, ids.pop(0) if ids else self.tok.eos_token_id] = 0.0
        out.logits = logits
        return out


def floor_rows(
    contexts: list[list[int]], answers: list[list[int]], group_sizes: list[int], max_len: int
) -> tuple[list[list[int]], list[int]]:
    """The least IG can compute: per group (fast.trunk_shares: a rollout's contexts, or a step's 1 + N)
    its trunk once, then each continuation (rest of the context + answer). Returns those rows and, per
    row, how many of its last positions need the LM head (the answer tokens: 0 on a trunk row)."""
    seqs = [
        c[max(0, len(c) + len(a) - max_len) :] + a for c, a in zip(contexts, answers)
    ]  # as answer_scores
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
    chunk: int = 512,
    full_head: bool = False,
) -> None:
    """No-grad forward over exactly the rows' tokens, packed into chunks of `chunk` (no padding), then the
    LM head and log-softmax on sum(heads) hidden states (on all of them when full_head)."""
    device = next(model.parameters()).device
    flat = torch.tensor([tok for row in rows for tok in row], dtype=torch.long, device=device)
    n = len(flat) // chunk
    batches = list(flat[: n * chunk].view(n, chunk).split(batch_size))  # (b, chunk) each
    if len(flat) % chunk:
        batches.append(flat[n * chunk :][None])  # the remainder, (1, r)
    left = sum(heads)
    for ids in batches:
        hidden = model.base_model(input_ids=ids).last_hidden_state.flatten(0, 1)  # (b * chunk, H)
        take = hidden if full_head else hidden[:left]
        left -= len(take)
        torch.log_softmax(model.get_output_embeddings()(take).float(), dim=-1)  # (M, V)


def bm25_child(n: int, corpus: str, queries: list[str], out) -> None:
    """In a fresh process: n synthetic passages (a 2-word title, 100 words) drawn from the corpus's word
    stream. Puts the BM25 build time and index memory (RSS delta), then the median latency of a query batch."""
    words = [w for line in open(corpus, encoding="utf-8") for w in tokenize(line)]
    rng, rows = np.random.default_rng(0), []
    for k in range(0, n, 10_000):
        for p in rng.integers(len(words), size=(min(10_000, n - k), 102)):
            rows.append(
                {
                    "id": str(len(rows)),
                    "contents": f'"{words[p[0]]} {words[p[1]]}"\n'
                    + " ".join(words[j] for j in p[2:]),
                }
            )
    before, start = rss_gb(), time.perf_counter()
    index = BM25Retriever(rows)
    out.put((time.perf_counter() - start, rss_gb() - before))
    out.put(
        statistics.median(measure(torch.device("cpu"), index.search, queries)[1] for _ in range(3))
    )


class Bench:
    def __init__(self, args):
        self.args, group = (
            args,
            2 if args.batch % 2 == 0 else 1,
        )  # the group sets the advantage baseline only
        self.cfg = c = train.Config(
            **{
                **config.PRESETS[args.shape],
                "model": args.model,
                "group_size": group,
                "questions_per_step": args.batch // group,
                "normalize_std": group > 1,
            }
        )
        self.model, self.tok = prepare.load_model(
            args.model, args.device, dtype=torch.float32
        )  # as train.py
        if c.grad_checkpointing:
            train.enable_checkpointing(self.model)
        self.undo_lean = fast.lean_backward(self.model)  # as train.py
        self.device, self.data = self.model.device, prepare.default_data()
        self.qs = [
            q
            for q in prepare.load_questions(self.data["train"])[: args.batch // group]
            for _ in range(group)
        ]
        self.golds, self.tpl = [q["golden_answers"] for q in self.qs], ig.TEMPLATES[c.template]
        self.prompts = [ig.build_prompt(self.tok, q["question"], self.tpl) for q in self.qs]
        self.policy = ScriptedPolicy(self.model, self.tok, dict(zip(self.prompts, self.qs)), c)
        self.backend = make_search(self.data["corpus"], "", c.topk, c.doc_words or None)
        ref_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # as train.py
        self.ref = (
            copy.deepcopy(self.model).to(ref_dtype).eval().requires_grad_(False)
            if c.kl_coef > 0
            else None
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.0, weight_decay=0.0)
        self.t_search, self.steps, self.trajs = 0.0, [], None

    def search(self, queries: list[str]) -> list[str]:
        docs, seconds, _ = measure(self.device, self.backend, queries)
        self.t_search += seconds
        return docs

    def rollout(self, max_turn_tokens: int = 0) -> list[ig.Trajectory]:
        c = self.cfg
        self.model.eval()
        with train.bf16(self.device):  # bf16 autocast on CUDA, as train.py
            return ig.rollout(
                self.policy,
                self.tok,
                self.prompts,
                self.search,
                template=self.tpl,
                generator=torch.Generator(device=self.device).manual_seed(c.seed + 2),
                max_searches=c.max_searches,
                max_turn_tokens=max_turn_tokens or c.max_turn_tokens,
                max_response_tokens=c.max_response_tokens,
                temperature=c.temperature,
                turn=fast.CachedTurns(),
            )  # as train.py

    def information_gain(self, trajs, shared_prefix: bool = True):
        c = self.cfg
        draws = ig.plan_counterfactuals(
            [ig.step_pairs(t) for t in trajs],
            c.ig_n_random,
            c.ig_baseline,
            torch.Generator().manual_seed(c.seed + 1),
        )
        with train.bf16(self.device):
            return ig.information_gain(
                self.model,
                self.tok,
                trajs,
                self.golds,
                draws,
                template=self.tpl,
                all_golds=c.ig_all_golds,
                max_len=c.ig_max_len,
                batch_size=c.ig_batch_size,
                head_weight=c.ig_head_weight,
                score=fast.answer_scores_shared_prefix if shared_prefix else ig.answer_scores,
            )

    def advantages(self, trajs, alpha: float) -> list[torch.Tensor]:
        c = self.cfg
        rewards = torch.tensor(
            [ig.exact_match(ig.extract_answer(t), g) for t, g in zip(trajs, self.golds)]
        )  # (B,)
        adv = ig.group_advantages(rewards, c.group_size, c.normalize_std)  # (B,)
        return ig.token_advantages(
            trajs, adv, alpha, c.ig_dead_zone, c.ig_neg_scale, c.ig_clip or None
        )

    def update(self, trajs, tok_adv) -> dict:
        return train.update(self.model, self.ref, self.tok, trajs, tok_adv, self.opt, self.cfg)

    def step(self, with_ig: bool) -> dict:
        """One training step through the functions train.py calls; seconds and peak GiB of each phase."""
        self.t_search, rec = 0.0, {"with_ig": with_ig}
        trajs, seconds, rec["mem rollout"] = measure(self.device, self.rollout)
        rec["retrieval"], rec["rollout"] = self.t_search, seconds - self.t_search
        _, rec["IG"], rec["mem IG"] = (
            measure(self.device, self.information_gain, trajs) if with_ig else (0, 0.0, 0.0)
        )
        tok_adv, rec["reward"], _ = measure(
            self.device, self.advantages, trajs, self.cfg.ig_alpha * with_ig
        )
        _, rec["update"], rec["mem update"] = measure(self.device, self.update, trajs, tok_adv)
        self.trajs, rec["total"] = trajs, sum(rec[k] for k in PHASES)
        return rec

    def run_steps(self) -> None:
        if self.steps:
            return
        warm = self.rollout(max_turn_tokens=8)  # warm-up: allocator, optimizer state
        self.update(warm, [torch.zeros(len(t.response_ids)) for t in warm])
        for r in range(
            self.args.repeats
        ):  # IG, outcome, outcome, IG, ...: a linear drift cancels out
            for with_ig in (True, False) if r % 2 == 0 else (False, True):
                self.steps.append(self.step(with_ig))
                print(
                    f"  step {len(self.steps)} ({'IG' if with_ig else 'outcome'}): {self.steps[-1]['total']:.1f} s"
                )

    def median(self, key: str, with_ig: bool | None = None) -> float:
        return statistics.median(
            s[key] for s in self.steps if with_ig is None or s["with_ig"] == with_ig
        )

    def section_step(self) -> None:
        self.run_steps()
        med, n, trajs = (
            {k: self.median(k, True) for k in PHASES + ("total",)},
            len(self.trajs),
            self.trajs,
        )
        table(
            f"1. training step with IG ({n} rollouts, median of {self.args.repeats})",
            ["phase", "seconds", "share"],
            [[k, med[k], f"{100 * med[k] / med['total']:.1f}%"] for k in PHASES]
            + [["step", med["total"], "100%"]],
        )
        print(
            f"  per rollout: {sum(len(t.steps) for t in trajs) / n:.1f} searches, "
            f"{sum(sum(t.loss_mask) for t in trajs) / n:.0f} generated tokens, "
            f"{sum(len(t.response_ids) for t in trajs) / n:.0f} response tokens (documents included)"
        )
        t_ig, t_out, t_scoring = self.median("total", True), self.median("total", False), med["IG"]
        direct = t_scoring / (
            t_ig - t_scoring
        )  # the same ratio, t_outcome estimated within the IG step: less noise
        table(
            "2. IG overhead (steps alternated, same rollouts)",
            ["", "value"],
            [
                ["step with IG (s)", t_ig],
                ["step outcome-only (s)", t_out],
                ["(t_IG - t_outcome) / t_outcome", f"{100 * (t_ig - t_out) / t_out:.1f}%"],
                ["IG scoring / rest of the same step", f"{100 * direct:.1f}%"],
            ],
        )
        if self.args.shape == "paper":
            target("<= 6.4% at the paper shape (IG scoring / rest of the step)", direct <= 0.064)

    def section_update(self) -> None:
        self.run_steps()
        tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in self.trajs)
        trained = sum(sum(t.loss_mask) for t in self.trajs)
        emb, head = (
            self.model.get_input_embeddings().weight,
            self.model.get_output_embeddings().weight,
        )
        n_body = (
            sum(p.numel() for p in self.model.parameters())
            - emb.numel()
            - (0 if head is emb else head.numel())
        )
        # 6 N T: the body on every token, the LM head on trained tokens only (+ 2 N T: the KL reference's forward)
        flops = (6 + 2 * (self.ref is not None)) * (n_body * tokens + head.numel() * trained)
        n, dtype = (
            (8192, torch.bfloat16) if self.device.type == "cuda" else (2048, torch.float32)
        )  # the update's dtype
        a = torch.randn(n, n, dtype=dtype, device=self.device)
        peak = (
            2 * n**3 / statistics.median(measure(self.device, torch.mm, a, a)[1] for _ in range(6))
        )
        achieved = flops / self.median("update")
        table(
            "6. update efficiency (model FLOPs; attention not counted)",
            ["", "value"],
            [
                ["update (s)", self.median("update")],
                ["tokens (trained)", f"{tokens} ({trained})"],
                ["achieved GFLOP/s", achieved / 1e9],
                [f"torch.mm {n}x{n} {str(a.dtype)[6:]} GFLOP/s", peak / 1e9],
                ["ratio", f"{100 * achieved / peak:.0f}%"],
            ],
        )

    def section_memory(self) -> None:
        self.run_steps()
        rows = [
            [f"{k} (median of the IG steps)", self.median(f"mem {k}", True)]
            for k in ("rollout", "IG", "update")
        ]
        mb = (
            self.cfg.micro_batch
        )  # the default run's update fills its micro-batches; the bench's batch may not
        if self.args.shape == "default" and len(self.trajs) < mb:
            trajs = (self.trajs * math.ceil(mb / len(self.trajs)))[:mb]
            _, _, mem = measure(
                self.device, self.update, trajs, [torch.zeros(len(t.response_ids)) for t in trajs]
            )
            rows.append([f"update of one full micro-batch ({mb} rollouts, as in train.py)", mem])
        kind = "CUDA allocated" if self.device.type == "cuda" else "process RSS"
        table(f"8. peak memory per phase (GiB, {kind})", ["", "GiB"], rows)
        if self.device.type == "cpu" and self.args.shape == "default":
            target("<= 3 GiB for the default run on CPU", max(r[1] for r in rows) <= 3)
        ones, runs = [torch.ones(len(t.response_ids)) for t in self.trajs], {True: [], False: []}
        for r in range(
            self.args.repeats
        ):  # the same batch with and without fast.lean_backward, alternated
            for lean in (False, True) if r % 2 == 0 else (True, False):
                self.lean(lean)
                _, seconds, mem = measure(self.device, self.update, self.trajs, ones)
                runs[lean].append((seconds, mem))
        self.lean(True)
        table(
            f"8b. update with and without fast.lean_backward (median of {self.args.repeats}, alternated)",
            ["", "seconds", "peak GiB"],
            [
                [name, *(statistics.median(x[i] for x in runs[lean]) for i in (0, 1))]
                for name, lean in (("with (as train.py)", True), ("without", False))
            ],
        )

    def lean(self, on: bool) -> None:
        """fast.lean_backward on (as train.py) or off."""
        if on and self.undo_lean is None:
            self.undo_lean = fast.lean_backward(self.model)
        elif not on and self.undo_lean is not None:
            self.undo_lean()
            self.undo_lean = None

    def section_ig(self) -> None:
        trajs, c = self.trajs or self.rollout(), self.cfg
        draws = ig.plan_counterfactuals(
            [ig.step_pairs(t) for t in trajs],
            c.ig_n_random,
            c.ig_baseline,
            torch.Generator().manual_seed(c.seed + 1),
        )
        requests = ig.score_requests(self.tok, trajs, self.golds, draws, self.tpl, c.ig_all_golds)
        contexts = [x for r in requests for x in r.context_ids]
        answers = [r.answer_ids for r in requests for _ in r.context_ids]
        bs, pad, steps = (
            c.ig_batch_size,
            self.tok.pad_token_id,
            [len(r.context_ids) for r in requests],
        )
        rows, heads = floor_rows(contexts, answers, fast.rollout_groups(requests, bs), c.ig_max_len)
        step_rows, step_heads = floor_rows(contexts, answers, steps, c.ig_max_len)
        runs = {
            "full contexts (answer_scores)": lambda: self.information_gain(trajs, False),
            "one trunk per rollout (information_gain)": lambda: self.information_gain(trajs, True),
            "one prefix per search step": lambda: fast.answer_scores_shared_prefix(
                self.model,
                requests,
                pad,
                c.ig_max_len,
                bs,
                head_weight=c.ig_head_weight,
                group_sizes=steps,
            ),
            "floor: packed plain forward, LM head at answers": lambda: plain_forward(
                self.model, rows, heads, bs
            ),
            "floor, LM head at every position": lambda: plain_forward(
                self.model, rows, heads, bs, full_head=True
            ),
            "floor with a prefix per step": lambda: plain_forward(
                self.model, step_rows, step_heads, bs
            ),
        }
        names, times, values = list(runs), {k: [] for k in runs}, {}
        for r in range(self.args.repeats):
            for name in (
                names[r % len(names) :] + names[: r % len(names)]
            ):  # the order rotates between repeats
                with train.bf16(self.device):
                    values[name], seconds, _ = measure(self.device, runs[name])
                times[name].append(seconds)
        t = {k: statistics.median(v) for k, v in times.items()}
        full, shared, per_step, floor = (t[k] for k in names[:4])
        full_tokens = sum(min(len(x) + len(a), c.ig_max_len) for x, a in zip(contexts, answers))
        tokens = [full_tokens] + [
            sum(map(len, r)) for r in (rows, step_rows, rows, rows, step_rows)
        ]
        table(
            f"3. IG scoring against its floor ({len(requests)} search steps, {len(contexts)} contexts)",
            ["", "tokens", "seconds", "x floor"],
            [[k, n, t[k], t[k] / floor] for k, n in zip(names, tokens)],
        )
        target("IG <= 1.25 x floor", min(full, shared) / floor <= 1.25)
        a, b = (
            np.array([v for row in values[k] for v in row if v is not None], dtype=float)
            for k in names[:2]
        )
        diff = float(np.abs(a - b).max()) if len(a) else 0.0
        table(
            "4. shared-prefix scoring",
            ["", "value"],
            [
                ["max |IG shared - IG full|", f"{diff:.1e}"],
                ["IG time saved", f"{100 * (1 - shared / full):.0f}%"],
                [
                    "of which by one trunk per rollout (vs a prefix per step)",
                    f"{100 * (1 - shared / per_step):.0f}%",
                ],
                ["kept (exact to 1e-4 and saves >= 15%)", diff <= 1e-4 and shared <= 0.85 * full],
            ],
        )

    def section_rollout(self) -> None:
        prompt_ids = [self.tok(p, add_special_tokens=False).input_ids for p in self.prompts]
        ids, mask, _ = lm.left_pad(prompt_ids, self.tok.pad_token_id, self.device)  # (B, T)
        per_row = math.ceil(
            sum(sum(t.loss_mask) for t in (self.trajs or self.rollout())) / len(self.prompts)
        )
        sampling = dict(do_sample=True, temperature=self.cfg.temperature, top_k=None, top_p=None)

        def generate():
            return self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=per_row,
                min_new_tokens=per_row,
                pad_token_id=self.tok.pad_token_id,
                **(sampling if self.cfg.temperature > 0 else {"do_sample": False}),
            )

        speed, docs_share = {"loop": [], "generate": [], "loop without documents": []}, []
        for r in range(self.args.repeats):
            for name in ("loop", "generate") if r % 2 == 0 else ("generate", "loop"):
                self.policy.t_documents = 0.0
                with train.bf16(self.device):
                    trajs, seconds, _ = measure(
                        self.device, self.rollout if name == "loop" else generate
                    )
                n_new = (
                    sum(sum(t.loss_mask) for t in trajs)
                    if name == "loop"
                    else per_row * len(self.prompts)
                )
                speed[name].append(n_new / seconds)
                if name == "loop":
                    speed["loop without documents"].append(
                        n_new / (seconds - self.policy.t_documents)
                    )
                    docs_share.append(self.policy.t_documents / seconds)
        loop, hf, bare = (
            statistics.median(speed[k]) for k in ("loop", "generate", "loop without documents")
        )
        table(
            "5. rollout throughput (generated tokens/s; same prompts, same number of new tokens)",
            ["", "tokens/s"],
            [
                ["igsearch.rollout (turns, retrieval, documents prefilled)", loop],
                ["model.generate (one call)", hf],
                ["ratio", f"{loop / hf:.2f}"],
                [
                    "share of the loop spent reading later turns' documents (work generate has none of)",
                    f"{100 * statistics.median(docs_share):.0f}%",
                ],
                [
                    "ratio with that prefill left out: the loop's own cost (bookkeeping, retrieval, turn starts)",
                    f"{bare / hf:.2f}",
                ],
            ],
        )
        target("ratio >= 0.8", loop / hf >= 0.8)

    def section_retrieval(self) -> None:
        queries, rows = [q["question"] for q in prepare.load_questions(self.data["train"])[:16]], []
        ctx = multiprocessing.get_context(
            "spawn"
        )  # a fresh process per size: its RSS delta is the index's
        for n in self.args.retrieval_sizes:
            out = ctx.Queue()
            child = ctx.Process(target=bm25_child, args=(n, self.data["corpus"], queries, out))
            child.start()
            row, late, deadline = (
                [n],
                f"> {self.args.retrieval_timeout} s",
                time.time() + self.args.retrieval_timeout,
            )
            try:  # queue.Empty: not done in time (or killed for memory)
                row += [*out.get(timeout=self.args.retrieval_timeout)]
                batch = out.get(timeout=max(1.0, deadline - time.time()))
                row += [batch, 1000 * batch / len(queries)]
            except Exception:
                row += [late] + ["-"] * (4 - len(row))
            rows.append(row)
            child.kill()
            child.join()
        table(
            f"7. in-memory BM25 (rank_bm25) on synthetic passages, {len(queries)} queries a batch",
            ["passages", "build s", "index GiB", "batch s", "ms/query"],
            rows,
        )
        local = BM25Retriever(
            load_corpus(self.data["corpus"])[:1000]
        )  # small: the search hides no overhead
        server = make_server(local, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        clients = {
            "local": local,
            "remote": RemoteRetriever(f"http://127.0.0.1:{server.server_address[1]}/retrieve"),
        }
        t = {name: [] for name in clients}
        for r in range(20):
            for name in ("local", "remote") if r % 2 == 0 else ("remote", "local"):
                t[name].append(
                    measure(self.device, clients[name].search, queries, self.cfg.topk)[1]
                )
        server.shutdown()
        server.server_close()
        lo, hi = statistics.median(t["local"]), statistics.median(t["remote"])
        table(
            f"7b. remote retriever on loopback ({len(local)} passages, {len(queries)} queries a batch)",
            ["", "ms"],
            [
                ["in process", 1000 * lo],
                ["HTTP round trip", 1000 * hi],
                ["overhead", f"{1000 * (hi - lo):.1f} ({100 * (hi - lo) / lo:.0f}%)"],
            ],
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="", help="HF name or folder; empty = the offline default (SmolLM2-135M)"
    )
    p.add_argument("--batch", type=int, default=4, help="rollouts per step")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--shape",
        default="default",
        choices=("default", "paper"),
        help="the train.py preset to copy",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs of each variant (median), after a warm-up",
    )
    p.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument(
        "--retrieval_sizes",
        default="10000,100000",
        help="synthetic corpus sizes, e.g. 10000,1000000",
    )
    p.add_argument(
        "--retrieval_timeout", type=int, default=120, help="seconds allowed per corpus size"
    )
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else list(SECTIONS)
    if set(only) - set(SECTIONS):
        p.error(
            f"--only: unknown section {sorted(set(only) - set(SECTIONS))}; choose from {','.join(SECTIONS)}"
        )
    args.retrieval_sizes = [int(n) for n in args.retrieval_sizes.split(",")]
    start, bench = time.time(), Bench(args)
    c = bench.cfg
    amp = ", bf16 autocast" if bench.device.type == "cuda" else ""
    print(
        f"model {args.model or prepare.default_model()} ({bench.model.dtype} weights{amp}) on {bench.device}, "
        f"{torch.get_num_threads()} CPU threads; shape {args.shape}: max_searches {c.max_searches}, max_turn_tokens "
        f"{c.max_turn_tokens}, max_response_tokens {c.max_response_tokens}, doc_words {c.doc_words}, ig_batch_size "
        f"{c.ig_batch_size}, micro_batch {c.micro_batch}, grad_checkpointing {c.grad_checkpointing}, kl_coef "
        f"{c.kl_coef}; {args.batch} rollouts per step"
    )
    for name in SECTIONS:
        if name in only:
            getattr(bench, f"section_{name}")()
    print(f"\nbench wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
