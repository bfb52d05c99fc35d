"""bench.py's floor: the least work IG scoring needs, counted on a hand-made case."""
from bench import floor_rows


def test_floor_counts_the_shared_prefix_once_and_every_continuation():
    """A step's 1 + N contexts share [1, 2, 3]; the continuations and the answer are each counted
    once per context; the LM head is needed at the answer tokens only."""
    contexts = [[1, 2, 3, 4, 5], [1, 2, 3, 6], [1, 2, 3, 7, 8, 9],  # step 1: 1 + N = 3 contexts
                [5, 6], [5, 7]]  # step 2: shares [5]
    answers = [[10, 11]] * 3 + [[12]] * 2
    rows, heads = floor_rows(contexts, answers, [3, 2], max_len=100)
    assert rows == [[1, 2, 3], [4, 5, 10, 11], [6, 10, 11], [7, 8, 9, 10, 11], [5], [6, 12], [7, 12]]
    assert heads == [0, 2, 2, 2, 0, 1, 1]


def test_floor_after_left_truncation_and_with_nothing_shared():
    """Contexts are left-truncated as answer_scores does (context + answer <= max_len), which can leave
    nothing shared: then there is no prefix row."""
    rows, heads = floor_rows([[1, 2, 3, 4], [9, 2, 3, 5]], [[7]] * 2, [2], max_len=4)
    assert rows == [[2, 3], [4, 7], [5, 7]] and heads == [0, 1, 1]
    rows, heads = floor_rows([[1, 2], [3, 2]], [[7]] * 2, [2], max_len=100)
    assert rows == [[1, 2, 7], [3, 2, 7]] and heads == [1, 1]
