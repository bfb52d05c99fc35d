"""Speed-ups: each gives what a plain function of igsearch.py or machinery/lm.py gives (up to float
rounding: the tests compare at 1e-4 to 1e-6; greedy rollouts are token for token the same), in less
time or memory. step.choose_compute picks them once for a run (training, in-training evaluation and
evaluate.py alike) unless `--fast false`, as nanoGPT uses torch.compile unless told not to;
tests/test_fast.py checks each against its plain twin.

1. CachedTurns equals lm.generate_turn: it keeps a rollout's KV cache from one turn to the
   next, so a turn prefills only what was added (documents, the invalid-action note) instead of
   the whole sequence again. (static_turns.StaticTurns is a third twin, for CUDA graphs.)
2. answer_logprobs_shared_prefix equals igsearch.answer_logprobs: step t's contexts hold every
   earlier step's real blocks, so all contexts of one rollout share one trunk: it runs once and
   its KV cache is reused by each context's continuation.
3. policy_logprobs equals igsearch.policy_logprobs: the LM head runs only on the trained positions
   (with a 49k vocabulary the head over every position costs more than the body).
4. lean_backward and backward equal loss.backward() in step.update, with less memory: a tied
   embedding gets a sparse gradient, and the heap's freed blocks go back to the OS (glibc).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import sys

import torch

from machinery import lm

# ---------------------------------------------------------- 1. the KV cache kept across turns


class CachedTurns:
    """lm.generate_turn with memory: one instance per rollout (its cache lives until then).

    A call whose sequences extend, in order, rows of the previous call's sequences continues their
    cache: the rows that left are dropped from it, and only each row's new tokens are prefilled
    (positions count real tokens only). Any other call starts afresh, exactly as generate_turn.
    """

    def __init__(self):
        self.past, self.mask, self.seqs = None, None, []  # the cache, its mask (B, T), rows so far

    def rows_continued(self, seqs: list[list[int]]) -> list[int] | None:
        """For each sequence, the previous row it extends (in order), or None if one does not."""
        rows, r = [], 0
        for s in seqs:
            while r < len(self.seqs) and not (
                len(s) > len(self.seqs[r]) and s[: len(self.seqs[r])] == self.seqs[r]
            ):
                r += 1
            if r == len(self.seqs):
                return None
            rows.append(r)
            r += 1
        return rows

    @torch.no_grad()
    def __call__(
        self,
        model,
        tokenizer,
        seqs: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        generator,
        stop: tuple[str, ...],
    ) -> list[list[int]]:
        device = next(model.parameters()).device
        pad_id = lm.pad_token_id(tokenizer)
        rows = self.rows_continued(seqs) if self.past is not None else None
        if rows is None:  # a fresh prefill: generate_turn's
            ids, mask, pos = lm.left_pad(seqs, pad_id, device)  # (B, T)
            kv = {}
        else:
            if len(rows) < len(self.seqs):  # the rows that answered leave the cache
                idx = torch.tensor(rows, device=device)
                self.past.batch_select_indices(idx)
                self.mask = self.mask[idx]
            cached = self.mask.sum(-1).tolist()  # tokens of each row in the cache
            ids, added, _ = lm.left_pad([s[n:] for s, n in zip(seqs, cached)], pad_id, device)
            mask = torch.cat([self.mask, added], dim=1)  # (B, T+P)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # (B, P) real tokens only
            kv = {lm.cache_keyword(model): self.past}
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **kv,
        )
        new, self.past, self.mask = lm.sample_tokens(
            model, tokenizer, out, mask, pos, max_new_tokens, temperature, generator, stop
        )
        self.seqs = [s + n for s, n in zip(seqs, new)]  # the cache holds all but each last token
        return new


# ------------------------------------------------------ 2. IG scoring on one trunk per rollout


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Number of leading tokens that all sequences share."""
    n = min(len(s) for s in seqs)
    return next((k for k in range(n) if any(s[k] != seqs[0][k] for s in seqs)), n)


def rollout_groups(requests: list, batch_size: int) -> list[int]:
    """Sizes of the groups that share a trunk: the contexts of one rollout's consecutive requests,
    as many whole requests per group as batch_size rows allow."""
    sizes: list[int] = []
    for k, r in enumerate(requests):
        n = len(r.context_ids)
        if sizes and requests[k - 1].traj == r.traj and sizes[-1] + n <= batch_size:
            sizes[-1] += n
        else:
            sizes.append(n)
    return sizes


