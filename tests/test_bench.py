"""bench.py's floor: the least work IG scoring needs, counted on a hand-made case."""

from bench import floor_rows


def test_floor_counts_each_trunk_once_and_every_continuation():
    """A step's 1 + N contexts share [1, 2, 3]; as one group per step the prefix is a trunk row, the
    continuations and the answer are counted once per context; as one group per rollout, step 2 (which
    holds step 1's real blocks) reads them from the same trunk. The LM head is needed at the answers only."""
    contexts = [
        [1, 2, 3, 4, 5],
        [1, 2, 3, 6],
        [1, 2, 3, 7, 8],  # step 1: 1 + N = 3 contexts, real first
        [1, 2, 3, 4, 5, 9, 20],
        [1, 2, 3, 4, 5, 9, 21, 22],
    ]  # step 2: real, one random
    answers = [[10, 11]] * 3 + [[12]] * 2
    rows, heads = floor_rows(contexts, answers, [3, 2], max_len=100)
    assert rows == [
        [1, 2, 3, 4],
        [5, 10, 11],
        [6, 10, 11],
        [7, 8, 10, 11],  # a context keeps its last token
        [1, 2, 3, 4, 5, 9, 21],
        [20, 12],
        [22, 12],
    ]
    assert heads == [0, 2, 2, 2, 0, 1, 1]
    rows, heads = floor_rows(contexts, answers, [5], max_len=100)
    assert rows == [
        [1, 2, 3, 4, 5, 9, 21],
        [5, 10, 11],
        [6, 10, 11],
        [7, 8, 10, 11],
        [20, 12],
        [22, 12],
    ]
    assert heads == [0, 2, 2, 2, 1, 1]
    assert sum(map(len, rows)) < sum(
        map(len, floor_rows(contexts, answers, [3, 2], max_len=100)[0])
    )


def test_floor_after_left_truncation_and_with_nothing_shared():
    """Contexts are left-truncated as answer_scores does (context + answer <= max_len), which can leave
    nothing shared but the trunk's own context."""
    rows, heads = floor_rows([[1, 2, 3, 4], [9, 2, 3, 5]], [[7]] * 2, [2], max_len=4)
    assert rows == [[2, 3], [4, 7], [5, 7]] and heads == [0, 1, 1]
    rows, heads = floor_rows([[1, 2], [3, 2]], [[7]] * 2, [2], max_len=100)
    assert rows == [[1], [2, 7], [3, 2, 7]] and heads == [
        0,
        1,
        1,
    ]  # the trunk's own context still shares
