"""The run's configuration: every field with its meaning and the paper's value, the presets, the
command line (every field a flag), the checks, the time a run will take, and the name of the
method a config stands for (compare.py names a finished run's method from its config.json).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from igsearch import TEMPLATES
from machinery import run_folder as ckpt
from machinery.errors import InputError, OneLineParser

TASKS = ("plain", "noisy")  # the offline default's question sets (prepare.default_data)


@dataclass
class Config:
    # data, model, retriever ("" = the offline default built by prepare.py)
    task: str = (
        "plain"  # offline questions: plain, or noisy (behind distractors: the query decides)
    )
    model: str = ""  # HF name or folder (paper: Qwen/Qwen2.5-3B)
    trust_remote_code: bool = False  # run Python code shipped with the model (trusted repos only)
    train_data: str = ""  # FlashRAG JSON lines (paper: NQ + HotpotQA train)
    test_data: str = ""  # held-out questions for the before/after table
    corpus: str = ""  # wiki-18 JSON lines for in-memory BM25 (paper: wiki-18 with E5)
    retriever_url: str = ""  # Search-R1 /retrieve endpoint; replaces corpus when set
    retriever_timeout: float = 30.0  # seconds per retriever request before it counts as failed
    retriever_retries: int = 3  # tries per retriever request (back-off 0.5 s, 1 s, ...)
    topk: int = 3  # passages per search (paper 3)
    doc_words: int = 30  # words kept per passage, 0 = all (paper: up to 512 tokens)
    template: str = "igsearch"  # prompt and tags: igsearch (documents + refine) or searchr1
    # rollout
    questions_per_step: int = 4  # prompts per step (paper 256)
    group_size: int = 4  # G rollouts per question, the baseline's group (paper 5)
    max_searches: int = 2  # searches per rollout before the final answer turn (paper 5)
    max_turn_tokens: int = 32  # new tokens per turn (paper 512)
    max_response_tokens: int = 512  # response budget, documents included (paper ~4096)
    temperature: float = 1.0  # sampling temperature (paper 1.0)
    # reward
    outcome_only: bool = False  # alpha = 0: the Search-R1 GRPO baseline
    step_reward: str = (
        "ig"  # what alpha weighs on the query tokens: ig (paper), or hit (a baseline)
    )
    ig_alpha: float = 0.3  # weight of IG on the query tokens (paper 0.3)
    ig_n_random: int = 3  # N counterfactual document sets per step (paper 3)
    ig_baseline: str = "random"  # random (paper) or empty (the paper's ablation)
    ig_pool: str = "batch"  # counterfactuals from the batch (official) or others: other questions
    ig_head_weight: float = 3.0  # weight of the first 3 answer tokens in s(a*|C) (official 3)
    ig_all_golds: bool = False  # score every gold answer and keep the best (default: the first)
    ig_dead_zone: float = 0.0  # |IG| below this counts as 0 (paper: delta, value not public)
    ig_neg_scale: float = 1.0  # factor on negative IG (paper: eta < 1, value not public)
    ig_clip: float = 0.0  # clip IG to [-c, c], 0 = off
    ig_center: bool = False  # IG minus its question's group mean (not the paper's: a variant)
    ig_max_len: int = 1024  # scoring contexts are left-truncated to this many tokens
    ig_batch_size: int = 16  # scoring sequences per forward pass
    normalize_std: bool = True  # divide the group advantage by the group's std
    # optimisation
    steps: int = 12  # RL steps (paper 200)
    lr: float = 2e-5  # AdamW learning rate (paper 1e-6)
    kl_coef: float = 0.0  # k3 KL penalty to the frozen start model (paper 0.001)
    grad_clip: float = 1.0  # gradient-norm clip
    max_bad_steps: int = 3  # stop after this many steps in a row with a non-finite loss or gradient
    micro_batch: int = 2  # rollouts per forward/backward in the update (gradient accumulation)
    rollout_batch: int = 0  # sequences generated together, at most (0 = all): bounds the KV cache
    grad_checkpointing: bool = True  # recompute each layer's activations in the backward pass
    fsdp: bool = False  # torchrun: shard weights, gradients and AdamW state over the ranks
    fast: bool = True  # machinery/fast.py's speed-ups (the same results up to float rounding)
    precision: str = "auto"  # auto (bf16 autocast where the device has bf16 units), bf16 or fp32
    lora_rank: int = 0  # LoRA adapters of this rank through peft (lora.py); 0 = all weights (paper)
    lora_alpha: float = 32.0  # LoRA scale alpha / rank on the adapters' output
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # adapted layers
    ignore_memory_check: bool = False  # run even when memory.py's estimate exceeds the device
    warmup_examples: int = 64  # format warm-up: supervised trajectories from the train split
    warmup_lr: float = 5e-5  # learning rate of the warm-up
    warmup_batch: int = 8  # trajectories per warm-up step
    warmup_query: str = "question"  # the warm-up's query: question, varied, or retry (two searches)
    # evaluation, logging, checkpoints
    eval_questions: int = 64  # held-out test questions in the before/after table (0 = skip)
    val_questions: int = 200  # validation questions carved from the train split, never trained on
    eval_every: int = 0  # validation EM every K RL steps, at step 0 and at the end (0 = off)
    eval_start: bool = True  # evaluate the start model (off when runs share a start checkpoint)
    eval_batch: int = 16  # questions per evaluation rollout batch
    out_dir: str = "runs/default"  # run folder: config, metrics.jsonl, checkpoint/
    save_every: int = 5  # checkpoint every K steps (and at the end)
    html_every: int = 0  # steps/step-NNNN.html, the credit of every token, every K steps (0 = off)
    seed: int = 0  # one seed for data order, sampling and counterfactual draws


PRESETS = {
    "default": {},
    # the README's learning experiment: from one shared warm-up checkpoint, 40 steps, validation
    # every 10 steps, all 751 test questions at the end (micro_batch 8, no checkpointing: faster)
    "learn": dict(
        steps=40,
        lr=2e-5,
        eval_questions=751,
        eval_start=False,
        warmup_examples=0,
        eval_every=10,
        micro_batch=8,
        grad_checkpointing=False,
        out_dir="runs/learn",
    ),
    # the query task's experiment: the same protocol on the noisy questions, with turns long enough
    # to copy a noisy question into a query; IG centred in its group (chosen on validation,
    # docs/experiments.md)
    "query": dict(
        task="noisy",
        ig_center=True,
        steps=40,
        lr=2e-5,
        eval_questions=751,
        eval_start=False,
        warmup_examples=0,
        eval_every=10,
        micro_batch=8,
        grad_checkpointing=False,
        max_turn_tokens=64,
        out_dir="runs/query",
    ),
    "paper": dict(
        model="Qwen/Qwen2.5-3B",
        questions_per_step=256,
        group_size=5,
        max_searches=5,
        max_turn_tokens=512,
        max_response_tokens=4096,
        doc_words=0,
        steps=200,
        lr=1e-6,
        kl_coef=0.001,
        micro_batch=4,
        ig_batch_size=32,
        ig_max_len=4096,
        warmup_examples=0,
        grad_checkpointing=True,
        rollout_batch=64,
        eval_questions=0,
        eval_batch=64,
        save_every=10,
        out_dir="runs/paper",
    ),
}


def checked_fields(saved: dict, where: Path) -> dict:
    """config.json's fields, each known and of its field's type, else one line naming it."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    for name, value in saved.items():
        if name not in fields:
            raise InputError(f"{where}: unknown config field '{name}'")
        ok = isinstance(value, kinds[fields[name]])
        if not ok or (fields[name] != "bool" and isinstance(value, bool)):
            raise InputError(f"{where}: '{name}' is {value!r}, not of type {fields[name]}")
    return saved


