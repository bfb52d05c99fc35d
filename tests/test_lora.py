"""lora.py: adapters train, the base stays, the KL reference is the base, checkpoints load as plain
models and a LoRA run resumes exactly."""

import copy
import sys

import pytest
import torch
from test_fast import answer_trajectories
from test_train import read_metrics, strip_times, tiny_config, tiny_run_files  # noqa: F401

import igsearch as ig
import step as rl
import train
from machinery import fast, lm, lora
from machinery.errors import InputError
from train import Config

TARGETS = Config().lora_targets


def test_without_peft_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(InputError, match=r'pip install -e "\.\[lora\]"'):
        lora.require_peft()


@pytest.fixture
def adapted(tiny_model):
    """(start model, a copy with a rank-4 adapter on every projection, its B matrices nonzero: an
    adapter that has trained, so that on and off differ)."""
    pytest.importorskip("peft")
    model = copy.deepcopy(tiny_model)
    lora.add_adapter(model, 4, 8.0, TARGETS)
    torch.manual_seed(1)
    for layer in lora.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    return tiny_model, model


def base_weights(model) -> dict[str, torch.Tensor]:
    return {
        k.replace(".base_layer", ""): v.clone()
        for k, v in model.state_dict().items()
        if ".lora_" not in k
    }


def test_only_the_adapters_get_gradients_and_adam_state_and_the_base_stays_bitwise(
    tokenizer, adapted
):
    """One AdamW update with a KL penalty to the adapter-off base: the adapters move, every base
    weight is bitwise what it was, and only adapter weights hold a gradient and an AdamW state."""
    start, model = adapted
    before, adapters = (
        base_weights(model),
        {n: p.clone() for n, p in model.named_parameters() if p.requires_grad},
    )
    assert adapters and all(".lora_" in n for n in adapters)
    trajs, tok_adv = answer_trajectories(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = rl.update(
        model,
        lora.AdapterOff(model),
        tokenizer,
        trajs,
        tok_adv,
        opt,
        Config(micro_batch=2, kl_coef=0.1),
    )
    assert not stats["skipped"] and stats["kl"] != 0
    after = base_weights(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: v for k, v in base_weights(start).items()}.keys() == before.keys()
    params = dict(model.named_parameters())
    assert all(not torch.equal(adapters[n], params[n]) for n in adapters)
    trained = {n for n, p in params.items() if p in opt.state}
    assert trained == set(adapters)  # no AdamW moments for the base
    assert all(p.requires_grad == (n in adapters) for n, p in params.items())  # after the KL pass


def test_the_kl_reference_is_the_start_model_without_a_copy(tokenizer, adapted):
    """The adapter-off model scores as a deep copy of the start model; with the adapter on it does
    not; and the reference shares the policy's weights (no second copy)."""
    start, model = adapted
    trajs, _ = answer_trajectories(tokenizer)
    batch = lm.response_batch(trajs, tokenizer.pad_token_id)
    ref = lora.AdapterOff(model)
    with torch.no_grad():
        ref_logp, _ = fast.policy_logprobs(ref, batch)
        start_logp, _ = fast.policy_logprobs(copy.deepcopy(start), batch)
        policy_logp, _ = fast.policy_logprobs(model, batch)
    assert torch.allclose(ref_logp, start_logp, atol=1e-6)
    assert not torch.allclose(policy_logp, start_logp, atol=1e-3)
    assert ref.model is model


def test_ig_is_scored_with_the_adapter_on(tokenizer, adapted, tmp_path):
    """IG of the adapted policy equals IG of its merged plain model (the checkpoint), not the
    base's."""
    start, model = adapted
    lora.save_weights(model, tmp_path)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    trajs = []
    for k, has in enumerate([True, False, True]):
        t = ig.Trajectory([], f"Question {k}?")
        t.prefix_text = f"Question {k}?"
        docs = 'Doc 1(Title: "Paris") Paris is the capital' if has else f'Doc 1(Title: "Rome") {k}'
        t.steps = [ig.Step("capital", docs, (0, 0), "")]
        trajs.append(t)
    golds = [["Paris"]] * 3
    draws = ig.plan_counterfactuals([ig.step_pairs(t) for t in trajs])
    kw = dict(
        template=ig.TEMPLATES["igsearch"],
        max_len=512,
        batch_size=8,
        logprobs=fast.answer_logprobs_shared_prefix,
    )
    on, plain, base = (
        [g.ig for row in ig.information_gain(m, tokenizer, trajs, golds, draws, **kw) for g in row]
        for m in (model, merged, start)
    )
    assert on == pytest.approx(plain, abs=1e-4) and on != pytest.approx(base, abs=1e-3)


def test_the_checkpoint_is_a_plain_model_with_the_adapter_beside_it(tokenizer, adapted, tmp_path):
    """from_pretrained loads the merged folder with the PEFT model's logits; PeftModel loads the
    adapter beside it on the start model with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start, model = adapted
    lora.save_weights(model, tmp_path)
    ids = torch.tensor([tokenizer("What is the capital of France?").input_ids])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(copy.deepcopy(start), tmp_path / lora.ADAPTER)
        via_peft = peft_model(input_ids=ids).logits
    assert not any(
        ".lora_" in k or "base_layer" in k
        for k in AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    )
    assert torch.allclose(merged, expected, atol=1e-4) and torch.allclose(
        via_peft, expected, atol=1e-5
    )
    assert not torch.allclose(start(input_ids=ids).logits, expected, atol=1e-3)


def test_a_resumed_lora_run_reproduces_the_uninterrupted_one(tiny_run_files, tmp_path):
    """Warm-up, KL and IG with an adapter: 1 step + --resume to 3 equals 3 steps; the checkpoint is
    the start model's folder plus the adapter, and the resume reads the adapter, not the merge."""
    pytest.importorskip("peft")
    kw = dict(lora_rank=4, lora_alpha=8.0, kl_coef=0.05, warmup_examples=2, warmup_batch=2)
    train.train(tiny_config(tiny_run_files, tmp_path / "full", steps=3, **kw))
    train.train(tiny_config(tiny_run_files, tmp_path / "cut", steps=1, **kw))
    assert (tmp_path / "cut" / "checkpoint" / lora.ADAPTER / "adapter_model.safetensors").exists()
    cfg, resume, _ = train.parse_config(["--resume", str(tmp_path / "cut"), "--steps", "3"])
    assert cfg.lora_rank == 4
    train.train(cfg, resume)
    full, cut = (
        strip_times(read_metrics(tmp_path / "full")),
        strip_times(read_metrics(tmp_path / "cut")),
    )
    assert [r["step"] for r in cut] == [1, 2, 3] and cut == full
    assert any(r["kl"] != 0 for r in full)
    with pytest.raises(InputError, match="lora_rank cannot change"):
        train.parse_config(["--resume", str(tmp_path / "cut"), "--lora_rank", "8"])


def test_lora_with_fsdp_or_without_its_targets_is_refused_in_one_line(
    tiny_run_files,
    tmp_path,  # noqa: F811
    capsys,
):
    with pytest.raises(InputError, match="lora_rank=4 is out of range.*0 with --fsdp"):
        train.check_config(Config(lora_rank=4, fsdp=True), world_size=2)
    pytest.importorskip("peft")
    code = train.main(
        [
            "--model",
            tiny_run_files["model"],
            "--corpus",
            tiny_run_files["corpus"],
            "--train_data",
            tiny_run_files["train_data"],
            "--eval_questions",
            "0",
            "--out_dir",
            str(tmp_path / "run"),
            "--lora_rank",
            "4",
            "--lora_targets",
            "q_proj,c_attn",
        ]
    )
    err = capsys.readouterr().err.strip()  # (the weights' loading bar comes before it)
    assert code == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("error: ")
    assert "no linear layer named c_attn" in err.splitlines()[-1] and "q_proj" in err
