"""bench.py's floor: the least work IG scoring needs, counted on a hand-made case."""

import pytest

from tools.bench import floor_rows


def test_floor_counts_each_trunk_once_and_every_continuation():
    """A step's 1 + N contexts share [1, 2, 3]; as one group per step the prefix is a trunk row, the
    continuations and the answer are counted once per context; as one group per rollout, step 2
    (which holds step 1's real blocks) reads them from the same trunk. The LM head is needed at
    the answers only."""
    contexts = [
        [1, 2, 3, 4, 5],
        [1, 2, 3, 6],
        [1, 2, 3, 7, 8],  # step 1: 1 + N = 3 contexts, real first
        [1, 2, 3, 4, 5, 9, 20],
        [1, 2, 3, 4, 5, 9, 21, 22],
    ]  # step 2: real, one random
    answers = [[10, 11]] * 3 + [[12]] * 2
    rows, heads = floor_rows(contexts, answers, [3, 2], max_len=100)
    assert rows == [
        [1, 2, 3, 4],
        [5, 10, 11],
        [6, 10, 11],
        [7, 8, 10, 11],  # a context keeps its last token
        [1, 2, 3, 4, 5, 9, 21],
        [20, 12],
        [22, 12],
    ]
    assert heads == [0, 2, 2, 2, 0, 1, 1]
    rows, heads = floor_rows(contexts, answers, [5], max_len=100)
    assert rows == [
        [1, 2, 3, 4, 5, 9, 21],
        [5, 10, 11],
        [6, 10, 11],
        [7, 8, 10, 11],
        [20, 12],
        [22, 12],
    ]
    assert heads == [0, 2, 2, 2, 1, 1]
    assert sum(map(len, rows)) < sum(
        map(len, floor_rows(contexts, answers, [3, 2], max_len=100)[0])
    )


def test_floor_after_left_truncation_and_with_nothing_shared():
    """Contexts are left-truncated as answer_scores does (context + answer <= max_len), which can
    leave nothing shared but the trunk's own context."""
    rows, heads = floor_rows([[1, 2, 3, 4], [9, 2, 3, 5]], [[7]] * 2, [2], max_len=4)
    assert rows == [[2, 3], [4, 7], [5, 7]] and heads == [0, 1, 1]
    rows, heads = floor_rows([[1, 2], [3, 2]], [[7]] * 2, [2], max_len=100)
    assert rows == [[1], [2, 7], [3, 2, 7]] and heads == [
        0,
        1,
        1,
    ]  # the trunk's own context still shares


def scripted_bench(monkeypatch, tmp_path, tokenizer, tiny_model, **args):
    """bench.bench_setup on a four-city corpus and the tiny model (args: bench's command line)."""
    import copy
    import json
    from types import SimpleNamespace

    from tools import bench

    titles = ["Paris", "Berlin", "Rome", "Madrid"]
    corpus, qa = tmp_path / "corpus.jsonl", tmp_path / "qa.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": str(i), "contents": f'"{t}"\n{t} is a city.'}) + "\n"
            for i, t in enumerate(titles)
        )
    )
    qa.write_text(
        "".join(
            json.dumps({"id": str(i), "question": f"Who is {t}?", "golden_answers": [t]}) + "\n"
            for i, t in enumerate(titles)
        )
    )
    monkeypatch.setattr(
        bench.loaders, "load_model", lambda *a, **k: (copy.deepcopy(tiny_model), tokenizer)
    )
    monkeypatch.setattr(
        bench.prepare, "default_data", lambda task: {"train": str(qa), "corpus": str(corpus)}
    )
    argv = dict(model="", batch=4, device="cpu", shape="default", repeats=1, lora_rank=0)
    return bench.bench_setup(SimpleNamespace(**{**argv, **args}))


