"""Which run of a sweep to use, and why: the recommendation rule, from the runs' evaluate figures.

    1. candidates: the trained runs (never the base) whose task score is within `tolerance` of the best run's;
    2. the pick: the candidate that forgets least (full-vocabulary KL(base || tuned) on held-out general
       prompts); ties go to the cheaper run (train time).

The task score is the one evaluate was configured with (--task-score: exact match by default, or normalized, json,
contains, regex, the user's own function), read from each run's report under its name; reports written before
there was a choice hold exact match only. When the task score does not separate the trained runs (all equal,
e.g. all 0 after a few steps of a hard task, not scored, or scored by different scores), step 1 uses held-out
task CE instead: lower is better and the tolerance is relative (CE at most (1 + tolerance) x the best run's).
The report, the plot and recommendation.json say which rule and which score were used.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

from pipeline.scoring import label

DEFAULT_SCORE = "exact_match"  # the score of reports written before --task-score had a choice
# [float tolerance note] 0.50 - 0.48 is 0.020000000000000018 in floats: a run exactly at the tolerance edge
# must count as within it, so comparisons allow this much slack (far below any score's resolution).
EDGE = 1e-9


@dataclass(frozen=True)
class RunFigures:
    """The figures of one run that the report, the plot and the recommendation use (None where not measured)."""

    name: str
    score: float | None  # the task score (`score_name`), 0..1, higher is better
    examples: int | None  # task eval examples behind `score`
    task_ce: float | None
    kl: float | None  # forgetting: full-vocabulary KL(base || tuned), per token
    top1_agreement: float | None
    kl_topk: float | None  # cached k+1 buckets: a lower bound of `kl`
    general_ce: float | None
    base_general_ce: float | None
    train_seconds: float | None
    score_name: str = DEFAULT_SCORE  # evaluate --task-score that made `score`
    recorded_error: float | None = None  # the standard error evaluate recorded with `score` (scoring.standard_error)

    @property
    def score_error(self) -> float | None:
        """The recorded standard error; for a report that predates it (exact match, 0/1 per example), binomial."""
        if self.score is None:
            return None
        return self.recorded_error if self.recorded_error is not None else sampling_error(self.score, self.examples)


def sampling_error(p: float | None, n: int | None) -> float | None:
    """Standard error of a proportion p measured on n examples: sqrt(p (1 - p) / n) (a 0/1 score's)."""
    if p is None or not n:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def run_figures(row: dict) -> RunFigures:
    """A sweep row's figures; keys an older or partial evaluate report lacks become None."""
    ev = row.get("eval") or {}
    task, forget = ev.get("task") or {}, ev.get("forgetting") or {}
    if "score_name" in task:
        name, score, error = task["score_name"], task.get("score"), task.get("score_error")
    else:  # written before --task-score had a choice: exact match
        name, score, error = DEFAULT_SCORE, task.get(DEFAULT_SCORE), None
    return RunFigures(name=row["name"], score=score, examples=task.get("examples"), task_ce=task.get("ce"),
                      kl=forget.get("kl"), top1_agreement=forget.get("top1_agreement"), kl_topk=forget.get("kl_topk"),
                      general_ce=forget.get("ce"), base_general_ce=forget.get("base_ce"),
                      train_seconds=row.get("train_seconds"), score_name=name, recorded_error=error)


def score_name(runs: list[RunFigures]) -> str:
    """The task score the runs were scored by (the most common among those scored; exact match if none was)."""
    names = Counter(r.score_name for r in runs if r.score is not None)
    return names.most_common(1)[0][0] if names else DEFAULT_SCORE


def score_label(name: str) -> str:
    """The report's name for the task score: 'task exact match', 'task json score', ..."""
    return f"task {label(name)}"


def choose_rule(runs: list[RunFigures]) -> str:
    """"task_score" when the task score separates the trained runs, else "task_ce" (see the module docstring)."""
    scores = [r.score for r in runs]
    if not scores or None in scores or len({r.score_name for r in runs}) > 1:
        return "task_ce"
    # One run needs no separating; several that all score the same (e.g. all 0) do.
    return "task_score" if len(scores) == 1 or max(scores) - min(scores) > EDGE else "task_ce"


@dataclass
class Recommendation:
    """The picked run and why; `to_json()` is recommendation.json."""

    name: str
    rule: str  # "task_score" or "task_ce"
    score_name: str  # the task score compared (evaluate --task-score), also under rule "task_ce"
    tolerance: float
    tolerance_kind: str  # "absolute" (task score) or "relative" (task CE)
    reason: str  # why this run, one or two sentences
    fallback: str | None  # the sentence saying the task score did not separate the runs
    warning: str | None  # the tolerance is below the sampling error
    candidates: list[str]  # the runs within the tolerance, best first
    figures: dict

    def to_json(self) -> dict:
        return asdict(self)


def _kl_key(r: RunFigures) -> tuple[float, float]:
    """Least forgetting first; ties (equal to 6 significant digits) go to the cheaper run."""
    kl = float(f"{r.kl:.6g}") if r.kl is not None else math.inf
    return kl, r.train_seconds if r.train_seconds is not None else math.inf


def recommend(rows: list[dict], tolerance: float) -> Recommendation | None:
    """The run to use: within `tolerance` of the best task score, the one that forgets least (module docstring).

    Args:
        rows: sweep rows (name, eval, train_seconds); the row named "base" is never picked.
        tolerance: absolute on the task score (0.02 = 2 points of a 0..1 score); relative on task CE.
    Returns:
        None when no trained run has a task score or a task CE.
    """
    runs = [run_figures(r) for r in rows if r["name"] != "base"]
    rule = choose_rule(runs)
    name = score_name(runs)
    what = score_label(name)
    if rule == "task_score":
        best = max(runs, key=lambda r: r.score)
        within = [r for r in runs if best.score - r.score <= tolerance + EDGE]
        measure = f"{what} is within {tolerance:g} of the best ({best.score:.3f}, {best.name})"
        fallback = None
    else:
        runs = [r for r in runs if r.task_ce is not None]
        if not runs:
            return None
        best = min(runs, key=lambda r: r.task_ce)
        within = [r for r in runs if r.task_ce <= best.task_ce * (1 + tolerance) + EDGE]
        percent = f"{tolerance * 100:g}%"
        measure = f"held-out task CE is within {percent} of the best ({best.task_ce:.4f}, {best.name})"
        scores = {r.score for r in runs}
        names = {r.score_name for r in runs if r.score is not None}
        why = ("scored by different task scores: " + ", ".join(sorted(names)) if len(names) > 1 else
               f"all {scores.pop():.3f}" if len(scores) == 1 and None not in scores else "not scored for every run")
        fallback = (f"The {what} does not separate the runs ({why}), so the pick uses held-out task CE "
                    f"instead (lower is better; the tolerance is then relative: within {percent} of the best CE).")
    within.sort(key=_kl_key)
    pick = within[0]
    if len(within) == 1:
        reason = f"{pick.name} is the only run whose {measure}."
    else:
        others = ", ".join(f"{r.name}: {fmt_number(r.kl)}" for r in within[1:])
        reason = (f"Of the {len(within)} runs whose {measure}, {pick.name} forgets least (forgetting KL "
                  f"{fmt_number(pick.kl)}, against {others}).")
        tied = [r for r in within[1:] if _kl_key(r)[0] == _kl_key(pick)[0]]
        if tied:
            cheaper = ("trained in less time" if _kl_key(tied[0])[1] > _kl_key(pick)[1] else
                       "trained in no more time and is listed first")
            reason += (f" It ties on forgetting with {', '.join(r.name for r in tied)} and {cheaper} "
                       f"({fmt_number(pick.train_seconds, 0)} s against {fmt_number(tied[0].train_seconds, 0)} s).")
    left_out = [r.name for r in runs if r not in within]
    if left_out:
        reason += f" Left out as learning less of the task: {', '.join(left_out)}."
    warning = None
    error = best.score_error if rule == "task_score" else None
    if error is not None and tolerance < error:
        warning = (f"The tolerance ({tolerance:g}) is below the sampling error of the best run's task score "
                   f"(+/- {error:.3f} on {best.examples} examples): runs as good within that error may have been "
                   "left out; raise --task-tolerance or score more examples.")
    score_figures = {"task_score": pick.score, "task_score_name": pick.score_name, "task_score_error": pick.score_error}
    if pick.score_name == "exact_match":  # the key recommendation.json has always had
        score_figures.update(task_exact_match=pick.score, task_exact_match_error=pick.score_error)
    figures = {**score_figures, "task_examples": pick.examples, "task_ce": pick.task_ce, "forgetting_kl": pick.kl,
               "top1_agreement": pick.top1_agreement, "kl_topk": pick.kl_topk, "general_ce": pick.general_ce,
               "base_general_ce": pick.base_general_ce, "train_seconds": pick.train_seconds}
    return Recommendation(name=pick.name, rule=rule, score_name=name, tolerance=tolerance,
                          tolerance_kind="absolute" if rule == "task_score" else "relative", reason=reason,
                          fallback=fallback, warning=warning, candidates=[r.name for r in within], figures=figures)


def fmt_number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
