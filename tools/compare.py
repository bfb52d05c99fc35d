"""Compare finished runs from their files alone (no model): the held-out table over seeds, one line
per run, per-method training means, and learning curves drawn to a PNG.

    python compare.py results/learn/*/ --plot results/learn/curves.png

A run folder holds config.json, table.json (held-out rows; absent when no test question was
evaluated), metrics.jsonl (one record per step; validation records carry val_*; a mean over no
steps is null, or 0.0 in older records: training_means leaves it out either way) and, when it was
timed, wall.json.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from config import Config, checked_fields, method_name
from machinery.errors import InputError, OneLineParser
from machinery.run_folder import load_metrics, read_json, read_table


@dataclass
class Run:
    """One run folder, read once."""

    path: Path
    config: dict
    table: dict  # row name -> held-out summary (n, em, f1, searches, valid, hit)
    records: list[dict]  # metrics.jsonl
    wall: dict  # wall.json: wall_seconds, threads, ...

    @classmethod
    def read(cls, folder: str) -> Run:
        path = Path(folder)
        if not (path / "config.json").exists():
            raise InputError(f"{path / 'config.json'}: no such file (is {folder} a run folder?)")

        def optional(name: str, read=read_json) -> dict:
            return read(path / name) if (path / name).exists() else {}

        run = cls(
            path,
            read_json(path / "config.json"),
            optional("table.json", read_table),
            load_metrics(path / "metrics.jsonl", upto=math.inf),
            optional("wall.json"),
        )
        known = {f.name for f in dataclasses.fields(Config)}  # fields of other versions: unchecked
        checked_fields({k: v for k, v in run.config.items() if k in known}, path / "config.json")
        wall = run.wall.get("wall_seconds", 0)
        if isinstance(wall, bool) or not isinstance(wall, (int, float)):
            raise InputError(f"{path / 'wall.json'}: 'wall_seconds' is {wall!r}, not a number")
        return run

    @classmethod
    def read_all(cls, folders: list[str]) -> list[Run]:
        """Each folder once, in the order given: a shell glob beside a named folder
        (`test-warmup test-*`) names it twice, and a run read twice would count as two seeds."""
        first: dict[Path, str] = {}
        for folder in folders:
            first.setdefault(Path(folder).resolve(), folder)
        return [cls.read(folder) for folder in first.values()]

    @property
    def rl_steps(self) -> list[dict]:
        """The records of RL steps; none for a run that only warmed up (it holds validation at step
        0)."""
        return [r for r in self.records if r.get("step", 0) > 0 and "reward" in r]

    @property
    def task(self) -> str:
        """The offline task the run trained on ("plain" for runs made before there was a choice)."""
        return self.config.get("task", "plain")

    @property
    def method(self) -> str:
        """The method of an RL run; a run without RL steps is named by its last table row (e.g.
        after warm-up: the model it produced), or "after warm-up" when it warmed up and tested
        nothing (--eval_questions 0). A task other than the plain one is part of the name: runs of
        two tasks are never averaged."""
        warmed = "after warm-up" if self.config.get("warmup_examples") else "-"
        name = method_name(self.config) if self.rl_steps else next(reversed(self.table), warmed)
        return name + (f" [{self.task}]" if self.task != "plain" else "")

    @property
    def setting(self) -> dict:
        """What seeds of one setting share: the config but its seed and folder (the model path
        normalised, so runs/w/checkpoint/ and runs/w/checkpoint are one start)."""
        setting = {k: v for k, v in self.config.items() if k not in ("seed", "out_dir")}
        if setting.get("model"):
            setting["model"] = os.path.normpath(setting["model"])
        return setting


def seed_groups(items: list[tuple[str, dict, object]]) -> tuple[dict[str, list], list[str]]:
    """Group (name, setting, item) as seeds: one group per name and setting. A name whose runs
    differ in their settings gets one group each, labelled by the fields that differ, and a note
    says which: never one '± spread' as if its runs were seeds. A field one config does not record
    (written before the field existed) is no difference."""
    same = lambda a, b: all(a[k] == b[k] for k in a.keys() & b.keys())
    by_name: dict[str, list[tuple[dict, list]]] = {}
    for name, setting, item in items:
        parts = by_name.setdefault(name, [])
        part = next((p for p in parts if same(p[0], setting)), None)
        parts.append((setting, [item])) if part is None else part[1].append(item)
    groups, notes = {}, []
    for name, parts in by_name.items():
        if len(parts) == 1:
            groups[name] = parts[0][1]
            continue
        settings = [setting for setting, _ in parts]
        differ = sorted(
            {k for a in settings for b in settings for k in a.keys() & b.keys() if a[k] != b[k]}
        )
        show = lambda st: ", ".join(f"{k}={st.get(k, '-')}" for k in differ)
        notes.append(
            f"{name}: runs not averaged together, they differ in {', '.join(differ)} ("
            + " / ".join(show(st) for st in settings)
            + ")"
        )
        for setting, members in parts:
            groups[f"{name} [{show(setting)}]"] = members
    return groups, notes


def run_labels(runs: list[Run]) -> tuple[dict[int, str], list[str]]:
    """id(run) -> the name its seeds share: its method, and the fields that set it apart from
    other runs of that method (seed_groups); and the notes that say so."""
    groups, notes = seed_groups([(run.method, run.setting, run) for run in runs])
    return {id(run): label for label, members in groups.items() for run in members}, notes


def column(names, least: int) -> int:
    """Width of a left-aligned text column: `least`, or wider so the longest name keeps a gap."""
    return max([least] + [len(name) + 2 for name in names])


def held_out_table(runs: list[Run]) -> list[str]:
    """Held-out rows grouped by name over runs: mean ± std (population), lowest and highest EM
    (whether seed spreads overlap), means of searches per question, valid answers and hit share."""
    task = lambda run: f" [{run.task}]" if run.task != "plain" else ""  # tasks never averaged
    groups, notes = seed_groups(
        [
            (name + task(run), {**run.setting, "n": row.get("n")}, row)
            for run in runs
            for name, row in run.table.items()
        ]
    )
    m = column(groups, 30)
    lines = [
        f"{'method':<{m}}{'runs':>5}{'EM':>15}{'EM min-max':>13}{'F1':>15}{'search/q':>10}"
        f"{'valid':>8}{'hit':>8}{'hit1':>8}"
    ]
    for name, rows in groups.items():
        stat = {
            k: torch.tensor([float(r[k]) for r in rows]) for k in ("em", "f1", "searches", "valid")
        }
        pm = {k: f"{v.mean():.3f} ± {v.std(unbiased=False):.3f}" for k, v in stat.items()}
        hit = "".join(  # tables written before a share was measured show "-"
            f"{sum(r[k] for r in rows) / len(rows):>8.2f}"
            if all(k in r for r in rows)
            else f"{'-':>8}"
            for k in ("hit", "hit1")
        )
        spread = f"{stat['em'].min():.3f}-{stat['em'].max():.3f}"
        lines.append(
            f"{name:<{m}}{len(rows):>5}{pm['em']:>15}{spread:>13}{pm['f1']:>15}"
            f"{stat['searches'].mean():>10.2f}{stat['valid'].mean():>8.2f}{hit}"
        )
    return lines + notes


def per_run(runs: list[Run]) -> list[str]:
    """One line per run: folder, method, seed, wall time, test EM and hit of its last table row
    (the trained model's; the rows before it are the start and the warm-up), and validation EM at
    every validated step."""
    w, m = column((run.path.name for run in runs), 14), column((run.method for run in runs), 38)
    lines = [
        f"{'run':<{w}}{'method':<{m}}{'seed':>5}{'wall s':>8}{'test EM':>9}{'hit':>6}"
        "  validation EM by step"
    ]
    for run in runs:
        row = next(reversed(run.table.values()), {})
        em, hit = (f"{row[k]:.3f}" if k in row else "-" for k in ("em", "hit"))
        val = " ".join(
            f"{r['step']}:{r['val_em']:.3f}" for r in run.records if r.get("val_em") is not None
        )
        lines.append(
            f"{run.path.name:<{w}}{run.method:<{m}}{run.config.get('seed', '-'):>5}"
            f"{run.wall.get('wall_seconds', '-'):>8}{em:>9}{hit:>6}  {val}"
        )
    return lines


TRAIN_KEYS = (
    ("reward", "training reward (EM)"),
    ("hit", "hit share of search steps"),
    ("hit1", "rollouts whose first search hits"),
    ("searches", "searches per rollout"),
    ("query_entropy", "query entropy"),
    ("query_tokens", "tokens per query"),
    ("bonus_share", "step bonus's share on query tokens"),
    ("zero_adv_groups", "groups with zero outcome advantage"),
    ("ig_pos", "share of search steps with IG > 0"),
    ("ig_hit", "mean IG of steps that hit"),
    ("ig_miss", "mean IG of steps that miss"),
)


IG_KEYS = ("ig_mean", "ig_pos", "ig_hit", "ig_miss")


def step_value(record: dict, key: str, scored: bool) -> float | None:
    """One step's `key`, or None where it is undefined: absent, null (train.py logs a mean over no
    steps as null), not finite, or a mean over no steps that older records wrote as 0.0. For those:
    every IG figure when the run scores no IG (`scored` False: outcome-only, the hit bonus) or the
    step scored none (all four exactly 0.0); ig_hit when no search step hit (hit 0), ig_miss when
    every one did (hit 1)."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if key in IG_KEYS and (not scored or all(record.get(k) == 0 for k in IG_KEYS)):
        return None
    if (key, record.get("hit")) in (("ig_hit", 0), ("ig_miss", 1)):
        return None
    return float(value)


