"""memory.py: the estimate from a config alone, and train.py's check before any work."""

import copy

import pytest
from test_train import tiny_run_files  # noqa: F401 (a fixture)

import train
from machinery import memory_estimate as memory
from tools import memory as memory_tool
from train import Config


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied head is counted once


def test_the_parameter_count_from_a_config_equals_the_models(tiny_model):
    """Tied and untied Llama, and Qwen2 (biases on q, k, v): counted from the config alone."""
    from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    assert memory.model_shape(tiny_model.config).params == n_params(tiny_model)
    untied = tiny_model.config.to_dict() | {"tie_word_embeddings": False}
    assert memory.model_shape(untied).params == n_params(
        LlamaForCausalLM(tiny_model.config.__class__(**untied))
    )
    qwen = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    assert memory.model_shape(qwen).params == n_params(Qwen2ForCausalLM(qwen))
    assert abs(memory.model_shape(memory.QWEN25_3B).params - 3.09e9) < 0.01e9  # its model card


def test_the_lora_share_equals_the_adapters_parameters(tiny_model):
    pytest.importorskip("peft")
    from machinery import lora

    model = copy.deepcopy(tiny_model)
    lora.add_adapter(model, 4, 8.0, "q_proj,v_proj,down_proj")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (
        memory.lora_params(memory.model_shape(tiny_model.config), 4, "q_proj,v_proj,down_proj")
        == trained
    )


def test_each_knob_moves_the_term_it_names():
    """Checkpointing, micro-batch, rollout chunk, KL reference and LoRA each change their term."""
    shape = memory.model_shape(memory.QWEN25_3B)
    terms = lambda **kw: {
        k: v
        for phase in memory.estimate(Config(**kw), shape, "cuda").values()
        for k, v in phase.items()
    }
    base = terms()
    assert terms(grad_checkpointing=False)["update activations"] > 5 * base["update activations"]
    assert terms(micro_batch=4)["LM-head logits"] == 2 * base["LM-head logits"]
    assert (
        terms(rollout_batch=64)["KV cache of a rollout chunk"]
        == 4 * terms(rollout_batch=16)["KV cache of a rollout chunk"]
    )
    assert "reference model" in terms(kl_coef=0.001)
    lora = terms(lora_rank=16, kl_coef=0.001)
    assert "reference model" not in lora and lora["AdamW state"] < base["AdamW state"] / 50


def test_a_run_that_would_not_fit_stops_in_one_line_before_any_work(
    tiny_run_files,
    tmp_path,  # noqa: F811
    monkeypatch,
    capsys,
):
    """The estimate and the device's memory come first; over the device, one line names the largest
    term and the flag that lowers it; --ignore_memory_check runs anyway."""
    monkeypatch.setattr(memory, "device_memory", lambda device: (2**20, "RAM 0.0 GiB"))
    loaded = []
    monkeypatch.setattr(train.loaders, "load_model", lambda *a, **k: loaded.append(1) or 1 / 0)
    args = [
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
        "--steps",
        "1",
    ]
    assert train.main(args) == 2 and not loaded  # stopped before the model is loaded
    out, err = capsys.readouterr()
    assert "memory: estimate" in out and "device: RAM 0.0 GiB" in out
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: memory: the estimate") and "exceeds" in line
    assert "the largest term is runtime" in line and "--ignore_memory_check" in line
    with pytest.raises(ZeroDivisionError):  # past the check: on to loading the model
        train.train(train.parse_config(args + ["--ignore_memory_check"])[0])
    assert loaded


def test_the_table_prints_offline_for_qwen(capsys):
    assert (
        memory_tool.main(
            [
                "--model_config",
                "qwen2.5-3b",
                "--device",
                "cuda",
                "--device_gib",
                "24",
                "--ranks",
                "0,16",
                "--preset",
                "paper",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3.09 B parameters" in out and "| fits 24.0 GiB | no | no |" in out


def saved_bytes_per_token(model, bf16: bool) -> float:
    """What a forward pass saves for backward, per token and layer, counted by torch's hooks: the
    slope between two lengths, so the bf16 weight copies autocast saves (no token dimension) cancel;
    parameters and the logits are left out (their own terms)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    vocab = model.config.vocab_size

    def saved(T: int) -> int:
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params and t.shape[-1:] != (vocab,):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, vocab, (2, T))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(input_ids=ids, use_cache=False)
        return sum(seen.values())

    return (saved(96) - saved(32)) / (2 * 64) / model.config.num_hidden_layers


@pytest.mark.parametrize("hidden,intermediate", [(32, 64), (64, 160)])
def test_a_layers_saved_activations_are_what_the_formula_counts(hidden, intermediate):
    """In fp32 and under bf16 autocast: autocast keeps the residual stream and the norms in fp32,
    so a layer saves ~0.72 of fp32's bytes, not half (counting half underestimated bf16 runs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model, shape = LlamaForCausalLM(cfg), memory.model_shape(cfg)
    for bf16 in (False, True):
        ratio = saved_bytes_per_token(model, bf16) / memory.saved_per_token(shape, bf16)
        assert 0.95 < ratio < 1.10, (bf16, ratio)
    assert 0.65 < memory.saved_per_token(shape, True) / memory.saved_per_token(shape, False) < 0.8


def test_the_estimate_follows_the_runs_precision_on_the_cpu(monkeypatch, capsys):
    """bf16 autocast on a CPU adds the bf16 copy of the trained weights and holds the products'
    activations in bf16; train.py's check passes the run's own choice (--precision fp32 on a bf16
    CPU: no copy)."""
    shape = memory.model_shape(memory.QWEN25_3B)
    fp32 = memory.estimate(Config(), shape, "cpu", bf16=False)["update"]
    bf16 = memory.estimate(Config(), shape, "cpu", bf16=True)["update"]
    assert "autocast bf16 weights" not in fp32 and bf16["autocast bf16 weights"] == 2 * shape.params
    assert bf16["update activations"] < fp32["update activations"]  # bf16 where autocast casts
    lora = memory.estimate(Config(lora_rank=16), shape, "cpu", bf16=True)["update"]
    assert "autocast bf16 weights" not in lora  # the frozen base is not a leaf that trains

    import torch

    from machinery import lm

    monkeypatch.setattr(lm, "native_bf16", lambda device: True)  # a CPU with bf16 units
    monkeypatch.setattr(memory, "model_shape", lambda config: shape)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", lambda *a, **k: None)
    estimate, asked = memory.estimate, []
    monkeypatch.setattr(
        memory, "estimate", lambda *a, **k: asked.append(k["bf16"]) or estimate(*a, **k)
    )
    for precision in ("auto", "fp32", "bf16"):
        cfg = Config(precision=precision, ignore_memory_check=True)  # 3B: over this RAM
        memory.check(cfg, "any", torch.device("cpu"), quiet=True)
    assert asked == [True, False, True]
