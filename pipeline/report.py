"""The sweep's outputs for people: the report table (report.md), the trade-off plot (tradeoff.png) and the
training curves (curves.png), with the recommendation (recommend.py) in words.

Pure presentation of the rows that sweep.py collected (one per run, each with its evaluate report and the eval
lines of its metrics.jsonl); nothing here trains, scores or touches a run directory.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

from pipeline import __version__
from pipeline.fileio import atomic_path, atomic_write_text
from pipeline.recommend import (
    EDGE,
    Recommendation,
    RunFigures,
    choose_rule,
    fmt_number,
    one_run,
    run_figures,
    score_label,
    score_name,
    trained_runs,
)
from pipeline.scoring import describe, label


def _fmt_score(r: RunFigures) -> str:
    if r.score is None:
        return "-"
    error = r.score_error
    return f"{r.score:.3f} ± {error:.3f}" if error is not None else f"{r.score:.3f}"


def kd_on_cell(row: dict) -> str:
    """Where the KL applies; "-" when no KL term trains (lambda 0 without a budget), whatever kd_on says."""
    if not row.get("kd_lambda") and row.get("max_forgetting") is None:
        return "-"
    return row.get("kd_on") or "-"


def rows_score_name(rows: list[dict]) -> str:
    """The task score the sweep's rows were scored by (recommend.score_name over every row)."""
    return score_name([run_figures(r) for r in rows])


