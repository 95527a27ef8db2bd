"""pipeline/recommend.py: which run of a sweep to use, on made-up rows (no model, no training)."""

from __future__ import annotations

import math

import pytest

from pipeline.errors import PipelineError
from pipeline.recommend import error_floor, recommend, sampling_error
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


def test_equal_task_scores_still_decide_by_the_score_then_forgetting():
    """Two runs at 0.9; one forgets 30x more but has the lower task CE. Equal scores are all within
    the tolerance, so forgetting decides, and a third run at 0.89 does not change the pick."""
    rows = [sweep_row("base", 0.5, 0.0, 0, ce=1.2), sweep_row("low-ce", 0.9, 0.30, ce=0.40),
            sweep_row("forgets-less", 0.9, 0.01, ce=0.45)]
    rec = recommend(rows, 0.02)
    assert (rec.name, rec.rule, rec.fallback, rec.candidates) == ("forgets-less", "task_score", None,
                                                                  ["forgets-less", "low-ce"])
    assert recommend([*rows, sweep_row("third", 0.89, 0.5, ce=0.41)], 0.02).name == "forgets-less"
    assert recommend(list(reversed(rows)), 0.02).name == "forgets-less"
    # Equal scores and equal forgetting: the cheaper run.
    tied = [sweep_row("slow", 0.9, 0.01, 200, ce=0.40), sweep_row("fast", 0.9, 0.01, 100, ce=0.45)]
    assert recommend(tied, 0.02).name == "fast"


def test_all_zero_scores_decide_by_forgetting_and_warn():
    rows = [sweep_row("base", 0.0, 0.0, 0, ce=1.60), sweep_row("plain", 0.0, 0.20, ce=0.43),
            sweep_row("kd-reh", 0.0, 0.05, ce=0.44), sweep_row("kd-all", 0.0, 0.01, ce=0.64)]
    rec = recommend(rows, 0.05)
    assert (rec.name, rec.rule, rec.tolerance_kind, rec.fallback) == ("kd-all", "task_score", "absolute", None)
    assert rec.candidates == ["kd-all", "kd-reh", "plain"]
    assert "is 0: the score cannot tell which run learned most" in rec.warning and "task CE" in rec.warning


def test_task_ce_only_when_a_score_is_missing_or_not_comparable():
    rows = [sweep_row("base", 0.0, 0.0, 0, ce=1.60), sweep_row("plain", 0.1, 0.20, ce=0.43),
            sweep_row("kd-reh", 0.0, 0.05, ce=0.44), sweep_row("kd-all", 0.0, 0.01, ce=0.64)]
    assert (recommend(rows, 0.05).rule, recommend(rows, 0.05).name) == ("task_score", "plain")
    # A report without a task score (evaluate --task-score none): held-out task CE, relative tolerance.
    rows[2]["eval"]["task"].pop("exact_match")
    rec = recommend(rows, 0.05)  # CE up to 0.43 * 1.05 = 0.4515
    assert (rec.name, rec.rule, rec.tolerance_kind, rec.candidates) == ("kd-reh", "task_ce", "relative",
                                                                         ["kd-reh", "plain"])
    assert "cannot compare the runs (not scored for every run)" in rec.fallback and "task CE" in rec.fallback
    assert rec.fallback.count(".") == rec.fallback.count("0.000") + 1  # one sentence
    assert recommend(rows, 0.02).name == "plain"  # 0.44 > 0.43 * 1.02
    assert rec.warning is None
    # Runs scored by different scores cannot be compared by them either.
    rows[2]["eval"]["task"].update(score_name="json", score=0.3)
    assert "scored by different task scores: exact_match, json" in recommend(rows, 0.05).fallback


@pytest.mark.parametrize("key", ["exact_match", "ce", "kl"])
def test_nan_is_refused_naming_the_run(key):
    rows = [sweep_row("a", 0.5, 0.10), sweep_row("b", 0.5, 0.05), sweep_row("c", 0.4, 0.01)]
    part = "forgetting" if key == "kl" else "task"
    rows[1]["eval"][part][key] = float("nan")
    for order in (rows, list(reversed(rows))):
        with pytest.raises(PipelineError) as refused:
            recommend(order, 0.02)
        what = {"exact_match": "task score", "ce": "task CE", "kl": "forgetting KL"}[key]
        assert str(refused.value).startswith(f"run b: {what} is nan") and "\n" not in str(refused.value)


def test_failed_runs_are_never_picked():
    failure = {"stage": "train", "error": "step 3: loss is nan"}
    rows = [sweep_row("base", 0.0, 0.0, 0), sweep_row("a", 0.5, 0.10),
            {**sweep_row("diverged", None, None), "eval": None, "train_seconds": None, "failed": failure},
            # a failed run whose figures would win (whatever a row holds, "failed" keeps it out)
            {**sweep_row("failed-late", 0.6, 0.01), "failed": {**failure, "stage": "evaluate"}}]
    rec = recommend(rows, 0.02)
    assert (rec.name, rec.candidates, rec.failed, rec.rule) == ("a", ["a"], ["diverged", "failed-late"], "task_score")
    assert "Not considered, as failed: diverged, failed-late." in rec.reason
    assert recommend([rows[0], rows[2]], 0.02) is None
    table = report_table(rows)
    assert "| diverged | 0.00 | 0.30 | - | failed (see above) | - | - |" in table


