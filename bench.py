"""What a training step costs, where the time goes, and how close IG scoring comes to its floor.

    python bench.py                          # train.py's default shape, 4 rollouts (~10 min on 2 CPU cores)
    python bench.py --shape paper --batch 2  # 512-token turns, up to 5 searches, full passages (hours on CPU)
    python bench.py --only ig,retrieval      # some sections: step overhead ig rollout update memory retrieval
    python bench.py --device cuda

The untrained default model seldom writes a search, which would leave IG nothing to score. So the
policy is scripted: every forward pass is the real model's and the sampler draws from its output,
but the logits are one-hot on a script that fills each turn to its token budget with a think block
and ends it with a search (max_searches of them), then answers. Each token costs what a free sample
costs; the trajectories have the shape of a policy that always uses its search budget.
The optimizer has lr = 0: the work of training, with weights that stay put, so every repeat samples
the same rollouts and a step with IG differs from one without by the IG scoring alone.
Times are medians over --repeats runs, alternated; on a shared machine compare the ratios.
"""
from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import re
import resource
import statistics
import threading
import time

import numpy as np
import torch

import igsearch as ig
import prepare
import train
from evaluate import make_search
from retriever import BM25Retriever, RemoteRetriever, make_server, tokenize

SECTIONS = ("step", "overhead", "update", "memory", "ig", "rollout", "retrieval")  # in the order they run
PHASES = ("rollout", "retrieval", "IG", "reward", "update")


def rss_gb() -> float:
    """Resident memory now (Linux /proc), in GiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def peak_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory since the last reset, or the process's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def timed(device: torch.device, fn, *args, **kw):
    """(result, seconds), the device synchronised on both sides; resets the CUDA peak first."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn(*args, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    print(f"\n== {title}")
    for r in cells:
        print("  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))))


class ScriptedPolicy(torch.nn.Module):
    """The real model's forward, its logits replaced by a one-hot on the script of each row's turn."""

    def __init__(self, model, tokenizer, questions: dict[str, dict], cfg: train.Config):
        super().__init__()
        self.model, self.tok, self.questions, self.cfg, self.turns = model, tokenizer, questions, cfg, []
        self.cache_kw = "cache" if "cache" in ig.inspect.signature(model.forward).parameters else "past_key_values"

    def script(self, text: str) -> list[int]:
        """Ids of the next turn: [refine of the last documents] think filler, then search (or answer)."""
        prompt = next(p for p in self.questions if text.startswith(p))
        q, response, tag = self.questions[prompt], text[len(prompt):], ig.TEMPLATES[self.cfg.template].doc_tag
        turn, docs = response.count(f"</{tag}>"), ig.find_block(response, tag, last=True)
        question = q["question"].split(": ", 1)[-1]
        head = ""
        if docs:
            title = re.search(r'Title: "([^"]*)"', docs.group(1))
            head = "<refine> " + " ".join(docs.group(1).split(") ", 1)[-1].split()[:8]) + " </refine>\n"
            question = f"{question} {title.group(1) if title else ''}"
        tail = (f" </think>\n<search> {question.strip()} </search>" if turn < self.cfg.max_searches
                else f" </think>\n<answer> {q['golden_answers'][0]} </answer>")
        head_ids, tail_ids = (self.tok(s, add_special_tokens=False).input_ids for s in (head, tail))
        filler = self.tok("<think> " + f"I should check {question}. " * self.cfg.max_turn_tokens,
                          add_special_tokens=False).input_ids
        room = max(0, self.cfg.max_turn_tokens - len(head_ids) - len(tail_ids))
        return head_ids[: max(0, self.cfg.max_turn_tokens - len(tail_ids))] + filler[:room] + tail_ids

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, **kw):
        past = {self.cache_kw: cache} if cache is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **past, **kw)
        if cache is None:  # prefill: a new turn starts on every row
            self.turns = [self.script(self.tok.decode(row[m.bool()])) for row, m in zip(input_ids, attention_mask)]
        logits = torch.full_like(out.logits, -1e4)  # (B, 1, V)
        for b, ids in enumerate(self.turns):
            logits[b, -1, ids.pop(0) if ids else self.tok.eos_token_id] = 0.0
        out.logits = logits
        return out


