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


@pytest.mark.parametrize("rows, ylabel", [(DEMO_ROWS, "exact match"), (  # not scored (--task-score none): task CE
    [sweep_row("base", None, 0.0, 0, ce=1.6), sweep_row("plain", None, 0.2, ce=0.43),
     sweep_row("kd", None, 0.05, ce=0.44)], "task CE")])
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


def test_the_report_names_each_failed_run_and_its_error(tmp_path):
    failure = {"stage": "train", "error": "step 3: loss is nan; stopped. The last good checkpoint is none; lower --lr"}
    rows = [*DEMO_ROWS, {"name": "lr=10", "kd_lambda": 1.0, "rehearsal_ratio": 0.3, "kd_on": "rehearsal",
                         "eval": None, "train_seconds": None, "curve": [], "failed": failure}]
    rec = recommend(rows, 0.1)
    write_report(tmp_path, rows, rec, command="pipeline sweep ...")
    text = (tmp_path / "report.md").read_text()
    assert f"* `lr=10` (train): {failure['error']}" in text and "--retry-failed" in text
    assert "| lr=10 | 1.00 | 0.30 | rehearsal | failed (see above) |" in text
    assert rec.name == "kd_lambda=1,kd_on=rehearsal" and "Not considered, as failed: lr=10." in text


def test_a_single_run_report_gives_its_figures_against_the_base(tmp_path):
    """`pipeline run` trains one run: the report says what it learned and forgot against the base, and recommends
    nothing (there is nothing to choose between)."""
    rows = [sweep_row("base", 0.0, 0.0, 0, n=40), sweep_row("train", 0.5, 0.008, n=40)]
    write_report(tmp_path, rows, recommend(rows), command="pipeline run ...")
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Report\n\n**`train`** (adapter: `recommended/adapter`): task exact match 0.500 ± 0.079 "
                           "(base 0.000); forgetting KL 0.0080 against the base")
    assert "Recommended" not in text and "Warning" not in text and "| train |" in text
    # With a second run it is a sweep again.
    rows.append(sweep_row("other", 0.4, 0.001, n=40))
    write_report(tmp_path, rows, recommend(rows), command="pipeline sweep ...")
    assert (tmp_path / "report.md").read_text().startswith("# Sweep report\n\n**Recommended: `other`**")
