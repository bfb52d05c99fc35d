"""credit.py: the page of a training step shows the very tokens, masks, advantages and scores that
training computed, read back from the page with html.parser; hostile text stays text."""

from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from test_train import PASSAGES, tiny_config, tiny_run_files  # noqa: F401 (a fixture)

import igsearch as ig
import step as rl
import train
import warmup
from machinery import credit_page as credit
from machinery import fast
from train import Config


class PageReader(HTMLParser):
    """A page read back: per rollout its response as (id, mask, advantage or None) in order, the
    score tables of the search steps, every tag opened and closed, and the visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.rollouts, self.scores, self.opened, self.closed, self.text = [], [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.opened.append(tag)
        if "data-rollout" in a:
            self.rollouts.append(
                {"outcome": float(a["data-outcome"]), "ids": [], "mask": [], "adv": []}
            )
        if "data-id" in a:  # a generated token
            r = self.rollouts[-1]
            r["ids"].append(int(a["data-id"]))
            r["mask"].append(int(a["data-m"]))
            r["adv"].append(float(a["data-a"]))
        if "data-ids" in a:  # inserted text
            ids = [int(x) for x in a["data-ids"].split()]
            r = self.rollouts[-1]
            r["ids"] += ids
            r["mask"] += [int(a["data-m"])] * len(ids)
            r["adv"] += [None] * len(ids)
        if "data-scores" in a:
            self.scores.append([float(x) for x in a["data-scores"].split()])

    def handle_endtag(self, tag):
        self.closed.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def assert_page_shows(page: PageReader, trajs, tok_adv):
    """The page's tokens, masks and advantages are those of the tensors, rollout by rollout."""
    assert len(page.rollouts) == len(trajs)
    for r, t, a in zip(page.rollouts, trajs, tok_adv):
        assert r["ids"] == t.response_ids and r["mask"] == t.loss_mask
        trained = [p for p, m in enumerate(t.loss_mask) if m]
        assert [r["adv"][p] for p in trained] == pytest.approx(
            [float(a[p]) for p in trained], rel=1e-6, abs=1e-7
        )
        assert all(r["adv"][p] is None for p, m in enumerate(t.loss_mask) if not m)


