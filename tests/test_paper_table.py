"""evaluate.format_paper_table: our EM beside the paper's Qwen2.5-3B rows, on fake rows."""

import pytest

import evaluate
import prepare
from machinery import tables


def fake_rows(names):
    return {
        name: {"n": 10, "em": 0.1 * (i + 1), "f1": 0.0, "searches": 1.0, "valid": 1.0}
        for i, name in enumerate(names)
    }


def test_seven_benchmarks_print_in_the_paper_layout_beside_the_quoted_rows():
    table = evaluate.format_paper_table(fake_rows(prepare.BENCHMARKS), "my-checkpoint")
    lines = table.splitlines()
    assert lines[1].split() == ["method", *tables.PAPER_COLUMNS]
    ours = lines[2].split()
    assert ours[0] == "my-checkpoint" and [float(v) for v in ours[1:]] == pytest.approx(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.4]
    )
    assert "quoted from the paper" in lines[3]
    quoted = {line[:24].strip(): line[24:].split() for line in lines[4:]}
    assert quoted["Search-R1 base GRPO"] == [
        "0.421",
        "0.583",
        "0.413",
        "0.297",
        "0.274",
        "0.066",
        "0.128",
        "0.312",
    ]
    assert quoted["IG-Search base"] == ["0.424", "0.430"]  # the cells the paper's table gives
    assert set(quoted) == set(tables.PAPER_EM)
    assert all(len(v) == 8 for v in tables.PAPER_EM.values())


def test_some_benchmarks_leave_blanks_and_say_what_the_average_covers():
    table = evaluate.format_paper_table(fake_rows(["nq", "bamboogle"]))
    ours = table.splitlines()[2]
    assert ours.split()[2:] == ["0.100", "0.200", "0.150", "*"]  # "this evaluation", then the cells
    assert ours.index("0.200") == ours.index("0.100") + 6 * 10  # bamboogle stays in its own column
    assert "over the 2 benchmarks evaluated" in table


def test_other_file_names_give_no_paper_table():
    assert evaluate.format_paper_table(fake_rows(["nq", "my_questions"])) is None
    assert evaluate.format_paper_table({}) is None