def test_sampling_error_and_the_tolerance_warning():
    assert sampling_error(0.5, 100) == pytest.approx(0.05)
    assert sampling_error(0.0, 40) == 0.0 and sampling_error(0.3, None) is None
    # best 0.53 and the closest run left out 0.46, both on 100 examples: the difference is +/- 0.0705.
    rec = recommend(DEMO_ROWS, 0.02)
    assert rec.warning and "+/- 0.071" in rec.warning and "plain-qlora 0.530 on 100 examples" in rec.warning
    assert "kd_lambda=0 0.460 on 100" in rec.warning
    assert recommend(DEMO_ROWS, 0.05).warning  # above either run's own error (0.050), below their difference's
    assert recommend(DEMO_ROWS, 0.08).warning is None  # 0.44 is left out: +/- 0.0705 against it
    assert recommend(DEMO_ROWS, 1.0).warning is None  # nothing left out: nothing to warn about
    assert rec.figures["task_exact_match_error"] == pytest.approx(math.sqrt(0.53 * 0.47 / 100))


def test_the_warning_error_does_not_vanish_at_a_score_of_0_or_1():
    """[error floor note] 5 examples all right (binomial error 0) are not proof of a score of exactly 1."""
    assert error_floor(5) == pytest.approx(1 / 12) and error_floor(100) == pytest.approx(1 / 202)
    rows = [sweep_row("all-right", 1.0, 0.2, n=5), sweep_row("all-wrong", 0.0, 0.01, n=5)]
    rec = recommend(rows, 0.1)  # +/- sqrt(2) / 12 = 0.118 on the difference
    assert rec.name == "all-right" and rec.warning and "+/- 0.118" in rec.warning
    assert recommend(rows, 0.12).warning is None
    # A partial-credit score whose per-example scores were all equal records an error of 0: floored too.
    for r, score in zip(rows, (0.8, 0.6), strict=True):
        r["eval"]["task"] = {"score_name": "json", "score": score, "score_error": 0.0, "examples": 5, "ce": 0.5}
    assert "+/- 0.118" in recommend(rows, 0.1).warning


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


def test_the_auto_tolerance_is_the_error_of_each_difference_from_the_best():
    """[auto tolerance note] Without a fixed tolerance a run is a candidate when the best run's lead over it is
    within sqrt(e_best^2 + e_run^2), each e the binomial error here (all above the Wilson floor)."""
    def within_by_hand(rows):
        runs = {r["name"]: (r["eval"]["task"]["exact_match"], r["eval"]["task"]["examples"])
                for r in rows if r["name"] != "base"}
        best, n_best = max(runs.values())
        error = lambda p, n: max(math.sqrt(p * (1 - p) / n), 1 / (2 * (n + 1)))  # noqa: E731
        return {name for name, (p, n) in runs.items()
                if best - p <= math.sqrt(error(best, n_best) ** 2 + error(p, n) ** 2)}

    rec = recommend(DEMO_ROWS)  # 0.53 - 0.46 = 0.07 <= 0.0705; 0.53 - 0.44 = 0.09 > 0.0704
    assert set(rec.candidates) == within_by_hand(DEMO_ROWS) == {"plain-qlora", "kd_lambda=0"}
    assert (rec.name, rec.tolerance, rec.tolerance_kind, rec.warning) == ("kd_lambda=0", None, "auto", None)
    assert "within the sampling error of its difference from the best (0.530, plain-qlora; +/- 0.071" in rec.reason
    assert recommend(DEMO_ROWS, 0.02).name == "plain-qlora"  # a fixed tolerance still applies when given

    # 40 examples: 5 points apart is within the error; 30 points is not. The auto pick forgets least of the two.
    rows = [sweep_row("a", 0.50, 0.30, n=40), sweep_row("b", 0.45, 0.01, n=40), sweep_row("c", 0.20, 0.001, n=40)]
    assert (recommend(rows).name, set(recommend(rows).candidates)) == ("b", within_by_hand(rows)) == ("b", {"a", "b"})
    # At a score of 1 on 5 examples the error does not vanish (the Wilson floor 1/12): 0.9 is within
    # sqrt(1/144 + 0.09 / 5) = 0.158 of it, 0.6 is not.
    rows = [sweep_row("all", 1.0, 0.30, n=5), sweep_row("most", 0.9, 0.01, n=5), sweep_row("half", 0.6, 0.0, n=5)]
    assert set(recommend(rows).candidates) == within_by_hand(rows) == {"all", "most"}
    # 0.92 on 50 examples is 0.08 behind: within sqrt(1/144 + 0.0736 / 50) = 0.092 only thanks to that floor.
    rows = [sweep_row("all", 1.0, 0.30, n=5), sweep_row("near", 0.92, 0.01, n=50)]
    assert set(recommend(rows).candidates) == within_by_hand(rows) == {"all", "near"}
    # A report without a recorded error or examples: the fixed 0.02 stands in, and says so.
    rows = [sweep_row("a", 0.50, 0.30, n=0), sweep_row("b", 0.49, 0.01, n=0), sweep_row("c", 0.45, 0.0, n=0)]
    rec = recommend(rows)
    assert (rec.name, rec.tolerance, rec.tolerance_kind) == ("b", 0.02, "absolute") and "within 0.02 of" in rec.reason
