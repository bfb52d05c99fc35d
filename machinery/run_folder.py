"""A run folder and how nothing in it is lost: config.json, metrics.jsonl, table.json, checkpoint/.

Every file is written atomically (a temporary file, then a rename), so a crash leaves the old
version or the new one, never half of one. The checkpoint holds the weights (save_pretrained), the
tokenizer, the optimizer and every RNG state, so a resumed run reproduces an uninterrupted one.
A folder belongs to one run: one process at a time holds it (a lock on RUN/.lock), and a new run
never starts over an older one's files unless asked to (--restart).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from machinery import distributed as dd
from machinery import lora
from machinery.errors import InputError, TrainingError

# the files train.py writes in a run folder (and evaluate.py's default beside its checkpoint)
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "table.json",
    "wall.json",
    "checkpoint",
    "checkpoint.old",
    "checkpoint.tmp",
    "checkpoint.eval.json",
    "checkpoint.eval.questions.jsonl",
    "questions-start.jsonl",
    "questions-warmup.jsonl",
    "questions.jsonl",
)
_held: dict[Path, int] = {}  # run folder -> the open lock file this process holds on it


def claim_run(run: Path, resume: bool, restart: bool) -> None:
    """Make `run` this process's, before any work: lock it (released by release_run or on exit),
    and refuse a new run in a folder that holds an older one's files unless `restart`; for a resume,
    check the state and metrics files it will read. Nothing in the folder changes here: start_run
    removes the older files once every input is checked."""
    if resume and restart:
        raise InputError(
            "--restart cannot be given with --resume (one continues the run, the "
            "other starts it over)"
        )
    if run.resolve() in _held:  # this process holds it already (train.train called again)
        return
    refuse_model_folder(run, "--resume" if resume else "--out_dir")
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"{run}: cannot write the run folder ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise InputError(f"{run}/.lock: cannot lock the run folder ({e.strerror})") from None
        raise InputError(
            f"{run}: in use by another process (pid {pid}, holding {run}/.lock); "
            f"wait for it to end, or choose another --out_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run.resolve()] = fd
    older = [name for name in RUN_FILES if (run / name).exists()]
    try:
        if resume:  # the files a resume reads, checked before any work (the weights: by load_model)
            read_state(last_checkpoint(run))
            load_metrics(run / "metrics.jsonl", math.inf)
    except InputError:
        release_run(run)
        raise
    if older and not resume and not restart:
        release_run(run)
        raise InputError(
            f"{run}: holds a run ({', '.join(older)}): --resume {run} continues it, "
            f"--restart starts it over (removing them), or choose another --out_dir"
        )


MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def refuse_model_folder(run: Path, flag: str) -> None:
    """A model folder (its config.json a model's, or weights beside it) is never taken for a run
    folder: --restart would remove its config.json, a run would write among the model's files."""
    if not run.is_dir():
        return
    weights = [name for name in MODEL_FILES if (run / name).exists()]
    try:
        saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        saved = None
    if isinstance(saved, dict) and ("model_type" in saved or "architectures" in saved):
        weights.insert(0, f"config.json of a {saved.get('model_type', 'transformers')} model")
    if weights:
        raise InputError(
            f"{flag} {run}: a model folder ({', '.join(weights)}), not a run folder: nothing "
            f"in it is changed; give a new folder for the run"
        )


def start_run(run: Path, config: dict, resume: bool) -> None:
    """Once data, retriever and model are loaded: remove an older run's files (a --restart,
    named on stdout) and write config.json, so a start that fails leaves the folder as it was."""
    done = read_state(last_checkpoint(run))["step"] if resume else 0
    if config.get("steps", done) < done:  # config.json would record steps the run has passed
        raise InputError(
            f"--steps {config['steps']}: {run} has done {done} steps already (give "
            f"--steps {done} or more)"
        )
    if not resume:
        older = [name for name in RUN_FILES if (run / name).exists()]
        if older:
            print(f"--restart: removing the older run's {', '.join(older)} from {run}")
        for name in older:
            path = run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        write_json(run / "config.json", config)
    except OSError as e:
        raise InputError(f"{run}: cannot write the run folder ({e.strerror or e})") from None


def release_run(run: Path | None = None) -> None:
    """Unlock `run` (every folder this process holds when None)."""
    for path in [run.resolve()] if run is not None else list(_held):
        fd = _held.pop(path, None)
        if fd is not None:
            os.close(fd)  # closing the file releases its flock


def write_text(path: str | Path, text: str) -> None:
    """Replace a file atomically: a temporary file, then rename. A failed write (a full disk)
    leaves the old file and no temporary one, and says so in one line."""
    tmp = Path(f"{path}.tmp")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"{path}: cannot be written ({e.strerror or e}); the old file is kept"
        ) from None


