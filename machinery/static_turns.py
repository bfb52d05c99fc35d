"""StaticTurns equals lm.generate_turn (the same ids, greedy and sampled, under the same generator),
as fast.CachedTurns does, with every decode step of a rollout in one shape, so that a GPU runs it as
one captured graph instead of a few hundred small kernel launches from Python.

1. One static KV cache (transformers' StaticCache) of B rows x T slots for the whole rollout, and
   one attention mask (B, T). Rows share a write offset: each turn's new tokens (the documents, the
   invalid-action note) are left-padded and prefilled at it, each decode step writes one slot of
   every row. Position ids are per row (the real tokens before), so holes in a row (padding, steps
   of rows that stopped) change nothing but the slots they take. Rows that answered, and the rows
   that pad a short batch to B, stay in the batch as masked filler. When slots run out, each row's
   real tokens move left (`relayout`), the shapes unchanged.
2. The decode step is torch.compile(fullgraph=True, mode="reduce-overhead") on CUDA (a CUDA graph);
   eager on the CPU (compiling there costs a minute even for the 2-layer test model, and its gain
   is not measured yet).
3. Sampling: torch.multinomial(probs, 1) is an exponential race, argmax(probs / E) with E ~ Exp(1)
   of probs' shape drawn from the generator (a Gumbel-max: -log E is Gumbel noise). The twin draws
   the same E with the same generator calls in the same order (one (rows of the turn, V) draw a
   step) outside the captured step, and takes the argmax inside it: lm.sample_token's tokens.
4. Stop tests: the new ids are read back once every `check_every` steps (one small copy, no
   decode per token); lm.sample_tokens' string test then runs on the host, only at tokens that can
   complete a stop (EOS, or a token whose text holds a stop string's last character). Steps run
   past the turn's last stop are undone: write offset, mask and generator state are rewound, so the
   next turn draws what the plain loop draws.
"""

from __future__ import annotations

import torch

from machinery import lm


def exponential_noise(rows: int, vocab: int, device, generator) -> torch.Tensor:
    """The draw inside torch.multinomial(probs, 1, generator=generator) for (rows, vocab) probs."""
    noise = torch.empty((rows, vocab), dtype=torch.float32, device=device)  # (n, V)
    return noise.exponential_(1, generator=generator)


def pick_tokens(logits: torch.Tensor, temperature: float, noise: torch.Tensor | None):
    """(B, V) fp32 logits -> (B,) ids: lm.sample_token's, given multinomial's own noise."""
    if noise is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    return (probs / noise).argmax(-1)


def default_generator(device: torch.device) -> torch.Generator:
    """The generator torch.multinomial uses when given none."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    return torch.default_generator


def stops_at(tokenizer, ids: list[int], eos_ids: set[int], stop: tuple[str, ...]) -> bool:
    """lm.sample_tokens' test, after the last of a row's new ids."""
    return ids[-1] in eos_ids or any(s in tokenizer.decode(ids[-12:]) for s in stop)


def may_stop(tokenizer, eos_ids: set[int], stop: tuple[str, ...]) -> set[int]:
    """Ids after which stops_at can turn true: EOS, and tokens that write a stop's last character
    (a stop string ends inside the text its last token adds)."""
    ends = {s[-1] for s in stop}
    vocab = range(len(tokenizer))
    return eos_ids | {v for v in vocab if any(c in tokenizer.decode([v]) for c in ends)}


def relayout(cache, mask: torch.Tensor, slots: int) -> torch.Tensor:
    """Move each row's cached tokens (mask 1) to the front, in order, right-aligned before the
    longest row's count n; with slots > T the cache grows (a new shape). Returns the new mask."""
    B, T = mask.shape
    n = int(mask.sum(-1).max())
    take = torch.sort(mask, dim=1, stable=True).indices[:, T - n :]  # (B, n) holes first, then real
    new_mask = torch.zeros((B, slots), dtype=mask.dtype, device=mask.device)  # (B, S)
    new_mask[:, :n] = mask.gather(1, take)
    for layer in cache.layers:
        for name in ("keys", "values"):
            old = getattr(layer, name)  # (B, H, T, D)
            moved = old.gather(2, take[:, None, :, None].expand(-1, old.shape[1], -1, old.shape[3]))
            if slots == T:  # in place: a captured graph keeps reading the same memory
                old[:, :, :n] = moved
            else:
                grown = old.new_zeros((*old.shape[:2], slots, old.shape[3]))  # (B, H, S, D)
                grown[:, :, :n] = moved
                setattr(layer, name, grown)
                torch._dynamo.mark_static_address(grown)
        layer.max_cache_len = slots
        layer.cumulative_length.fill_(n)
    return new_mask


