"""Train a search policy with IG-Search: REINFORCE over groups of rollouts, IG on the queries.

    python train.py                        # offline default: SmolLM2-135M, wiki QA, BM25, 2 CPUs
    python train.py --preset paper         # the paper's setting (Qwen2.5-3B, GPU)
    python train.py --outcome_only         # the Search-R1 GRPO baseline (alpha = 0)
    python train.py --resume runs/default  # continue a run from its last checkpoint

The run: set up -> evaluate the start model -> format warm-up -> evaluate -> RL steps (step.py:
rollouts -> rewards and IG -> advantages -> update; then log, validate, checkpoint) -> evaluate.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import prepare
import step as rl
from config import Config, check_config, estimate_seconds, method_name, parse_config
from evaluate import evaluate, format_table, question_records
from machinery import credit_page, fast, lm, loaders, lora, memory_estimate, records
from machinery import distributed as dd
from machinery import run_folder as ckpt
from machinery.errors import InputError, RetrieverError, TrainingError
from retriever import make_search
from warmup import warmup

# ----------------------------------------------------------------------------------- set-up


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


@dataclass
class Setup:
    """Everything a run holds: config, folder, device, models, optimizer, data, retriever, RNGs."""

    cfg: Config
    run: Path
    device: torch.device
    model: torch.nn.Module  # the trained model (sharded with FSDP)
    policy: torch.nn.Module  # what samples, scores and is saved: the model, or its full copy
    tokenizer: object
    search: object
    train_q: list[dict]
    val_q: list[dict]  # rank 0 alone evaluates: [] on the others
    test_q: list[dict]
    gens: dict[str, torch.Generator]
    compute: rl.Compute  # plain or fast, fp32 or bf16: chosen once here
    ref_model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    table: dict = dataclasses.field(default_factory=dict)
    step: int = 0

    def save(self, step: int) -> None:
        ckpt.save_checkpoint(
            self.run,
            self.policy,
            self.tokenizer,
            self.model,
            self.optimizer,
            step,
            dataclasses.asdict(self.cfg),
            self.gens,
        )

    def sync_policy(self) -> None:
        """With FSDP, refresh the full copy that samples, scores and is saved (every rank)."""
        if self.policy is not self.model:
            dd.copy_full(self.model, self.policy)


def set_up(cfg: Config, resume: str, restart: bool = False) -> Setup:
    """The run's state: device, seeds, run folder, data, retriever, model and optimizer; for a
    resumed run, the checkpoint's weights, optimizer and RNG states. It evaluates and trains
    nothing: train() does, in order."""
    device, main = dd.setup(), dd.is_main()  # only rank 0 (main) prints and writes files
    check_config(cfg, dd.world_size())
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    gens = {
        "data": torch.Generator().manual_seed(cfg.seed),
        "ig": torch.Generator().manual_seed(cfg.seed + 1),
        "sample": torch.Generator(device=device).manual_seed(cfg.seed + 2 + 1000 * dd.rank()),
    }
    run = Path(resume or cfg.out_dir)
    table = run / "table.json"  # a resumed run's rows so far, read before any work
    table = ckpt.read_table(table) if resume and table.exists() else {}
    if main:  # the folder is this run's: locked, and never an older run's files (ckpt.claim_run)
        ckpt.claim_run(run, bool(resume), restart)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        if device.type == "cpu" and not cfg.model:
            print(
                f"estimate: ~{estimate_seconds(cfg) / 60:.0f} min on 2 CPU cores (measured "
                f"rates, config.CPU_SECONDS); each phase's bar shows its own ETA"
            )
    memory_estimate.check(
        cfg,
        str(ckpt.last_checkpoint(run)) if resume else cfg.model or prepare.default_model(),
        device,
        dd.world_size(),
        quiet=not main,
    )
    own_data = cfg.train_data and (cfg.corpus or cfg.retriever_url)
    data = {} if own_data else prepare.default_data(cfg.task)
    train_file = cfg.train_data or data["train"]
    train_q, val_q = loaders.split_validation(
        loaders.load_questions(train_file), cfg.val_questions if cfg.eval_every else 0
    )
    if not train_q:
        raise InputError(
            f"config: val_questions={cfg.val_questions} leaves no training questions "
            f"in {train_file}"
        )
    test_file = cfg.test_data or data.get("test", "")
    test_q = []
    if test_file and cfg.eval_questions:
        test_q = loaders.load_questions(test_file)[: cfg.eval_questions]
    search = make_search(
        cfg.corpus or data.get("corpus", ""),
        cfg.retriever_url,
        cfg.topk,
        cfg.doc_words or None,
        cfg.retriever_timeout,
        cfg.retriever_retries,
    )
    start_model = str(ckpt.last_checkpoint(run)) if resume and not cfg.lora_rank else cfg.model
    start_model = start_model or prepare.default_model()
    model, tokenizer = loaders.load_model(
        start_model, device, cfg.trust_remote_code, dtype=torch.float32
    )
    if cfg.lora_rank:  # the base stays the loaded model; a resumed run reloads only its adapter
        lora.add_adapter(
            model,
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.lora_targets,
            ckpt.last_checkpoint(run) if resume else None,
        )
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    policy = model
    if cfg.fsdp:
        policy = copy.deepcopy(model).eval().requires_grad_(False)
        dd.shard_model(model)
    elif cfg.fast:  # (FSDP's sharded gradients stay dense)
        fast.lean_backward(model)
    compute = rl.choose_compute(cfg.fast, device, lm.amp_dtype(cfg.precision, device))
    if main:
        amp = "bf16 autocast" if compute.amp_dtype else "fp32"
        print(f"precision: {amp} on {device} (--precision {cfg.precision}); weights fp32")
    s = Setup(
        cfg=cfg,
        run=run,
        device=device,
        model=model,
        policy=policy,
        tokenizer=tokenizer,
        search=search,
        train_q=train_q,
        val_q=val_q if main else [],
        test_q=test_q if main else [],
        gens=gens,
        compute=compute,
        table=table,
    )
    s.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if resume:
        s.step = ckpt.load_state(run, model, s.optimizer, gens)
        if dd.rank():  # the checkpoint holds rank 0's sampling state; the others must not repeat it
            gens["sample"].manual_seed(cfg.seed + 2 + 1000 * dd.rank() + s.step)
    if main:  # every input is checked (the adapter, the saved state too): a refusal changed nothing
        ckpt.start_run(run, dataclasses.asdict(cfg), bool(resume))  # config.json; --restart cleans
    if resume:
        kept = ckpt.load_metrics(run / "metrics.jsonl", s.step)  # drop records after the checkpoint
        if main:
            ckpt.write_lines(run / "metrics.jsonl", [json.dumps(r) for r in kept])
    return s


def frozen_copy(policy, device: torch.device):
    """The KL reference: a frozen copy of the model RL starts from (bf16 on CUDA is enough)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)