def trunk_shares(
    seqs: list[list[int]], answers: list[list[int]], group_sizes: list[int]
) -> list[tuple[list[int], list[int], list[int]]]:
    """Per group: its sequence indices, its trunk, and how many leading tokens each shares with it.

    group_sizes[g] consecutive sequences form group g. The trunk is the group's longest context (a
    sequence without its answer); a sequence shares its common prefix with the trunk, but keeps at
    least one context token for its continuation (that token predicts the first answer token). The
    trunk is cut to the longest share: no sequence reads past it.
    """
    out, first = [], 0
    for n in group_sizes:
        idx = list(range(first, first + n))
        first += n
        trunk = max((seqs[i][: len(seqs[i]) - len(answers[i])] for i in idx), key=len)
        context_len = [len(seqs[i]) - len(answers[i]) for i in idx]
        shares = [
            max(0, min(common_prefix_len([seqs[i], trunk]), n - 1))
            for i, n in zip(idx, context_len)
        ]
        out.append((idx, trunk[: max(shares)], shares))
    return out


@torch.no_grad()
def answer_logprobs_shared_prefix(
    model,
    requests: list,
    pad_id: int,
    max_len: int,
    batch_size: int = 16,
    group_sizes: list[int] | None = None,
) -> list[list[torch.Tensor]]:
    """igsearch.answer_logprobs, with the tokens that a rollout's contexts share computed once.

    requests: igsearch.ScoreRequest (traj, context_ids, answer_ids are read).

    Step t's contexts are equal up to step t's documents and each holds the real blocks of every
    earlier step, so one rollout's contexts share a trunk (trunk_shares). The trunk runs once; its
    KV cache is repeated for the continuations (the rest of each context, then the answer), which
    run batched, left-padded, each attending to the part of the trunk its context shares, positions
    continuing after it; a chunk of continuations gets the trunk's cache cut after the last position
    that one of them reads. Same truncation and positions as answer_logprobs; batch_size counts
    continuation rows. A model that returns no cache (the test fakes) runs whole (lm.tail_logprobs,
    as answer_logprobs runs).
    group_sizes: other groups of consecutive contexts to share a trunk (bench.py: one per request).
    """
    device = next(model.parameters()).device
    cache_kw = lm.cache_keyword(model)
    answers = [r.answer_ids for r in requests for _ in r.context_ids]
    seqs = [
        lm.truncate_left(c, r.answer_ids, max_len) + r.answer_ids
        for r in requests
        for c in r.context_ids
    ]
    groups = trunk_shares(seqs, answers, group_sizes or rollout_groups(requests, batch_size))
    logps: list[torch.Tensor] = [torch.zeros(0)] * len(seqs)
    loose = [i for idx, trunk, _ in groups if not trunk for i in idx]  # nothing shared: whole
    batches: list[list[tuple[list[int], list[int], list[int]]]] = []
    for g in sorted((g for g in groups if g[1]), key=lambda g: max(len(seqs[i]) for i in g[0])):
        if not batches or sum(len(idx) for idx, *_ in batches[-1]) + len(g[0]) > batch_size:
            batches.append([])  # groups sorted by length, as many per batch as batch_size allows
        batches[-1].append(g)
    for batch in batches:
        ids, attn, pos = lm.left_pad([trunk for _, trunk, _ in batch], pad_id, device)  # (G, P)
        out = model(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1
        )
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None:
            loose, batches = list(range(len(seqs))), []  # every sequence whole, below
            break
        start = ids.shape[1] - attn.sum(-1)  # (G,) where each trunk begins, after its padding
        rows = [(g, i, k) for g, (idx, _, ks) in enumerate(batch) for i, k in zip(idx, ks)]
        # A real context continues the trunk for a few tokens, a counterfactual for its documents;
        # an early step's rows read a short part of the trunk. Chunks by continuation length, then
        # by the length they read.
        conts = [len(seqs[i]) - k for _, i, k in rows]
        chunks = [
            [c[j] for j in sub]
            for c in lm.length_chunks(conts, batch_size)
            for sub in lm.length_chunks([rows[r][2] + conts[r] for r in c], batch_size)
        ]
        for n, chunk in enumerate(chunks):
            part = [rows[r] for r in chunk]  # (group, sequence, share)
            kv = cache if n == len(chunks) - 1 else copy.deepcopy(cache)  # each chunk its own copy
            group = torch.tensor([g for g, _, _ in part], device=device)  # (rows,)
            kv.batch_select_indices(group)  # (G, ...) -> (rows, ...): the trunk for each row
            shares = torch.tensor([k for _, _, k in part], device=device)  # (rows,)
            positions = torch.arange(ids.shape[1], device=device)[None, :]  # (1, P)
            at = positions - start[group][:, None]  # (rows, P) the index in each row's trunk
            seen = ((at >= 0) & (at < shares[:, None])).long()  # (rows, P) trunk tokens it reads
            end = int((start[group] + shares).max())  # no row of this chunk reads past here
            if end < ids.shape[1]:
                kv.crop(end - ids.shape[1])  # a negative count: drop that many positions at the end
                seen = seen[:, :end]  # (rows, end)
            # (rows, C)
            cont_ids, cont_attn, cont_pos = lm.left_pad(
                [seqs[i][k:] for _, i, k in part], pad_id, device
            )
            L = max(len(answers[i]) for _, i, _ in part)
            # (rows, L+1, V)
            logits = model(
                input_ids=cont_ids,
                attention_mask=torch.cat([seen, cont_attn], 1),
                position_ids=cont_pos + shares[:, None],  # continue after the share
                logits_to_keep=L + 1,
                **{cache_kw: kv},
            ).logits
            logp = lm.token_logprobs(logits[:, :-1], cont_ids[:, -L:])  # (rows, L)
            for row, (_, i, _) in enumerate(part):
                logps[i] = logp[row, L - len(answers[i]) :]  # (n,) the answer tokens in order
    if loose:  # nothing shared with a trunk: run whole
        tails = lm.tail_logprobs(
            model, [seqs[i] for i in loose], [len(answers[i]) for i in loose], pad_id, batch_size
        )
        for i, lp in zip(loose, tails):
            logps[i] = lp
    out, k = [], 0
    for r in requests:
        out.append(logps[k : k + len(r.context_ids)])
        k += len(r.context_ids)
    return out