def test_a_bench_step_is_train_py_s_phase_functions(monkeypatch, tmp_path, tokenizer, tiny_model):
    """bench.timed_step times step.py's own phase functions in train.train's order, with the step's
    config (the old bench re-built the step and left out ig_center); the scripted policy makes
    every rollout use the whole search budget."""
    import step as rl
    from tools import bench

    calls, bonuses = [], []
    for name in ("generate_rollouts", "step_bonus", "advantages", "update"):

        def spy(*args, _name=name, _real=getattr(rl, name), **kw):
            calls.append((_name, next(x for x in args if isinstance(x, rl.Config))))
            out = _real(*args, **kw)
            if _name == "step_bonus":
                bonuses.append(out)
            return out

        monkeypatch.setattr(rl, name, spy)
    b = scripted_bench(monkeypatch, tmp_path, tokenizer, tiny_model)
    b.cfg = b.policy.cfg = bench.dataclasses.replace(b.cfg, ig_center=True)
    for with_ig in (True, False):
        calls.clear()
        rec = bench.timed_step(b, with_ig)
        assert [n for n, _ in calls] == ["generate_rollouts", "step_bonus", "advantages", "update"]
        assert all(c.ig_center and c.outcome_only != with_ig for _, c in calls)
        assert all(rec[k] >= 0 for k in bench.PHASES) and rec["total"] > 0
        assert [len(t.steps) for t in b.trajs] == [b.cfg.max_searches] * 4  # the whole budget
        igs = [g and g.ig for row in bonuses[-1].gains for g in row]
        assert any(v is not None for v in igs) if with_ig else all(v is None for v in igs)


def test_bench_with_lora_trains_the_adapter_and_prints_the_estimate(
    monkeypatch, tmp_path, tokenizer, tiny_model, capsys
):
    """--lora_rank: as train.py, the optimizer holds the adapter alone and the KL reference is the
    adapter switched off (no copy); the memory table puts memory.estimate beside each phase."""
    pytest.importorskip("peft")
    from machinery import lora
    from machinery import memory_estimate as memory
    from tools import bench

    monkeypatch.setitem(bench.PRESETS, "default", {"kl_coef": 0.01})
    b = scripted_bench(monkeypatch, tmp_path, tokenizer, tiny_model, lora_rank=4)
    trained = {id(w) for g in b.opt.param_groups for w in g["params"]}
    adapter = {id(w) for n, w in b.model.named_parameters() if "lora_" in n}
    assert adapter and trained == adapter
    assert isinstance(b.ref, lora.AdapterOff)
    steps = {"IG": [bench.timed_step(b, True)]}
    capsys.readouterr()
    bench.bench_memory(b, steps)
    out = capsys.readouterr().out
    assert "LoRA rank 4" in out
    est = memory.estimate(
        bench.dataclasses.replace(b.cfg, eval_questions=0, eval_every=0),
        memory.model_shape(b.model.config),
        "cpu",
    )
    assert est["update"]["LoRA adapter"] > 0 and "reference model" not in est["update"]
    row = next(line for line in out.splitlines() if line.startswith("update (median"))
    printed = float(row.split()[-2])  # the estimate column, GiB
    assert printed == pytest.approx(sum(est["update"].values()) / memory.GiB, rel=2e-3)


def test_spearman_on_known_ranks_with_a_tie():
    """Spearman is Pearson's correlation of the ranks, tied values sharing their mean rank:
    y = [5, 6, 7, 8, 7] ranks [1, 2, 3.5, 5, 3.5], so rho = 8 / sqrt(10 * 9.5)."""
    from tools.bench import ranks, spearman

    assert ranks([5, 6, 7, 8, 7]).tolist() == [1, 2, 3.5, 5, 3.5]
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / (10 * 9.5) ** 0.5)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([0.1, 0.5, 0.2], [1, 9, 3]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3], [4, 4, 4]) != spearman([1, 2, 3], [4, 4, 4])  # nan: no ranking