def reference_model(policy, cfg: Config, device: torch.device):
    """The KL penalty's start model: under LoRA the base with its adapter off (no second copy),
    else a frozen copy; None without a KL term."""
    if cfg.kl_coef == 0:
        return None
    return lora.AdapterOff(policy) if cfg.lora_rank else frozen_copy(policy, device)


# ------------------------------------------------------------------------------------ train


def evaluate_on(s: Setup, questions: list[dict], desc: str, save_as: str = "") -> dict:
    """Greedy EM of the policy on held-out questions (rank 0 alone holds them), with the run's
    rollout settings and Compute; save_as: a file of the run folder for one record a question."""
    summary, answered = evaluate(
        s.policy, s.tokenizer, questions, s.search, s.cfg, s.compute, desc=desc
    )
    if save_as:
        ckpt.write_lines(s.run / save_as, [json.dumps(r) for r in question_records(answered)])
    return summary


def validate(s: Setup, step: int) -> dict:
    """Validation after `step` RL steps: a point of the held-out learning curve."""
    return {f"val_{k}": v for k, v in evaluate_on(s, s.val_q, f"validate {step}").items()}


def log_step(s: Setup, step: int, qs, trajs, outcome, bonus, adv, stats, times) -> dict:
    """The step's record (machinery/records.py) over the global batch; rank 0 appends it to
    metrics.jsonl, prints it and, every html_every steps, writes the step's credit page."""
    mine = [
        records.rollout_stats(
            traj=t,
            reward=r,
            answered=a is not None,
            hits=h,
            igs=[g and g.ig for g in gains],
            entropy=e,
            token_adv=ta,
            a_i=a_i,
        )
        for t, r, a, h, gains, e, ta, a_i in zip(
            trajs,
            outcome.rewards.tolist(),
            outcome.answers,
            outcome.hits,
            bonus.gains,
            stats["token_entropy"],
            adv.tokens,
            adv.outcome.tolist(),
        )
    ]
    rec = records.step_record(
        step=step,
        rollouts=mine,
        group_size=s.cfg.group_size,
        stats=stats,
        times=times,
        device=s.device,
    )
    if s.val_q and ((step + 1) % s.cfg.eval_every == 0 or step + 1 == s.cfg.steps):
        rec.update(validate(s, step + 1))
    if dd.is_main():
        ckpt.append_record(s.run / "metrics.jsonl", rec)
        tqdm.write(
            " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
        )
        if s.cfg.html_every and ((step + 1) % s.cfg.html_every == 0 or step + 1 == s.cfg.steps):
            title = f"{s.run}: step {step + 1}" + (", rank 0's share" * (dd.world_size() > 1))
            credit_page.write_step_page(
                s.run / "steps" / f"step-{step + 1:04d}.html",
                s.tokenizer,
                questions=qs,
                trajs=trajs,
                outcome=outcome,
                gains=bonus.gains,
                adv=adv,
                cfg=s.cfg,
                title=title,
            )
    return rec


