"""What a run will need, before it runs: the peak memory of a training run, from its config and the
model's config alone (no weights loaded), against what the device has.

    python tools/memory.py                      # the offline default, on this machine
    python tools/memory.py --model_config qwen2.5-3b --device cuda --device_gib 24 \\
        --ranks 0,16,64 --preset paper --rollout_batch 8 --micro_batch 1 --ig_batch_size 8

Each phase of a step holds the fixed part (fp32 weights, AdamW state, the KL reference, a LoRA
adapter) and its own working memory; the estimate is the largest phase. Sequences are counted at
their full budget (every turn at max_turn_tokens, every search at max_searches, passages at
doc_words), so a model that stops early needs less. train.py prints it in its first lines and stops
when it exceeds the device. docs/performance.md compares it with measured peaks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from machinery.errors import InputError

GiB = 2**30
PROMPT_TOKENS = 100  # instruction + question (86 with the default template and tokenizer)
TOKENS_PER_WORD = 1.3
PASSAGE_WORDS = 100  # a wiki-18 passage, when doc_words = 0 keeps whole passages
# Python, torch, tokenizer, questions, BM25 index: measured, offline default
CPU_RUNTIME = 0.43 * GiB
CUDA_RUNTIME = 0.5 * GiB  # CUDA context and allocator slack (assumed, not measured here)

# Qwen2.5-3B's published architecture (its config.json), so its table prints offline.
QWEN25_3B = dict(
    model_type="qwen2",
    hidden_size=2048,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    intermediate_size=11008,
    vocab_size=151936,
    tie_word_embeddings=True,
    attention_bias=True,
)
NAMED = {"qwen2.5-3b": QWEN25_3B}

# the flag that lowers each term, for the one-line stop
FLAGS = {
    "weights": "a smaller --model",
    "AdamW state": "--lora_rank 16",
    "gradients": "--lora_rank 16",
    "reference model": "--kl_coef 0 or --lora_rank 16",
    "autocast bf16 weights": "--lora_rank 16",
    "KV cache of a rollout chunk": "--rollout_batch",
    "prefill of a rollout chunk": "--rollout_batch",
    "IG scoring batch": "--ig_batch_size",
    "update activations": "--micro_batch (or --grad_checkpointing true)",
    "LM-head logits": "--micro_batch",
    "runtime": "nothing (fixed)",
    "LoRA adapter": "--lora_rank",
}


@dataclass
class Shape:
    """What memory depends on in a decoder-only transformer's config."""

    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


def model_shape(config, where: str = "model config") -> Shape:
    """From a transformers config (or its dict): the parameter count is computed, not loaded. A
    config without the sizes, or with sizes that are not positive integers, is refused in one line
    naming `where` and the field."""
    c = config.to_dict() if hasattr(config, "to_dict") else config
    c = c.get("text_config", c) if isinstance(c, dict) else c  # multimodal: the LM's is nested
    if not isinstance(c, dict):
        raise InputError(f"{where}: not a model config (a JSON object of sizes)")
    sizes = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")
    for key in sizes + ("num_key_value_heads", "head_dim", "intermediate_size"):
        value = c.get(key)
        if (value is not None or key in sizes) and not (
            isinstance(value, int) and not isinstance(value, bool) and value > 0
        ):
            raise InputError(
                f"{where}: '{key}' is {value!r}, not a positive integer "
                f"({'missing' if value is None else 'a model config has it as a count'})"
            )
    H, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    d = c.get("head_dim") or H // heads
    inter = c.get("intermediate_size") or 4 * H
    bias = (heads + 2 * kv) * d if c.get("attention_bias") or c.get("model_type") == "qwen2" else 0
    # attention, MLP, norms
    layer = H * heads * d * 2 + 2 * H * kv * d + bias + 3 * H * inter + 2 * H
    embed = V * H * (1 if c.get("tie_word_embeddings", False) else 2)
    return Shape(L * layer + embed + H, L, H, heads, kv, d, inter, V)


