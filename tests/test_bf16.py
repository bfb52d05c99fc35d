"""bf16 autocast (issue 46): the precision chosen once, and what must hold in bf16 as in fp32: the
trained weights stay fp32, inserted tokens never train, advantages land on the tokens they name."""

import copy
import os

import pytest
import torch
from test_train import tiny_run_files  # noqa: F401 (a fixture)

import step as rl
import warmup
from config import Config
from machinery import lm

BF16 = rl.choose_compute(True, torch.device("cpu"), torch.bfloat16)


def test_precision_is_chosen_once_from_the_flag_and_the_hardware():
    cpu = torch.device("cpu")
    assert lm.amp_dtype("fp32", cpu) is None and lm.amp_dtype("bf16", cpu) is torch.bfloat16
    assert lm.amp_dtype("auto", cpu) is (torch.bfloat16 if lm.native_bf16(cpu) else None)
    assert rl.choose_compute(True, cpu, None).autocast().__class__.__name__ == "nullcontext"
    with BF16.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16


def test_a_bf16_cpu_run_bounds_the_kernel_caches_and_a_users_size_wins(monkeypatch):
    """oneDNN keeps a compiled kernel per product shape (1,024 by default in each of two caches):
    a bf16 run on the CPU asks for few before its first product; fp32 and CUDA runs leave them."""
    names = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    rl.choose_compute(True, torch.device("cpu"), None)
    rl.choose_compute(True, torch.device("cuda"), torch.bfloat16)
    assert not any(name in os.environ for name in names)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "256")
    rl.choose_compute(False, torch.device("cpu"), torch.bfloat16)
    assert os.environ["LRU_CACHE_CAPACITY"] == "256"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(lm.KERNEL_CACHE)


def trajectories(tokenizer):
    """Two trajectories with inserted documents (loss mask 0) between trained pieces."""
    return [
        warmup.supervised_trajectory(
            tokenizer,
            f"Question {k}?",
            [
                ("<search> capital </search>", True),
                ("\n<documents> Doc 1 Paris </documents>\n", False),
                (f"<answer> {a} </answer>", True),
            ],
        )
        for k, a in enumerate(["Paris", "Rome"])
    ]


def grads(model, tokenizer, trajs, token_adv):
    """The gradient of one bf16 update (SGD, lr 0), flattened; and the update's stats."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.zero_grad()
    cfg = Config(micro_batch=2, grad_clip=1e9)
    stats = rl.update(model, None, tokenizer, trajs, token_adv, opt, cfg, BF16)
    return model, stats


def test_bf16_update_keeps_fp32_weights_and_trains_only_sampled_tokens(tokenizer, tiny_model):
    trajs = trajectories(tokenizer)
    inserted = [torch.tensor([1.0 - m for m in t.loss_mask]) for t in trajs]  # A on inserted only
    model, stats = grads(tiny_model, tokenizer, trajs, inserted)
    assert all(p.dtype is torch.float32 for p in model.parameters())
    assert stats["grad_norm"] == 0.0  # documents have loss mask 0: no gradient reaches them
    sampled = [torch.tensor([float(m) for m in t.loss_mask]) for t in trajs]
    _, stats = grads(tiny_model, tokenizer, trajs, sampled)
    assert stats["grad_norm"] > 0 and not stats["skipped"]
    for t, e in zip(trajs, stats["token_entropy"]):  # the entropy is logged on trained tokens only
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        assert torch.all(e[~mask] == 0) and torch.all(e[mask] > 0)


def test_bf16_logprobs_are_fp32_masked_and_close_to_fp32(tokenizer, tiny_model):
    trajs = trajectories(tokenizer)
    batch = lm.response_batch(trajs, tokenizer.pad_token_id)
    plain = BF16.policy_logprobs(tiny_model, batch)[0]
    with BF16.autocast():
        logp, _ = BF16.policy_logprobs(tiny_model, batch)
    assert logp.dtype is torch.float32  # log-softmax in fp32 under autocast
    assert torch.all(logp[batch["loss_mask"] == 0] == 0)
    assert logp.detach() == pytest.approx(plain.detach(), rel=0.05)  # bf16 rounding: ~1 %


def test_advantages_land_on_the_query_tokens_in_a_bf16_run(
    tiny_run_files, tmp_path, monkeypatch, script_rollouts
):
    """A tiny training run with --precision bf16 (a scripted policy that searches, then answers):
    each update's per-token advantages are A_i off the query tokens and carry IG on them, as in
    fp32."""
    from test_train import PASSAGES, tiny_config
    from transformers import AutoTokenizer

    import train

    tok = AutoTokenizer.from_pretrained(tiny_run_files["model"])
    keys = [p[1].split()[-1] for p in PASSAGES]  # each question's last word: its own documents
    scripts = {k: [f"<search> {k.strip('.')} </search>", "<answer> Paris </answer>"] for k in keys}
    real_update, seen = rl.update, []
    script_rollouts(tok, scripts)

    def spy(model, ref, tokenizer, trajs, tok_adv, optimizer, cfg, compute=None):
        seen.append((trajs, tok_adv, compute))
        return real_update(model, ref, tokenizer, trajs, tok_adv, optimizer, cfg, compute)

    monkeypatch.setattr(rl, "update", spy)
    cfg = tiny_config(
        tiny_run_files,
        tmp_path / "run",
        precision="bf16",
        warmup_examples=0,
        questions_per_step=3,
        max_turn_tokens=24,
    )
    train.train(cfg)
    assert seen and all(c.amp_dtype is torch.bfloat16 for _, _, c in seen)
    bonus_seen = False
    for trajs, tok_adv, _ in seen:
        for t, a in zip(trajs, tok_adv):
            query = torch.zeros(len(t.response_ids), dtype=torch.bool)
            for s in t.steps:
                query[slice(*s.query_span)] = True
            assert torch.all(a[~query] == a[~query][0])  # A_i on every token off the queries
            bonus_seen |= bool((a[query] != a[~query][0]).any())
    assert bonus_seen  # IG, scored under bf16, reached the query tokens
