"""Driving a causal language model: left padding with position ids, the decoding loop with a KV
cache, length-sorted batches. Nothing here is IG-Search; igsearch.py builds the method on it, and
fast.py's CachedTurns is the speed-up of generate_turn (the same tokens).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path

import torch


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 matrices natively: a CUDA GPU that supports bf16, or a CPU
    with AMX-BF16 or AVX512-BF16 (torch's CPU capabilities, else Linux's /proc/cpuinfo flags).
    Elsewhere bf16 autocast is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


KERNEL_CACHE = 16  # compiled oneDNN kernels kept per cache (torch's and oneDNN's: 1024 each)


def bound_kernel_caches() -> None:
    """Keep few compiled bf16 kernels. On the CPU, bf16 products run through oneDNN, which compiles
    a kernel for each new shape and keeps it, with memory of its own, in two caches of 1,024
    entries; the rollout's prefills, the IG batches and the update change their length at every
    call, so the default run grew by ~0.5 GiB over its 12 RL steps (docs/performance.md). Both
    caches read their size at the first product that uses them, so call this before it; a size set
    in the environment wins."""
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(KERNEL_CACHE))


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: bf16 (precision "bf16", or "auto" where the device has native
    bf16 matrix units), else None: fp32 throughout. The weights, their gradients and the AdamW
    state stay fp32 either way: steps of lr 1e-6 would round away on bf16 weights (their spacing
    is ~1e-4 near 0.02)."""
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


def pad_token_id(tokenizer) -> int:
    """The id that fills padding (masked by position, so any id will do): pad, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(
    seqs: list[list[int]], pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad id lists. Returns ids, attention mask and position ids, all (B, T).

    The mask comes from each sequence's length, never from comparing ids with pad_id (igsearch.py's
    departure 1).
    """
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, T - len(s) :] = torch.tensor(s)
            mask[b, T - len(s) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) 0 at the first real token
    return ids.to(device), mask.to(device), position_ids.to(device)


def sample_token(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) ids; greedy when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cache_keyword(model) -> str:
    """transformers 5.2x calls the KV cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_tokens(
    model,
    tokenizer,
    out,
    mask: torch.Tensor,
    pos: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    stop: tuple[str, ...],
):
    """The decoding loop after a prefill `out` (logits of each row's last position, its KV cache).

    Samples until a stop string, EOS or the limit; rows that stopped are fed filler tokens with mask
    0 while the others go on. Returns the new ids of each row (the stop token included: it is
    trained), the KV cache and its attention mask (B, T): what fast.CachedTurns continues from.
    """
    device = mask.device
    eos_ids = {tokenizer.eos_token_id, pad_token_id(tokenizer)} - {None}
    cache_kw = cache_keyword(model)
    past = out.cache if hasattr(out, "cache") else out.past_key_values  # grown in place by calls
    new: list[list[int]] = [[] for _ in range(mask.shape[0])]
    done = [False] * mask.shape[0]
    for _ in range(max_new_tokens):
        next_ids = sample_token(out.logits[:, -1, :], temperature, generator)  # (B,)
        fed = [not d for d in done]  # rows still running: their token is real, the others' filler
        for b, tok in enumerate(next_ids.tolist()):
            if done[b]:
                continue
            new[b].append(tok)
            tail = tokenizer.decode(new[b][-12:])
            done[b] = tok in eos_ids or any(s in tail for s in stop)
        if all(done):
            break
        fed_mask = torch.tensor(fed, device=device, dtype=mask.dtype)[:, None]  # (B, 1)
        mask = torch.cat([mask, fed_mask], dim=1)  # (B, T+1)
        pos = pos[:, -1:] + 1  # (B, 1)
        out = model(
            input_ids=next_ids[:, None],
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{cache_kw: past},
        )
    return new, past, mask


@torch.no_grad()
def generate_turn(
    model,
    tokenizer,
    seqs: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    stop: tuple[str, ...],
) -> list[list[int]]:
    """Sample one turn for every sequence: prefill the whole sequences, then sample_tokens."""
    device = next(model.parameters()).device
    ids, mask, pos = left_pad(seqs, pad_token_id(tokenizer), device)  # (B, T)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    return sample_tokens(
        model, tokenizer, out, mask, pos, max_new_tokens, temperature, generator, stop
    )[0]


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


def truncate_left(context: list[int], answer: list[int], max_len: int) -> list[int]:
    """The context cut from the left so that context + answer fit max_len tokens."""
    return context[max(0, len(context) + len(answer) - max_len) :]


@torch.no_grad()
def tail_logprobs(
    model, seqs: list[list[int]], n_tail: list[int], pad_id: int, batch_size: int = 16
) -> list[torch.Tensor]:
    """log p of the last n_tail[i] tokens of each sequence, teacher-forced: one (n_tail[i],) tensor
    per sequence. Sequences run left-padded in length-sorted batches (length_chunks); the LM head
    runs only on the positions that predict those tokens (logits_to_keep)."""
    device = next(model.parameters()).device
    flat: list[torch.Tensor] = [torch.zeros(0)] * len(seqs)
    for idx in length_chunks([len(s) for s in seqs], batch_size):
        ids, attn, pos = left_pad([seqs[i] for i in idx], pad_id, device)  # (b, T)
        L = max(n_tail[i] for i in idx)
        # (b, L+1, V)
        logits = model(
            input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=L + 1
        ).logits
        logp = token_logprobs(logits[:, :-1], ids[:, -L:])  # (b, L): position p predicts p+1
        for row, i in enumerate(idx):
            flat[i] = logp[row, L - n_tail[i] :]  # (n_tail[i],) the tail tokens in order
    return flat


def response_batch(
    trajs: list, pad_id: int, device=None, advantages: list[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded prompt+response ids and the right-aligned response targets, loss mask and, when
    given, the per-token advantages A_{i,p} (one (R_i,) tensor per trajectory; 0 on padding).

    Every response ends at the right edge, so the last R positions hold all generated tokens.
    """
    seqs = [t.prompt_ids + t.response_ids for t in trajs]
    ids, attn, pos = left_pad(seqs, pad_id, device)  # (B, T)
    R = max(len(t.response_ids) for t in trajs)
    mask, _, _ = left_pad([t.loss_mask for t in trajs], 0, device)  # (B, R)
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": pos,
        "targets": ids[:, -R:],
        "loss_mask": mask,
    }
    if advantages is not None:
        # (B, R)
        batch["advantages"] = torch.stack(
            [torch.nn.functional.pad(a, (R - len(a), 0)) for a in advantages]
        ).to(device)
    return batch


def length_chunks(lengths: list[int], size: int) -> list[list[int]]:
    """Indices sorted by length, in chunks of at most `size`; a chunk also ends where the next
    length is over twice its shortest, so that left padding wastes little."""
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not chunks or len(chunks[-1]) == size or lengths[i] > 2 * lengths[chunks[-1][0]]:
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers, by the class names transformers lists in `_no_split_modules`."""
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in layer_types]
