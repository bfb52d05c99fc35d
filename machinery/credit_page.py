"""The page of one training step: where the update's credit goes, token by token.

    python train.py --html_every 5       # runs/default/steps/step-0005.html, step-0010.html, ...
    python evaluate.py --model runs/default/checkpoint --html page.html \\
        --question "What is this: Capital of Laos?" --answer Vientiane

The update multiplies each trained token's log-prob by its advantage

    A_{i,p} = A_i + alpha * IG~_t / |Q_t|    for p in Q_t (step t's query tokens), else A_i

and this page shows that number on every token of every rollout: the colour is A_{i,p}, the title
(hover) splits it into the outcome part A_i and the IG part, both read from the tensors the update
used (the IG part is A_{i,p} - A_i). Inserted documents are grey: loss mask 0, not trained. Each
search step shows its query, IG_t, the scores s(a*|C) of the real context and of each counterfactual
that IG_t came from, and whether its documents hold a gold answer. One static HTML file: inline CSS,
no script, every text escaped, at most MAX_PAGE_BYTES (whole groups while they fit, then a line that
says how many were left out).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import torch

from machinery.run_folder import write_text

POSITIVE, NEGATIVE = (33, 102, 172), (178, 24, 43)  # pushed up: blue; pushed down: red (RdBu ends)
MAX_PAGE_BYTES = 32 * 2**20  # a page shows whole groups up to this size and names those left out
NOTICE_BYTES = 1024  # room kept for the line that names them
CONTEXT = 8  # tokens decoded before each token to find its text (a character spans at most 4)

CSS = """
body { font: 15px/1.5 "DejaVu Sans", Verdana, sans-serif; color: #1a1a1a; background: #fff;
       max-width: 1150px; margin: 16px auto; padding: 0 12px; }
h1 { font-size: 22px; margin: 4px 0; } h2 { font-size: 17px; margin: 0 0 4px; }
.meta, .note { color: #444; font-size: 13px; } .note { margin: 4px 0 8px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; font-size: 13px;
          margin: 3px 0; }