def report_table(rows: list[dict]) -> str:
    """Markdown table, one row per run: setting, task score +/- error, task CE, forgetting figures, train time."""
    head = ["run", "kd_lambda", "rehearsal", "kd_on", f"{score_label(rows_score_name(rows))} ± error", "task CE",
            "forgetting KL (full vocab)", "top-1 agreement", "KL top-k (lower bound)", "general CE", "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r = run_figures(row)
        lines.append("| " + " | ".join([
            r.name, fmt_number(row.get("kd_lambda"), 2), fmt_number(row.get("rehearsal_ratio"), 2), kd_on_cell(row),
            "failed (see above)" if row.get("failed") else _fmt_score(r), fmt_number(r.task_ce), fmt_number(r.kl),
            fmt_number(r.top1_agreement, 3), fmt_number(r.kl_topk), fmt_number(r.general_ce),
            fmt_number(r.train_seconds, 0)]) + " |")
    return "\n".join(lines) + "\n"


def recommendation_text(rec: Recommendation | None) -> str:
    """The report's opening paragraph: the pick, why, the fallback sentence and the warning."""
    if rec is None:
        return "**No recommendation**: no trained run that finished has a task score or a task CE.\n"
    text = f"**Recommended: `{rec.name}`** (adapter: `recommended/adapter`). {rec.reason}"
    if rec.fallback:
        text += f" {rec.fallback}"
    tolerance = ("the sampling error of its difference from the best run's score (the default; a fixed "
                 "`--task-tolerance` replaces it)" if rec.tolerance_kind == "auto" else
                 f"`--task-tolerance` ({rec.tolerance:g}, {rec.tolerance_kind})")
    text += (f"\n\nThe rule: among the trained runs whose task score (here: {label(rec.score_name)}, `--task-score "
             f"{rec.score_name}`) is within the tolerance of the best run's, tolerance being {tolerance}, the one "
             "with the least forgetting (full-vocabulary KL); ties go to the cheaper run. Held-out task CE takes "
             "the score's place only when a run has no task score or the runs were scored by different scores. "
             "Failed runs are never picked.\n")
    if rec.warning:
        text += f"\n> **Warning**: {rec.warning}\n"
    return text


def write_report(out: Path, rows: list[dict], rec: Recommendation | None, *, command: str, curves: bool = False,
                 extra: str = "") -> Path:
    """OUT/report.md: the recommendation and why, the table, what each column is, the plots, command and date."""
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    has_full_kl = any((r.get("eval") or {}).get("forgetting", {}).get("kl_topk") is not None for r in rows)
    kl_note = ("mean per-token KL(base || tuned) over the full vocabulary on held-out general prompts, base = the same "
               "model with the adapter off (lower is better; 0 for the base model)" if has_full_kl else
               "mean per-token KL(base || tuned) on held-out general prompts, over the cached top-k + 1 buckets (these "
               "reports predate the full-vocabulary figure: a lower bound)")
    name = rec.score_name if rec else rows_score_name(rows)
    opening = ("# Report\n\n" + single_run_text(rows, rec) if rec is not None and one_run(rows) else
               "# Sweep report\n\n" + recommendation_text(rec))
    text = (opening + "\n" + failures_text(rows) + report_table(rows)
            + "\n"
            f"* {score_label(name)} (`--task-score {name}`): {describe(name)}, averaged over the n held-out task "
            "examples (higher is better), ± its sampling error: the standard deviation of the per-example scores / "
            "sqrt(n) (for a 0/1 score, sqrt(p (1 - p) / n)).\n"
            + fields_line(rows, rec) +
            "* task CE: per-token cross-entropy of the held-out task answers (lower is better).\n"
            f"* forgetting KL: {kl_note}.\n"
            "* top-1 agreement: share of those positions where the tuned and the base model's most likely next token "
            "agree (1 for the base model).\n"
            "* KL top-k: the same KL over the cached top-k + 1 buckets: cheap, and a lower bound of the full figure.\n"
            "* general CE: cross-entropy of the held-out general answers under the model (the base row: the base "
            "model's).\n\n"
            "![task score against forgetting](tradeoff.png)\n"
            + ("\n![task CE and forgetting against step](curves.png)\n" if curves else
               "\n(No curves.png: the runs logged no eval lines; train with --eval-every N.)\n")
            + f"\nCommand: `{command}`  \nDate: {date}  \npipeline {__version__}\n" + extra)
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def single_run_text(rows: list[dict], rec: Recommendation) -> str:
    """The opening of a report on one trained run (`pipeline run` without a sweep): what it learned and what it
    forgot, each against the base row; there is nothing to recommend between."""
    base, run = run_figures(rows[0]), run_figures(rows[1])
    what = score_label(rec.score_name)
    learned = (f"{what} {_fmt_score(run)} (base {fmt_number(base.score, 3)})" if run.score is not None else
               f"task CE {fmt_number(run.task_ce)} (base {fmt_number(base.task_ce)})")
    text = (f"**`{run.name}`** (adapter: `recommended/adapter`): {learned}; forgetting KL {fmt_number(run.kl)} "
            f"against the base (full vocabulary, held-out general prompts; 0 = none), top-1 agreement with the base "
            f"{fmt_number(run.top1_agreement, 3)}.\n")
    if rec.warning:
        text += f"\n> **Warning**: {rec.warning}\n"
    return text


def failures_text(rows: list[dict]) -> str:
    """The runs that failed, each with its error (sweep.py's row["failed"]); "" when none did."""
    failed = [r for r in rows if r.get("failed")]
    if not failed:
        return ""
    lines = [f"* `{r['name']}` ({r['failed']['stage']}): {r['failed']['error']}" for r in failed]
    return ("**Failed runs** (never recommended; the error is also in the run's `failed.json`, "
            "and a rerun keeps them failed unless given `--retry-failed`):\n\n" + "\n".join(lines) + "\n\n")


def fields_line(rows: list[dict], rec: Recommendation | None) -> str:
    """For the json score, the recommended run's accuracy per field of the reference (evaluate's task.fields)."""
    pick = next((r for r in rows if rec is not None and r["name"] == rec.name), None)
    fields = ((pick or {}).get("eval") or {}).get("task", {}).get("fields")
    if not fields:
        return ""
    cells = ", ".join(f"`{k}` {v['accuracy']:.3f}" for k, v in fields.items())
    return f"* per field, `{rec.name}`: {cells} (share of the examples whose answer holds the reference's value).\n"


def pareto_front(points: list[tuple[str, float, float]], *, higher_is_better: bool) -> list[str]:
    """Names of the points no other point beats on both axes (x: forgetting, lower is better), by x ascending."""
    sign = 1 if higher_is_better else -1
    front, best = [], -math.inf
    for name, _, y in sorted(points, key=lambda p: (p[1], -sign * p[2])):
        if sign * y > best + EDGE:
            front.append(name)
            best = sign * y
    return front


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_tradeoff(ax, rows: list[dict], rec: Recommendation | None) -> str | None:
    """Task score (or task CE, when the rule fell back to it) against forgetting KL, one labelled point per run,
    the Pareto front dashed and the pick ringed; returns the name of the ringed run (None if nothing ringed)."""
    runs = [run_figures(r) for r in rows]
    rule = rec.rule if rec else choose_rule(trained_runs(rows))
    use_score = rule == "task_score"
    what = score_label(rec.score_name if rec else score_name(trained_runs(rows)))
    points = [(r.name, r.kl, r.score if use_score else r.task_ce) for r in runs]
    points = [p for p in points if p[1] is not None and p[2] is not None]
    if not points:
        return None
    errors = {r.name: r.score_error for r in runs}
    positive = [kl for name, kl, _ in points if name != "base" and kl > 0]
    if positive and max(positive) > 10 * min(positive):
        # Forgetting spans orders of magnitude (plain QLoRA far right, the distilled runs crowded near 0):
        # logarithmic above the smallest run's KL, linear below it so that the base model's 0 has a place.
        ax.set_xscale("symlog", linthresh=min(positive) / 2, linscale=0.5)
    front = pareto_front(points, higher_is_better=use_score)
    xy = {name: (kl, y) for name, kl, y in points}
    ax.plot([xy[n][0] for n in front], [xy[n][1] for n in front], ls="--", lw=1, color="tab:green",
            drawstyle="steps-post" if len(front) > 1 else "default", label="Pareto front", zorder=2)
    span = (max(p[2] for p in points) - min(p[2] for p in points)) or 1.0
    for name, kl, y in points:
        err = errors.get(name) if use_score else None
        ax.errorbar(kl, y, yerr=err, fmt="o", ms=6, capsize=3, zorder=3,
                    color="tab:gray" if name == "base" else "tab:blue")
        # Label above-right, or below-right when a point just above and to the right would cover the label.
        crowded = any(0 <= (y2 - y) * (1 if use_score else -1) < 0.06 * span and k2 > kl
                      for n2, k2, y2 in points if n2 != name)
        ax.annotate(name, (kl, y), textcoords="offset points", xytext=(6, -11 if crowded else 4), fontsize=8)
    ringed = None
    if rec is not None and rec.name in xy:
        ring = ax.scatter([xy[rec.name][0]], [xy[rec.name][1]], s=320, facecolors="none", edgecolors="tab:red",
                          linewidths=2, zorder=4, label=f"recommended: {rec.name}")
        ring.set_gid("recommended")
        ringed = rec.name
    scale = ", log scale" if ax.get_xscale() == "symlog" else ""
    ax.set_xlabel(f"forgetting: KL(base || tuned) on held-out general prompts{scale}  (lower is better)")
    if use_score:
        ax.set_ylabel(f"{what} ± sampling error  (higher is better)")
        ax.set_title("Learned vs forgotten")
    else:
        ax.set_ylabel("held-out task CE  (lower is better)")
        ax.set_title(f"Learned vs forgotten (task CE: the {what.removeprefix('task ')} cannot compare the runs)",
                     fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if ax.get_xscale() == "linear":
        ax.set_xlim(left=min(0.0, *(p[1] for p in points)) - 0.002)
    return ringed


def plot_tradeoff(out: Path, rows: list[dict], rec: Recommendation | None = None) -> str | None:
    """OUT/tradeoff.png (see draw_tradeoff); returns the name of the ringed run, or None (nothing ringed or no plot)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    try:
        ringed = draw_tradeoff(ax, rows, rec)
        if ax.has_data():
            fig.tight_layout()
            with atomic_path(out / "tradeoff.png") as tmp:
                fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return ringed


def plot_curves(out: Path, rows: list[dict]) -> Path | None:
    """OUT/curves.png: held-out task CE and forgetting (cached top-k KL) against step, one line per run, from
    the eval lines of each run's metrics.jsonl (row["curve"]); with --max-forgetting runs (row["budget_curve"]) a
    second row of panels: lambda, and the running constraint against its budget. None, and no file, when no run
    has any of these."""
    curves = {r["name"]: r.get("curve") or [] for r in rows if r["name"] != "base"}
    budgets = [r for r in rows if r.get("budget_curve")]
    if not any(curves.values()) and not budgets:
        return None
    plt = _pyplot()
    if budgets:  # a second row: how each --max-forgetting run moved its multiplier to keep its budget
        fig, ((ax_ce, ax_kl), (ax_lam, ax_con)) = plt.subplots(2, 2, figsize=(10, 7.5), dpi=120)
    else:
        fig, (ax_ce, ax_kl) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    try:
        for r in budgets:
            pts = r["budget_curve"]
            line, = ax_lam.plot([p["step"] for p in pts], [p["lambda"] for p in pts], label=r["name"])
            con = [(p["step"], p["constraint"]) for p in pts if p["constraint"] is not None]
            if con:
                ax_con.plot(*zip(*con, strict=True), color=line.get_color(), label=r["name"])
            ax_con.axhline(r["max_forgetting"], color=line.get_color(), ls="--", lw=1)
        if budgets:  # (ax_lam and ax_con exist only then)
            ax_lam.set_ylabel("lambda (the KL weight)")
            ax_lam.set_title("Forgetting budget: the multiplier", fontsize=10)
            ax_con.set_ylabel("running KL per rehearsal token")
            ax_con.set_title("... and the constraint it keeps (dashed: the budget)", fontsize=10)
            ax_lam.legend(fontsize=8)
            for ax in (ax_lam, ax_con):
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
        for name, points in curves.items():
            for ax, key in ((ax_ce, "task_ce"), (ax_kl, "kl_topk")):
                pts = [(p["step"], p[key]) for p in points if p.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
        ax_ce.set_ylabel("held-out task CE  (lower is better)")
        ax_kl.set_ylabel("forgetting: cached top-k KL (a lower bound)")
        for ax in (ax_ce, ax_kl):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        ax_ce.legend(fontsize=8)
        ax_ce.set_title("Task: has it levelled off?", fontsize=10)
        ax_kl.set_title("Forgetting during training", fontsize=10)
        fig.tight_layout()
        path = out / "curves.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
