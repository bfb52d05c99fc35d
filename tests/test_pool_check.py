"""tools/pool_check.py: the figures it compares the two counterfactual pools by."""

import igsearch as ig
from tools import pool_check


def test_group_figures_rank_hits_against_their_group_and_spot_siblings():
    """Two questions of two rollouts, one search each: a hit below its group's mean IG is counted,
    and a counterfactual whose documents are a sibling's is flagged."""
    trajs = []
    for q, k in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        t = ig.Trajectory([1], "p")
        t.steps = [ig.Step("q", f"documents of question {q} rollout {k}", (0, 1))]
        trajs.append(t)
    gains = [[ig.Gain(1.0, [])], [ig.Gain(3.0, [])], [ig.Gain(2.0, [])], [None]]  # 4: not scored
    hits = [[True], [False], [True], [False]]
    sibling = ig.Evidence("documents of question 0 rollout 1", "")
    other = ig.Evidence("documents of question 1 rollout 0", "")
    draws = [[[sibling]], [[other]], [[other]], [[]]]
    rows = pool_check.group_figures(trajs, gains, hits, draws, group_size=2)
    assert rows == [(True, 1.0, 2.0, True), (False, 3.0, 2.0, False), (True, 2.0, 2.0, True)]
    line = pool_check.report("batch", rows)
    assert line.split()[:3] == ["batch", "3", "2"]  # steps, hits
    assert line.split()[3:] == ["+1.50", "+3.00", "0.50", "0.67"]  # one hit of two below its group