def check_config(cfg: Config, world_size: int = 1) -> None:
    """Every rule on the config, in one place: a value out of range stops the run with one line
    naming the field and what it accepts."""
    c = cfg
    rules = [
        ("group_size", c.group_size >= 2, "an integer >= 2"),
        ("ig_alpha", c.ig_alpha >= 0, ">= 0"),
        ("topk", c.topk >= 1, "an integer >= 1"),
        ("max_searches", c.max_searches >= 0, ">= 0"),
        (
            "questions_per_step",
            c.questions_per_step >= max(1, world_size),
            f">= 1 and >= the {world_size} ranks",
        ),
        (
            "questions_per_step",
            not c.fsdp or c.questions_per_step % world_size == 0,
            f"a multiple of the {world_size} ranks with --fsdp",
        ),
        ("lora_rank", c.lora_rank >= 0, ">= 0 (0 = full fine-tuning)"),
        ("lora_rank", not (c.lora_rank and c.fsdp), "0 with --fsdp (LoRA runs in one process)"),
        ("lora_alpha", c.lora_alpha > 0, "> 0"),
        (
            "lora_alpha",
            not c.lora_rank or c.lora_alpha <= 256 * c.lora_rank,
            f"<= 256 x lora_rank = {256 * c.lora_rank} (B A is scaled by alpha / rank)",
        ),
        (
            "fsdp",
            not c.fsdp or world_size > 1,
            "False in one process: launch with torchrun --nproc_per_node K to shard",
        ),
        ("max_turn_tokens", c.max_turn_tokens >= 1, ">= 1"),
        ("ig_n_random", c.ig_n_random >= 1, ">= 1"),
        ("micro_batch", c.micro_batch >= 1, ">= 1"),
        ("ig_baseline", c.ig_baseline in ("random", "empty"), "random or empty"),
        ("ig_pool", c.ig_pool in ("batch", "others"), "batch or others"),
        (
            "warmup_query",
            c.warmup_query in ("question", "varied", "retry"),
            "question, varied or retry",
        ),
        ("task", c.task in TASKS, " or ".join(TASKS)),
        (
            "task",
            c.task == "plain" or not (c.train_data and (c.corpus or c.retriever_url)),
            "plain with your own --train_data and --corpus or --retriever_url (the task picks "
            "the offline question sets, which these replace)",
        ),
        ("step_reward", c.step_reward in ("ig", "hit"), "ig or hit"),
        ("precision", c.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
        ("template", c.template in TEMPLATES, " or ".join(TEMPLATES)),
        ("lr", c.lr > 0, "> 0"),
        ("temperature", c.temperature >= 0, ">= 0"),
        ("retriever_retries", c.retriever_retries >= 1, ">= 1"),
        ("retriever_timeout", c.retriever_timeout > 0, "> 0"),
        ("rollout_batch", c.rollout_batch >= 0, ">= 0"),
        ("val_questions", c.val_questions >= 0, ">= 0"),
        ("eval_every", c.eval_every >= 0, ">= 0"),
        ("steps", c.steps >= 0, ">= 0"),
        ("save_every", c.save_every >= 1, ">= 1"),
        ("html_every", c.html_every >= 0, ">= 0 (0 = off)"),
        ("max_bad_steps", c.max_bad_steps >= 1, ">= 1"),
        ("seed", c.seed >= 0, ">= 0"),
        ("doc_words", c.doc_words >= 0, ">= 0 (0 = whole passages)"),
        ("ig_clip", c.ig_clip >= 0, ">= 0 (0 = off)"),
        ("grad_clip", c.grad_clip > 0, "> 0"),
        ("kl_coef", c.kl_coef >= 0, ">= 0"),
        ("ig_neg_scale", c.ig_neg_scale >= 0, ">= 0"),
        ("ig_dead_zone", c.ig_dead_zone >= 0, ">= 0"),
        ("ig_head_weight", c.ig_head_weight > 0, "> 0"),
        ("ig_batch_size", c.ig_batch_size >= 1, ">= 1"),
        ("ig_max_len", c.ig_max_len >= 64, ">= 64 (a context and its answer must fit)"),
        ("eval_batch", c.eval_batch >= 1, ">= 1"),
        ("warmup_batch", c.warmup_batch >= 1, ">= 1"),
        ("warmup_examples", c.warmup_examples >= 0, ">= 0"),
        ("warmup_lr", c.warmup_lr > 0, "> 0"),
        ("eval_questions", c.eval_questions >= 0, ">= 0"),
        (
            "max_response_tokens",
            c.max_response_tokens >= c.max_turn_tokens,
            f">= max_turn_tokens ({c.max_turn_tokens})",
        ),
        ("out_dir", c.out_dir.strip() != "", "a folder path"),
    ]
    rules += [
        (f.name, math.isfinite(getattr(c, f.name)), "a finite number")
        for f in dataclasses.fields(c)
        if f.type == "float"
    ]
    for name, ok, accepted in rules:
        if not ok:
            raise InputError(
                f"config: {name}={getattr(cfg, name)!r} is out of range (accepted: {accepted})"
            )


def method_name(config: dict) -> str:
    """The name of a run's method (its table row), from its config: the method and every IG setting
    that departs from the paper's formulation."""
    if config.get("outcome_only") or config.get("ig_alpha") == 0:
        return "outcome-only"
    hit = config.get("step_reward") == "hit"  # not the paper's: alpha * [the documents hold a gold]
    marks = [
        ("empty baseline", config.get("ig_baseline") == "empty" and not hit),
        ("other questions' documents", config.get("ig_pool") == "others" and not hit),
        ("centred", config.get("ig_center")),
        (f"alpha {config.get('ig_alpha'):g}", config.get("ig_alpha", 0.3) != 0.3),
        (f"dead zone {config.get('ig_dead_zone'):g}", config.get("ig_dead_zone", 0) > 0),
        (f"neg x{config.get('ig_neg_scale'):g}", config.get("ig_neg_scale", 1) != 1),
        (f"clip {config.get('ig_clip'):g}", config.get("ig_clip", 0) > 0),
    ]
    marks = [m for m, on in marks if on]
    return ("hit bonus" if hit else "IG-Search") + (f" ({', '.join(marks)})" if marks else "")


def parse_bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
        text.lower()
    )
    if value is None:
        raise ValueError(text)
    return value


