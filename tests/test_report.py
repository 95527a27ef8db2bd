"""The sweep's recommendation, report, plots and OUT/recommended/, on made-up rows (no model, no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.recommend import recommend, sampling_error
from pipeline.report import draw_tradeoff, pareto_front, plot_curves, plot_tradeoff, report_table, write_report
from pipeline.sweep import budget_curve, eval_curve, metric_lines, write_outputs


def row(name: str, score: float | None, kl: float | None, seconds: float = 100.0, *, ce: float = 0.5, n: int = 100,
        curve: list | None = None) -> dict:
    """A sweep row as sweep.py builds it, with the evaluate report keys it reads."""
    return {"name": name, "kd_lambda": 0.0, "rehearsal_ratio": 0.3, "kd_on": "all", "train_seconds": seconds,
            "curve": curve or [],
            "eval": {"task": {"exact_match": score, "examples": n, "ce": ce},
                     "forgetting": {"kl": kl, "top1_agreement": 0.9, "kl_topk": kl and kl / 2, "ce": 2.4,
                                    "base_ce": 2.3}}}


# The README's demo table, roughly: plain QLoRA learns most and forgets most.
DEMO = [row("base", 0.00, 0.0, 0, ce=1.57), row("plain-qlora", 0.53, 0.2646, 166, ce=0.09),
        row("kd_lambda=0", 0.46, 0.0368, 192, ce=0.12), row("kd_lambda=1,kd_on=rehearsal", 0.44, 0.0132, 180, ce=0.12),
        row("kd_lambda=1", 0.10, 0.0069, 178, ce=0.48)]


@pytest.mark.parametrize("tolerance, pick, candidates", [
    (0.02, "plain-qlora", ["plain-qlora"]),                                      # nothing else within 2 points
    (0.07, "kd_lambda=0", ["kd_lambda=0", "plain-qlora"]),                       # 0.53 - 0.46 = 0.07: on the edge
    (0.0699, "plain-qlora", ["plain-qlora"]),                                    # just inside the edge: left out
    (0.10, "kd_lambda=1,kd_on=rehearsal", ["kd_lambda=1,kd_on=rehearsal", "kd_lambda=0", "plain-qlora"]),
    (1.0, "kd_lambda=1", ["kd_lambda=1", "kd_lambda=1,kd_on=rehearsal", "kd_lambda=0", "plain-qlora"]),  # never base
])
def test_recommend_picks_least_forgetting_within_tolerance(tolerance, pick, candidates):
    rec = recommend(DEMO, tolerance)
    assert (rec.name, rec.candidates, rec.rule, rec.fallback) == (pick, candidates, "task_score", None)
    assert rec.figures["forgetting_kl"] == next(r["eval"]["forgetting"]["kl"] for r in DEMO if r["name"] == pick)
    assert pick in rec.reason


def test_float_edge_counts_as_within():
    # 0.50 - 0.48 is 0.020000000000000018 in floats; the run exactly at the tolerance is a candidate.
    rows = [row("a", 0.50, 0.20), row("b", 0.48, 0.05)]
    assert recommend(rows, 0.02).name == "b"
    assert recommend(rows, 0.0199).name == "a"


def test_tie_on_forgetting_goes_to_the_cheaper_run():
    rows = [row("slow", 0.50, 0.05, seconds=200), row("fast", 0.50, 0.05, seconds=120), row("forgets", 0.51, 0.3, 50)]
    rec = recommend(rows, 0.02)
    assert rec.name == "fast" and "ties on forgetting with slow" in rec.reason
    rows[0]["train_seconds"] = 100
    assert recommend(rows, 0.02).name == "slow"
    assert recommend(list(reversed(rows)), 0.02).name == "slow"  # not the order of the rows


def test_task_ce_fallback_when_the_score_does_not_separate_the_runs():
    rows = [row("base", 0.0, 0.0, 0, ce=1.60), row("plain", 0.0, 0.20, ce=0.43), row("kd-reh", 0.0, 0.05, ce=0.44),
            row("kd-all", 0.0, 0.01, ce=0.64)]
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
    rec = recommend(DEMO, 0.02)  # best 0.53 on 100 examples: +/- 0.0499
    assert rec.warning and "0.050" in rec.warning and "100 examples" in rec.warning
    assert recommend(DEMO, 0.05).warning is None
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


def test_report_opens_with_the_recommendation(tmp_path):
    rec = recommend(DEMO, 0.1)
    write_report(tmp_path, DEMO, rec, command="pipeline sweep ...")
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


@pytest.mark.parametrize("rows, ylabel", [(DEMO, "exact match"), (
    [row("base", 0.0, 0.0, 0, ce=1.6), row("plain", 0.0, 0.2, ce=0.43), row("kd", 0.0, 0.05, ce=0.44)], "task CE")])
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


def adapters(out: Path, names: list[str]) -> None:
    for name in names:
        (out / name / "adapter").mkdir(parents=True)
        (out / name / "adapter" / "adapter_config.json").write_text(json.dumps({"run": name}))


def test_outputs_name_the_same_run_and_hand_over_its_adapter(tmp_path, monkeypatch):
    import pipeline.sweep

    adapters(tmp_path, [r["name"] for r in DEMO[1:]])
    ringed = []
    monkeypatch.setattr(pipeline.sweep, "plot_tradeoff",
                        lambda out, rows, rec: ringed.append(plot_tradeoff(out, rows, rec)) or ringed[-1])
    rec = write_outputs(tmp_path, DEMO, 0.1, command="test", log=lambda *_: None)
    doc = json.loads((tmp_path / "recommendation.json").read_text())
    assert [doc["name"]] == ringed == [rec.name] == ["kd_lambda=1,kd_on=rehearsal"]
    assert (doc["rule"], doc["tolerance"], doc["figures"]["forgetting_kl"]) == ("task_score", 0.1, 0.0132)
    link = tmp_path / "recommended" / "adapter"
    assert link.is_symlink() and link.resolve() == (tmp_path / doc["name"] / "adapter").resolve()
    assert json.loads((link / "adapter_config.json").read_text()) == {"run": doc["name"]}
    assert doc["name"] in (tmp_path / "recommended" / "README.md").read_text()
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000 and not (tmp_path / "curves.png").exists()

    # A rerun that picks another run replaces the link.
    write_outputs(tmp_path, DEMO, 0.02, command="test", log=lambda *_: None)
    assert json.loads((link / "adapter_config.json").read_text()) == {"run": "plain-qlora"}
    assert json.loads((tmp_path / "recommendation.json").read_text())["name"] == "plain-qlora" == ringed[-1]

    # Nothing to recommend (no trained run scored): no stale pick from the earlier sweep is left behind.
    assert write_outputs(tmp_path, DEMO[:1], 0.02, command="test", log=lambda *_: None) is None
    assert not (tmp_path / "recommended").exists() and not (tmp_path / "recommendation.json").exists()


def test_a_copy_where_links_cannot_be_made(tmp_path, monkeypatch):
    adapters(tmp_path, [r["name"] for r in DEMO[1:]])

    def no_links(*a, **kw):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(Path, "symlink_to", no_links)
    rec = write_outputs(tmp_path, DEMO, 0.1, command="test", log=lambda *_: None)
    adapter = tmp_path / "recommended" / "adapter"
    assert not adapter.is_symlink() and json.loads((adapter / "adapter_config.json").read_text()) == {"run": rec.name}
    assert "copy" in (tmp_path / "recommended" / "README.md").read_text()


def test_curves_from_eval_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([
        json.dumps({"step": 0, "loss": 1.0, "kl": 0.0}),
        json.dumps({"step": 0, "eval": True, "task_ce": 1.5, "kl_topk": 0.0}),
        json.dumps({"step": 4, "loss": 0.8, "kl": 0.01, "lambda": 0.5}),
        json.dumps({"step": 4, "eval": True, "task_ce": 0.9, "kl_topk": 0.02}),
        '{"step": 8, "eval": tr']) + "\n")  # a torn last line
    curve = eval_curve(metric_lines(metrics))
    assert curve == [{"step": 0, "task_ce": 1.5, "kl_topk": 0.0}, {"step": 4, "task_ce": 0.9, "kl_topk": 0.02}]
    assert eval_curve(metric_lines(tmp_path / "missing.jsonl")) == []
    assert plot_curves(tmp_path, DEMO) is None and not (tmp_path / "curves.png").exists()
    rows = [DEMO[0], {**DEMO[1], "curve": curve}, DEMO[2]]
    assert plot_curves(tmp_path, rows) == tmp_path / "curves.png" and (tmp_path / "curves.png").stat().st_size > 1000


def test_task_tolerance_is_a_flag_with_the_rule_in_its_help():
    result = CliRunner().invoke(main, ["sweep", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--task-tolerance" in text and "[default: 0.02]" in text and "least forgetting" in text
    result = CliRunner().invoke(main, ["sweep", "--cache", "c", "--out", "o", "--lambdas", "0", "--task-tolerance",
                                       "-1"])
    assert result.exit_code == 2 and "task_tolerance" in result.output


def test_budget_runs_add_the_multiplier_and_the_constraint_to_the_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([
        json.dumps({"step": 0, "loss": 1.0, "kl": 0.0}),  # the step-0 line: no multiplier yet
        json.dumps({"step": 1, "loss": 1.0, "kl": 0.02, "lambda": 0.0, "constraint": 0.02}),
        json.dumps({"step": 2, "eval": True, "task_ce": 0.9, "kl_topk": 0.02}),
        json.dumps({"step": 2, "loss": 0.9, "kl": 0.01, "lambda": 0.2, "constraint": None}),  # no rehearsal row
        '{"step": 3, "lambda": 0.']) + "\n")
    pts = budget_curve(metric_lines(metrics))
    assert pts == [{"step": 1, "lambda": 0.0, "constraint": 0.02}, {"step": 2, "lambda": 0.2, "constraint": None}]
    assert budget_curve(metric_lines(tmp_path / "missing.jsonl")) == []
    plain = plot_curves(tmp_path, [DEMO[0], {**DEMO[1], "curve": eval_curve(metric_lines(metrics))}])
    height = plt_height(plain)
    rows = [DEMO[0], {**DEMO[1], "curve": eval_curve(metric_lines(metrics)), "max_forgetting": 0.01,
                      "budget_curve": pts}]
    assert plot_curves(tmp_path, rows) == plain
    assert plt_height(plain) > 1.5 * height  # a second row of panels: lambda and the constraint


def plt_height(png) -> int:
    import matplotlib.image

    return matplotlib.image.imread(png).shape[0]
