"""The tables a run prints: exact match per question set, and EM in the paper's layout beside the
rows quoted from the IG-Search paper (its 7 benchmarks, by their FlashRAG file names)."""

from __future__ import annotations

# the paper's 7 benchmarks (FlashRAG's names: the test split, else dev), in its table's order
BENCHMARKS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")


def format_table(rows: dict[str, dict], average: bool = True, first: str = "dataset") -> str:
    """Dataset | n | EM | F1 | searches | valid | hit, with an average row when there are several
    datasets.

    hit: the share of search steps whose documents hold a gold answer (query quality)."""
    lines = [f"{first:<24}{'n':>6}{'EM':>8}{'F1':>8}{'search/q':>10}{'valid':>8}{'hit':>8}"]
    rows = dict(rows)
    if average and len(rows) > 1:
        keys = ("em", "f1", "searches", "valid", "hit")
        rows["average"] = {
            "n": sum(r["n"] for r in rows.values()),
            **{k: sum(r[k] for r in rows.values()) / len(rows) for k in keys},
        }
    for name, r in rows.items():
        # tables written before hit was measured
        hit = f"{r['hit']:>8.2f}" if "hit" in r else f"{'-':>8}"
        lines.append(
            f"{name:<24}{r['n']:>6}{r['em']:>8.3f}{r['f1']:>8.3f}{r['searches']:>10.2f}{r['valid']:>8.2f}{hit}"
        )
    return "\n".join(lines)


# Exact match of Qwen2.5-3B rows, quoted from the IG-Search paper (arXiv 2604.15148), in the order
# of BENCHMARKS, then the average. None: a cell the paper's table does not give for that row.
PAPER_EM = {
    "Direct inference": (0.106, 0.288, 0.108, 0.149, 0.244, 0.020, 0.024, 0.134),
    "RAG": (0.348, 0.544, 0.387, 0.255, 0.226, 0.047, 0.080, 0.270),
    "Search-R1 base GRPO": (0.421, 0.583, 0.413, 0.297, 0.274, 0.066, 0.128, 0.312),
    "AutoRefine base": (0.467, 0.620, 0.450, 0.405, 0.393, 0.157, 0.344, 0.405),
    "MR-Search base": (0.477, 0.635, 0.460, 0.419, 0.401, 0.165, 0.344, 0.414),
    "GiGPO instruct": (0.420, 0.595, 0.424, 0.369, 0.370, 0.126, 0.641, 0.421),
    "IG-Search base": (None, None, None, None, None, None, 0.424, 0.430),
}
PAPER_COLUMNS = ("NQ", "TriviaQA", "PopQA", "HotpotQA", "2wiki", "MuSiQue", "Bamboogle", "avg")


def format_paper_table(rows: dict[str, dict], name: str = "this evaluation") -> str | None:
    """EM in the paper's layout (7 benchmarks and the average), our row above the paper's rows.

    rows: dataset name (file stem) -> summary with "em". None unless every name is one of the seven
    benchmarks (BENCHMARKS); a benchmark not evaluated is left blank, and our average is
    then over the ones evaluated (marked *).
    """
    if not rows or any(k not in BENCHMARKS for k in rows):
        return None
    ours = [rows[b]["em"] if b in rows else None for b in BENCHMARKS]
    done = [v for v in ours if v is not None]
    cell = lambda v: f"{'':>10}" if v is None else f"{v:>10.3f}"
    line = lambda label, values: f"{label[:24]:<24}" + "".join(cell(v) for v in values)
    out = [
        "EM in the paper's layout: our row (this model, retriever and top-k), then rows quoted "
        "from the paper",
        f"{'method':<24}" + "".join(f"{c:>10}" for c in PAPER_COLUMNS),
        line(name, ours + [sum(done) / len(done)]) + ("" if len(done) == len(ours) else " *"),
        "quoted from the paper (Qwen2.5-3B, E5 over wiki-18, top-3):",
    ]
    out += [line(method, list(values)) for method, values in PAPER_EM.items()]
    if len(done) < len(ours):
        out.append(
            f"* our average is over the {len(done)} benchmarks evaluated; the paper's is over all 7"
        )
    return "\n".join(out)