def write_json(path: str | Path, obj) -> None:
    """A JSON object, written atomically (write_text)."""
    write_text(path, json.dumps(obj, indent=2))


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


def check_not_input(path: str | Path, flag: str, inputs: list[str], model: str = "") -> None:
    """An output never overwrites what the program reads (a question file, the corpus), a model
    folder's files or a run's own files: refused in one line before any work."""
    out = Path(path).resolve()
    for name in inputs:
        if name and Path(name).resolve() == out:
            raise InputError(
                f"{flag} {path}: is an input of this command ({name}), not overwritten"
            )
    folder = Path(model).resolve() if model and Path(model).is_dir() else None
    if folder is not None and folder in out.parents:
        raise InputError(
            f"{flag} {path}: inside the model folder {model}, which is not written to; "
            f"give a path outside it"
        )
    if out.name in RUN_FILES[:4] and (out.parent / "config.json").exists():
        raise InputError(f"{flag} {path}: a run folder's own file, not overwritten")


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
    except RecursionError:  # [[[[...: Python's parser gives up
        raise InputError(f"{path}: JSON nested too deep") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_lines(path: Path, lines: list[str]) -> None:
    """A text file of lines, written atomically (write_text)."""
    write_text(path, "".join(line + "\n" for line in lines))


def append_record(path: Path, record: dict) -> None:
    """One whole JSON line per record, flushed: a crash can cut only the last line."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
    except OSError as e:
        raise InputError(
            f"{path}: cannot append step {record.get('step')}'s record ({e.strerror or e})"
        ) from None


def read_table(path: Path) -> dict:
    """table.json: row name -> {n, em, f1, searches, valid[, hit]}, or one line naming the problem
    (read before the work that would end by printing it)."""
    table = read_json(path)
    for name, row in table.items():
        numbers = isinstance(row, dict) and all(
            _is_number(row.get(k)) for k in ("n", "em", "f1", "searches", "valid")
        )
        if not numbers or not isinstance(row["n"], int) or not _is_number(row.get("hit", 0)):
            raise InputError(
                f"{path}: row '{name}' is not an object of numbers n, em, f1, "
                f"searches, valid (and hit)"
            )
    return table


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_metrics(path: Path, upto: float) -> list[dict]:
    """The records of metrics.jsonl up to step `upto`. A partial last line (a crash cuts only the
    last one) is skipped with a warning; any other line that is not a step record is refused."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except RecursionError:
            raise InputError(f"{path}:{n}: JSON nested too deep") from None
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
            print(
                f"warning: {path}:{n}: skipped an incomplete record (the run was interrupted)",
                file=sys.stderr,
            )
            continue
        step = rec.get("step") if isinstance(rec, dict) else None
        if (
            not isinstance(step, int)
            or isinstance(step, bool)
            or step < 0
            or not all(v is None or isinstance(v, (int, float)) for v in rec.values())
        ):
            raise InputError(
                f"{path}:{n}: not a step record (an object with an integer 'step' and numbers)"
            )
        if step <= upto:
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


