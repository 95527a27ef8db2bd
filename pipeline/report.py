"""The sweep's outputs for people: the report table (report.md) and the trade-off plot (tradeoff.png).

Pure presentation of rows that sweep.py collected (one per run, each with its evaluate report); nothing
here trains or scores.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from pipeline import __version__
from pipeline.fileio import atomic_path, atomic_write_text


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report_table(rows: list[dict]) -> str:
    """Markdown table, one row per run: setting, task score, task CE, forgetting KL, general CE, train time."""
    head = ["run", "kd_lambda", "rehearsal", "kd_on", "task exact match", "task CE", "forgetting KL", "general CE",
            "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ev = r.get("eval", {})
        task, forget = ev.get("task", {}), ev.get("forgetting", {})
        lines.append("| " + " | ".join([
            r["name"], _fmt(r.get("kd_lambda"), 2), _fmt(r.get("rehearsal_ratio"), 2), r.get("kd_on") or "-",
            _fmt(task.get("exact_match"), 3), _fmt(task.get("ce")), _fmt(forget.get("kl")), _fmt(forget.get("ce")),
            _fmt(r.get("train_seconds"), 0)]) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list[dict], *, command: str, extra: str = "") -> Path:
    """OUT/report.md: the table, the command and the date."""
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = (f"# Sweep report\n\nCommand: `{command}`  \nDate: {date}  \npipeline {__version__}\n\n"
            + report_table(rows) + "\n"
            "Task exact match: greedy answer equals the reference (higher is better). Forgetting KL: mean per-token "
            "KL(base || tuned) on held-out general prompts (lower is better; 0 for the base model). General CE: "
            "cross-entropy of the held-out general answers under the model.\n" + extra)
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def plot_tradeoff(out: Path, rows: list[dict]) -> Path | None:
    """OUT/tradeoff.png: task score against forgetting KL, one labelled point per run (base included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["name"], r["eval"]["forgetting"]["kl"], r["eval"]["task"].get("exact_match"))
              for r in rows if r.get("eval", {}).get("forgetting") and r.get("eval", {}).get("task")]
    points = [p for p in points if p[2] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    positive = [kl for name, kl, _ in points if name != "base" and kl > 0]
    if positive and max(positive) > 10 * min(positive):
        # Forgetting spans orders of magnitude (plain QLoRA far right, the distilled runs crowded near 0):
        # logarithmic above the smallest run's KL, linear below it so that the base model's 0 has a place.
        ax.set_xscale("symlog", linthresh=min(positive) / 2, linscale=0.5)
    span = (max(p[2] for p in points) - min(p[2] for p in points)) or 1.0
    for name, kl, score in points:
        ax.scatter(kl, score, s=36, color="tab:gray" if name == "base" else "tab:blue", zorder=3)
        # Label above-right, or below-right when a point just above and to the right would cover the label.
        crowded = any(0 <= s2 - score < 0.06 * span and k2 > kl for n2, k2, s2 in points if n2 != name)
        ax.annotate(name, (kl, score), textcoords="offset points", xytext=(6, -11 if crowded else 4), fontsize=8)
    scale = ", log scale" if ax.get_xscale() == "symlog" else ""
    ax.set_xlabel(f"forgetting: KL(base || tuned) on held-out general prompts{scale}  (lower is better)")
    ax.set_ylabel("task exact match  (higher is better)")
    ax.set_title("Learned vs forgotten")
    ax.grid(alpha=0.3)
    if ax.get_xscale() == "linear":
        ax.set_xlim(left=min(0.0, *(p[1] for p in points)) - 0.002)
    fig.tight_layout()
    path = out / "tradeoff.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
