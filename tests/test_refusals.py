"""Bad input, fourth round (issue 49): a refused command changes nothing, an output never overwrites
an input or a model, a resumed run means what it meant, an index never serves a stale corpus, the
error path never crashes, bounded JSON nesting, flags that mean what they say."""

import json
import sys

import pytest
from test_bad_input import copy_run, one_line_error, snapshot
from test_reliability import train_args
from test_train import tiny_run_files  # noqa: F401 (a fixture)

import evaluate
import train
from machinery import loaders

LORA = {"lora_rank": 4, "lora_alpha": 8.0}

# ------------------------------------------------------------- 1. a refused command changes nothing


@pytest.fixture(scope="module")
def lora_run(tiny_run_files, tmp_path_factory):  # noqa: F811
    pytest.importorskip("peft")
    run = tmp_path_factory.mktemp("lora") / "run"
    assert train.main(train_args(tiny_run_files, run, 1, **LORA)) == 0
    return run


@pytest.mark.parametrize(
    "flag, value",
    [("--lora_targets", "q_proj,v_proj"), ("--lora_alpha", "64"), ("--template", "searchr1")],
)
def test_a_lora_resume_refused_for_a_new_adapter_setting_changes_no_file(
    lora_run, tmp_path, capsys, flag, value
):
    """Issue 49: a resume refused for new --lora_targets had rewritten config.json, so afterwards
    even a plain --resume failed the same way; --lora_alpha 64 silently doubled the trained
    adapter's weight delta and rewrote its adapter_config.json. Refused; nothing changes; a plain
    resume still works."""
    run = copy_run(lora_run, tmp_path)
    before = snapshot(run)
    code = train.main(["--resume", str(run), flag, value, "--steps", "2"])
    assert f"{flag} cannot change on --resume" in one_line_error(capsys, code)
    assert snapshot(run) == before
    assert train.main(["--resume", str(run), "--steps", "2"]) == 0


def test_an_adapter_saved_with_another_alpha_or_targets_is_refused(lora_run, tmp_path, capsys):
    """Issue 49: load_adapter compared only the rank with adapter_config.json; an adapter whose
    alpha or targets disagree with the run's config would be read with another meaning."""
    for key, value in (("lora_alpha", 64), ("target_modules", ["q_proj"])):
        (tmp_path / key).mkdir()
        run = copy_run(lora_run, tmp_path / key)
        path = run / "checkpoint" / "adapter" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
        before = snapshot(run)
        code = train.main(["--resume", str(run), "--steps", "2"])
        message = one_line_error(capsys, train_code(code, capsys))
        assert f"{path}: the adapter was trained with {key}" in message
        assert snapshot(run) == before
    (tmp_path / "broken").mkdir()
    run = copy_run(lora_run, tmp_path / "broken")
    (run / "checkpoint" / "adapter" / "adapter_config.json").write_text("{")
    code = train.main(["--resume", str(run), "--steps", "2"])
    assert "adapter_config.json: cannot read" in one_line_error(capsys, train_code(code, capsys))


def train_code(code: int, capsys) -> int:
    """Pass the code on, with stderr's loading bars (before the error line) dropped."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(("error", "Trace"))]
    sys.stderr.write("".join(line + "\n" for line in lines))
    return code


@pytest.mark.parametrize("why", ["no peft", "bad target"])
def test_a_refused_lora_start_leaves_no_config_json(
    tiny_run_files, tmp_path, capsys, monkeypatch, why
):  # noqa: F811
    """Issue 49: a start refused because peft is missing, or for a target the model does not have,
    left config.json behind; the retry was then told '--resume continues it' with no checkpoint."""
    run = tmp_path / "run"
    args = train_args(tiny_run_files, run, 1, **LORA)
    if why == "no peft":
        monkeypatch.setitem(sys.modules, "peft", None)
    else:
        pytest.importorskip("peft")
        args += ["--lora_targets", "q_proj,c_attn"]
    code = train.main(args)
    one_line_error(capsys, train_code(code, capsys))
    assert snapshot(run) == {}
    monkeypatch.undo()
    if why == "bad target":  # the retry with the typo fixed starts, it is not sent to --resume
        assert train.main(train_args(tiny_run_files, run, 1, **LORA)) == 0


def test_a_resume_refused_by_its_saved_state_changes_no_file(finished_run_copy, capsys):
    """A state.pt that does not fit the model (found by load_state, after the model is loaded) was
    found after config.json had been rewritten with the resume's new fields."""
    import torch

    run = finished_run_copy
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0]))
    torch.save(state, run / "checkpoint" / "state.pt")
    before = snapshot(run)
    code = train.main(["--resume", str(run), "--steps", "2", "--lr", "0.5"])
    assert "state.pt: does not fit this model" in one_line_error(capsys, train_code(code, capsys))
    assert snapshot(run) == before


@pytest.fixture
def finished_run_copy(tiny_run_files, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    assert train.main(train_args(tiny_run_files, run, 1)) == 0
    return run


# ------------------------------------------------ 2. an output never overwrites an input or a model


def test_train_never_takes_a_model_folder_for_a_run_folder(tiny_run_files, tmp_path, capsys):  # noqa: F811
    """Issue 49: --out_dir M on a model folder said '--restart starts it over', and following that
    advice replaced the model's config.json. A model folder is refused before anything is written
    (no .lock either), with --restart and --resume too."""
    model = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_run_files["model"], model)
    before = snapshot(model)
    for extra in ([], ["--restart"]):
        code = train.main(train_args({**tiny_run_files}, model, 1) + extra)
        assert "a model folder (config.json of a" in one_line_error(capsys, code)
    code = train.main(["--resume", str(model)])
    assert f"--resume {model}: a model folder" in one_line_error(capsys, code)
    assert snapshot(model) == before and not (model / ".lock").exists()


def test_evaluate_never_writes_over_its_inputs_or_a_model(
    tiny_run_files, finished_run_copy, tmp_path, capsys, monkeypatch
):  # noqa: F811
    """Issue 49: evaluate.py --out accepted the question file it reads, or a model folder's
    config.json, and overwrote it. Refused before the model is loaded; the file is untouched."""
    monkeypatch.setattr(loaders, "load_model", lambda *a, **k: pytest.fail("evaluated first"))
    files = tiny_run_files
    model = files["model"]
    run_config = str(finished_run_copy / "config.json")
    for flag, out, problem in (
        ("--out", files["train_data"], "is an input of this command"),
        ("--out", files["corpus"], "is an input of this command"),
        ("--out", f"{model}/config.json", "inside the model folder"),
        ("--out", f"{model}/new.json", "inside the model folder"),
        ("--out", run_config, "a run folder's own file"),
        ("--html", files["train_data"], "is an input of this command"),
    ):
        before = open(out, "rb").read() if out.endswith(("jsonl", "config.json")) else None
        argv = ["--model", model, "--data", files["train_data"], "--corpus", files["corpus"]]
        argv += [flag, out] + (["--question", "Who?", "--answer", "X"] if flag == "--html" else [])
        code = evaluate.main(argv)
        assert f"{flag} {out}: {problem}" in one_line_error(capsys, code)
        if before is not None:
            assert open(out, "rb").read() == before