# the projections of a Llama/Qwen-style layer the estimate knows (lora_params counts no other name)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_params(shape: Shape, rank: int, targets: str) -> int:
    """r (in + out) for every targeted projection of every layer."""
    s, q, kv = shape, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    dims = {
        "q_proj": (s.hidden, q),
        "k_proj": (s.hidden, kv),
        "v_proj": (s.hidden, kv),
        "o_proj": (q, s.hidden),
        "gate_proj": (s.hidden, s.intermediate),
        "up_proj": (s.hidden, s.intermediate),
        "down_proj": (s.intermediate, s.hidden),
    }
    return s.layers * sum(rank * sum(dims.get(t.strip(), (0, 0))) for t in targets.split(","))


def lengths(cfg) -> tuple[int, int, int]:
    """(sequence, generated, one search's inserted) tokens of a rollout at its full budget."""
    generated = (cfg.max_searches + 1) * cfg.max_turn_tokens
    passage = (cfg.doc_words or PASSAGE_WORDS) * TOKENS_PER_WORD + 12  # + 'Doc i(Title: "...")'
    inserted = int(cfg.topk * passage + 16)  # + the documents tags
    response = min(cfg.max_response_tokens, generated + cfg.max_searches * inserted)
    return PROMPT_TOKENS + response, min(generated, response), inserted


def saved_per_token(s: Shape, bf16: bool) -> int:
    """Bytes one decoder layer saves for the backward pass, per token.

    8 H-vectors (the residual stream, the norms' inputs, the attention output) stay fp32 under
    autocast, which casts only the products' inputs; the MLP's 4 I-vectors and the attention's
    4 kv·d follow the precision. Counted with torch.autograd.graph.saved_tensors_hooks on a Llama
    layer (tests/test_memory.py): this formula within 5 % in fp32 and in bf16, where a layer saves
    ~0.72 of fp32's bytes, not half.
    """
    act = 2 if bf16 else 4
    return 8 * s.hidden * 4 + (4 * s.intermediate + 4 * s.kv_heads * s.head_dim) * act


