"""A run folder and how nothing in it is lost: config.json, metrics.jsonl, table.json, checkpoint/.

Every file is written atomically (a temporary file, then a rename), so a crash leaves the old
version or the new one, never half of one. The checkpoint holds the weights (save_pretrained), the
tokenizer, the optimizer and every RNG state, so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import distributed as dd
from errors import InputError


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically: a temporary file, then rename."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_writable(path: str | Path) -> None:
    """Stop before the work, not after it, when a result file cannot be written at `path`."""
    tmp = Path(f"{path}.tmp")
    try:
        if Path(path).is_dir():
            raise IsADirectoryError(21, "a folder is in the way")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("")
        tmp.unlink()
    except OSError as e:
        raise InputError(f"{path}: cannot be written ({e.strerror or e})") from None


def read_json(path: str | Path) -> dict:
    """A run file written by write_json: a JSON object, or one line naming the file's problem."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_lines(path: Path, lines: list[str]) -> None:
    """Replace a text file atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def append_record(path: Path, record: dict) -> None:
    """One whole JSON line per record, flushed: a crash can cut only the last line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def load_metrics(path: Path, upto: int) -> list[dict]:
    """The records of metrics.jsonl up to step `upto`; a partial line from a crash is skipped."""
    records = []
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            print(
                f"warning: {path}:{n}: skipped an incomplete record (the run was interrupted)",
                file=sys.stderr,
            )
            continue
        if rec.get("step", 0) <= upto:
            records.append(rec)
    return records


def rng_state(gens: dict[str, torch.Generator]) -> dict:
    """Every RNG state, in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        **{k: g.get_state() for k, g in gens.items()},
    }


def set_rng_state(rng: dict, gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    for k, g in gens.items():
        g.set_state(rng[k])


def save_checkpoint(
    run: Path, policy, tokenizer, model, optimizer, step: int, config: dict, gens: dict
) -> None:
    """Write run/checkpoint atomically: build checkpoint.tmp, then swap it in by renames. Every rank
    calls it (a sharded model's optimizer state is gathered); rank 0 writes the policy's weights."""
    state = dd.optimizer_state(model, optimizer)
    if not dd.is_main():
        return
    tmp, final, old = run / "checkpoint.tmp", run / "checkpoint", run / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": state, "rng": rng_state(gens)}, tmp / "state.pt")
    (tmp / "config.json.igsearch").write_text(json.dumps(config, indent=2))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def last_checkpoint(run: Path) -> Path:
    """run/checkpoint, or checkpoint.old when a crash fell between save_checkpoint's two renames."""
    if not (run / "checkpoint").exists() and (run / "checkpoint.old").exists():
        return run / "checkpoint.old"
    return run / "checkpoint"


def load_state(run: Path, model, optimizer, gens: dict) -> int:
    """Restore optimizer and every RNG state; returns the step to continue from."""
    ckpt = last_checkpoint(run)
    try:
        state = torch.load(ckpt / "state.pt", weights_only=True)  # no arbitrary unpickling
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{ckpt / 'state.pt'}: refused, not a state file written by train.py "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    dd.load_optimizer_state(model, optimizer, state["optimizer"])
    set_rng_state(state["rng"], gens)
    return state["step"]
