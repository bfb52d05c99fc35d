"""What a run will need, before it runs: the peak memory of a training run from its config and the
model's config alone (no weights loaded), phase by phase, against what the device has.

    python tools/memory.py                      # the offline default, on this machine
    python tools/memory.py --model_config qwen2.5-3b --device cuda --device_gib 24 \\
        --ranks 0,16,64 --preset paper --rollout_batch 8 --micro_batch 1 --ig_batch_size 8

Every train.py flag is taken too. The estimate itself is machinery/memory_estimate.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import torch
from transformers import AutoConfig

import prepare
from config import Config, check_config, parse_config
from machinery.errors import InputError, OneLineParser
from machinery.lm import amp_dtype
from machinery.memory_estimate import (
    NAMED,
    PROJECTIONS,
    GiB,
    device_memory,
    estimate,
    lengths,
    model_shape,
    table,
)


def read_model_config(name: str) -> dict:
    """A config.json named on the command line: a JSON object, or one line naming the file."""
    try:
        with open(name, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f"{name}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{name}:{e.lineno}: not JSON ({e.msg})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{name}: not a JSON config ({type(e).__name__})") from None


def parse_ranks(text: str, default: int) -> list[int]:
    """--ranks '0,16,64' -> [0, 16, 64]; each a whole number >= 0."""
    if not text:
        return [default]
    try:
        ranks = [int(r) for r in text.split(",")]
    except ValueError:
        raise InputError(f"--ranks {text}: not comma-separated whole numbers") from None
    if any(r < 0 for r in ranks):
        raise InputError(f"--ranks {text}: a rank is >= 0 (0 = full fine-tuning)")
    return ranks


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every train.py flag is taken too (python train.py --help): the run to estimate.",
    )
    p.add_argument("--model_config", default="", help="qwen2.5-3b, a model folder, a config.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--device_gib", type=float, default=0.0, help="the device's memory (0: this one's)"
    )
    p.add_argument(
        "--ranks", default="", help="comma-separated --lora_rank values, one column each"
    )
    try:
        args, rest = p.parse_known_args(argv)
        cfg = parse_config(rest)[0]
        if not (math.isfinite(args.device_gib) and args.device_gib >= 0):
            raise InputError(f"--device_gib {args.device_gib}: a size in GiB >= 0 (0: this one's)")
        if args.device not in ("cpu", "cuda"):
            raise InputError(f"--device {args.device}: cpu or cuda")
        ranks = parse_ranks(args.ranks, cfg.lora_rank)
        for r in ranks:
            check_config(dataclasses.replace(cfg, lora_rank=r))
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        unknown = [t for t in targets if t not in PROJECTIONS] or ([] if targets else ["(none)"])
        if any(ranks) and unknown:  # counted as 0 parameters: a LoRA column of full fine-tuning
            raise InputError(
                f"--lora_targets: {', '.join(unknown)} is not a projection the estimate knows "
                f"({', '.join(PROJECTIONS)})"
            )
        name = args.model_config or cfg.model or prepare.default_model()
        if name.lower() in NAMED:
            shape = model_shape(NAMED[name.lower()], name)
        elif name.endswith(".json"):
            shape = model_shape(read_model_config(name), name)
        else:
            try:
                config = AutoConfig.from_pretrained(name)
            except (OSError, ValueError, KeyError) as e:
                raise InputError(f"{name}: no model config ({str(e).splitlines()[0]})") from None
            shape = model_shape(config, name)
        too_big = [r for r in ranks if r > shape.hidden]
        if too_big:
            raise InputError(
                f"--ranks: {too_big[0]} is above the model's hidden size {shape.hidden}"
            )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    have = args.device_gib * GiB or (
        device_memory(torch.device(args.device))[0]
        if args.device == "cpu" or torch.cuda.is_available()
        else None
    )
    # bf16 as train.py chooses it (lm.amp_dtype) for this machine's CPU; any CUDA GPU is taken to
    # have bf16 units (the paper's A100s), as one need not be present to print its table
    if args.device == "cuda":
        bf16 = cfg.precision != "fp32"
    else:
        bf16 = amp_dtype(cfg.precision, torch.device("cpu")) is not None
    columns = {
        ("full fine-tuning" if r == 0 else f"LoRA rank {r}"): estimate(
            Config(**{**cfg.__dict__, "lora_rank": r}), shape, args.device, bf16=bf16
        )
        for r in ranks
    }
    T, generated, _ = lengths(cfg)
    print(
        f"{shape.params / 1e9:.2f} B parameters, {shape.layers} layers; sequences of {T} tokens "
        f"({generated} generated) at full budget; {args.device}"
    )
    print(table(columns, have))
    return 0


if __name__ == "__main__":
    sys.exit(main())