def test_step_pages_show_what_the_update_used(
    tiny_run_files, tmp_path, monkeypatch, script_rollouts
):
    """A scripted policy that searches (different documents per question) then answers; the tiny
    model scores IG and trains. Pages come every html_every steps and for the last one, and show
    the advantages passed to update, the masks and ids of its trajectories, and the IG scores."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_run_files["model"])
    keys = [p[1].split()[-1] for p in PASSAGES]
    scripts = {
        k: [
            f"<think> hm </think> <search> {k.strip('.')} </search>",
            "<refine> ok </refine> <answer> Paris </answer>",
        ]
        for k in keys
    }
    real_update, seen = rl.update, []
    script_rollouts(tok, scripts)

    def spy_update(model, ref, tokenizer, trajs, tok_adv, optimizer, cfg, compute=None):
        seen.append((trajs, [a.clone() for a in tok_adv]))
        return real_update(model, ref, tokenizer, trajs, tok_adv, optimizer, cfg, compute)

    real_bonus, bonuses = rl.step_bonus, []

    def spy_bonus(*a, **kw):
        bonuses.append(real_bonus(*a, **kw))
        return bonuses[-1]

    monkeypatch.setattr(rl, "update", spy_update)
    monkeypatch.setattr(rl, "step_bonus", spy_bonus)
    run = tmp_path / "run"
    train.train(
        tiny_config(
            tiny_run_files,
            run,
            steps=3,
            html_every=2,
            questions_per_step=3,
            max_turn_tokens=24,
            warmup_examples=0,
        )
    )
    assert sorted(p.name for p in (run / "steps").iterdir()) == ["step-0002.html", "step-0003.html"]
    trajs, tok_adv = seen[-1]
    page = PageReader((run / "steps" / "step-0003.html").read_text())
    assert_page_shows(page, trajs, tok_adv)
    gains = [g for row in bonuses[-1].gains for g in row]
    assert gains and all(g is not None for g in gains)
    assert page.scores == [pytest.approx(g.scores, rel=1e-6) for g in gains]
    assert all(g.ig == pytest.approx(g.scores[0] - sum(g.scores[1:]) / 3) for g in gains)
    # IG reaches the query tokens: there the advantage differs from the rollout's outcome part
    bonus = [
        r["adv"][p] - r["outcome"]
        for r, t in zip(page.rollouts, trajs)
        for p in range(*t.steps[0].query_span)
    ]
    assert max(map(abs, bonus)) > 1e-4
    other = [
        r["adv"][p] - r["outcome"]
        for r, t in zip(page.rollouts, trajs)
        for p in range(len(t.response_ids))
        if t.loss_mask[p] and not t.steps[0].query_span[0] <= p < t.steps[0].query_span[1]
    ]
    assert max(map(abs, other)) < 1e-6  # elsewhere A_{i,p} = A_i
    # every rollout answered Paris: every group's outcome advantage is zero and the page says so
    assert page.opened.count("span") and "only IG teaches this group" in "".join(page.text)


def test_step_scores_are_the_scores_information_gain_computed(tokenizer, tiny_model, monkeypatch):
    """Gain.scores = [real, rand_1..rand_N] of the kept gold, as scored from the log-probs the
    scorer returned; the fast shared-prefix scorer gives the same."""
    from test_igsearch import TPL, ig_batch

    returned = []

    def recording(*a, **kw):
        returned.append(ig.answer_logprobs(*a, **kw))
        return returned[-1]

    trajs = ig_batch([True, False, False, True])
    golds = [["Berlin", "Paris"]] * 4
    draws = ig.plan_counterfactuals([ig.step_pairs(t) for t in trajs], 3, "random")
    kw = dict(template=TPL, all_golds=True, max_len=512)
    gains = ig.information_gain(
        tiny_model, tokenizer, trajs, golds, draws, logprobs=recording, **kw
    )
    scores = [[ig.answer_score(lp) for lp in row] for row in returned[0]]  # one row per gold
    kept = [max(scores[2 * i : 2 * i + 2], key=lambda s: s[0]) for i in range(4)]  # two golds
    assert [row[0].scores for row in gains] == kept
    shared = ig.information_gain(
        tiny_model,
        tokenizer,
        trajs,
        golds,
        draws,
        logprobs=fast.answer_logprobs_shared_prefix,
        **kw,
    )
    flat = lambda gains: [x for row in gains for x in row[0].scores]
    assert flat(shared) == pytest.approx(flat(gains), abs=1e-4)


HOSTILE = "<script>alert('x')</script></details></span><img src=x onerror=alert(1)>&amp;"


def test_hostile_text_shows_as_text(tokenizer):
    """Documents, questions and generated tokens holding markup are escaped: the page opens no
    script or image, every <details> closes where the page closes it, and the text reads as
    written."""
    trajs = []
    for k in range(2):
        t = warmup.supervised_trajectory(
            tokenizer,
            "Question?",
            [
                ("<think> <b>bold</b> </think> <search> q </search>", True),
                (ig.observation_text(f"Doc 1 {HOSTILE} {k}", ig.TEMPLATES["igsearch"]), False),
                ("<answer> Paris </answer>", True),
            ],
        )
        lo = len(
            tokenizer("<think> <b>bold</b> </think> <search> ", add_special_tokens=False).input_ids
        )
        t.steps.append(ig.Step("q" + HOSTILE, f"Doc 1 {HOSTILE} {k}", (lo, lo + 1)))
        trajs.append(t)
    questions = [{"question": "Who? " + HOSTILE, "golden_answers": ["Paris" + HOSTILE]}] * 2
    outcome = rl.rewards(trajs, [q["golden_answers"] for q in questions])
    outcome = outcome._replace(rewards=torch.tensor([1.0, 0.0]))  # one right, one wrong
    gains = [[ig.Gain(0.5, [-1.0, -1.5, -1.5, -1.5])] for _ in trajs]
    adv = rl.advantages(trajs, outcome.rewards, [[0.5], [0.5]], Config(group_size=2))
    tok_adv = adv.tokens
    html = credit.step_page(
        tokenizer,
        questions=questions,
        trajs=trajs,
        outcome=outcome,
        gains=gains,
        adv=adv,
        group_size=2,
        title="title " + HOSTILE,
        settings="settings " + HOSTILE,
    )
    page = PageReader(html)
    assert "script" not in page.opened and "img" not in page.opened
    assert page.opened.count("details") == page.closed.count("details") == 2
    assert page.opened.count("b") == page.closed.count("b")  # the generated <b> is no tag
    text = "".join(page.text)
    assert text.count(HOSTILE) >= 2 + 1  # both documents, the question (and more)
    assert "<b>bold</b>" in text
    assert_page_shows(page, trajs, tok_adv)


def test_token_texts_join_to_the_decoded_text(tokenizer):
    ids = tokenizer("Café 東京 <answer> x </answer>", add_special_tokens=False).input_ids
    pieces = credit.token_texts(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids)
    assert "\ufffd" not in "".join(pieces)  # a split multi-byte character shows once, whole


def test_question_page_from_a_checkpoint(tiny_run_files, tmp_path, capsys):
    """evaluate.py --html: G rollouts of one question, sampled and credited as training does; the
    three flags go together (one line, exit 2)."""
    import evaluate

    out = tmp_path / "q.html"
    files = [
        "--model",
        tiny_run_files["model"],
        "--corpus",
        tiny_run_files["corpus"],
        "--data",
        tiny_run_files["test_data"],
    ]
    assert (
        evaluate.main(
            [
                *files,
                "--html",
                str(out),
                "--question",
                "Which city is the capital of France?",
                "--answer",
                "Paris",
            ]
        )
        == 0
    )
    page = PageReader(out.read_text())
    assert len(page.rollouts) == Config().group_size and all(r["ids"] for r in page.rollouts)
    assert "Which city is the capital of France?" in "".join(page.text)
    capsys.readouterr()
    assert evaluate.main([*files, "--html", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--answer" in err and len(err.strip().splitlines()) == 1


def test_question_page_advantages_are_trainings(tiny_run_files, tokenizer, tiny_model, tmp_path):
    """The tensors question_page returns are those its page shows, and its rewards and group
    advantages follow train.py's rule."""
    import evaluate

    search = lambda qs: ['Doc 1(Title: "Paris") Paris is the capital of France.'] * len(qs)  # noqa
    path, (trajs, outcome, bonus, adv) = evaluate.question_page(
        tiny_model,
        tokenizer,
        search,
        tiny_run_files["model"],
        "Capital of France?",
        ["Paris"],
        tmp_path / "sub" / "q.html",
    )
    assert_page_shows(PageReader(Path(path).read_text()), trajs, adv.tokens)
    assert len(trajs) == Config().group_size
    assert torch.equal(adv.outcome, ig.group_advantages(outcome.rewards, Config().group_size))


