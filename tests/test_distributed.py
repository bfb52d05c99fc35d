"""Data-parallel training (distributed.py, train.py) with two gloo processes on CPU equals one
process.

The two ranks are launched as torchrun would launch them (RANK, WORLD_SIZE, MASTER_ADDR/PORT on
127.0.0.1); each runs `worker` below, and the test compares what they saved with a single-process
run of the same code on the same global batch. Uneven shares on purpose: three groups over two
ranks. With --fsdp (`fsdp_worker`) the shares are even, as FSDP requires: every rank runs the same
forward passes.
"""

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_train import tiny_run_files  # noqa: E402,F401 (a fixture)

import igsearch as ig  # noqa: E402
import step as rl  # noqa: E402
import train  # noqa: E402
import warmup  # noqa: E402
from igsearch import Step, Trajectory  # noqa: E402
from machinery import loaders  # noqa: E402

GROUP = 2  # rollouts per question; 3 questions -> rank 0 holds 1 group, rank 1 holds 2
PASSAGES = [
    ("Paris", "Paris is the capital of France."),
    ("Berlin", "Berlin is the capital of Germany."),
    ("Rome", "Rome is the capital of Italy."),
    ("Hamlet", "Hamlet is a tragedy by Shakespeare."),
    ("Nile", "The Nile is a long river in Africa."),
    ("Moon", "The Moon orbits the Earth."),
]


def update_batch(tokenizer, groups: int = 3) -> tuple[list[Trajectory], list[torch.Tensor]]:
    """Trajectories (3 groups: six) of different lengths with inserted documents, and per-token
    advantages."""
    gen = torch.Generator().manual_seed(0)
    trajs, tok_adv = [], []
    for k in range(groups * GROUP):
        title, text = PASSAGES[k % len(PASSAGES)]
        pieces = [
            (f"<search> {'which city ' * (k % 3)}{title} </search>", True),
            (
                ig.observation_text(f'Doc 1(Title: "{title}") {text}', ig.TEMPLATES["igsearch"]),
                False,
            ),
            (f"<answer> {title} </answer><|im_end|>", True),
        ]
        t = warmup.supervised_trajectory(tokenizer, f"Question {k}: {text}?", pieces)
        trajs.append(t)
        tok_adv.append(torch.randn(len(t.response_ids), generator=gen))
    return trajs, tok_adv


def ig_batch() -> tuple[list[Trajectory], list[list[str]]]:
    """Six trajectories with 0-2 search steps; one step has empty documents, one too short for the
    pool."""
    trajs = []
    for k in range(3 * GROUP):
        t = Trajectory([], f"Question {k}?")
        t.prefix_text = f"Question {k}?"
        docs = [
            f'Doc 1(Title: "{PASSAGES[(k + j) % 6][0]}") {PASSAGES[(k + j) % 6][1]}'
            for j in range(k % 3)
        ]
        t.steps = [
            Step(f"q{k}{j}", d, (0, 0), f"refine {j}" if j else "") for j, d in enumerate(docs)
        ]
        trajs.append(t)
    trajs[4].steps[0].documents = "  "  # no IG for this step
    trajs[5].steps[1].documents = "short"  # not in the counterfactual pool, still scored
    return trajs, [[PASSAGES[k][0]] for k in range(3 * GROUP)]


def local_share(items: list) -> list:
    """This rank's whole groups, as train.py takes them."""
    from machinery import distributed as dd

    groups = [items[g : g + GROUP] for g in range(0, len(items), GROUP)]
    return [x for grp in groups[dd.shard(len(groups))] for x in grp]


def train_config(files: dict, out_dir: str) -> train.Config:
    return train.Config(
        model=files["model"],
        corpus=files["corpus"],
        train_data=files["qa"],
        questions_per_step=3,
        group_size=GROUP,
        max_searches=1,
        max_turn_tokens=6,
        temperature=0.0,
        steps=2,
        lr=1e-3,
        kl_coef=0.01,
        micro_batch=2,
        rollout_batch=3,
        warmup_examples=4,
        warmup_batch=2,
        eval_questions=0,
        save_every=1,
        out_dir=out_dir,
        precision="fp32",  # ranks and one process agree to float rounding in fp32
    )


def worker(args_path: str) -> None:
    """One rank: an update on its share, its share of the IG draw and scores, then a short training
    run."""
    from machinery import distributed as dd

    args = json.loads(Path(args_path).read_text())
    dd.setup()
    out = Path(args["out"])
    model, tok = loaders.load_model(args["files"]["model"], "cpu")
    trajs, tok_adv = update_batch(tok)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = rl.update(
        model,
        copy.deepcopy(model),
        tok,
        local_share(trajs),
        local_share(tok_adv),
        opt,
        train.Config(micro_batch=2, kl_coef=0.1),
    )
    torch.save({"params": model.state_dict(), "stats": stats}, out / f"update{dd.rank()}.pt")

    trajs, golds = ig_batch()
    mine = local_share(trajs)
    draws = rl.counterfactual_draws(mine, train.Config(), torch.Generator().manual_seed(5))
    gains = ig.information_gain(model, tok, mine, local_share(golds), draws, max_len=512)
    igs = [[g and g.ig for g in row] for row in gains]  # IG_t, None where not scored
    all_draws, all_igs = dd.all_gather(draws), dd.all_gather(igs)
    if dd.is_main():
        (out / "ig.json").write_text(
            json.dumps({"draws": sum(all_draws, []), "igs": sum(all_igs, [])})
        )

    train.train(train_config(args["files"], str(out / "run")))
    dd.cleanup()


