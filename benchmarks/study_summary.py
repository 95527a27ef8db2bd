"""What the forgetting study found, per task, from its own output files (rows.json, recommendation.json, run.yaml).

    .venv/bin/python benchmarks/study_summary.py runs/study      # after benchmarks/forgetting_study.sh

Prints markdown: for each task, the recommended run against plain QLoRA (full-vocabulary forgetting KL, top-1
agreement, task score), every distilled run that scores within the tolerance of plain QLoRA (equal task score),
the LoRA rank runs, the seed spread, and the forgetting-budget runs against their budget and against the best
fixed-lambda run that stayed within the same budget. Every figure is read from the sweep's files; none is
recomputed from the cached targets training minimised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from pipeline.recommend import RunFigures, run_figures, score_label, score_name
from pipeline.scoring import label

TOLERANCE = 0.02  # "equal task score": within 2 points of the task score (the study's bar; it scores exact match)
PLAIN = "plain-qlora"


def _run_yaml(sweep: Path, name: str) -> dict:
    path = sweep / name / "run.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def _fmt(r: RunFigures) -> str:
    return (f"{label(r.score_name)} {r.score:.3f} +/- {r.score_error:.3f}, forgetting KL {r.kl:.4f}, "
            f"top-1 agreement {r.top1_agreement:.3f}")


def _cut(kl: float, ref: float) -> str:
    return f"{100 * (1 - kl / ref):.0f}%" if ref > 0 else "-"


def summarise(task_dir: Path) -> list[str]:
    sweep = task_dir / "sweep"
    rows = json.loads((sweep / "rows.json").read_text())
    runs = {r["name"]: run_figures(r) for r in rows if r["name"] != "base"}
    runs = {k: v for k, v in runs.items() if v.score is not None and v.kl is not None}
    rec = json.loads((sweep / "recommendation.json").read_text())
    out = [f"### {task_dir.name}", ""]
    plain = runs.get(PLAIN)
    if plain is None:
        return [*out, "(no plain-qlora run yet)", ""]
    scored_by = score_name(list(runs.values()))  # the task score the runs were scored by (evaluate --task-score)
    out += [f"| run | {score_label(scored_by)} | task CE | forgetting KL (full vocab) | top-1 agreement | general CE |",
            "|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("failed"):  # a run the sweep recorded as failed (sweep.py): no figures
            out.append(f"| {row['name']} | failed ({row['failed']['stage']}) | - | - | - | - |")
            continue
        r = run_figures(row)
        error = f" +/- {r.score_error:.3f}" if r.score_error is not None else ""
        out.append(f"| {r.name} | {r.score:.3f}{error} | {r.task_ce:.4f} | {r.kl:.4f} | {r.top1_agreement:.3f} | "
                   f"{r.general_ce:.3f} |")
    out.append("")
    pick = runs[rec["name"]]
    out.append(f"* recommended: `{pick.name}`: {_fmt(pick)}")
    out.append(f"* plain QLoRA: {_fmt(plain)}")
    out.append(f"* the recommended run forgets {_cut(pick.kl, plain.kl)} less (full-vocabulary KL) at a task score "
               f"{pick.score - plain.score:+.3f} from plain QLoRA's")
    equal = sorted((r for r in runs.values() if r.name != PLAIN and not r.name.startswith(PLAIN)
                    and r.score >= plain.score - TOLERANCE - 1e-9), key=lambda r: r.kl)
    if equal:
        best = equal[0]
        runs_word = "run" if len(equal) == 1 else "runs"
        out.append(f"* at equal task score (within {TOLERANCE:.2f} of plain QLoRA's {plain.score:.3f}): "
                   f"{len(equal)} {runs_word}; the one that forgets least, `{best.name}`, cuts the KL by "
                   f"{_cut(best.kl, plain.kl)} ({plain.kl:.4f} -> {best.kl:.4f})")
    else:
        out.append(f"* no run other than plain QLoRA scores within {TOLERANCE:.2f} of its {plain.score:.3f}")
    seeds = [(n, r) for n, r in runs.items() if n.endswith(",seed=1")]
    for name, r in seeds:
        base_name = name.removesuffix(",seed=1")
        if base_name in runs:
            b = runs[base_name]
            out.append(f"* seed spread, `{base_name}`: {label(scored_by)} {b.score:.3f} / {r.score:.3f}, "
                       f"KL {b.kl:.4f} / {r.kl:.4f} (seed 0 / seed 1)")
    ranks = sorted(((n, r) for n, r in runs.items() if ",lora_r=" in n), key=lambda x: int(x[0].rsplit("=", 1)[1]))
    if ranks:
        setting = ranks[0][0].rsplit(",lora_r=", 1)[0]
        line = [f"r=8 {runs[setting].score:.3f} / {runs[setting].kl:.4f}"] if setting in runs else []
        line += [f"r={n.rsplit('=', 1)[1]} {r.score:.3f} / {r.kl:.4f}" for n, r in ranks]
        out.append(f"* LoRA rank at `{setting}` ({label(scored_by)} / KL): " + ", ".join(sorted(line, key=lambda s: int(
            s.split()[0][2:]))))
    # The budget runs are compared with fixed-lambda runs of the same length: not stage 3's longer ones.
    fixed = [r for n, r in runs.items() if not n.startswith("budget=") and ",steps=" not in n]
    for name, r in runs.items():
        if not name.startswith("budget="):
            continue
        summary = _run_yaml(sweep, name).get("summary") or {}
        eps = summary.get("max_forgetting") or float(name.split("=", 1)[1])
        within = [f for f in fixed if f.kl <= eps]
        ref = max(within, key=lambda f: f.score, default=None)
        verdict = "within 20% of it or below" if r.kl <= 1.2 * eps else "more than 20% over it"
        line = (f"* budget {eps:g}: held-out forgetting KL {r.kl:.4f} ({r.kl / eps:.2f} x the budget, {verdict}); "
                f"final lambda {summary.get('final_lambda', float('nan')):.2f}; {label(scored_by)} {r.score:.3f} "
                f"+/- {r.score_error:.3f}")
        if ref is not None:
            line += (f"; the best fixed-lambda run within the budget, `{ref.name}`, scores {ref.score:.3f} "
                     f"(difference {r.score - ref.score:+.3f}, sampling error {ref.score_error:.3f})")
        else:
            line += "; no fixed-lambda run stayed within the budget"
        near = max((f for f in fixed if eps < f.kl <= 1.2 * eps), key=lambda f: f.score, default=None)
        if near is not None and (ref is None or near.score > ref.score):
            line += (f"; within 20% over the budget (the tolerance the budget run is held to), `{near.name}` "
                     f"(KL {near.kl:.4f}) scores {near.score:.3f} (difference {r.score - near.score:+.3f})")
        out.append(line)
    return [*out, ""]


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "runs/study")
    tasks = [d for d in sorted(root.iterdir()) if (d / "sweep" / "rows.json").exists()] if root.exists() else []
    if not tasks:
        print(f"{root}: no task with a finished sweep (sweep/rows.json); run benchmarks/forgetting_study.sh first",
              file=sys.stderr)
        return 2
    for task in tasks:
        print("\n".join(summarise(task)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