def test_ig_agreement_tells_sign_from_ranking():
    """A step can change sign while the order of the steps stays (and the other way round)."""
    from tools.bench import ig_agreement

    a = ig_agreement([0.5, -0.2, 0.1], [0.45, 0.1, 0.12])
    assert a.same_sign == pytest.approx(2 / 3) and a.same_ranking and a.spearman == 1.0
    assert a.mean_abs_diff == pytest.approx(0.37 / 3) and a.max_abs_diff == pytest.approx(0.3)
    b = ig_agreement([0.3, 0.2, 0.1], [0.2, 0.3, 0.1])
    assert b.same_sign == 1.0 and not b.same_ranking and b.spearman == pytest.approx(0.5)


def test_precision_section_scores_both_precisions_and_reports_equal_ig_as_agreeing(
    monkeypatch, tmp_path, tokenizer, tiny_model, capsys
):
    """bench_precision runs step.py's phases once in fp32 and once under bf16 autocast on the same
    rollouts; where both precisions return the same IG it must report sign agreement 1, Spearman 1
    and the ranking unchanged (a mix-up of the two runs' values would not)."""
    import torch

    import step as rl
    from tools import bench

    seen = {"step_bonus": [], "update": []}
    fixed = [[0.3, -0.1], [0.2, 0.05], [-0.4, 0.1], [0.0, 0.25]]

    def fake_bonus(*args, **kw):
        seen["step_bonus"].append(args[-1].amp_dtype)
        trajs = args[2]
        return rl.StepBonus(bonus=[row[: len(t.steps)] for row, t in zip(fixed, trajs)], gains=[])

    def spy_update(*args, _real=rl.update, **kw):
        seen["update"].append(args[-1].amp_dtype)
        return _real(*args, **kw)

    monkeypatch.setattr(rl, "step_bonus", fake_bonus)
    monkeypatch.setattr(rl, "update", spy_update)
    b = scripted_bench(monkeypatch, tmp_path, tokenizer, tiny_model)
    capsys.readouterr()
    bench.bench_precision(b)
    out = capsys.readouterr().out
    for phase in ("step_bonus", "update"):  # a warm-up, a timed and a profiled run of each
        assert sorted(map(str, seen[phase])) == sorted(map(str, [None, torch.bfloat16] * 3))
    rows = [line.rsplit("  ", 1) for line in out.splitlines() if "  " in line]
    lines = {name.strip(): value.strip() for name, value in rows}
    assert lines["same sign (share of steps)"] == "1"
    assert lines["Spearman rank correlation"] == "1"
    assert lines["same ranking of steps"] == "yes"
    assert "target IG ranking of steps unchanged: met" in out
    assert "are the same tokens: yes" in out
    ceiling = out[out.index("== 9d.") :].splitlines()[2:6]  # the header, then a row a phase
    assert [r.split("  ")[0] for r in ceiling] == ["rollout (sampling)", "IG scoring"] + [
        "update (lr 0)",
        "step",
    ]


def test_amdahl_and_the_product_split():
    """Half the time 2x faster is the whole 4/3 faster; a product and an elementwise op land on
    their own sides of product_seconds' split."""
    import torch

    from tools.bench import amdahl, product_seconds

    assert amdahl(share=0.5, speedup=2.0) == pytest.approx(4 / 3)
    assert amdahl(share=1.0, speedup=3.0) == pytest.approx(3.0)
    assert amdahl(share=0.0, speedup=9.0) == 1.0
    x = torch.randn(256, 256)
    products, rest = product_seconds(lambda: x @ x)
    assert products > 0 and rest < products
    products, rest = product_seconds(lambda: (x * x).exp())
    assert products == 0 and rest > 0


def test_bench_bounds_the_kernel_caches_before_any_product(monkeypatch):
    """bench.py runs fp32 sections before section 9's bf16 ones; the caches read their size at
    their first product, so the bound is set before the model is even loaded."""
    import os

    from machinery.errors import InputError
    from tools import bench

    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    seen = {}

    def setup(args):
        seen.update({k: os.environ.get(k) for k in ("LRU_CACHE_CAPACITY",)})
        raise InputError("stop here")

    monkeypatch.setattr(bench, "bench_setup", setup)
    assert bench.main(["--only", "precision"]) == 2
    assert seen == {"LRU_CACHE_CAPACITY": "16"}
