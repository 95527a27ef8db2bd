"""Which run of a sweep to use, and why: the recommendation rule, from the runs' evaluate figures.

    1. candidates: the trained runs (never the base, never a failed run) whose task score is within the tolerance
       of the best run's: by default (auto) the sampling error of their difference from the best, or a fixed
       --task-tolerance;
    2. the pick: the candidate that forgets least (full-vocabulary KL(base || tuned) on held-out general
       prompts); ties (equal to 6 significant digits) go to the cheaper run (train time).

The task score is the one evaluate was configured with (--task-score: exact match by default, or normalized, json,
contains, regex, the user's own function), read from each run's report under its name; reports written before
there was a choice hold exact match only. The task score decides whenever every trained run has one, by the same
score, even when they are all equal (then every run is a candidate and forgetting decides; at all 0 the report
warns that the score cannot tell which run learned most). Only when a run has no task score (evaluate
--task-score none) or the runs were scored by different scores does step 1 use held-out task CE instead: lower is
better and the tolerance is relative (CE at most (1 + tolerance) x the best run's). The report, the plot and
recommendation.json say which rule and which score were used.

A NaN or infinite figure that the pick reads (task score, task CE, forgetting KL) is refused with one line naming
the run: it would make the pick depend on the order of the rows. A sweep records such a run as failed first.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from pipeline.errors import PipelineError
from pipeline.scoring import label

DEFAULT_SCORE = "exact_match"  # the score of reports written before --task-score had a choice
# [auto tolerance note] Without --task-tolerance a run is a candidate when its task score is within one standard
# error of its difference from the best run's, sqrt(e_best^2 + e_run^2) (each error as comparison_error gives it:
# floored, so never 0). Two runs whose scores differ by less than that cannot be told apart on these examples, so
# forgetting decides between them; more examples make the errors, and so the tolerance, smaller. A fixed 2 points
# is below that on any eval set of fewer than ~1,200 examples at a score near 0.5. When a run has no recorded error
# (a report from before there was one) the fixed AUTO_FALLBACK is used, and under the task CE rule (no per-example
# errors) the relative AUTO_FALLBACK.
AUTO_FALLBACK = 0.02
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


def error_floor(n: int) -> float:
    """The floor of the sampling error the tolerance warning uses for a mean score on n examples: the half-width of
    the Wilson score interval at z = 1 for a score of 0 or 1, 1 / (2 (n + 1)).

    [error floor note] The binomial standard error sqrt(p (1 - p) / n) is 0 at p = 0 or 1, as if 5 examples all
    right proved a score of exactly 1; the Wilson interval at z = 1 (one standard error, as score_error is) still
    spans 1 / (2 (n + 1)) there (0.083 on 5 examples, 0.005 on 100). For a score between 0 and 1 the recorded error
    is kept (for 0/1 scores it is larger than this floor), and a partial-credit score whose per-example scores
    happen to be all equal (recorded error 0) gets the floor too.
    """
    return 1 / (2 * (n + 1))


def comparison_error(r: RunFigures) -> float | None:
    """The sampling error of r's task score as the tolerance warning uses it: score_error, floored (error_floor)."""
    if r.score_error is None or not r.examples:
        return r.score_error
    return max(r.score_error, error_floor(r.examples))


def run_figures(row: dict) -> RunFigures:
    """A sweep row's figures; keys an older or partial evaluate report lacks (or a failed run's) become None."""
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


def trained_runs(rows: list[dict]) -> list[RunFigures]:
    """The figures of the rows the pick chooses from: trained runs (not the base) that did not fail."""
    return [run_figures(r) for r in rows if r["name"] != "base" and not r.get("failed")]


def one_run(rows: list[dict]) -> bool:
    """The rows of one trained run that did not fail and the base: nothing to choose between (`pipeline run`)."""
    return len(rows) == 2 and rows[0]["name"] == "base" and not rows[1].get("failed")