# what a resumed run cannot change: its folder and start, its seed (every RNG state is restored),
# the split and test set its earlier records were measured on, the warm-up it already did, the
# prompt template the weights were trained on, and what its adapter's weights mean (rank, alpha:
# the scale alpha / rank of B A, targets: the layers they belong to)
FIXED_ON_RESUME = (
    "model",
    "out_dir",
    "seed",
    "train_data",
    "test_data",
    "val_questions",
    "eval_questions",
    "eval_start",
    "warmup_examples",
    "warmup_lr",
    "warmup_batch",
    "warmup_query",
    "task",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "template",
)


def parse_config(argv: list[str] | None = None) -> tuple[Config, str, bool]:
    """--field value for every Config field, --preset NAME, --resume RUN_DIR, --restart
    -> (config, resume, restart)."""
    p = OneLineParser(
        description="Train a search policy with IG-Search; every Config field is a flag."
    )
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--resume", default="", help="run folder to continue from its checkpoint")
    p.add_argument(
        "--restart", action="store_true", help="start over in an out_dir that holds a run"
    )
    for f in dataclasses.fields(Config):
        if f.type == "bool":  # --flag, or --flag true/false
            p.add_argument(f"--{f.name}", nargs="?", const=True, default=None, type=parse_bool)
        else:
            p.add_argument(
                f"--{f.name}", default=None, type={"int": int, "float": float}.get(f.type, str)
            )
    args = p.parse_args(argv)
    values = dataclasses.asdict(Config())
    given = {k: v for k, v in vars(args).items() if k in values and v is not None}
    if args.resume:
        run = Path(args.resume)
        ckpt.refuse_model_folder(run, "--resume")
        if not (run / "config.json").exists():
            raise InputError(f"{run}: not a run folder (no config.json)")
        if not ckpt.last_checkpoint(run).exists():
            raise InputError(
                f"{run}: no checkpoint to resume from (the run stopped before its "
                f"first save): start it again without --resume"
            )
        saved = ckpt.read_json(run / "config.json")
        for name in FIXED_ON_RESUME:
            if name in given and given[name] != saved.get(name, given[name]):
                raise InputError(
                    f"--{name} cannot change on --resume (the run continues from "
                    f"{run}/checkpoint): start a new run to change it"
                )
        if args.preset != "default":
            raise InputError("--preset cannot be given with --resume (the run keeps its config)")
        values.update(checked_fields(saved, run / "config.json"))
    else:
        values.update(PRESETS[args.preset])
    values.update(given)
    return Config(**values), args.resume, args.restart


# Seconds per unit of work of the offline default on 2 quiet CPU cores, measured from one plain
# `python train.py`: the time estimate printed at the start of a run scales these.
CPU_SECONDS = {
    "setup": 20,
    "eval_untrained": 1.7,
    "warmup": 2.0,
    "eval_formatted": 1.0,
    "rollout": 3.85,
}


def estimate_seconds(cfg: Config) -> float:
    """The run's wall-clock on 2 CPU cores with the default model, from CPU_SECONDS."""
    c, n = CPU_SECONDS, cfg.eval_questions
    evals = n * (
        c["eval_untrained"] * cfg.eval_start
        + c["eval_formatted"] * ((cfg.warmup_examples > 0) + (cfg.steps > 0))
    )
    if cfg.eval_every:  # validation at step 0 (when this run made its start model), each K steps
        n_val = bool(cfg.eval_start or cfg.warmup_examples) + math.ceil(cfg.steps / cfg.eval_every)
        evals += n_val * cfg.val_questions * c["eval_formatted"]
    rl = cfg.steps * cfg.questions_per_step * cfg.group_size * c["rollout"]  # rollout + IG + update
    return c["setup"] + evals + cfg.warmup_examples * c["warmup"] + rl
