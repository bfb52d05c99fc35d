"""Decode speed of the three turn functions against the memory-bound floor, on a GPU.

    python tools/device_decode.py                      # CUDA: 135M x 4 rows, 3B-shaped x 64, 256
    python tools/device_decode.py --bandwidth 3.35e12  # the floor at an H100's HBM bandwidth
    python tools/device_decode.py --device cpu --quick # a tiny random Qwen2: checks it runs

Per shape: ms a decode step and tokens/s of lm.generate_turn (the plain loop), fast.CachedTurns and
static_turns.StaticTurns (compiled on CUDA), each from one turn of `--steps` tokens minus a turn of
one token (the prefill's share cancels). The floor: a step reads every weight once and each row's
KV cache, at the device's bandwidth. The Qwen2.5-3B-shaped model has random weights (no download);
a random token never stops a row early (EOS is an id it cannot sample).
"""

import argparse
import time

import torch

from machinery import fast, lm, static_turns

QWEN25_3B = dict(  # Qwen/Qwen2.5-3B-Instruct's config.json, the sizes that set the cost
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1e6,
    tie_word_embeddings=True,
)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
TINY.update(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


class NoStopTokenizer:
    """What the turn functions ask of a tokenizer; EOS and pad are the model's last id, which a
    forward hook on the LM head makes unsampleable (a logit of -1e4)."""

    def __init__(self, eos: int):
        self.eos_token_id = self.pad_token_id = eos

    def decode(self, ids) -> str:
        return ""

    def __len__(self) -> int:
        return self.eos_token_id + 1


def random_model(config: dict, device, dtype):
    """A Qwen2 model of the config's sizes, random weights, its last id unsampleable."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{**config, "vocab_size": config["vocab_size"] + 1})
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    model.lm_head.weight.data[-1] = 0  # tied: the embedding's row too (fed only as padding)
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill_(-1, eos_id(out), -1e4))
    return model, NoStopTokenizer(config["vocab_size"])


def eos_id(logits: torch.Tensor) -> torch.Tensor:
    return torch.tensor([logits.shape[-1] - 1], device=logits.device)


def default_model(device, dtype):
    """The offline default model (SmolLM2-135M-Instruct); its last id made unsampleable."""
    import prepare
    from machinery import loaders

    model, _ = loaders.load_model(prepare.default_model(), str(device), dtype=dtype)
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill_(-1, eos_id(out), -1e4))
    return model.eval(), NoStopTokenizer(model.config.vocab_size - 1)


def floor_seconds(model, rows: int, context: int, bandwidth: float) -> float:
    """Bytes a decode step must read (weights once, each row's K and V) over the bandwidth."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim
    kv = rows * context * per_token * next(model.parameters()).element_size()
    return (weights + kv) / bandwidth


def sync(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def ms_per_step(turn, model, tok, seqs, steps: int, device) -> float:
    """(one turn of `steps` tokens - one turn of 1 token) / (steps - 1), a second run of each."""
    seconds = {}
    for n in (1, steps, 1, steps):
        start = sync(device)
        new = (turn() if callable(turn) else turn)(model, tok, seqs, n, 1.0, None, ())
        seconds[n] = sync(device) - start
        assert all(len(x) == n for x in new)  # no row stopped: every step is a full batch
    return 1000 * (seconds[steps] - seconds[1]) / (steps - 1)


def bench_shape(name, model, tok, rows, prompt, steps, args):
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, len(tok) - 1, (rows, prompt), generator=gen).tolist()
    static = static_turns.StaticTurns(rows=rows, max_len=prompt + steps + 8)
    ways = {
        "lm.generate_turn (today's loop)": lambda: lm.generate_turn,
        "fast.CachedTurns": fast.CachedTurns,
        "static_turns.StaticTurns": lambda: static,  # one instance: its step captured once
    }
    floor = floor_seconds(model, rows, prompt + steps // 2, args.bandwidth)
    print(f"\n== {name}: {rows} rows, prompt {prompt}, {steps} steps; floor {1000 * floor:.3f} ms")
    print(f"{'':34s}{'ms/step':>10s}{'tokens/s':>12s}{'x loop':>8s}{'x floor':>8s}")
    base = None
    with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
        for label, make in ways.items():
            ms = ms_per_step(make, model, tok, seqs, steps, device)
            base = base or ms
            rate = 1000 * rows / ms
            print(f"{label:34s}{ms:10.3f}{rate:12.0f}{base / ms:8.2f}{1000 * floor / ms:8.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bandwidth", type=float, default=None, help="B/s (H200 4.8e12, H100 3.35e12)")
    p.add_argument("--steps", type=int, default=64, help="decode steps a timed turn")
    p.add_argument("--prompt", type=int, default=256, help="tokens in each row before decoding")
    p.add_argument("--quick", action="store_true", help="a tiny random model, small shapes")
    p.add_argument("--skip_default", action="store_true", help="leave out the 135M default model")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.bandwidth = args.bandwidth or (3.35e12 if "H100" in name else 4.8e12)
    args.bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"device {name}, floor at {args.bandwidth:.3g} B/s, {dtype}")
    if args.quick:
        model, tok = random_model(TINY, device, dtype)
        bench_shape("tiny random Qwen2", model, tok, 4, 16, 12, args)
        return
    if not args.skip_default:
        model, tok = default_model(device, dtype)
        bench_shape("SmolLM2-135M (default)", model, tok, 4, args.prompt, args.steps, args)
        del model
    model, tok = random_model(QWEN25_3B, device, dtype)
    for rows in (64, 256):
        bench_shape("Qwen2.5-3B shape", model, tok, rows, args.prompt, args.steps, args)
        print("targets: StaticTurns >= 10x the loop at the default shape; >= 0.3x floor at 64 rows")


if __name__ == "__main__":
    main()