def fsdp_config(files: dict, out_dir: str, **kw) -> train.Config:
    """train_config with two questions per step: FSDP needs equal shares (one group per rank)."""
    return dataclasses.replace(train_config(files, out_dir), questions_per_step=2, **kw)


def load_tiny(path: str, tied: bool = True):
    """The tiny model with its head tied to the input embeddings (SmolLM2, Qwen2.5-3B) or untied
    (Qwen2.5-7B)."""
    model, tok = loaders.load_model(path, "cpu")
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model, tok


def fsdp_worker(args_path: str) -> None:
    """One rank with FSDP: an AdamW update of a sharded model, a training run, and the same run
    stopped after one step and resumed from its checkpoint."""
    from machinery import distributed as dd

    args = json.loads(Path(args_path).read_text())
    dd.setup()
    out = Path(args["out"])
    for tied in (True, False):
        model, tok = load_tiny(args["files"]["model"], tied)
        trajs, tok_adv = update_batch(
            tok, groups=4
        )  # two micro-batches per rank: gradient accumulation
        dd.shard_model(model)
        assert dd.is_sharded(model)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
        stats = rl.update(
            model,
            None,
            tok,
            local_share(trajs),
            local_share(tok_adv),
            opt,
            train.Config(micro_batch=2),
        )
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        local = sum(
            p.to_local().numel() for p in model.parameters()
        )  # this rank's share of the weights
        if dd.is_main():
            torch.save(
                {"params": full, "stats": stats, "local": local}, out / f"fsdp_update_tied{tied}.pt"
            )

    train.train(fsdp_config(args["files"], str(out / "fsdp_run"), fsdp=True))
    train.train(fsdp_config(args["files"], str(out / "fsdp_resumed"), fsdp=True, steps=1))
    train.train(
        fsdp_config(args["files"], str(out / "fsdp_resumed"), fsdp=True),
        resume=str(out / "fsdp_resumed"),
    )
    dd.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tiny_run_files):
    """The tiny model folder, ten-passage corpus and question file of test_train."""
    return {
        "model": tiny_run_files["model"],
        "corpus": tiny_run_files["corpus"],
        "qa": tiny_run_files["train_data"],
    }


