"""Which setting the defaults study supports, from its own output files (benchmarks/defaults_study.sh).

    .venv/bin/python benchmarks/defaults_summary.py runs/study      # reads runs/study/<task>/defaults/rows.json
    .venv/bin/python benchmarks/defaults_summary.py stage2 CONFIG SWEEP_DIR OUT   # the study's second stage

Prints markdown: per task, every run against plain QLoRA (task score +/- its error, full-vocabulary forgetting KL,
the cut in that KL, and whether the score is within 2 points of plain QLoRA's); then, per setting, its worst case
over the tasks, and the setting whose worst case is best ([robust choice note]); when none holds on every task,
the one whose task score fell least under plain QLoRA's on its worst task.

[robust choice note] A default must hold on a task nobody tuned it on, so the settings are ranked by their worst
task, not their average: on each task a setting's figure is the cut in forgetting against plain QLoRA,
1 - KL / KL_plain, when its task score is within 2 points of plain QLoRA's (TOLERANCE, the study's "equal task
score"), and "misses" (ranked below any cut) when it is not; its worst case is the lowest of those over the tasks.
A setting is one that every task ran under the same name: plain QLoRA, lambda 1, 2, 5, 10, and the stage-2 runs
named by role (the second seed, batch 16 and the budget, each at the lambda that task's sweep recommended, are
compared as roles, not as one fixed lambda). Every figure is read from the sweeps' files; none is recomputed from
the cached targets training minimised.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.recommend import RunFigures, run_figures

TOLERANCE = 0.02  # "equal task score": within 2 points of plain QLoRA's (the study's bar)
PLAIN = "plain-qlora"
MISS = float("-inf")  # a setting whose task score is not within TOLERANCE of plain QLoRA's on a task


@dataclass(frozen=True)
class Outcome:
    """One setting on one task, against that task's plain QLoRA."""

    run: RunFigures
    cut: float  # 1 - KL / KL_plain; MISS when the task score is not within TOLERANCE of plain QLoRA's
    gap: float  # task score minus plain QLoRA's (negative: below it)

    @property
    def equal_score(self) -> bool:
        return self.cut != MISS


def setting_of(name: str) -> str:
    """The setting a run stands for across tasks: stage-2 runs by role ("lambda=2,seed=1" -> "recommended,seed=1";
    "budget=0.0091" -> "budget"), stage-1 runs by their name."""
    if name.startswith("budget="):
        return "budget (lambda 1's forgetting, from lambda 1)"
    head, sep, role = name.partition(",")
    return f"recommended,{role}" if sep and head.startswith("lambda=") else name


def outcomes(rows: list[dict]) -> dict[str, Outcome]:
    """Each trained run's outcome against plain QLoRA in one task's rows, keyed by setting_of(name); runs without
    figures (failed, or not evaluated) are left out. Raises KeyError when the task has no plain QLoRA run."""
    runs = {r["name"]: run_figures(r) for r in rows if r["name"] != "base" and not r.get("failed")}
    runs = {n: r for n, r in runs.items() if r.score is not None and r.kl is not None}
    plain = runs[PLAIN]
    out = {}
    for name, r in runs.items():
        equal = r.score >= plain.score - TOLERANCE - 1e-9
        cut = (1 - r.kl / plain.kl if plain.kl > 0 else 0.0) if equal else MISS
        out[setting_of(name)] = Outcome(r, cut, r.score - plain.score)
    return out


def common_settings(tasks: dict[str, dict[str, Outcome]]) -> list[str]:
    """The settings (never plain QLoRA itself) that every task ran, sorted."""
    return sorted(set.intersection(*(set(t) for t in tasks.values())) - {PLAIN}) if tasks else []


def worst_gaps(tasks: dict[str, dict[str, Outcome]]) -> dict[str, tuple[float, str]]:
    """Each common setting's lowest task score against plain QLoRA's over the tasks: (score - plain, task)."""
    return {s: min((t[s].gap, name) for name, t in tasks.items()) for s in common_settings(tasks)}


def robust_choice(tasks: dict[str, dict[str, Outcome]]) -> tuple[str | None, dict[str, float]]:
    """The setting (never plain QLoRA itself) whose worst case over the tasks is best ([robust choice note]), and
    every such setting's worst case; only settings that ran on every task are ranked. (None, {}) when none is."""
    worst = {s: min(t[s].cut for t in tasks.values()) for s in common_settings(tasks)}
    best = max(worst, key=lambda s: (worst[s], s), default=None)  # ties: the name, so the output is stable
    return (best if best is not None and worst[best] != MISS else None), worst


def finished_rows(sweep: Path, names: list[str]) -> list[dict]:
    """Rows for the named runs of a sweep directory that have an evaluation, read from each run's eval.json (a
    sweep still under way has no rows.json yet)."""
    return [{"name": n, "eval": json.loads((sweep / n / "eval.json").read_text())}
            for n in names if (sweep / n / "eval.json").exists()]