def a_step(tokenizer, n_groups: int, group_size: int = 2) -> dict:
    """step_page's arguments for n_groups questions of group_size rollouts that search once (with
    multi-byte text in every part) and answer; the first rollout of each group is right."""
    trajs, questions = [], []
    for i in range(n_groups * group_size):
        t = warmup.supervised_trajectory(
            tokenizer,
            f"Question {i // group_size}: naïve 東京?",
            [
                ("<think> café 😀 </think> <search> q </search>", True),
                (ig.observation_text(f"Doc 1 Zürich {i} 東京", ig.TEMPLATES["igsearch"]), False),
                (f"<answer> Paris {i} </answer>", True),
            ],
        )
        lo = len(
            tokenizer("<think> café 😀 </think> <search> ", add_special_tokens=False).input_ids
        )
        t.steps.append(ig.Step("q", f"Doc 1 Zürich {i} 東京", (lo, lo + 1)))
        trajs.append(t)
        questions.append({"question": f"Question {i // group_size}?", "golden_answers": ["Paris"]})
    outcome = rl.rewards(trajs, [q["golden_answers"] for q in questions])
    rewards = torch.tensor([float(i % group_size == 0) for i in range(len(trajs))])
    outcome = outcome._replace(rewards=rewards)
    gains = [[ig.Gain(0.5, [-1.0, -1.5, -1.5, -1.5])] for _ in trajs]
    adv = rl.advantages(trajs, rewards, [[0.5]] * len(trajs), Config(group_size=group_size))
    return dict(
        questions=questions,
        trajs=trajs,
        outcome=outcome,
        gains=gains,
        adv=adv,
        group_size=group_size,
        title="a step",
        settings="settings",
    )


