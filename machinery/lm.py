"""Driving a causal language model: left padding with position ids, the decoding loop with a KV
cache, length-sorted batches. Nothing here is IG-Search; igsearch.py builds the method on it, and
fast.py's CachedTurns is the speed-up of generate_turn (the same tokens).
"""

from __future__ import annotations

import inspect

import torch


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
