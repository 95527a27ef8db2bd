"""pipeline/report.py: the sweep's report table and trade-off plot, on made-up rows (no model, no training)."""

from __future__ import annotations

import pytest

from pipeline.recommend import recommend
from pipeline.report import draw_tradeoff, pareto_front, write_report
from tests.helpers import (
    DEMO_ROWS,
    sweep_row,
)


def test_report_opens_with_the_recommendation(tmp_path):
    rec = recommend(DEMO_ROWS, 0.1)
    write_report(tmp_path, DEMO_ROWS, rec, command="pipeline sweep ...")
    text = (tmp_path / "report.md").read_text()
    first = text.split("\n\n")[1]
    assert first.startswith("**Recommended: `kd_lambda=1,kd_on=rehearsal`**") and "forgets least" in first
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    for column in ("task exact match ± error", "task CE", "forgetting KL (full vocab)", "top-1 agreement",
                   "KL top-k (lower bound)", "general CE", "train time (s)"):
        assert column in header
    assert "| kd_lambda=0 | 0.00 | 0.30 | - | 0.460 ± 0.050 | 0.1200 | 0.0368 | 0.900 | 0.0184 |" in text  # lambda 0
    assert "No curves.png" in text


def test_kd_on_is_shown_only_where_a_kl_term_trains():
    from pipeline.report import kd_on_cell

    assert kd_on_cell({"kd_lambda": 0.0, "kd_on": "rehearsal"}) == "-"  # plain QLoRA under the default kd_on
    assert kd_on_cell({"kd_lambda": 1.0, "kd_on": "rehearsal"}) == "rehearsal"
    assert kd_on_cell({"kd_lambda": 0.5, "kd_on": "all"}) == "all"
    assert kd_on_cell({"kd_lambda": 0.0, "kd_on": "rehearsal", "max_forgetting": 0.01}) == "rehearsal"  # lambda grows
    assert kd_on_cell({"name": "base", "kd_lambda": None, "kd_on": None}) == "-"


def test_pareto_front():
    points = [("base", 0.0, 0.0), ("a", 0.01, 0.1), ("b", 0.02, 0.05), ("c", 0.04, 0.44), ("d", 0.3, 0.53),
              ("e", 0.3, 0.40)]
    assert pareto_front(points, higher_is_better=True) == ["base", "a", "c", "d"]
    ce = [(n, kl, 1 - y) for n, kl, y in points]
    assert pareto_front(ce, higher_is_better=False) == ["base", "a", "c", "d"]


@pytest.mark.parametrize("rows, ylabel", [(DEMO_ROWS, "exact match"), (
    [sweep_row("base", 0.0, 0.0, 0, ce=1.6), sweep_row("plain", 0.0, 0.2, ce=0.43),
     sweep_row("kd", 0.0, 0.05, ce=0.44)], "task CE")])
def test_the_ring_sits_on_the_picked_run(rows, ylabel):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = recommend(rows, 0.1)
    fig, ax = plt.subplots()
    assert draw_tradeoff(ax, rows, rec) == rec.name
    rings = [c for c in ax.collections if c.get_gid() == "recommended"]
    assert len(rings) == 1
    labels = {a.get_text(): a.xy for a in ax.texts}
    assert tuple(rings[0].get_offsets()[0]) == pytest.approx(labels[rec.name])
    assert ylabel in ax.get_ylabel()
    plt.close(fig)