def stage2_pick(rows: list[dict]) -> str:
    """The run the second stage is built on: by the study's own bar, the distilled run with the least forgetting
    among those within TOLERANCE of plain QLoRA's task score; "lambda=1" (the default) when none is, or when plain
    QLoRA has no figures yet."""
    outs = outcomes(rows) if any(r["name"] == PLAIN for r in rows) else {}
    kept = [o.run for s, o in outs.items() if s.startswith("lambda=") and o.equal_score]
    return min(kept, key=lambda r: (r.kl, r.name)).name if kept else "lambda=1"


def stage2_config(doc: dict, sweep: Path) -> tuple[dict, str]:
    """The study's second stage (benchmarks/defaults_study.sh): the stage-1 config `doc` with three runs added at
    the picked lambda: a second seed, batch 16 (the same task exposure in half the optimiser steps) and a
    forgetting budget at lambda 1's measured forgetting, started from lambda 1. Returns (config, one-line summary)."""
    names = [r["name"] for r in doc["sweep"]["runs"]]
    rows = finished_rows(sweep, names)
    pick = stage2_pick(rows)
    lam = next(r for r in doc["sweep"]["runs"] if r["name"] == pick)["kd_lambda"]
    kl = run_figures(next(r for r in rows if r["name"] == "lambda=1")).kl
    budget = float(f"{kl:.2g}")
    doc = {**doc, "sweep": {**doc["sweep"], "runs": [*doc["sweep"]["runs"],
           {"name": f"{pick},seed=1", "kd_lambda": lam, "seed": 1},
           {"name": f"{pick},batch=16", "kd_lambda": lam, "batch_size": 16},
           {"name": f"budget={budget:g}", "kd_lambda": 1, "max_forgetting": budget}]}}
    return doc, f"stage 2 at {pick}: a second seed, batch 16, and a forgetting budget of {budget:g} from lambda 1"


def closest(tasks: dict[str, dict[str, Outcome]]) -> tuple[str, str, float] | None:
    """When no setting holds on every task: the one that came closest, i.e. whose task score falls least under
    plain QLoRA's on its worst task, as (setting, that task, score - plain score); None without a common setting."""
    worst = worst_gaps(tasks)
    if not worst:
        return None
    best = max(worst, key=lambda s: (worst[s][0], s))
    return best, worst[best][1], worst[best][0]


def _pct(cut: float) -> str:
    return "misses" if cut == MISS else f"{100 * cut:.0f}%"


def task_table(task: str, rows: list[dict], outs: dict[str, Outcome]) -> list[str]:
    plain = outs[PLAIN].run
    lines = [f"### {task}", "", f"plain QLoRA: {plain.score:.3f} +/- {plain.score_error:.3f}, forgetting KL "
             f"{plain.kl:.4f}; equal task score: at least {plain.score - TOLERANCE:.3f}", "",
             "| run | setting | task score +/- error | forgetting KL | cut vs plain QLoRA |", "|---|---|---|---|---|"]
    for setting, o in outs.items():
        lines.append(f"| {o.run.name} | {setting} | {o.run.score:.3f} +/- {o.run.score_error:.3f} | {o.run.kl:.4f} | "
                     f"{_pct(o.cut)} |")
    failed = [r["name"] for r in rows if r.get("failed")]
    if failed:
        lines.append(f"\nfailed: {', '.join(failed)}")
    return [*lines, ""]


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[1] == "stage2":
        import yaml
        config, sweep, out = argv[2:]
        doc, said = stage2_config(yaml.safe_load(Path(config).read_text()), Path(sweep))
        Path(out).write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        print(said)
        return 0
    root = Path(argv[1] if len(argv) > 1 else "runs/study")
    dirs = [d for d in sorted(root.iterdir()) if (d / "defaults" / "rows.json").exists()] if root.exists() else []
    if not dirs:
        print(f"{root}: no task with a finished defaults sweep (<task>/defaults/rows.json); run "
              "benchmarks/defaults_study.sh first", file=sys.stderr)
        return 2
    tasks, lines = {}, []
    for d in dirs:
        rows = json.loads((d / "defaults" / "rows.json").read_text())
        try:
            tasks[d.name] = outcomes(rows)
        except KeyError:
            lines += [f"### {d.name}", "", "(no plain-qlora run yet)", ""]
            continue
        lines += task_table(d.name, rows, tasks[d.name])
    best, worst = robust_choice(tasks)
    gaps = worst_gaps(tasks)
    lines += [f"### Worst case over {len(tasks)} tasks ({', '.join(tasks)})", "",
              "| setting | worst cut at equal task score | lowest task score vs plain QLoRA |", "|---|---|---|"]
    lines += [f"| {s} | {_pct(c)} | {100 * gaps[s][0]:+.1f} points ({gaps[s][1]}) |"
              for s, c in sorted(worst.items(), key=lambda x: (-x[1], -gaps[x[0]][0]))]
    partial = sorted(set().union(*(set(t) for t in tasks.values())) - set(worst) - {PLAIN})
    if partial:
        lines += ["", "not ranked (not run on every task): " + ", ".join(
            f"{s} ({', '.join(n for n, t in tasks.items() if s in t)})" for s in partial)]
    if best:
        lines += ["", f"most robust: `{best}`"]
    else:
        near = closest(tasks)
        lines += ["", "no setting kept plain QLoRA's task score on every task" + (
            f"; closest: `{near[0]}` ({near[1]}: {100 * near[2]:+.1f} points)" if near else "")]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