# ------------------------------------------------------------------------------------ train


def train(cfg: Config, resume: str = "", restart: bool = False) -> dict:
    """The run: evaluate -> warm-up -> evaluate -> RL steps -> evaluate. Returns the test table."""
    s = set_up(cfg, resume, restart)
    main = dd.is_main()
    if not resume:
        # ---- the start model on the test questions; the format warm-up; the warmed-up model on
        #      the test questions and on validation (step 0 of the learning curve)
        if s.test_q and cfg.eval_start:
            s.table["start model"] = evaluate_on(s, s.test_q, "eval start", "questions-start.jsonl")
        if cfg.warmup_examples:
            warmup(s.model, s.tokenizer, s.train_q, s.search, cfg, s.compute, s.gens["data"])
            s.sync_policy()
            if s.test_q:
                s.table["after warm-up"] = evaluate_on(
                    s, s.test_q, "eval warm-up", "questions-warmup.jsonl"
                )
        if s.table:
            ckpt.write_json(s.run / "table.json", s.table)
        if s.val_q and (cfg.eval_start or cfg.warmup_examples):  # this run made its start model
            ckpt.write_lines(s.run / "metrics.jsonl", [json.dumps({"step": 0, **validate(s, 0)})])
    s.ref_model = reference_model(s.policy, cfg, s.device)
    bad_steps = 0
    for step in tqdm(
        range(s.step, cfg.steps), desc="train", initial=s.step, total=cfg.steps, disable=not main
    ):
        # ---- 1. rollouts: G of each of the step's questions
        t0 = time.time()
        qs = rl.sample_questions(s.train_q, cfg, s.gens["data"])
        s.policy.eval()
        try:
            trajs = rl.generate_rollouts(
                s.policy, s.tokenizer, qs, s.search, cfg, s.gens["sample"], s.compute
            )
        except RetrieverError:  # keep the work so far, then stop with the retriever's message
            if not cfg.fsdp:  # (FSDP's state gathering needs every rank, which may not be here)
                s.save(step)
            raise
        t1 = time.time()
        # ---- 2. rewards and IG: R_i = EM, and the bonus of every search step (IG_t)
        golds = [q["golden_answers"] for q in qs]
        outcome = rl.rewards(trajs, golds)
        bonus = rl.step_bonus(
            s.policy, s.tokenizer, trajs, golds, outcome, cfg, s.gens["ig"], s.compute
        )
        t2 = time.time()
        # ---- 3. advantages: the group baseline, plus alpha * IG~_t / |Q_t| on the query tokens
        adv = rl.advantages(trajs, outcome.rewards, bonus.bonus, cfg)
        # ---- 4. one on-policy REINFORCE update
        stats = rl.update(
            s.model, s.ref_model, s.tokenizer, trajs, adv.tokens, s.optimizer, cfg, s.compute
        )
        s.sync_policy()
        t3 = time.time()
        # ---- 5. log (over the global batch), validate, checkpoint
        times = records.PhaseTimes(rollout=t1 - t0, ig=t2 - t1, update=t3 - t2)
        log_step(s, step, qs, trajs, outcome, bonus, adv, stats, times)
        bad_steps = bad_steps + 1 if stats["skipped"] else 0
        problem = records.step_problem(s.policy, stats, skipped_ok=True)
        if bad_steps >= cfg.max_bad_steps or problem:  # never saved: the checkpoint predates it
            raise TrainingError(
                f"{s.run}: stopped at step {step + 1}: "
                + (problem or f"{bad_steps} steps in a row had a non-finite loss or gradient")
                + f"; {ckpt.kept_checkpoint(s.run, 'before them')}"
            )
        if not bad_steps and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            s.save(step + 1)
    if cfg.steps == 0:  # a warm-up-only run: keep the warmed-up model as the run's checkpoint
        s.save(0)
    # ---- the trained model on the test questions
    if s.test_q and cfg.steps > 0:
        s.table[method_name(dataclasses.asdict(cfg))] = evaluate_on(
            s, s.test_q, "eval trained", "questions.jsonl"
        )
        ckpt.write_json(s.run / "table.json", s.table)
        print(format_table(s.table, average=False, first="model"))  # rows: one test set
    dd.barrier()  # ranks leave together, once rank 0's checkpoint and table are written
    return s.table


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume, restart = parse_config(argv)
        train(cfg, resume, restart)
    except (InputError, RetrieverError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ckpt.release_run()
        dd.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
