"""pipeline/recommend.py: which run of a sweep to use, on made-up rows (no model, no training)."""

from __future__ import annotations

import math

import pytest

from pipeline.recommend import recommend, sampling_error
from pipeline.report import report_table
from tests.helpers import (
    DEMO_ROWS,
    sweep_row,
)


@pytest.mark.parametrize("tolerance, pick, candidates", [
    (0.02, "plain-qlora", ["plain-qlora"]),                                      # nothing else within 2 points
    (0.07, "kd_lambda=0", ["kd_lambda=0", "plain-qlora"]),                       # 0.53 - 0.46 = 0.07: on the edge
    (0.0699, "plain-qlora", ["plain-qlora"]),                                    # just inside the edge: left out
    (0.10, "kd_lambda=1,kd_on=rehearsal", ["kd_lambda=1,kd_on=rehearsal", "kd_lambda=0", "plain-qlora"]),
    (1.0, "kd_lambda=1", ["kd_lambda=1", "kd_lambda=1,kd_on=rehearsal", "kd_lambda=0", "plain-qlora"]),  # never base
])
def test_recommend_picks_least_forgetting_within_tolerance(tolerance, pick, candidates):
    rec = recommend(DEMO_ROWS, tolerance)
    assert (rec.name, rec.candidates, rec.rule, rec.fallback) == (pick, candidates, "task_score", None)
    assert rec.figures["forgetting_kl"] == next(r["eval"]["forgetting"]["kl"] for r in DEMO_ROWS if r["name"] == pick)
    assert pick in rec.reason


def test_float_edge_counts_as_within():
    # 0.50 - 0.48 is 0.020000000000000018 in floats; the run exactly at the tolerance is a candidate.
    rows = [sweep_row("a", 0.50, 0.20), sweep_row("b", 0.48, 0.05)]
    assert recommend(rows, 0.02).name == "b"
    assert recommend(rows, 0.0199).name == "a"


def test_tie_on_forgetting_goes_to_the_cheaper_run():
    rows = [sweep_row("slow", 0.50, 0.05, seconds=200), sweep_row("fast", 0.50, 0.05, seconds=120),
            sweep_row("forgets", 0.51, 0.3, 50)]
    rec = recommend(rows, 0.02)
    assert rec.name == "fast" and "ties on forgetting with slow" in rec.reason
    rows[0]["train_seconds"] = 100
    assert recommend(rows, 0.02).name == "slow"
    assert recommend(list(reversed(rows)), 0.02).name == "slow"  # not the order of the rows


def test_task_ce_fallback_when_the_score_does_not_separate_the_runs():
    rows = [sweep_row("base", 0.0, 0.0, 0, ce=1.60), sweep_row("plain", 0.0, 0.20, ce=0.43),
            sweep_row("kd-reh", 0.0, 0.05, ce=0.44), sweep_row("kd-all", 0.0, 0.01, ce=0.64)]
    rec = recommend(rows, 0.05)  # relative: CE up to 0.43 * 1.05 = 0.4515
    assert (rec.name, rec.rule, rec.tolerance_kind, rec.candidates) == ("kd-reh", "task_ce", "relative",
                                                                         ["kd-reh", "plain"])
    assert "does not separate the runs (all 0.000)" in rec.fallback and "task CE" in rec.fallback
    assert rec.fallback.count(".") == rec.fallback.count("0.000") + 1  # one sentence
    assert recommend(rows, 0.02).name == "plain"  # 0.44 > 0.43 * 1.02
    assert rec.warning is None
    # Scores that differ do separate: the score rule, whatever the CE says.
    rows[1]["eval"]["task"]["exact_match"] = 0.1
    assert (recommend(rows, 0.05).rule, recommend(rows, 0.05).name) == ("task_score", "plain")
    # A report without a task score (evaluate --task-score none) falls back too.
    for r in rows:
        r["eval"]["task"].pop("exact_match")
    assert recommend(rows, 0.05).rule == "task_ce"
    assert "not scored" in recommend(rows, 0.05).fallback


def test_sampling_error_and_the_tolerance_warning():
    assert sampling_error(0.5, 100) == pytest.approx(0.05)
    assert sampling_error(0.0, 40) == 0.0 and sampling_error(0.3, None) is None
    rec = recommend(DEMO_ROWS, 0.02)  # best 0.53 on 100 examples: +/- 0.0499
    assert rec.warning and "0.050" in rec.warning and "100 examples" in rec.warning
    assert recommend(DEMO_ROWS, 0.05).warning is None
    assert rec.figures["task_exact_match_error"] == pytest.approx(math.sqrt(0.53 * 0.47 / 100))


def test_missing_keys_fall_back_gracefully():
    rows = [{"name": "base", "train_seconds": 0, "eval": {"task": {"exact_match": 0.0, "examples": 4, "ce": 1.0},
                                                          "forgetting": {"kl": 0.0}}},
            {"name": "a", "train_seconds": None, "eval": {"task": {"exact_match": 0.5, "examples": 4, "ce": 0.5}}},
            {"name": "b", "train_seconds": 10, "eval": {"task": {"exact_match": 0.49, "examples": 4, "ce": 0.6},
                                                        "forgetting": {"kl": 0.1}}}]
    assert recommend(rows, 0.02).name == "b"  # a run without a forgetting figure is not preferred
    table = report_table(rows)
    assert "| a | - | - | - | 0.500 ± 0.250 | 0.5000 | - | - | - | - | - |" in table
    assert recommend([{"name": "base", "eval": {}}], 0.02) is None