def choose_rule(runs: list[RunFigures]) -> str:
    """"task_score" when every trained run has a task score, by the same score (equal scores included), else
    "task_ce" (see the module docstring)."""
    if not runs or any(r.score is None for r in runs) or len({r.score_name for r in runs}) > 1:
        return "task_ce"
    return "task_score"


# The figures the pick reads, by the name a refusal gives them.
PICK_FIGURES = {"score": "task score", "task_ce": "task CE", "kl": "forgetting KL"}


def nonfinite_figures(r: RunFigures) -> list[str]:
    """The figures of r that the pick reads and that are NaN or infinite, e.g. ["task CE is nan"]."""
    return [f"{what} is {value}" for key, what in PICK_FIGURES.items()
            if (value := getattr(r, key)) is not None and not math.isfinite(value)]


def refuse_nonfinite(runs: list[RunFigures]) -> None:
    """Raise, naming the run, when a figure the pick reads is NaN or infinite (see the module docstring)."""
    for r in runs:
        bad = nonfinite_figures(r)
        if bad:
            raise PipelineError(f"run {r.name}: {', '.join(bad)} in its evaluation; no run can be recommended "
                                "against it: evaluate it again, or leave it out of the sweep")


@dataclass
class Recommendation:
    """The picked run and why; `to_json()` is recommendation.json."""

    name: str
    rule: str  # "task_score" or "task_ce"
    score_name: str  # the task score compared (evaluate --task-score), also under rule "task_ce"
    tolerance: float | None  # None under the auto tolerance: each run's own, the error of its difference
    tolerance_kind: str  # "auto" or "absolute" (task score), or "relative" (task CE)
    reason: str  # why this run, one or two sentences
    fallback: str | None  # the sentence saying why task CE was used instead of the task score
    warning: str | None  # the tolerance is below the sampling error, or every run scores 0
    candidates: list[str]  # the runs within the tolerance, best first
    figures: dict
    failed: list[str] = field(default_factory=list)  # runs that failed (sweep rows marked "failed"): never picked

    def to_json(self) -> dict:
        return asdict(self)


def _kl_key(r: RunFigures) -> tuple[float, float]:
    """Least forgetting first; ties (equal to 6 significant digits) go to the cheaper run."""
    kl = float(f"{r.kl:.6g}") if r.kl is not None else math.inf
    return kl, r.train_seconds if r.train_seconds is not None else math.inf