def free_space(folder: Path) -> str:
    """The free space of the disk that holds `folder`, as a failed save reports it."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free on its disk"
    except OSError:
        return "free space unknown"


def save_checkpoint(
    run: Path, policy, tokenizer, model, optimizer, step: int, config: dict, gens: dict
) -> None:
    """Write run/checkpoint atomically: build checkpoint.tmp, then swap it in by renames. Every rank
    calls it (a sharded model's optimizer state is gathered); rank 0 writes the policy's weights.
    Weights that are not finite are never saved; a failed write (a full disk) leaves the last
    complete checkpoint and no checkpoint.tmp; both stop the run in one line."""
    state = dd.optimizer_state(model, optimizer)
    if not dd.is_main():
        return
    tmp, final, old = run / "checkpoint.tmp", run / "checkpoint", run / "checkpoint.old"
    bad = next((name for name, p in policy.named_parameters() if not p.isfinite().all()), None)
    if bad is not None:
        raise TrainingError(
            f"{run}: the weights are not finite after step {step} ({bad}); not "
            f"saved: {kept_checkpoint(run)}"
        )
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        # a plain model folder (a LoRA adapter merged, and beside it)
        lora.save_weights(policy, tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": state, "rng": rng_state(gens)}, tmp / "state.pt")
        (tmp / "config.json.igsearch").write_text(json.dumps(config, indent=2))
    except (OSError, RuntimeError, SafetensorError) as e:
        # torch.save and safetensors report a full disk as RuntimeError ("unexpected pos ...") or
        # SafetensorError, words that do not say "disk": the free space, read before the partial
        # checkpoint is removed, shows the cause
        free = free_space(run)
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise TrainingError(
            f"{tmp}: cannot save step {step} ({reason[:200]}; {free}); removed it: "
            f"{kept_checkpoint(run)}"
        ) from None
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


def kept_checkpoint(run: Path, when: str = "") -> str:
    """What a stop message says of the checkpoint on disk (saved `when`, e.g. "before them"): its
    folder and step, or that there is none."""
    ckpt = last_checkpoint(run)
    if not (ckpt / "state.pt").exists():
        return f"no checkpoint was saved {when}".strip()
    try:
        step = f" (step {read_state(ckpt)['step']})"
    except InputError:
        step = ""
    return (
        f"the last checkpoint saved {when} is {ckpt}{step}"
        if when
        else f"the last complete checkpoint is {ckpt}{step}"
    )


def read_state(ckpt: Path, mmap: bool = True) -> dict:
    """checkpoint/state.pt (mmap: mapped rather than read, cheap to check before a resume starts);
    one line naming the file when it is missing, cut short, tampered with or of another shape."""
    path = ckpt / "state.pt"
    try:
        state = torch.load(path, weights_only=True, mmap=mmap)  # no arbitrary unpickling
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (the checkpoint is incomplete)") from None
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{path}: refused, not a state file written by train.py "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(
            f"{path}: cut short or not a state file written by train.py "
            f"({(str(e).splitlines() or [type(e).__name__])[0][:120]})"
        ) from None
    if not (
        isinstance(state, dict)
        and isinstance(state.get("step"), int)
        and isinstance(state.get("optimizer"), dict)
        and isinstance(state.get("rng"), dict)
    ):
        raise InputError(
            f"{path}: not a state file written by train.py (no step, optimizer and rng)"
        )
    return state


def load_state(run: Path, model, optimizer, gens: dict) -> int:
    """Restore optimizer and every RNG state; returns the step to continue from. The config's
    learning rate wins over the saved one (a resume may change it, and config.json says so)."""
    ckpt = last_checkpoint(run)
    state = read_state(ckpt, mmap=False)  # the optimizer steps on these tensors: a private copy
    lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        dd.load_optimizer_state(model, optimizer, state["optimizer"])
        set_rng_state(state["rng"], gens)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise InputError(
            f"{ckpt / 'state.pt'}: does not fit this model and run "
            f"({type(e).__name__}: {str(e)[:120]})"
        ) from None
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return state["step"]
