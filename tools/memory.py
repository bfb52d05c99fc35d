"""What a run will need, before it runs: the peak memory of a training run from its config and the
model's config alone (no weights loaded), phase by phase, against what the device has.

    python tools/memory.py                      # the offline default, on this machine
    python tools/memory.py --model_config qwen2.5-3b --device cuda --device_gib 24 \\
        --ranks 0,16,64 --preset paper --rollout_batch 8 --micro_batch 1 --ig_batch_size 8

Every train.py flag is taken too. The estimate itself is machinery/memory_estimate.py.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoConfig

import prepare
from config import Config, parse_config
from machinery.errors import InputError
from machinery.memory_estimate import (
    NAMED,
    GiB,
    device_memory,
    estimate,
    lengths,
    model_shape,
    table,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--model_config", default="", help="qwen2.5-3b, a model folder, a config.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--device_gib", type=float, default=0.0, help="the device's memory (0: this one's)"
    )
    p.add_argument(
        "--ranks", default="", help="comma-separated --lora_rank values, one column each"
    )
    args, rest = p.parse_known_args(argv)
    try:
        cfg = parse_config(rest)[0]
        name = args.model_config or cfg.model or prepare.default_model()
        if name.lower() in NAMED:
            shape = model_shape(NAMED[name.lower()])
        elif name.endswith(".json"):
            shape = model_shape(json.loads(open(name).read()))
        else:
            shape = model_shape(AutoConfig.from_pretrained(name))
    except (OSError, ValueError) as e:
        print(
            f"error: {args.model_config or 'model'}: no config ({str(e).splitlines()[0]})",
            file=sys.stderr,
        )
        return 2
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    have = args.device_gib * GiB or (
        device_memory(torch.device(args.device))[0]
        if args.device == "cpu" or torch.cuda.is_available()
        else None
    )
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [cfg.lora_rank]
    columns = {
        ("full fine-tuning" if r == 0 else f"LoRA rank {r}"): estimate(
            Config(**{**cfg.__dict__, "lora_rank": r}), shape, args.device
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