def floor_rows(contexts: list[list[int]], answers: list[list[int]], group_sizes: list[int],
               max_len: int) -> tuple[list[list[int]], list[int]]:
    """The least IG can compute: per group (the 1 + N contexts of a step) the shared prefix once, then
    each continuation (rest of the context + answer). Returns those rows and, per row, how many of its
    last positions need the LM head (the answer tokens: 0 on a prefix row, len(answer) on the others)."""
    seqs = [c[max(0, len(c) + len(a) - max_len):] + a for c, a in zip(contexts, answers)]  # as answer_scores
    rows, heads, first = [], [], 0
    for n in group_sizes:
        idx = range(first, first + n)
        first += n
        shared = min([ig.common_prefix_len([seqs[i] for i in idx])] + [len(seqs[i]) - len(answers[i]) for i in idx])
        if shared:
            rows.append(seqs[first - n][:shared])
            heads.append(0)
        rows += [seqs[i][shared:] for i in idx]
        heads += [len(answers[i]) for i in idx]
    return rows, heads


@torch.no_grad()
def plain_forward(model, rows: list[list[int]], heads: list[int], batch_size: int, full_head: bool = False) -> None:
    """No-grad forward over the rows, sorted by length, with the LM head and log-softmax at the `heads`
    last positions of each row (every position when full_head)."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for k in range(0, len(order), batch_size):
        idx = order[k: k + batch_size]
        ids, attn, pos = ig.left_pad([rows[i] for i in idx], 0, device)  # (b, T)
        hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state  # (b, T, H)
        want = torch.tensor([heads[i] for i in idx], device=device)
        sel = attn.bool() if full_head else torch.arange(ids.shape[1], device=device) >= ids.shape[1] - want[:, None]
        torch.log_softmax(model.get_output_embeddings()(hidden[sel]).float(), dim=-1)  # (M, V)


def bm25_child(n: int, corpus: str, queries: list[str], out: multiprocessing.Queue) -> None:
    """In a fresh process: n synthetic passages of 100 words drawn from the corpus's word stream,
    BM25 index memory (RSS delta) and build time, median latency of a batch of queries."""
    words = [w for row in open(corpus, encoding="utf-8") for w in tokenize(row)]
    rng = np.random.default_rng(0)
    rows = []
    for k in range(0, n, 10_000):
        for pick in rng.integers(len(words), size=(min(10_000, n - k), 102)):
            rows.append({"id": str(len(rows)), "contents": '"%s %s"\n' % (words[pick[0]], words[pick[1]])
                         + " ".join(words[j] for j in pick[2:])})
    before, start = rss_gb(), time.perf_counter()
    index = BM25Retriever(rows)
    build, mem = time.perf_counter() - start, rss_gb() - before
    lat = [timed(torch.device("cpu"), index.search, queries, 3)[1] for _ in range(3)]
    out.put({"build": build, "mem": mem, "batch": statistics.median(lat)})


class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = train.Config(**{**train.PRESETS["default" if args.shape == "default" else "paper"], "model": args.model})
        self.model, self.tok = prepare.load_model(args.model, args.device)
        self.device = self.model.device
        self.data = prepare.default_data()
        group = 2 if args.batch % 2 == 0 else 1  # the group only sets the advantage baseline: its cost is nil
        self.cfg = train.Config(**{**self.cfg.__dict__, "group_size": group, "questions_per_step": args.batch // group})
        questions = prepare.load_questions(self.data["train"])[: args.batch // group]
        self.qs = [q for q in questions for _ in range(group)]
        self.tpl = ig.TEMPLATES[self.cfg.template]
        self.prompts = [ig.build_prompt(self.tok, q["question"], self.tpl) for q in self.qs]
        self.policy = ScriptedPolicy(self.model, self.tok, dict(zip(self.prompts, self.qs)), self.cfg)
        self.backend = make_search(self.data["corpus"], "", self.cfg.topk, self.cfg.doc_words or None)
        self.t_search = 0.0
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) if self.cfg.kl_coef > 0 else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.0, weight_decay=0.0)
        self.steps, self.trajs = [], None

    def search(self, queries: list[str]) -> list[str]:
        docs, seconds = timed(self.device, self.backend, queries)
        self.t_search += seconds
        return docs

    def rollout(self, max_turn_tokens: int | None = None) -> list[ig.Trajectory]:
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 2)
        return ig.rollout(self.policy, self.tok, self.prompts, self.search, template=self.tpl, generator=gen,
                          max_searches=self.cfg.max_searches, max_turn_tokens=max_turn_tokens or self.cfg.max_turn_tokens,
                          max_response_tokens=self.cfg.max_response_tokens, temperature=self.cfg.temperature)

    def information_gain(self, trajs, shared_prefix: bool = True):
        golds = [q["golden_answers"] for q in self.qs]
        return ig.information_gain(self.model, self.tok, trajs, golds, template=self.tpl, n_random=self.cfg.ig_n_random,
                                   baseline=self.cfg.ig_baseline, all_golds=self.cfg.ig_all_golds,
                                   max_len=self.cfg.ig_max_len, batch_size=self.cfg.ig_batch_size,
                                   head_weight=self.cfg.ig_head_weight, shared_prefix=shared_prefix,
                                   generator=torch.Generator().manual_seed(self.cfg.seed + 1))

    def update(self, trajs, tok_adv):
        return train.update(self.model, self.ref, self.tok, trajs, tok_adv, self.opt, self.cfg)

    def step(self, with_ig: bool) -> dict:
        """One training step through the functions train.py calls, each phase timed."""
        rec, self.t_search = {}, 0.0
        trajs, t = timed(self.device, self.rollout)
        rec["retrieval"], rec["rollout"], rec["mem rollout"] = self.t_search, t - self.t_search, peak_gb(self.device)
        golds, alpha = [q["golden_answers"] for q in self.qs], self.cfg.ig_alpha if with_ig else 0.0
        rec["IG"], rec["mem IG"] = (timed(self.device, self.information_gain, trajs)[1], peak_gb(self.device)) if with_ig else (0.0, 0.0)
        def reward():
            rewards = torch.tensor([ig.exact_match(ig.extract_answer(tr), g) for tr, g in zip(trajs, golds)])  # (B,)
            adv = ig.group_advantages(rewards, self.cfg.group_size, self.cfg.normalize_std)  # (B,)
            return ig.token_advantages(trajs, adv, alpha, self.cfg.ig_dead_zone, self.cfg.ig_neg_scale, self.cfg.ig_clip or None)
        tok_adv, rec["reward"] = timed(self.device, reward)
        rec["update"] = timed(self.device, self.update, trajs, tok_adv)[1]
        rec["mem update"], self.trajs = peak_gb(self.device), trajs
        rec["total"] = sum(rec[k] for k in PHASES)
        return rec

    def run_steps(self) -> None:
        if self.steps:
            return
        warm = self.rollout(max_turn_tokens=8)  # warm-up: allocator, optimizer state
        self.update(warm, [torch.zeros(len(t.response_ids)) for t in warm])
        for r in range(self.args.repeats):  # IG, outcome, outcome, IG, ...: a drift cancels out
            for with_ig in ((True, False) if r % 2 == 0 else (False, True)):
                self.steps.append({"with_ig": with_ig, **self.step(with_ig)})
                print(f"  step {len(self.steps)} ({'IG' if with_ig else 'outcome'}): {self.steps[-1]['total']:.1f} s", flush=True)

    def median(self, key: str, with_ig: bool | None = None) -> float:
        return statistics.median(s[key] for s in self.steps if with_ig is None or s["with_ig"] == with_ig)

    def step_table(self) -> None:
        self.run_steps()
        med = {k: self.median(k, True) for k in PHASES + ("total",)}
        rows = [[k, med[k], f"{100 * med[k] / med['total']:.1f}%"] for k in PHASES] + [["step", med["total"], "100%"]]
        table(f"1. training step with IG ({self.args.batch} rollouts, median of {self.args.repeats})",
              ["phase", "seconds", "share"], rows)
        n = len(self.trajs)
        print(f"  per rollout: {sum(len(t.steps) for t in self.trajs) / n:.1f} searches, "
              f"{sum(sum(t.loss_mask) for t in self.trajs) / n:.0f} generated tokens, "
              f"{sum(len(t.response_ids) for t in self.trajs) / n:.0f} response tokens, "
              f"{sum(len(t.prompt_ids) for t in self.trajs) / n:.0f} prompt tokens")

    def overhead(self) -> None:
        self.run_steps()
        t_ig, t_out, ig_med = self.median("total", True), self.median("total", False), self.median("IG", True)
        over, direct = (t_ig - t_out) / t_out, ig_med / (t_ig - ig_med)
        table("2. IG overhead (steps alternated; same rollouts: lr = 0 and the same seeds)", ["", "value"], [
            ["step with IG (s)", t_ig], ["step outcome-only (s)", t_out], ["overhead (t_IG - t_out) / t_out", f"{100 * over:.1f}%"],
            ["IG / rest of the same step", f"{100 * direct:.1f}%"]])
        if self.args.shape == "paper":
            print(f"  target <= 6.4% at the paper shape: {'met' if over <= 0.064 else 'NOT met'}")
        else:
            print("  no target at the default shape (short turns: every forward pass counts); the paper target "
                  "applies to --shape paper")

    def update_table(self) -> None:
        self.run_steps()
        t_upd = self.median("update")
        tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in self.trajs)
        trained = sum(sum(t.loss_mask) for t in self.trajs)
        emb, head = self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight
        n_all = sum(p.numel() for p in self.model.parameters())
        n_body = n_all - emb.numel() - (0 if head is emb else head.numel())  # the embedding is a lookup
        # 6 N T for the body (forward + backward), the LM head only on trained tokens; + 2 N T for a KL reference
        flops = 6 * (n_body * tokens + head.numel() * trained) + (2 * (n_body * tokens + head.numel() * trained) if self.ref else 0)
        n = 8192 if self.device.type == "cuda" else 2048
        a = torch.randn(n, n, dtype=self.model.dtype, device=self.device)
        mm = statistics.median(timed(self.device, torch.mm, a, a)[1] for _ in range(6))
        achieved, peak = flops / t_upd, 2 * n**3 / mm
        table("6. update efficiency", ["", "value"], [
            ["update (s)", t_upd], ["tokens (trained)", f"{tokens} ({trained})"], ["achieved GFLOP/s", achieved / 1e9],
            [f"torch.mm {n}x{n} {str(self.model.dtype)[6:]} GFLOP/s", peak / 1e9], ["ratio", f"{100 * achieved / peak:.0f}%"]])

    def memory(self) -> None:
        self.run_steps()
        first = next(s for s in self.steps if s["with_ig"])
        rows = [[f"after {k}", first[f"mem {k}"]] for k in ("rollout", "IG", "update")]
        mb = self.cfg.micro_batch  # one full micro-batch: the default run's largest update
        trajs = (self.trajs * math.ceil(mb / len(self.trajs)))[:mb]
        self.update(trajs, [torch.zeros(len(t.response_ids)) for t in trajs])
        rows.append([f"update of one micro-batch ({mb} rollouts)", peak_gb(self.device)])
        what = "peak allocated CUDA memory in the phase" if self.device.type == "cuda" else "process peak RSS so far"
        table(f"8. memory (GiB, {what})", ["", "GiB"], rows)
        if self.device.type == "cpu" and self.args.shape == "default":
            print(f"  target <= 3 GiB on CPU: {'met' if rows[-1][1] <= 3 else 'NOT met'}")

    def ig_table(self) -> None:
        trajs = self.trajs or self.rollout()
        contexts, answers, plan = ig.ig_requests(self.tok, trajs, [q["golden_answers"] for q in self.qs], template=self.tpl,
                                                 n_random=self.cfg.ig_n_random, baseline=self.cfg.ig_baseline,
                                                 all_golds=self.cfg.ig_all_golds,
                                                 generator=torch.Generator().manual_seed(self.cfg.seed + 1))
        rows, heads = floor_rows(contexts, answers, [n for *_, n in plan], self.cfg.ig_max_len)
        bs = self.cfg.ig_batch_size
        runs = {"full contexts (answer_scores)": lambda: self.information_gain(trajs, False),
                "shared prefix (answer_scores_shared_prefix)": lambda: self.information_gain(trajs, True),
                "floor: plain forward, head at answers": lambda: plain_forward(self.model, rows, heads, bs),
                "floor with the head on every position": lambda: plain_forward(self.model, rows, heads, bs, True)}
        times, values = {k: [] for k in runs}, {}
        for r in range(self.args.repeats):
            for name in list(runs)[r % 4:] + list(runs)[: r % 4]:  # rotate the order between repeats
                values[name], t = timed(self.device, runs[name])
                times[name].append(t)
        t = {k: statistics.median(v) for k, v in times.items()}
        full_tokens = sum(min(len(c) + len(a), self.cfg.ig_max_len) for c, a in zip(contexts, answers))
        floor = t["floor: plain forward, head at answers"]
        tokens = [full_tokens, sum(map(len, rows)), sum(map(len, rows)), sum(map(len, rows))]
        table(f"3. IG scoring against its floor ({len(plan)} steps x {len(contexts) // max(1, len(plan))} contexts)",
              ["", "tokens", "seconds", "x floor"], [[k, n, t[k], t[k] / floor] for k, n in zip(runs, tokens)])
        best = min(t["full contexts (answer_scores)"], t["shared prefix (answer_scores_shared_prefix)"])
        print(f"  target IG <= 1.25 x floor: {best / floor:.2f} x, {'met' if best / floor <= 1.25 else 'NOT met'}")
        a, b = (np.array([v for row in values[k] for v in row if v is not None], dtype=float) for k in list(runs)[:2])
        diff = float(np.abs(a - b).max()) if len(a) else 0.0
        saving = 1 - t["shared prefix (answer_scores_shared_prefix)"] / t["full contexts (answer_scores)"]
        table("4. shared-prefix scoring", ["", "value"], [["max |IG shared - IG full|", f"{diff:.2e}"],
              ["IG time saved", f"{100 * saving:.0f}%"], ["keep (exact to 1e-4, saves >= 15%)", diff <= 1e-4 and saving >= 0.15]])

    def rollout_table(self) -> None:
        pad = self.tok.pad_token_id
        ids, mask, _ = ig.left_pad([self.tok(p, add_special_tokens=False).input_ids for p in self.prompts], pad, self.device)
        loop, hf = [], []
        for r in range(self.args.repeats):
            for which in ("loop", "generate") if r % 2 == 0 else ("generate", "loop"):
                if which == "loop":
                    trajs, t = timed(self.device, self.rollout)
                    n_new = sum(sum(tr.loss_mask) for tr in trajs)
                    loop.append(n_new / t)
                else:
                    per_row = math.ceil(sum(sum(tr.loss_mask) for tr in (self.trajs or self.rollout())) / len(self.prompts))
                    sample = dict(do_sample=True, temperature=self.cfg.temperature, top_k=None, top_p=None) if self.cfg.temperature > 0 else dict(do_sample=False)
                    _, t = timed(self.device, self.model.generate, input_ids=ids, attention_mask=mask, max_new_tokens=per_row,
                                 min_new_tokens=per_row, pad_token_id=pad, **sample)
                    hf.append(per_row * len(self.prompts) / t)
        ratio = statistics.median(loop) / statistics.median(hf)
        table("5. rollout throughput (generated tokens/s, same prompts and total new tokens)", ["", "tokens/s"], [
            ["igsearch.rollout (multi-turn, retrieval, re-prefill)", statistics.median(loop)],
            ["model.generate (one call)", statistics.median(hf)], ["ratio", f"{ratio:.2f}"]])
        print(f"  target ratio >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'}")

    def retrieval(self) -> None:
        queries = [q["question"] for q in prepare.load_questions(self.data["train"])[:16]]
        ctx, rows = multiprocessing.get_context("spawn"), []
        for n in self.args.retrieval_sizes:
            out = ctx.Queue()
            child = ctx.Process(target=bm25_child, args=(n, self.data["corpus"], queries, out))
            child.start()
            try:
                r = out.get(timeout=self.args.retrieval_timeout)
                rows.append([n, r["build"], r["mem"], r["batch"], 1000 * r["batch"] / len(queries)])
            except Exception:  # queue.Empty: too slow (or killed for memory)
                rows.append([n, f"> {self.args.retrieval_timeout} s", "-", "-", "-"])
            child.terminate()
            child.join()
        table(f"7. BM25 in memory (rank_bm25), synthetic 100-word passages, batch of {len(queries)} queries",
              ["passages", "build s", "index GiB", "batch s", "ms/query"], rows)
        local = BM25Retriever(self.data["corpus"])
        server = make_server(local, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        remote = RemoteRetriever(f"http://127.0.0.1:{server.server_address[1]}/retrieve")
        t_local, t_remote = [], []
        for r in range(5):
            for client, ts in ((local, t_local), (remote, t_remote)) if r % 2 == 0 else ((remote, t_remote), (local, t_local)):
                ts.append(timed(self.device, client.search, queries, self.cfg.topk)[1])
        server.shutdown()
        server.server_close()
        lo, re_ = statistics.median(t_local), statistics.median(t_remote)
        table(f"7b. remote retriever on loopback ({len(local)} passages, batch of {len(queries)})", ["", "ms"], [
            ["in process", 1000 * lo], ["HTTP round trip", 1000 * re_], ["overhead", f"{1000 * (re_ - lo):.1f} ({100 * (re_ - lo) / lo:.0f}%)"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF name or folder; empty = the offline default (SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=4, help="rollouts per step")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--shape", default="default", choices=("default", "paper"), help="train.py's preset to copy")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each variant (median), after a warm-up")
    p.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--retrieval_sizes", default="10000,100000", help="synthetic corpus sizes (1000000: see the README)")
    p.add_argument("--retrieval_timeout", type=int, default=120, help="seconds allowed per corpus size")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else list(SECTIONS)
    if set(only) - set(SECTIONS):
        p.error(f"--only: unknown section {sorted(set(only) - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    args.retrieval_sizes = [int(n) for n in args.retrieval_sizes.split(",")]
    start = time.time()
    bench = Bench(args)
    print(f"model {args.model or prepare.default_model()} ({bench.model.dtype}) on {bench.device}"
          f"{'' if bench.device.type == 'cuda' else f', {torch.get_num_threads()} threads'}; shape {args.shape}: "
          f"max_searches {bench.cfg.max_searches}, max_turn_tokens {bench.cfg.max_turn_tokens}, doc_words "
          f"{bench.cfg.doc_words}, ig_batch_size {bench.cfg.ig_batch_size}, micro_batch {bench.cfg.micro_batch}; "
          f"{args.batch} rollouts per step ({bench.cfg.questions_per_step} questions x {bench.cfg.group_size})")
    methods = {"step": bench.step_table, "overhead": bench.overhead, "update": bench.update_table,
               "memory": bench.memory, "ig": bench.ig_table, "rollout": bench.rollout_table, "retrieval": bench.retrieval}
    for name in SECTIONS:
        if name in only:
            methods[name]()
    print(f"\nbench wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