def decode_step(model, cache, ids, pos, mask, noise, temperature: float):
    """One token for each of the B rows: (B, 1) ids and positions, (B, T) mask -> (B,) ids and
    their (B, V) fp32 logits. The graph that is captured."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        **{lm.cache_keyword(model): cache},
    )
    logits = out.logits[:, -1].float()  # (B, V)
    return pick_tokens(logits, temperature, noise), logits


class StaticTurns:
    """lm.generate_turn on one static cache; one instance per run, so that its step is captured
    once.

    A call whose sequences extend, in order, sequences of the previous call continues their rows
    (fast.CachedTurns' rule); any other call starts a new rollout on the same buffers. rows: the
    batch B (fewer sequences are padded with filler rows; more make a new shape); max_len: slots a
    row, the run's longest sequence (default: the first call's longest + 8 turns of max_new_tokens).
    compile: "auto" (compiled on CUDA, eager on the CPU), "off", or a torch.compile backend (tests
    pass a counting one). record: a list that receives the (rows, V) logits of every step (tests).
    """

    def __init__(self, rows=None, max_len=None, compile="auto", check_every=8, record=None):
        self.rows, self.max_len, self.compile = rows, max_len, compile
        self.check_every, self.record = check_every, record
        self.cache, self.step, self.seqs, self.noise = None, None, [], None

    def continued(self, seqs: list[list[int]]) -> list[int] | None:
        """For each sequence, the row whose sequence it extends (in order), or None."""
        slots, r = [], 0
        for s in seqs:
            while r < len(self.seqs) and not (
                self.seqs[r] is not None
                and len(s) > len(self.seqs[r])
                and s[: len(self.seqs[r])] == self.seqs[r]
            ):
                r += 1
            if r == len(self.seqs):
                return None
            slots.append(r)
            r += 1
        return slots

    def start(self, model, seqs: list[list[int]], max_new_tokens: int, pad_id: int) -> list:
        """A new rollout: the buffers made (or emptied, when the shape fits). Returns the parts to
        prefill: the sequences, then one filler token for each row that pads the batch."""
        from transformers import StaticCache

        device = next(model.parameters()).device
        B = max(self.rows or 0, len(seqs))
        T = self.max_len or max(map(len, seqs)) + 8 * max_new_tokens
        if self.cache is None or self.mask.shape[0] != B or self.mask.shape[1] < T:
            self.cache = StaticCache(config=model.config, max_cache_len=T)
            self.mask = torch.zeros((B, T), dtype=torch.long, device=device)  # (B, T)
            self.ids = torch.zeros((B, 1), dtype=torch.long, device=device)  # (B, 1)
            self.pos = torch.zeros((B, 1), dtype=torch.long, device=device)  # (B, 1)
            self.step, self.noise = None, None
        else:
            self.mask.zero_()
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(0)
        self.offset, self.length, self.seqs = 0, [0] * B, [None] * B
        return seqs + [[pad_id]] * (B - len(seqs))  # a filler row attends to one real slot

    def prefill(self, model, parts: list[list[int]], pad_id: int) -> torch.Tensor:
        """Each row's part (B lists, some empty), left-padded at the write offset -> (B, V)."""
        ids, part_mask, part_pos = lm.left_pad(parts, pad_id, self.mask.device)  # (B, P)
        P = ids.shape[1]
        if self.offset + P > self.mask.shape[1]:
            raise ValueError("prefill past the cache: make_room first")
        self.mask[:, self.offset : self.offset + P] = part_mask
        length = torch.tensor(self.length, device=ids.device)[:, None]  # (B, 1) tokens cached
        out = model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=part_pos + length,  # (B, P) real tokens before, per row
            use_cache=True,
            logits_to_keep=1,
            **{lm.cache_keyword(model): self.cache},
        )
        self.offset += P
        self.pos.copy_(length + part_mask.sum(-1, keepdim=True))  # the first sampled token's
        return out.logits[:, -1].float()  # (B, V)

    def make_room(self, slots: int) -> None:
        """Slots for the next `slots` writes: rows moved left, else the cache grown."""
        if self.offset + slots <= self.mask.shape[1]:
            return
        n, T = int(self.mask.sum(-1).max()), self.mask.shape[1]
        size = max(T, n + slots)
        self.mask = relayout(self.cache, self.mask, size)  # (B, S)
        self.offset, self.step = n, None if size > T else self.step  # a new shape: a new capture

    def compiled_step(self, model, temperature: float):
        def step(ids, pos, mask, noise):
            return decode_step(model, self.cache, ids, pos, mask, noise, temperature)

        cuda = self.mask.device.type == "cuda"
        if self.compile == "off" or (self.compile == "auto" and not cuda):
            return step
        if self.compile == "auto":
            return torch.compile(step, fullgraph=True, mode="reduce-overhead")
        return torch.compile(step, fullgraph=True, backend=self.compile)

    @torch.no_grad()
    def __call__(self, model, tokenizer, seqs, max_new_tokens, temperature, generator, stop):
        pad_id = lm.pad_token_id(tokenizer)
        slots = self.continued(seqs) if self.cache is not None else None
        if slots is None:
            parts, slots = self.start(model, seqs, max_new_tokens, pad_id), range(len(seqs))
        else:
            parts = [[] for _ in self.seqs]  # rows not in this turn: filler, masked
            for s, r in zip(seqs, slots):
                parts[r] = s[self.length[r] :]  # the tokens not in the cache yet
        self.make_room(max(map(len, parts)) + max_new_tokens)
        logits = self.prefill(model, parts, pad_id)  # (B, V)
        if self.step is None or self.step_temperature != temperature:
            self.step, self.step_temperature = self.compiled_step(model, temperature), temperature
        eos_ids = {tokenizer.eos_token_id, pad_id} - {None}
        if getattr(self, "stop_key", None) != (id(tokenizer), stop):
            self.stop_key, self.flagged = (id(tokenizer), stop), may_stop(tokenizer, eos_ids, stop)
        slots, first = list(slots), self.offset
        new = self.sample(logits, slots, max_new_tokens, temperature, generator, tokenizer, stop)
        self.offset = first + max(map(len, new)) - 1  # steps past the last stop: undone
        for s, r, n in zip(seqs, slots, new):
            self.mask[r, first + len(n) - 1 :] = 0  # a row's last token is not fed (CachedTurns)
            self.length[r] += len(parts[r]) + len(n) - 1
            self.seqs[r] = s + n
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(self.offset)
        return new

    def sample(self, logits, slots, max_new_tokens, temperature, generator, tokenizer, stop):
        """lm.sample_tokens after the prefill's (B, V) logits, for the rows in `slots`."""
        device, (B, V) = logits.device, logits.shape
        rows = torch.tensor(slots, device=device)  # (n,)
        fed = torch.zeros(B, dtype=torch.long, device=device).index_fill_(0, rows, 1)  # (B,)
        gen = generator if generator is not None else default_generator(device)
        if temperature > 0 and (self.noise is None or self.noise.shape != (B, V)):
            self.noise = torch.ones((B, V), device=device)  # (B, V) filler rows keep 1
        eos_ids = {tokenizer.eos_token_id, lm.pad_token_id(tokenizer)} - {None}
        new, done, states, block = [[] for _ in slots], [False] * len(slots), [], []
        for t in range(max_new_tokens):
            noise = None
            if temperature > 0:  # multinomial's draw, as the plain loop makes it this step
                states.append(gen.get_state())
                self.noise[rows] = exponential_noise(len(slots), V, device, gen)
                noise = self.noise
            if t == 0:
                next_ids = pick_tokens(logits, temperature, noise)  # (B,)
            else:  # feed the last token; filler rows and slots stay masked
                self.ids.copy_(next_ids[:, None])
                self.mask[:, self.offset] = fed
                self.offset += 1
                next_ids, logits = self.step(self.ids, self.pos, self.mask, noise)
                self.pos += 1
            block.append(next_ids[rows])  # (n,)
            if self.record is not None:
                self.record.append(logits[rows].clone())  # (n, V)
            if (t + 1) % self.check_every and t + 1 < max_new_tokens:
                continue
            for k, step_ids in enumerate(torch.stack(block).tolist(), t + 1 - len(block)):
                for r, tok in enumerate(step_ids):
                    if not done[r]:
                        new[r].append(tok)
                        done[r] = tok in self.flagged and stops_at(tokenizer, new[r], eos_ids, stop)
                if all(done):
                    if k + 1 < len(states):
                        gen.set_state(states[k + 1])  # the draws after the last stop: undone
                    return new
            block = []
        return new
