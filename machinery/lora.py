"""LoRA through peft (optional: pip install -e ".[lora]"): train low-rank adapters, not the weights.

With --lora_rank R each target projection y = W x becomes

    y = W x + (alpha / R) B A x        A: (R, in), B: (out, R); B starts at 0, so the policy
                                       starts as the loaded model; only A and B train

so the gradients and AdamW state shrink to the adapters' (a few % of the weights), and the KL
reference is the same base with the adapter switched off: no second copy of the model. The adapter
is injected into the model in place (peft.inject_adapter_in_model): the policy stays the plain
transformers model, so rollouts, IG scoring and fast.py's speed-ups run on it unchanged, with the
adapter on. A checkpoint is a plain Hugging Face folder with the adapter merged (W + (alpha/R) B A),
which from_pretrained and evaluate.py load as any model, and the adapter itself in
checkpoint/adapter (PeftModel.from_pretrained(base, "checkpoint/adapter") for PEFT users; --resume
reads it).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from machinery.errors import InputError

ADAPTER = "adapter"  # the adapter's folder inside a checkpoint


def require_peft():
    try:
        import peft
    except ImportError:
        raise InputError('--lora_rank needs peft: pip install -e ".[lora]"') from None
    return peft


def linear_names(model) -> set[str]:
    """The last name of every linear layer a LoRA adapter may target (the LM head excluded: its
    weight is tied to the embedding in SmolLM2 and Qwen2.5-3B, and fast.py applies it outside the
    model's forward)."""
    head = model.get_output_embeddings()
    return {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    }


def add_adapter(
    model, rank: int, alpha: float, targets: str, resume_from: Path | None = None
) -> None:
    """Freeze the model and inject a LoRA adapter into its `targets` (comma-separated last names of
    linear layers) in place; with resume_from, the adapter's weights come from that checkpoint."""
    peft = require_peft()
    names = [t.strip() for t in targets.split(",") if t.strip()]
    have = linear_names(model)
    missing = [t for t in names if t not in have] or ([] if names else ["(none given)"])
    if missing:
        raise InputError(
            f"--lora_targets: {model.config.model_type} has no linear layer named "
            f"{', '.join(missing)} (its linear layers: {', '.join(sorted(have))})"
        )
    smallest = min(
        min(m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names
    )
    if rank > smallest:  # B A of rank r > min(in, out) has no more freedom than the full weight
        raise InputError(
            f"--lora_rank {rank}: above the smallest targeted layer's size ({smallest}); "
            f"give at most {smallest}"
        )
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=names,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=model.config.name_or_path or None,
    )
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model)  # the adapters' weights train, nothing else
    model.lora_config = config  # kept for the adapter's adapter_config.json
    if resume_from is not None:
        load_adapter(model, resume_from / ADAPTER)


def adapter_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def is_lora(model) -> bool:
    return hasattr(model, "lora_config")


@contextlib.contextmanager
def adapter_off(model):
    """The base model inside the block: every adapter switched off, then on again."""
    layers = adapter_layers(model)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)  # (and the adapters' requires_grad back on)


class AdapterOff:
    """The model with its adapter off, called as the model is: the frozen start model that the KL
    penalty compares with, without a second copy of the weights."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapter_off(self.model):
            return self.model(*args, **kwargs)

    def __getattr__(self, name):  # config, get_output_embeddings (not adapted), device, ...
        return getattr(self.model, name)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapters' weights under the names PeftModel.from_pretrained expects."""
    from peft import get_peft_model_state_dict

    return {
        f"base_model.model.{k}": v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(model).items()
    }


def merged_state(model) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged: W + (alpha / R) B A."""
    adapted = set(adapter_layers(model))
    layers = {name: m for name, m in model.named_modules() if m in adapted}
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        owner, leaf = key.rsplit(".", 1)
        if owner.endswith(".base_layer"):  # a targeted layer's own weight and bias
            owner = owner[: -len(".base_layer")]
            if leaf == "weight":
                with torch.no_grad():
                    value = value + layers[owner].get_delta_weight("default")
        state[f"{owner}.{leaf}"] = value
    return state


def save_weights(model, folder: Path) -> None:
    """A Hugging Face folder that loads as a plain model; with LoRA the adapter merged into it, and
    the adapter itself in folder/adapter (adapter_config.json, adapter_model.safetensors)."""
    if not is_lora(model):
        model.save_pretrained(folder, safe_serialization=True)
        return
    from safetensors.torch import save_file

    model.save_pretrained(folder, state_dict=merged_state(model), safe_serialization=True)
    (folder / ADAPTER).mkdir(parents=True, exist_ok=True)
    model.lora_config.save_pretrained(folder / ADAPTER)
    save_file(
        adapter_state(model),
        folder / ADAPTER / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )


def load_adapter(model, folder: Path) -> None:
    """The adapters' weights from a folder written by save_weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise InputError(f"{path}: no adapter to resume the LoRA run from")
    config = folder / "adapter_config.json"
    try:
        saved = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{config}: cannot read the adapter's config ({e})") from None
    if not isinstance(saved, dict):
        raise InputError(f"{config}: expected a JSON object, got {type(saved).__name__}")
    want = model.lora_config
    # what the saved weights mean: y = W x + (alpha / r) B A x on these layers
    for key, have in (
        ("r", want.r),
        ("lora_alpha", want.lora_alpha),
        ("target_modules", sorted(want.target_modules)),
    ):
        got = saved.get(key)
        got = sorted(got) if key == "target_modules" and isinstance(got, list) else got
        if got != have:
            raise InputError(
                f"{config}: the adapter was trained with {key} {got}, not {have}: resumed with "
                f"another value, its weights would mean something else"
            )
    prefix = "base_model.model."
    state = {k[len(prefix) :]: v for k, v in load_file(path).items()}
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise InputError(
            f"{path}: adapter weights that the model has no place for "
            f"({result.unexpected_keys[0]}, ...)"
        )