.sw { display: inline-block; min-width: 54px; text-align: center; padding: 1px 3px;
      border: 1px solid #ccc; font-family: "DejaVu Sans Mono", monospace; }
.group { border: 1px solid #bbb; border-radius: 6px; margin: 18px 0; padding: 10px 12px; }
.cut { background: #fde0dd; border: 1px solid #b2182b; padding: 4px 8px; }
.badge { background: #fff3c4; border: 1px solid #d9b700; padding: 0 6px; border-radius: 4px; }
.rollout { border-top: 1px dashed #bbb; margin-top: 10px; padding-top: 6px; }
.rhead { font-size: 14px; margin-bottom: 4px; }
.resp { font: 13px/1.9 "DejaVu Sans Mono", monospace; white-space: pre-wrap;
        overflow-wrap: anywhere; }
.t { border-radius: 2px; }
.q { border-bottom: 3px solid #222; }  /* the query tokens Q_t; the colour: the IG part's sign */
.qp { border-bottom-color: rgb(33, 102, 172); } .qn { border-bottom-color: rgb(178, 24, 43); }
.obs { color: #8a8a8a; font-size: 12px; }
.step { font: 13px/1.5 "DejaVu Sans", Verdana, sans-serif; white-space: normal;
        background: #f4f4f4; border-left: 4px solid #888; margin: 4px 0; padding: 4px 8px; }
.step table { border-collapse: collapse; margin: 2px 0; }
.step td, .step th { border: 1px solid #ccc; padding: 0 6px; font-size: 12px; text-align: right; }
details > summary { cursor: pointer; color: #555; }
details .obs { white-space: pre-wrap; display: block; }
"""


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def num(x: float) -> str:
    """A number as a data-* attribute: enough digits to compare with the tensor it came from."""
    return f"{x:.7g}"


def colour(a: float, scale: float) -> str:
    """Diverging scale: white at 0, blue for A > 0, red for A < 0; the square root lets the small IG
    part of a query token show beside outcome advantages of order 1."""
    t = min(1.0, math.sqrt(abs(a) / scale)) if scale > 0 else 0.0
    end = POSITIVE if a > 0 else NEGATIVE
    r, g, b = (round(255 + (e - 255) * t * 0.8) for e in end)  # at most 80 %: text stays legible
    return f"#{r:02x}{g:02x}{b:02x}"


def exact_token_texts(tokenizer, ids: list[int]) -> list[str]:
    """token_texts from whole prefixes: decodes ids[: k + 1] for every k, so quadratic in len(ids);
    the fallback of token_texts for a tokenizer whose decoding needs more than CONTEXT tokens."""
    out, done = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[: k + 1])
        if text.endswith("\ufffd") and k + 1 < len(ids):
            out.append("")
            continue
        out.append(text[len(done) :])
        done = text
    return out


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token, joining to the decoded text of all of them: a token that ends inside
    a multi-byte character shows nothing, and the token that completes it shows the character.

    Each token is decoded after at most CONTEXT tokens of context, so the work is linear in
    len(ids); where the pieces do not join to tokenizer.decode(ids), the exact quadratic pass."""
    out, done = [], 0  # ids[:done] have their text in out
    for k in range(len(ids)):
        lo = max(0, done - CONTEXT)
        text = tokenizer.decode(ids[lo : k + 1])
        # a run of CONTEXT tokens ending in U+FFFD holds the character itself, not a split one
        if text.endswith("\ufffd") and k + 1 < len(ids) and k + 1 - done < CONTEXT:
            out.append("")  # ends inside a character: the token that completes it shows it
            continue
        before = tokenizer.decode(ids[lo:done]) if done > lo else ""
        if not text.startswith(before):
            return exact_token_texts(tokenizer, ids)
        out.append(text[len(before) :])
        done = k + 1
    if "".join(out) != tokenizer.decode(ids):
        return exact_token_texts(tokenizer, ids)
    return out


def observation_steps(traj) -> dict[int, int]:
    """Segment index -> the search step whose documents it inserted (the first inserted segment
    after the step's query)."""
    found, t = {}, 0
    for k, (start, _, generated, _) in enumerate(traj.segments):
        if t < len(traj.steps) and not generated and start >= traj.steps[t].query_span[1]:
            found[k], t = t, t + 1
    return found


def step_box(step, t: int, gain, ig_part: float, n_query: int, hit: bool, obs: str) -> str:
    """One search step (an igsearch.Step; gain: its igsearch.Gain or None): query, IG, the scores
    it came from, hit, and its folded documents."""
    if gain is None:
        igs = "IG not scored (no counterfactual, empty documents, or alpha = 0)"
    else:
        igs = (
            f"IG = <b>{gain.ig:+.3f}</b> nats &nbsp; credit per query token "
            f"&alpha;&middot;IG~/|Q| = <b>{ig_part:+.4f}</b> over |Q| = {n_query} tokens"
        )
    table = ""
    if gain is not None:
        head = "".join(f"<th>C rand {j}</th>" for j in range(1, len(gain.scores)))
        cells = "".join(f"<td>{s:.3f}</td>" for s in gain.scores)
        table = (
            f'<table data-scores="{" ".join(num(s) for s in gain.scores)}"><tr>'
            f"<th>s(a*|C)</th><th>C real</th>{head}</tr><tr><td>score</td>{cells}</tr>"
            f"</table>"
        )
    hit = "yes" if hit else "no"
    cut = f", {step.cut} tokens cut to the budget" if step.cut else ""
    return (
        f'<div class="step" data-step="{t}"><b>search step {t + 1}</b> &nbsp; query: '
        f"&laquo;{esc(step.query)}&raquo; &nbsp; {igs}{table}gold answer in the documents: "
        f"<b>{hit}</b><details><summary>documents inserted by the environment (loss mask 0, "
        f"not trained{cut})</summary>{obs}</details></div>"
    )


def rollout_html(
    tokenizer,
    traj,
    i: int,
    *,
    answer: str | None,
    hits: list[bool],
    gains: list,
    reward: float,
    a_i: float,
    tok_adv: torch.Tensor,
    scale: float,
) -> str:
    """One rollout as its tokens: trained ones coloured by A_{i,p}, inserted ones grey."""
    adv = tok_adv.tolist()
    query = {p for s in traj.steps for p in range(*s.query_span)}
    steps = observation_steps(traj)
    parts = []
    for k, (start, end, _, text) in enumerate(traj.segments):
        ids = traj.response_ids[start:end]
        mask = traj.loss_mask[start:end]
        if not any(mask):  # inserted text: one grey span, in its step's box when it is documents
            obs = (
                f'<span class="obs" data-ids="{" ".join(map(str, ids))}" data-m="0">'
                f"{esc(text)}</span>"
            )
            if k in steps:
                t = steps[k]
                lo, hi = traj.steps[t].query_span
                ig_part = adv[lo] - a_i if hi > lo else 0.0
                obs = step_box(traj.steps[t], t, gains[t], ig_part, hi - lo, hits[t], obs)
            parts.append(obs)
            continue
        for p, tok, m, piece in zip(range(start, end), ids, mask, token_texts(tokenizer, ids)):
            a = adv[p]
            cls = "t" if p not in query else "t q qp" if a > a_i else "t q qn" if a < a_i else "t q"
            title = f"A = {a:+.4f}: outcome A_i {a_i:+.4f} + IG part {a - a_i:+.4f}"
            parts.append(
                f'<span class="{cls}" data-id="{tok}" data-m="{m}" data-a="{num(a)}" '
                f'style="background:{colour(a, scale)}" title="{title}">{esc(piece)}'
                f"</span>"
            )
    answer = "no answer" if answer is None else f"&laquo;{esc(answer)}&raquo;"
    return (
        f'<div class="rollout" data-rollout="{i}" data-outcome="{num(a_i)}"><div class="rhead">'
        f"<b>rollout {i + 1}</b> &nbsp; answer {answer} &nbsp; reward R = {reward:g} &nbsp; "
        f"outcome advantage A_i = <b>{a_i:+.3f}</b> &nbsp; {len(traj.steps)} "
        f"search{'es' * (len(traj.steps) != 1)}, "
        f"{len(traj.response_ids)} tokens{' (truncated)' if traj.truncated else ''}</div>"
        f'<div class="resp">{"".join(parts)}</div></div>'
    )


def legend(scale: float) -> str:
    values = [-scale, -scale / 4, -scale / 16, 0.0, scale / 16, scale / 4, scale]
    swatches = "".join(
        f'<span class="sw" style="background:{colour(v, scale)}">{v:+.3g}</span>' for v in values
    )
    return (
        f'<div class="legend"><span>advantage A<sub>i,p</sub>: pushed down</span>{swatches}'
        f'<span>pushed up</span></div><div class="legend"><span class="sw q qp">query</span>'
        f"<span>underlined: the query tokens Q<sub>t</sub>, where IG enters; blue: IG raises "
        f'their advantage, red: lowers it</span></div><div class="legend">'
        f'<span class="sw obs">grey</span><span>inserted by the environment: loss mask 0, '
        f"not trained</span></div>"
    )


def group_html(tokenizer, *, g: int, group_size: int, questions, trajs, outcome, gains, adv, scale):
    """The box of the group whose rollouts start at index g: its question, golds, rewards (and the
    badge when its outcome advantages are all zero), then its rollouts."""
    rewards, tok_adv, a = outcome.rewards, adv.tokens, adv.outcome
    r = rewards[g : g + group_size].float()  # (G,)
    q = questions[g]
    zero = bool((a[g : g + group_size] == 0).all())
    scored = any(x is not None for row in gains[g : g + group_size] for x in row)
    badge = (
        ' &nbsp; <span class="badge">outcome advantage all zero: '
        f"{'only IG teaches' if scored else 'nothing trains'} this group</span>"
        if zero
        else ""
    )
    rolls = "".join(
        rollout_html(
            tokenizer,
            trajs[i],
            i,
            answer=outcome.answers[i],
            hits=outcome.hits[i],
            gains=gains[i],
            reward=float(rewards[i]),
            a_i=float(a[i]),
            tok_adv=tok_adv[i],
            scale=scale,
        )
        for i in range(g, min(g + group_size, len(trajs)))
    )
    return (
        f'<div class="group" data-zero="{int(zero)}"><h2>question {g // group_size + 1}: '
        f'{esc(q["question"])}</h2><div class="meta">gold: '
        f"{esc(' | '.join(q['golden_answers']))} &nbsp; rewards R = "
        f"{' '.join(f'{x:g}' for x in r.tolist())} &nbsp; mean {float(r.mean()):.3f} &nbsp; "
        f"std {float(r.std()) if len(r) > 1 else 0.0:.3f}{badge}</div>{rolls}</div>"
    )


def size(text: str) -> int:
    """Bytes in the file (pages are written as UTF-8)."""
    return len(text.encode("utf-8"))


def step_page(
    tokenizer,
    *,
    questions: list[dict],
    trajs: list,
    outcome,
    gains: list[list],
    adv,
    group_size: int,
    title: str,
    settings: str,
    max_bytes: int | None = None,
) -> str:
    """The page of one step, from step.py's phases: outcome (step.Outcome: R_i (B,), answers,
    hits), gains[i][t] (igsearch.Gain or None), adv (step.Advantages: A_i (B,) and the per-token
    advantages the update used, one (R_i,) tensor per trajectory); consecutive groups of
    group_size share a question. At most max_bytes (MAX_PAGE_BYTES when None): whole groups in
    order while they fit, and a line near the top naming how many were left out."""
    max_bytes = MAX_PAGE_BYTES if max_bytes is None else max_bytes
    rewards = outcome.rewards
    trained = [
        float(a[p]) for a, t in zip(adv.tokens, trajs) for p, m in enumerate(t.loss_mask) if m
    ]
    scale = max(abs(a) for a in trained) if any(trained) else 1.0  # all zero: any scale will do
    search_steps = [s for t in trajs for s in t.steps]
    igs = [x.ig for row in gains for x in row if x is not None]
    summary = (
        f"{len(trajs)} rollouts, mean reward {float(rewards.float().mean()):.3f}, "
        f"{len(search_steps)} search steps, {len(igs)} scored"
        + (f", mean IG {sum(igs) / len(igs):+.3f} nats" if igs else "")
    )
    how = (
        "Each token the update trains is coloured by its advantage A<sub>i,p</sub> "
        "= A<sub>i</sub> + &alpha;&middot;IG~<sub>t</sub>/|Q<sub>t</sub>| on the query tokens "
        "Q<sub>t</sub> (underlined), A<sub>i</sub> elsewhere; hover a token for its two parts. "
        "A<sub>i</sub> = (R<sub>i</sub> &minus; mean) / (std + &epsilon;) over the question's "
        "group. IG<sub>t</sub> = s(a*|C real) &minus; the mean of s(a*|C rand): the gold "
        "answer's mean log-prob after the real documents against other steps' documents."
    )
    head = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>Where the credit goes: {esc(title)}</h1><div class="meta">{esc(settings)}</div>'
        f'<div class="meta">{esc(summary)}</div>'
    )
    body = f'<p class="note">{how}</p>{legend(scale)}'
    tail = "</body></html>\n"
    room = max_bytes - size(head) - size(body) - size(tail) - NOTICE_BYTES
    if room < 0:
        raise ValueError(f"max_bytes {max_bytes} leaves no room for the page's header")
    groups, starts = [], range(0, len(trajs), group_size)
    for g in starts:  # one group past the bound is made, never the rest
        box = group_html(
            tokenizer,
            g=g,
            group_size=group_size,
            questions=questions,
            trajs=trajs,
            outcome=outcome,
            gains=gains,
            adv=adv,
            scale=scale,
        )
        room -= size(box)
        if room < 0:
            break
        groups.append(box)
    notice, left = "", len(starts) - len(groups)
    if left:
        shown = min(len(trajs), len(groups) * group_size)
        notice = (
            f'<p class="cut" data-left-out="{left}">{left} of {len(starts)} groups '
            f"({len(trajs) - shown} of {len(trajs)} rollouts) left out: a page is kept under "
            f"{max_bytes:,} bytes, and it shows the first {len(groups)} groups whole (the next "
            f"would have gone over). The summary above and the colour scale are of all "
            f"{len(trajs)} rollouts.</p>"
        )
    return f"{head}{notice}{body}{''.join(groups)}{tail}"


def settings_line(cfg) -> str:
    """The config fields that decide the credit, from the Config."""
    alpha = 0.0 if cfg.outcome_only else cfg.ig_alpha
    return (
        f"alpha {alpha:g}, N = {cfg.ig_n_random} counterfactuals ({cfg.ig_baseline}), "
        f"G = {cfg.group_size}, std normalisation {'on' if cfg.normalize_std else 'off'}, "
        f"IG shaping: dead zone {cfg.ig_dead_zone:g}, negative scale {cfg.ig_neg_scale:g}, "
        f"clip {cfg.ig_clip or 'off'}{', centred in groups' if cfg.ig_center else ''}"
    )


def write_step_page(
    path: str | Path,
    tokenizer,
    *,
    questions: list[dict],
    trajs: list,
    outcome,
    gains: list[list],
    adv,
    cfg,
    title: str,
) -> Path:
    """step_page for a Config, written atomically to path (its folder made); at most
    MAX_PAGE_BYTES."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = step_page(
        tokenizer,
        questions=questions,
        trajs=trajs,
        outcome=outcome,
        gains=gains,
        adv=adv,
        group_size=cfg.group_size,
        title=title,
        settings=settings_line(cfg),
    )
    write_text(path, page)
    return path