def recommend(rows: list[dict], tolerance: float | None = None) -> Recommendation | None:
    """The run to use: within the tolerance of the best task score, the one that forgets least (module docstring).

    Args:
        rows: sweep rows (name, eval, train_seconds, and "failed" for a run that failed); the row named "base" and
            failed rows are never picked.
        tolerance: absolute on the task score (0.02 = 2 points of a 0..1 score); relative on task CE; None: auto,
            the sampling error of each run's difference from the best ([auto tolerance note]).
    Returns:
        None when no trained run has a task score or a task CE (or every one failed).
    Raises:
        PipelineError: a figure the pick reads is NaN or infinite, naming the run.
    """
    runs = trained_runs(rows)
    failed = [r["name"] for r in rows if r["name"] != "base" and r.get("failed")]
    refuse_nonfinite(runs)
    rule = choose_rule(runs)
    name = score_name(runs)
    what = score_label(name)
    auto = tolerance is None
    if rule == "task_score":
        best = max(runs, key=lambda r: r.score)
        if auto and all(comparison_error(r) is not None for r in runs):
            within = [r for r in runs if best.score - r.score <= difference_error(best, r) + EDGE]
            measure = (f"{what} is within the sampling error of its difference from the best ({best.score:.3f}, "
                       f"{best.name}; +/- {difference_error(best, best):.3f} for a run scored as it was)")
            kind = "auto"
        else:
            tolerance = AUTO_FALLBACK if auto else tolerance
            within = [r for r in runs if best.score - r.score <= tolerance + EDGE]
            measure = f"{what} is within {tolerance:g} of the best ({best.score:.3f}, {best.name})"
            kind = "absolute"
        fallback = None
    else:
        tolerance = AUTO_FALLBACK if auto else tolerance
        kind = "relative"
        runs = [r for r in runs if r.task_ce is not None]
        if not runs:
            return None
        best = min(runs, key=lambda r: r.task_ce)
        within = [r for r in runs if r.task_ce <= best.task_ce * (1 + tolerance) + EDGE]
        percent = f"{tolerance * 100:g}%"
        measure = f"held-out task CE is within {percent} of the best ({best.task_ce:.4f}, {best.name})"
        names = {r.score_name for r in runs if r.score is not None}
        why = ("scored by different task scores: " + ", ".join(sorted(names)) if len(names) > 1 else
               "not scored for every run")
        fallback = (f"The {what} cannot compare the runs ({why}), so the pick uses held-out task CE "
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
    left_out = [r for r in runs if r not in within]
    if left_out:
        reason += f" Left out as learning less of the task: {', '.join(r.name for r in left_out)}."
    if failed:
        reason += f" Not considered, as failed: {', '.join(failed)}."
    warning = tolerance_warning(None if kind == "auto" else tolerance, best, left_out, runs, what) \
        if rule == "task_score" else None
    score_figures = {"task_score": pick.score, "task_score_name": pick.score_name, "task_score_error": pick.score_error}
    if pick.score_name == "exact_match":  # the key recommendation.json has always had
        score_figures.update(task_exact_match=pick.score, task_exact_match_error=pick.score_error)
    figures = {**score_figures, "task_examples": pick.examples, "task_ce": pick.task_ce, "forgetting_kl": pick.kl,
               "top1_agreement": pick.top1_agreement, "kl_topk": pick.kl_topk, "general_ce": pick.general_ce,
               "base_general_ce": pick.base_general_ce, "train_seconds": pick.train_seconds}
    return Recommendation(name=pick.name, rule=rule, score_name=name, tolerance=None if kind == "auto" else tolerance,
                          tolerance_kind=kind, reason=reason,
                          fallback=fallback, warning=warning, candidates=[r.name for r in within], figures=figures,
                          failed=failed)


def difference_error(a: RunFigures, b: RunFigures) -> float:
    """The sampling error of the difference between two runs' task scores, sqrt(e_a^2 + e_b^2) (comparison_error;
    both must have one)."""
    return math.sqrt(comparison_error(a) ** 2 + comparison_error(b) ** 2)


def tolerance_warning(tolerance: float | None, best: RunFigures, left_out: list[RunFigures],
                      runs: list[RunFigures], what: str) -> str | None:
    """Under the task-score rule, the report's warning (None when there is nothing to warn about):

    * a fixed tolerance (None: auto, which is this error by construction) is below the sampling error of the
      difference between the best run's score and that of the closest run left out, sqrt(e_best^2 + e_other^2)
      (each error floored: error_floor): that run may be as good, and was left out by chance;
    * every run scores 0: the score cannot tell which run learned most, and forgetting alone picked.
    """
    warnings = []
    closest = max(left_out, key=lambda r: r.score, default=None)
    e_best, e_other = comparison_error(best), comparison_error(closest) if closest is not None else None
    if tolerance is not None and e_best is not None and e_other is not None:  # auto (None) is that error
        error = difference_error(best, closest)
        if tolerance < error:
            warnings.append(
                f"The tolerance ({tolerance:g}) is below the sampling error of the difference between the best "
                f"run's task score and the closest run left out (+/- {error:.3f}: {best.name} {best.score:.3f} on "
                f"{best.examples} examples, {closest.name} {closest.score:.3f} on {closest.examples}): runs as good "
                "within that error may have been left out; raise --task-tolerance or score more examples.")
    if len(runs) > 1 and all(r.score <= EDGE for r in runs):
        warnings.append(f"Every run's {what} is 0: the score cannot tell which run learned most of the task, so the "
                        "pick is the one that forgets least, which may be the one that learned least; compare their "
                        "task CE in the table, or train longer.")
    return " ".join(warnings) or None


def fmt_number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