def training_means(runs: list[Run], window: int = 10) -> list[str]:
    """Per-method means of the RL steps' metrics: over the first `window` and the last `window`
    steps where a quantity is defined (and over all of them), each run's mean, then the mean over
    the method's runs. A step where it is undefined (step_value: no step hit, say, or IG not
    scored) is left out, never counted as 0; a run where it is never defined is left out of the
    mean over runs, and a method with no such run shows '-'."""
    per: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    labels, notes = run_labels([run for run in runs if run.rl_steps])
    for run in runs:
        steps = run.rl_steps
        if not steps:
            continue
        method = labels[id(run)]
        # IG is scored for IG-Search's runs only: not for outcome-only (alpha 0) or the hit bonus
        scored = run.config.get("step_reward", "ig") == "ig" and not run.method.startswith(
            "outcome-only"
        )
        for key, _ in TRAIN_KEYS:
            vals = [v for r in steps if (v := step_value(r, key, scored)) is not None]
            if vals:
                first, last = vals[:window], vals[-window:]
                per.setdefault(method, {}).setdefault(key, []).append(
                    (sum(first) / len(first), sum(last) / len(last), sum(vals) / len(vals))
                )
    if not per:
        return []
    widths = [max(26, len(m) + 2) for m in per]  # a column fits its method's name
    lines = [
        f"training means over each run's RL steps (first {window} -> last {window}, all), "
        "mean over runs:",
        f"{'quantity':<38}" + "".join(f"{m:>{w}}" for m, w in zip(per, widths)),
    ]
    for key, title in TRAIN_KEYS:
        cells = []
        for stats in per.values():
            got = stats.get(key)
            mean = [sum(x[i] for x in got) / len(got) for i in range(3)] if got else None
            cells.append(f"{mean[0]:.2f} -> {mean[1]:.2f} ({mean[2]:.2f})" if mean else "-")
        lines.append(f"{title:<38}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return lines + notes


def first_search_hits(runs: list[Run]) -> list[str]:
    """Per method, the validation share of questions whose first search finds the gold at each
    validated step (mean over runs), and the first step at which it reaches outcome-only's final
    level on the same task: how fast a reward teaches the queries."""
    curves = {m: c["val_hit1"] for m, c in learning_curves(runs).items() if "val_hit1" in c}
    if not curves:
        return []
    means = {m: {s: sum(v) / len(v) for s, v in sorted(c.items())} for m, c in curves.items()}
    lines = ["validation: questions whose first search finds the gold, by step (mean over runs)"]
    width = column(means, 38)
    for method, curve in means.items():
        task = method[method.find(" [") :] if " [" in method else ""
        ref = means.get("outcome-only" + task)
        reach = ""
        if ref and not method.startswith("outcome-only"):
            level = ref[max(ref)]
            step = next((s for s, v in curve.items() if v >= level), None)
            at = f"reached at step {step}" if step is not None else "not reached"
            reach = f"   outcome-only's final {level:.3f} {at}"
        points = " ".join(f"{s}:{v:.3f}" for s, v in curve.items())
        lines.append(f"{method:<{width}}{points}{reach}")
    return lines


def report(runs: list[Run]) -> str:
    """Everything above, blocks separated by a blank line."""
    return "\n\n".join(
        "\n".join(block)
        for block in (
            held_out_table(runs),
            per_run(runs),
            training_means(runs),
            first_search_hits(runs),
        )
        if block
    )


PLOT_PANELS = (
    ("val_em", "validation EM"),
    ("val_hit", "validation: search steps that find the gold"),
    ("val_hit1", "validation: first searches that find the gold"),
    ("reward", "training reward (5-step mean)"),
    ("hit", "training: steps that find the gold (5-step mean)"),
    ("hit1", "training: first searches that find the gold (5-step mean)"),
    ("zero_adv_groups", "training: groups with zero outcome advantage (5-step mean)"),
)


def learning_curves(runs: list[Run]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """method -> metric -> RL step -> one value per run, for the keys of PLOT_PANELS.

    Training metrics are noisy (16 rollouts a step): each run's are a trailing 5-step mean. A run
    without RL steps (the shared warm-up) gives every method its step-0 validation point."""
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    # the warm-up of each task
    start = {
        run.task: {
            k: v
            for r in run.records
            for k, v in r.items()
            if k.startswith("val_") and v is not None
        }
        for run in runs
        if not run.rl_steps
    }
    labels, _ = run_labels([r for r in runs if r.rl_steps])
    for run in (r for r in runs if r.rl_steps):
        per_key = curves.setdefault(labels[id(run)], {})
        for key, _ in PLOT_PANELS:
            points = [(r["step"], r[key]) for r in run.records if r.get(key) is not None]
            if not key.startswith("val_"):  # the mean of the last (up to) 5 steps
                values = [v for _, v in points]
                points = [
                    (s, sum(values[max(0, k - 4) : k + 1]) / len(values[max(0, k - 4) : k + 1]))
                    for k, (s, _) in enumerate(points)
                ]
            for s, v in points:
                per_key.setdefault(key, {}).setdefault(s, []).append(v)
    for run in (r for r in runs if r.rl_steps):
        per_key = curves[labels[id(run)]]
        for key, value in start.get(run.task, {}).items():
            if key in per_key:
                per_key[key].setdefault(0, [value])
    return curves


def plot(runs: list[Run], out: str) -> None:
    """learning_curves drawn to a PNG: per method, the mean over its runs (seeds), shaded from the
    lowest to the highest run, against RL step. Panels without data are left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install matplotlib") from None
    curves = learning_curves(runs)
    panels = [(k, title) for k, title in PLOT_PANELS if any(k in c for c in curves.values())]
    if not panels:
        raise InputError("no learning curves: none of the runs has RL steps in its metrics.jsonl")
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (key, title) in zip(axes.flat, panels):
        for method, per_key in curves.items():
            steps = sorted(per_key.get(key, {}))
            values = [torch.tensor(per_key[key][s]) for s in steps]
            if not steps:
                continue
            n = max(len(v) for v in values)
            (line,) = ax.plot(
                steps,
                [float(v.mean()) for v in values],
                marker="o" if key.startswith("val_") else None,
                markersize=3,
                label=f"{method} ({n} run{'s' * (n > 1)})",
            )
            ax.fill_between(
                steps,
                [float(v.min()) for v in values],
                [float(v.max()) for v in values],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train.py --out_dir)")
    p.add_argument("--plot", metavar="PNG", help="also draw the runs' learning curves to PNG")
    try:
        args = p.parse_args(argv)
        runs = Run.read_all(args.runs)
        print(report(runs))
        if args.plot:
            plot(runs, args.plot)
            print(f"curves written to {args.plot}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `compare.py ... | head` ends quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