def launch(worker: str, files: dict, out: Path) -> list[str]:
    """Run test_distributed.<worker> on two gloo ranks, as torchrun would; returns each rank's
    stdout."""
    (out / "args.json").write_text(json.dumps({"files": files, "out": str(out)}))
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; "
        f"import test_distributed as t; t.{worker}(sys.argv[1])"
    )
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    logs = [
        (open(out / f"rank{r}.out", "w"), open(out / f"rank{r}.err", "w")) for r in range(2)
    ]  # no pipe to fill
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(out / "args.json")],
            cwd=ROOT,
            text=True,
            stdout=logs[r][0],
            stderr=logs[r][1],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(2)
    ]
    try:
        for r, p in enumerate(procs):
            p.wait(timeout=300)
            assert p.returncode == 0, (out / f"rank{r}.err").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in (f for pair in logs for f in pair):
            f.close()
    return [(out / f"rank{r}.out").read_text() for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(files, tmp_path_factory) -> tuple[Path, list[str]]:
    """worker() on two ranks: the output folder and each rank's stdout."""
    out = tmp_path_factory.mktemp("ranks")
    return out, launch("worker", files, out)


@pytest.fixture(scope="module")
def two_sharded_ranks(files, tmp_path_factory) -> Path:
    """fsdp_worker() on two ranks: the output folder."""
    out = tmp_path_factory.mktemp("fsdp")
    launch("fsdp_worker", files, out)
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoint" / "model.safetensors")


def test_one_update_equals_the_single_process_update(files, two_ranks):
    out, _ = two_ranks
    model, tok = loaders.load_model(files["model"], "cpu")
    trajs, tok_adv = update_batch(tok)
    stats = rl.update(
        model,
        copy.deepcopy(model),
        tok,
        trajs,
        tok_adv,
        torch.optim.SGD(model.parameters(), lr=0.1),
        train.Config(micro_batch=2, kl_coef=0.1),
    )
    ranks = [torch.load(out / f"update{r}.pt", weights_only=True) for r in range(2)]
    for r, saved in enumerate(ranks):
        for name, p in model.state_dict().items():
            assert torch.allclose(saved["params"][name], p, atol=1e-6), (r, name)
        for k in ("loss", "kl", "grad_norm"):
            assert saved["stats"][k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), k
    # each rank's token entropies are those of its share of the batch, in order
    entropy = torch.cat([e for saved in ranks for e in saved["stats"]["token_entropy"]])
    assert torch.allclose(entropy, torch.cat(stats["token_entropy"]), atol=1e-6)


def test_sharded_ig_draw_and_scores_equal_the_single_process_ones(files, two_ranks):
    out, _ = two_ranks
    got = json.loads((out / "ig.json").read_text())
    trajs, golds = ig_batch()
    draws = ig.plan_counterfactuals(
        [ig.step_pairs(t) for t in trajs], 3, "random", torch.Generator().manual_seed(5)
    )
    assert got["draws"] == [[[list(p) for p in step] for step in row] for row in draws]
    model, tok = loaders.load_model(files["model"], "cpu")
    # the workers scored with the model after their update: score with the same weights here
    model.load_state_dict(torch.load(out / "update0.pt", weights_only=True)["params"])
    gains = ig.information_gain(model, tok, trajs, golds, draws, max_len=512)
    igs = [[g and g.ig for g in row] for row in gains]
    assert [v is None for row in got["igs"] for v in row] == [v is None for row in igs for v in row]
    assert [v for row in got["igs"] for v in row if v is not None] == pytest.approx(
        [v for row in igs for v in row if v is not None], abs=1e-5
    )


def test_training_run_on_two_ranks_equals_one_process(files, two_ranks, tmp_path):
    """Greedy rollouts, warm-up, IG, KL and two updates: the same metrics and weights; rank 1 writes
    nothing."""
    out, stdouts = two_ranks
    train.train(train_config(files, str(tmp_path / "run")))
    single, double = metrics(tmp_path / "run"), metrics(out / "run")
    assert len(single) == len(double) == 2
    for a, b in zip(single, double):
        for k, v in a.items():
            if not (k.startswith("t_") or k == "mem_gb"):
                assert b[k] == (v if v is None else pytest.approx(v, rel=1e-4, abs=1e-5)), k
    w1, w2 = weights(tmp_path / "run"), weights(out / "run")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert '"seed"' in stdouts[0] and stdouts[1].strip() == ""  # only rank 0 prints the config


@pytest.mark.parametrize("tied", [True, False], ids=["tied head", "untied head"])
def test_fsdp_update_equals_the_single_process_update(files, two_sharded_ranks, tied):
    """Sharded weights, gradients summed by FSDP's reduce-scatter, sharded AdamW state: the same
    step."""
    saved = torch.load(two_sharded_ranks / f"fsdp_update_tied{tied}.pt", weights_only=True)
    model, tok = load_tiny(files["model"], tied)
    trajs, tok_adv = update_batch(tok, groups=4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    stats = rl.update(model, None, tok, trajs, tok_adv, opt, train.Config(micro_batch=2))
    assert saved["local"] < 0.6 * sum(
        p.numel() for p in model.parameters()
    )  # about half each, not a replica
    start = dict(load_tiny(files["model"], tied)[0].named_parameters())
    assert ("lm_head.weight" in start) != tied  # named_parameters lists a tied head once
    for name, p in model.named_parameters():
        assert torch.allclose(saved["params"][name], p, atol=1e-6), name
    assert (
        max((p - start[name]).abs().max().item() for name, p in model.named_parameters()) > 1e-3
    )  # it moved
    for k in ("loss", "grad_norm"):
        assert saved["stats"][k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), k
    mine = saved["stats"]["token_entropy"]  # rank 0's share: the first rollouts of the batch
    assert torch.allclose(
        torch.cat(mine), torch.cat(stats["token_entropy"][: len(mine)]), atol=1e-6
    )


def test_fsdp_training_run_equals_one_process_and_resumes(files, two_sharded_ranks, tmp_path):
    """Warm-up, greedy rollouts on the full copy, IG, KL, two sharded updates and their checkpoints:
    the metrics and weights of one process; stopped after step 1 and resumed, the same again."""
    train.train(fsdp_config(files, str(tmp_path / "run")))
    single = metrics(tmp_path / "run")
    for run in ("fsdp_run", "fsdp_resumed"):
        sharded = metrics(two_sharded_ranks / run)
        assert len(single) == len(sharded) == 2, run
        for a, b in zip(single, sharded):
            for k, v in a.items():
                if not (k.startswith("t_") or k == "mem_gb"):
                    assert b[k] == (v if v is None else pytest.approx(v, rel=1e-4, abs=1e-5)), (
                        run,
                        k,
                    )
        w1, w2 = weights(tmp_path / "run"), weights(two_sharded_ranks / run)
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4, run


def test_fsdp_needs_several_processes(files, tmp_path):
    with pytest.raises(train.InputError, match="fsdp=True is out of range .*torchrun"):
        train.train(fsdp_config(files, str(tmp_path / "run"), fsdp=True))