def test_a_page_over_its_bound_shows_whole_groups_and_says_how_many_it_left_out(tokenizer):
    """Issue 49, family 12: the page had no bound (148 bytes a generated token, ~0.5 GB for a step
    of the paper preset). Over max_bytes it shows the first groups whole, stays valid HTML (every
    tag it opens closed), and says near the top how many groups and rollouts it left out."""
    step = a_step(tokenizer, n_groups=6)
    whole = credit.step_page(tokenizer, **step)
    assert 'class="cut"' not in whole  # under the bound: every group, no notice
    bound = len(whole.encode()) // 2
    for max_bytes in (bound, len(whole.encode()) - 1, 12_000):
        html = credit.step_page(tokenizer, **step, max_bytes=max_bytes)
        assert len(html.encode()) <= max_bytes
        page = PageReader(html)
        for tag in ("details", "div", "span", "table", "p"):
            assert page.opened.count(tag) == page.closed.count(tag), tag
        shown = len(page.rollouts)
        assert shown % 2 == 0 and shown < 12  # whole groups of 2, some left out
        assert_page_shows(page, step["trajs"][:shown], step["adv"].tokens[:shown])
        left = 6 - shown // 2
        text = "".join(page.text)
        assert f"{left} of 6 groups ({12 - shown} of 12 rollouts) left out" in text
        assert f"under {max_bytes:,} bytes" in text
        assert html.index('class="cut"') < html.index('class="note"')  # near the top
    assert len(PageReader(credit.step_page(tokenizer, **step, max_bytes=bound)).rollouts) >= 4
    assert not PageReader(credit.step_page(tokenizer, **step, max_bytes=12_000)).rollouts


def test_the_step_page_file_is_bounded_by_max_page_bytes(tokenizer, tmp_path, monkeypatch):
    """train.py --html_every and evaluate.py --html write through write_step_page: the file on disk
    holds at most MAX_PAGE_BYTES bytes (32 MiB; here made small)."""
    step = a_step(tokenizer, n_groups=4)
    del step["group_size"], step["settings"]
    monkeypatch.setattr(credit, "MAX_PAGE_BYTES", 20_000)
    path = credit.write_step_page(tmp_path / "steps" / "p.html", tokenizer, **step, cfg=Config())
    assert 0 < path.stat().st_size <= 20_000
    assert "left out: a page is kept under 20,000 bytes" in "".join(
        PageReader(path.read_text()).text
    )


MULTIBYTE = "Café naïve 東京 Zürich 😀 <answer> ß </answer> ありがとう 🇫🇷 Ωmega "


def decode_counter(tokenizer, monkeypatch) -> list[int]:
    """tokenizer.decode spied on: the lengths of the id lists it was asked to decode."""
    real, lengths = tokenizer.decode, []

    def decode(ids, *a, **kw):
        lengths.append(len(ids))
        return real(ids, *a, **kw)

    monkeypatch.setattr(tokenizer, "decode", decode)
    return lengths


def test_token_texts_of_multibyte_text_equal_the_exact_pass(tokenizer):
    """Each token's text is that of the exact prefix-by-prefix pass: "" for a token that ends inside
    a character, the character on the token that completes it; the pieces join to the decode."""
    ids = tokenizer(MULTIBYTE * 6, add_special_tokens=False).input_ids
    pieces = credit.token_texts(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == MULTIBYTE * 6
    assert pieces == credit.exact_token_texts(tokenizer, ids)
    assert "" in pieces and "\ufffd" not in "".join(pieces)
    for n in (1, 2, 3, 17):  # a segment that ends inside a character keeps its U+FFFD, as decode
        assert "".join(credit.token_texts(tokenizer, ids[:n])) == tokenizer.decode(ids[:n])


def test_token_texts_work_is_linear_in_the_segment(tokenizer, monkeypatch):
    """Issue 49, family 12: token_texts decoded ids[:k+1] for every k, 2 million ids for a segment
    of 2,000 tokens (a paper-preset response holds up to 4,096). Now at most 20 ids a token."""
    ids = tokenizer(MULTIBYTE * 200, add_special_tokens=False).input_ids[:2000]
    assert len(ids) == 2000
    whole = tokenizer.decode(ids)
    lengths = decode_counter(tokenizer, monkeypatch)
    pieces = credit.token_texts(tokenizer, ids)
    assert "".join(pieces) == whole
    assert sum(lengths) <= 20 * len(ids)


class CapsLock:
    """A decoder with state further back than any window: ids 0-25 are a-z, id 26 switches upper
    case on or off for what follows."""

    def decode(self, ids):
        upper, out = False, []
        for i in ids:
            if i == 26:
                upper = not upper
            else:
                out.append(chr(97 + i).upper() if upper else chr(97 + i))
        return "".join(out)


def test_token_texts_fall_back_to_the_exact_pass_where_the_window_is_not_enough():
    """Where the windowed pieces do not join to the whole decode, token_texts takes the exact pass:
    correctness never depends on the tokenizer."""
    ids = [26] + list(range(26)) * 2 + [26] + list(range(5))
    pieces = credit.token_texts(CapsLock(), ids)
    assert "".join(pieces) == CapsLock().decode(ids)
    assert pieces == credit.exact_token_texts(CapsLock(), ids)