def estimate(
    cfg, shape: Shape, device_type: str, world_size: int = 1, bf16: bool | None = None
) -> dict[str, dict]:
    """Bytes each term holds, per phase (rollout and evaluation, IG scoring, update), per rank.
    bf16: the run autocasts to bf16 (train.py's choice from --precision; None: on CUDA only)."""
    bf16 = device_type == "cuda" if bf16 is None else bf16
    s, act = shape, (2 if bf16 else 4)  # the products' outputs are bf16 under autocast
    T, generated, inserted = lengths(cfg)
    adapter = lora_params(s, cfg.lora_rank, cfg.lora_targets) if cfg.lora_rank else 0
    trained = adapter or s.params
    # fp32 weights, two moments
    fixed = {
        "runtime": CUDA_RUNTIME if device_type == "cuda" else CPU_RUNTIME,
        "weights": 4 * s.params,
        "AdamW state": 8 * trained,
    }
    if adapter:
        fixed["LoRA adapter"] = 4 * adapter
    elif bf16:  # autocast keeps a bf16 copy of every weight that trains
        fixed["autocast bf16 weights"] = 2 * s.params
    if cfg.kl_coef > 0 and not adapter:  # LoRA's reference is the base, adapter off: no copy
        fixed["reference model"] = s.params * (2 if device_type == "cuda" else 4)
    kv_token = 2 * s.layers * s.kv_heads * s.head_dim * act  # keys and values of every layer
    layer_token = (4 * s.hidden + 3 * s.intermediate) * act  # one layer's working set, no grad
    chunk = cfg.rollout_batch or max(1, cfg.questions_per_step // world_size) * cfg.group_size
    if cfg.eval_questions or cfg.eval_every:
        chunk = max(chunk, cfg.eval_batch)
    prefill = max(PROMPT_TOKENS, inserted)  # the first turn's prompt, or a search's documents
    rollout = {
        "KV cache of a rollout chunk": chunk * T * kv_token,
        "prefill of a rollout chunk": chunk * prefill * (layer_token + T * act),
    }
    ctx = min(T, cfg.ig_max_len)  # IG: a batch of contexts, forward only, with their KV cache
    ig = {"IG scoring batch": cfg.ig_batch_size * ctx * (kv_token + layer_token + ctx * act)}
    mb, N = cfg.micro_batch, cfg.micro_batch * T
    saved = saved_per_token(s, bf16)
    mask = mb * T * T * act  # each layer's attention mask (B, 1, T, T)
    if cfg.grad_checkpointing:  # layer inputs (fp32 residual stream) + one layer recomputed
        acts = s.layers * N * s.hidden * 4 + N * saved + mask
    else:
        acts = s.layers * (N * saved + mask)
    head_tokens = mb * (generated if cfg.fast else T - PROMPT_TOKENS)  # fast: trained tokens only
    # logits, log-softmax, p, grad
    update = {
        "gradients": 4 * trained,
        "update activations": acts,
        "LM-head logits": head_tokens * s.vocab * (act + 12),
    }
    return {"rollout": {**fixed, **rollout}, "IG": {**fixed, **ig}, "update": {**fixed, **update}}


def peak(phases: dict[str, dict]) -> tuple[str, float, dict]:
    """The phase with the largest total: (phase, bytes, its terms)."""
    name = max(phases, key=lambda p: sum(phases[p].values()))
    return name, sum(phases[name].values()), phases[name]


def device_memory(device) -> tuple[float, str]:
    """(bytes, description): the GPU's memory, or the machine's RAM (or a lower cgroup limit)."""
    if device.type == "cuda":
        import torch

        total = torch.cuda.get_device_properties(device.index or 0).total_memory
        return total, f"CUDA total {total / GiB:.1f} GiB"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return total, f"RAM {total / GiB:.1f} GiB"


def summary(phase: str, total: float, terms: dict, top: int = 3) -> str:
    big = sorted(terms.items(), key=lambda kv: -kv[1])[:top]
    return (
        f"{total / GiB:.2f} GiB at the {phase} phase ("
        + ", ".join(f"{k} {v / GiB:.2f}" for k, v in big)
        + ")"
    )


def check(cfg, model_path: str, device, world_size: int = 1, quiet: bool = False) -> None:
    """train.py's check before any work: print the estimate and the device's memory; stop in one
    line when the estimate exceeds it (--ignore_memory_check runs anyway)."""
    say = (lambda text: None) if quiet else print
    if cfg.fsdp:
        say("memory: no estimate with --fsdp (the table in docs/paper-setting.md is per rank)")
        return
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
        shape = model_shape(config)
    except Exception as e:  # an estimate never stops a run: loading the model says what is wrong
        say(f"memory: no estimate ({str(e).strip().splitlines()[0][:120]})")
        return
    from machinery.lm import amp_dtype  # torch, imported only when a run checks

    bf16 = amp_dtype(cfg.precision, device) is not None
    phase, total, terms = peak(estimate(cfg, shape, device.type, world_size, bf16=bf16))
    have, what = device_memory(device)
    say(f"memory: estimate {summary(phase, total, terms)}; device: {what}")
    if total > have and not cfg.ignore_memory_check:
        term = max(terms, key=terms.get)
        raise InputError(
            f"memory: the estimate {total / GiB:.1f} GiB exceeds the device's "
            f"{have / GiB:.1f} GiB; the largest term is {term} "
            f"({terms[term] / GiB:.1f} GiB), lowered by {FLAGS[term]} "
            f"(--ignore_memory_check runs anyway)"
        )


def table(columns: dict[str, dict[str, dict]], have: float | None) -> str:
    """Terms as rows, one column per configuration, the peak phase of each."""
    peaks = {name: peak(phases) for name, phases in columns.items()}
    rows = list(dict.fromkeys(k for _, _, terms in peaks.values() for k in terms))
    lines = ["| GiB | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [
        f"| {row} | "
        + " | ".join(
            f"{terms[row] / GiB:.2f}" if row in terms else "–" for _, _, terms in peaks.values()
        )
        + " |"
        for row in rows
    ]
    lines.append(
        "| **peak** (phase) | "
        + " | ".join(f"**{t / GiB:.1f}** ({p})" for p, t, _ in peaks.values())
        + " |"
    )
    lines.append(
        "| phases: rollout / IG / update | "
        + " | ".join(
            " / ".join(f"{sum(terms.values()) / GiB:.1f}" for terms in phases.values())
            for phases in columns.values()
        )
        + " |"
    )
    if have:
        lines.append(
            f"| fits {have / GiB:.1f} GiB | "
            + " | ".join("yes" if t <= have else "no" for _, t, _ in peaks.values())
            + " |"
        )
    return "\n".join(lines)