# ---------------------------------------------------- 3. the LM head on trained positions only


def policy_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """igsearch.policy_logprobs, with the LM head only on the hidden states whose log-prob the loss
    uses (loss mask 1). Returns logp (B, R) with gradient and entropy (B, R) without, both 0 off
    the mask.
    """
    R = batch["targets"].shape[1]
    # the model's own forward (an FSDP root gathers its weights there), the head on 1 position
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=1,
        output_hidden_states=True,
    )
    hidden = out.hidden_states[-1][:, -R - 1 : -1]  # (B, R, H), after the final norm
    sel = batch["loss_mask"].bool()  # (B, R)
    logits = model.get_output_embeddings()(hidden[sel])  # (M, V), M = number of trained tokens
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style soft-capping, applied as the model's own forward would
        logits = torch.tanh(logits / cap) * cap
    lp, ent = lm.token_logprobs(logits[None], batch["targets"][sel][None], entropy=True)  # (1, M)
    logp = torch.zeros(sel.shape, dtype=lp.dtype, device=lp.device).masked_scatter(sel, lp[0])
    entropy = torch.zeros_like(logp).detach().masked_scatter(sel, ent[0])  # (B, R)
    return logp, entropy


# ----------------------------------------------------------------- 4. a leaner backward pass

LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand the heap's free blocks back to the OS (glibc's malloc_trim). glibc keeps freed blocks
    for reuse: without it the peak RSS grew ~0.1 GiB with every micro-batch of an update."""
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def lean_backward(model, trim_every: int = 5):
    """Lower the update's peak memory; the gradient stays the same (to float rounding, ~1e-5).

    - A tied embedding (the head reuses the input embedding matrix: SmolLM2, Qwen2.5-3B) gets a
      sparse gradient, the rows of the batch's tokens, which the head's dense V x H gradient absorbs
      in place: without it the backward holds two dense V x H gradients and their sum.
    - On CPU the heap's free blocks go back to the OS every `trim_every` decoder layers of a
      backward pass: glibc keeps what each recomputed layer frees (RSS rose ~0.3 GiB within one
      backward pass).
    Returns a function that undoes both (bench.py times the update with and without).
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    was_sparse = emb.sparse
    emb.sparse = was_sparse or (head is not None and emb.weight is head.weight)
    cpu = next(model.parameters()).device.type == "cpu"

    def trim_when_its_gradient_passes(module, inputs, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden.register_hook(lambda grad: release_freed_memory())

    hooks = [
        layer.register_forward_hook(trim_when_its_gradient_passes)
        for layer in (lm.decoder_layers(model) if cpu else [])[::trim_every]
    ]

    def undo():
        emb.sparse = was_sparse
        for h in hooks:
            h.remove()

    return undo


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), with the heap trimmed before (what the forward passes freed) and after (the
    micro-batch's activations: RSS would otherwise grow with each micro-batch)."""
    release_freed_memory()
    loss.backward()
    release_freed_memory()
