"""`pipeline sweep`: train + evaluate several settings from ONE cache, then recommend one and report.

The teacher is never run here: every run trains against the same cached targets, which is what makes a
lambda sweep cost only training. The base model is evaluated once as the baseline row (its eval.json is kept
only if made with the same evaluate settings, from a cache with the same content, by the same model). An
interrupted sweep resumes: finished runs (eval.json written) are kept, a run with checkpoints continues from them.
A run that fails (training diverges, or train or evaluate raises a PipelineError or RuntimeError, or its figures
are NaN) is recorded as failed in OUT/<run>/failed.json and in its row, and the other runs go on; a rerun keeps it
failed unless given --retry-failed ([failed run note]). Then recommend.py picks the run to use (within
--task-tolerance of the best task score, the one that forgets least) and report.py draws the table and plots;
this module hands its adapter over in OUT/recommended/, and at the very end raises RunsFailed naming the runs
that failed.

    OUT/
      base/eval.json
      <run name>/{adapter/, metrics.jsonl, run.yaml, checkpoints/, eval.json, failed.json if it failed}
      report.md, tradeoff.png, curves.png, rows.json, recommendation.json
      recommended/{adapter -> ../<picked run>/adapter, README.md}
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import shutil
import traceback
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline import __version__
from pipeline.cache.read import Cache, open_cache
from pipeline.config import (
    EvalConfig,
    SweepConfig,
    TrainConfig,
    _coerce,
    load_config,
    overlay,
    settings_in,
)
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluate import evaluate
from pipeline.fileio import atomic_dir, atomic_write_json, read_json
from pipeline.model_source import ModelSource, open_model_source
from pipeline.recommend import Recommendation, nonfinite_figures, one_run, recommend, run_figures
from pipeline.report import plot_curves, plot_tradeoff, write_report
from pipeline.run_dir import read_run_yaml, refuse_other_settings
from pipeline.scoring import NONE, load_scorer
from pipeline.train import check_inputs, run_length, train

# Train settings that a sweep sets itself, per run.
PER_RUN = ("cache", "out", *settings_in(TrainConfig, "run"))
EVAL_KEYS = settings_in(EvalConfig, "scoring")
FAILED = "failed.json"  # in a run directory: the run failed, and why ([failed run note])


class RunsFailed(PipelineError):
    """Some runs of a sweep failed; everything else was trained, evaluated, reported and recommended.

    Raised at the very end, after the outputs are written; `rows` is what sweep() would have returned (every run's
    row, the failed ones marked), so that a caller can still show the table and hand over the recommended adapter.
    """

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


@dataclass
class PlannedRun:
    name: str
    overrides: dict


def _fmt_value(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def plan_runs(cfg: SweepConfig) -> list[PlannedRun]:
    """The runs of a sweep: the product of --lambdas and every --grid axis, then the config's extra `runs`."""
    train_fields = {f.name for f in fields(TrainConfig)} - set(PER_RUN)
    hints = typing.get_type_hints(TrainConfig)
    problems: list[str] = []
    axes: list[tuple[str, list]] = []
    if cfg.lambdas:
        axes.append(("kd_lambda", list(cfg.lambdas)))
    for spec in cfg.grid:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            problems.append(f"--grid {spec!r}: expected key=v1,v2")
        elif key not in train_fields:
            problems.append(f"--grid {spec!r}: {key!r} is not a train setting")
        else:
            axes.append((key, [_coerce(v.strip(), hints[key], f"--grid {key}", problems) for v in values.split(",")]))
    runs = []
    if axes:
        for combo in itertools.product(*(values for _, values in axes)):
            overrides = {k: v for (k, _), v in zip(axes, combo, strict=True)}
            runs.append(PlannedRun(",".join(f"{k}={_fmt_value(v)}" for k, v in overrides.items()), overrides))
    for i, extra in enumerate(cfg.runs):
        extra = dict(extra)
        name = str(extra.pop("name", "")) or ",".join(f"{k}={_fmt_value(v)}" for k, v in extra.items())
        for k, v in extra.items():
            if k not in train_fields:
                problems.append(f"sweep.runs[{i}].{k}: not a train setting")
            else:
                extra[k] = _coerce(v, hints[k], f"sweep.runs[{i}].{k}", problems)
        runs.append(PlannedRun(name, extra))
    names = [r.name for r in runs]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"two runs are both named {n!r}")
    if not runs:
        problems.append("nothing to sweep: give --lambdas, --grid key=v1,v2 or sweep.runs in the config")
    if any("/" in n or n in ("", ".", "..", "base") for n in names):
        problems.append("run names must not contain '/' or be 'base'")
    if problems:
        raise ConfigError(problems)
    return runs


def _finished(run_dir: Path, want: TrainConfig, cache_fingerprint: str) -> bool:
    """True if run_dir holds a finished run with exactly these settings; refuse one trained otherwise.

    Settings that only change what a run reports and where things are (the sweep directory or cache moved, or
    spelled as another path) may differ; the cache's content may not (run_dir.refuse_other_settings).
    """
    recorded = read_run_yaml(run_dir)
    if recorded is None:
        return False
    refuse_other_settings(run_dir, recorded, want, cache_fingerprint, doing="trained",
                          fix="use another sweep --out or delete that run")
    return recorded.get("status") == "finished" and (run_dir / "adapter" / "adapter_config.json").is_file()


def _eval_current(path: Path, eval_cfg: EvalConfig, scorer_sha256: str | None, cache: Cache,
                  model: ModelSource) -> dict | None:
    """A previous eval.json if it was made with the same evaluation settings (and, for a python: task score, the
    same content of the user's scorer file: an edited scorer rescores every run), from a cache with the same
    content and by the same model (their fingerprints; a report that predates the model's is made again)."""
    if not path.is_file():
        return None
    try:
        report = read_json(path, "evaluation report")
    except PipelineError:
        return None
    settings = report.get("settings", {})
    if any(settings.get(k) != getattr(eval_cfg, k) for k in EVAL_KEYS):
        return None
    if settings.get("task_score_sha256") != scorer_sha256:
        return None
    if report.get("cache_fingerprint") != cache.fingerprint or report.get("model_fingerprint") != model.fingerprint:
        return None
    return report


# [failed run note] A run that fails is recorded in OUT/<run>/failed.json (stage, error) and left out of the pick;
# the sweep goes on with the other runs and raises RunsFailed at the end, after writing its outputs. A rerun does
# not train it again: resuming is exact, so a run that diverged would diverge again at the same step, every time.
# --retry-failed removes the marker and tries again (from the run's last checkpoint), e.g. after an out-of-memory
# error on a busy GPU. Failures of the environment rather than of the run (a full disk, an unwritable directory:
# a PipelineError caused by an OSError) and interruptions stop the sweep as before.
RUN_ERRORS = (PipelineError, RuntimeError)


def read_failure(run_dir: Path) -> dict | None:
    """The failure recorded in run_dir ([failed run note]), or None; an unreadable marker still counts as failed."""
    path = run_dir / FAILED
    if not path.exists():
        return None
    try:
        doc = read_json(path, "failed-run record")
    except PipelineError as e:
        return {"stage": "unknown", "error": str(e)}
    return {"stage": str(doc.get("stage", "unknown")), "error": str(doc.get("error", ""))}


def record_failure(run_dir: Path, stage: str, error: BaseException) -> dict:
    """Write run_dir/failed.json for a run that failed in `stage` ("train" or "evaluate"); returns the row's record.

    The message is the error's one line; an unexpected error (not a PipelineError) also keeps its traceback there.
    """
    failure = {"stage": stage, "error": " ".join(str(error).split()) or type(error).__name__}
    doc = {**failure, "type": type(error).__name__, "package_version": __version__}
    if not isinstance(error, PipelineError):
        doc["traceback"] = "".join(traceback.format_exception(error))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / FAILED, doc)
    return failure


def _environment_error(error: BaseException) -> bool:
    """A failure of the machine, not of the run: a PipelineError raised for an OSError (a full disk, ...)."""
    return isinstance(error, PipelineError) and isinstance(error.__cause__, OSError)


def sweep(cfg: SweepConfig, fixed_train: dict, eval_cfg: EvalConfig, *, command: str, log=print) -> list[dict]:
    """Run the sweep (see the module docstring); returns one summary row per run, base first.

    Raises:
        RunsFailed: after writing every output, when some runs failed (their rows carry "failed").
    """
    runs = plan_runs(cfg)
    cache = open_cache(cfg.cache)
    out = Path(cfg.out)
    shared = {"model": cfg.model, "seed": cfg.seed, "precision": cfg.precision, "device": cfg.device, "attn": cfg.attn}
    source = open_model_source(cfg.model)
    train_cfgs = check_runs(runs, fixed_train, shared, cache, out, source)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    scorer_sha256 = load_scorer(eval_cfg.task_score).sha256 if eval_cfg.task_score != NONE else None
    reusable = {"eval_cfg": eval_cfg, "scorer_sha256": scorer_sha256, "cache": cache, "model": source}

    base_path = out / "base" / "eval.json"
    report = _eval_current(base_path, **reusable)
    if report is None:
        log("== base model (the baseline row)")
        report = evaluate(dataclasses.replace(eval_cfg, **shared, cache=str(cache.path), adapter=None,
                                              out=str(base_path)), log=log)
    rows.append({"name": "base", "kd_lambda": None, "rehearsal_ratio": None, "kd_on": None, "eval": report,
                 "train_seconds": 0.0})

    for i, (run, train_cfg) in enumerate(zip(runs, train_cfgs, strict=True), start=1):
        run_dir = out / run.name
        failure = read_failure(run_dir)
        if failure is not None and cfg.retry_failed:
            (run_dir / FAILED).unlink()
            failure = None
        if failure is not None:
            log(f"== run {i}/{len(runs)}: {run.name} (failed earlier, not retried: {failure['error']}; pass "
                "--retry-failed to try it again)")
            report = None
        else:
            report, failure = train_and_evaluate(run, train_cfg, i, len(runs), shared, reusable, log)
        summary = (read_run_yaml(run_dir) or {}).get("summary", {})
        rows.append({"name": run.name, "kd_lambda": train_cfg.kd_lambda, "rehearsal_ratio": train_cfg.rehearsal_ratio,
                     "kd_on": train_cfg.kd_on, "eval": report, "train_seconds": summary.get("train_seconds"),
                     **({"failed": failure} if failure is not None else {}),
                     "curve": eval_curve(lines := metric_lines(run_dir / "metrics.jsonl")),
                     **({"max_forgetting": train_cfg.max_forgetting, "budget_curve": budget_curve(lines)}
                        if train_cfg.max_forgetting is not None else {})})

    write_outputs(out, rows, cfg.task_tolerance, command=command, log=log)
    failed = [r for r in rows if r.get("failed")]
    if failed:
        named = ", ".join(f"{r['name']} ({r['failed']['stage']}: {_shorten(r['failed']['error'])})"
                          for r in failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        raise RunsFailed(f"{len(failed)} of {len(runs)} runs failed: {named}; the others are reported and "
                         f"recommended in {out / 'report.md'}, each error in its run's {FAILED}; rerun with "
                         "--retry-failed to try the failed runs again", rows)
    return rows


def _shorten(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def train_and_evaluate(run: PlannedRun, train_cfg: TrainConfig, i: int, n: int, shared: dict, reusable: dict,
                       log=print) -> tuple[dict | None, dict | None]:
    """One run of the sweep: train it (or keep it, finished earlier), evaluate it (or keep its eval.json).

    Returns:
        (its evaluate report, None), or (None, its failure as record_failure wrote it) ([failed run note]).
    """
    run_dir = Path(train_cfg.out)
    eval_cfg, cache = reusable["eval_cfg"], reusable["cache"]
    done = _finished(run_dir, train_cfg, cache.fingerprint)
    report = _eval_current(run_dir / "eval.json", **reusable) if done else None
    if report is not None:
        log(f"== run {i}/{n}: {run.name} (finished earlier, kept)")
    stage = "train"
    try:
        if report is None and not done:
            log(f"== run {i}/{n}: {run.name}")
            train(dataclasses.replace(train_cfg, resume=run_dir.exists()), log=log)
            gc.collect()
        stage = "evaluate"
        if report is None:
            report = evaluate(dataclasses.replace(eval_cfg, **shared, cache=str(cache.path),
                                                  adapter=str(run_dir / "adapter"), out=str(run_dir / "eval.json")),
                              log=log)
            gc.collect()
        bad = nonfinite_figures(run_figures({"name": run.name, "eval": report}))
        if bad:  # NaN would make the pick depend on the order of the rows
            raise PipelineError(f"{', '.join(bad)} in {run_dir / 'eval.json'}")
    except RUN_ERRORS as e:
        if _environment_error(e):
            raise
        failure = record_failure(run_dir, stage, e)
    else:
        return report, None
    gc.collect()  # the failed run's model, held by the traceback until now
    log(f"run {run.name} failed ({failure['stage']}): {failure['error']}; going on with the other runs")
    return None, failure


def run_config(run: PlannedRun, fixed_train: dict, shared: dict, cache: str, out: Path) -> TrainConfig:
    """The train settings of one run: the shared settings, the sweep's fixed train settings, then the run's own.

    Raises:
        ConfigError: every problem of the run's settings, each naming the run.
    """
    try:
        return load_config(TrainConfig, None, {**overlay({**fixed_train, **shared}, run.overrides), "cache": cache,
                                               "out": str(out / run.name)})
    except ConfigError as e:
        raise ConfigError([f"run {run.name}: {p}" for p in e.problems]) from None


def check_runs(runs: list[PlannedRun], fixed_train: dict, shared: dict, cache: Cache, out: Path,
               source: ModelSource) -> list[TrainConfig]:
    """Every run's train settings, checked before any work: its config, its inputs against the cache and the model
    (train.check_inputs), and a run kept from an earlier sweep against them. All problems are raised together, each
    naming its run, so that a sweep never trains some runs and then stops on a later one."""
    configs, problems = [], []
    for run in runs:
        run_dir = out / run.name
        try:
            train_cfg = run_config(run, fixed_train, shared, str(cache.path), out)
        except ConfigError as e:
            problems += e.problems
            continue
        held_out = cache.count("task", "eval") + cache.count("rehearsal", "eval")
        if "eval_every" not in {**fixed_train, **run.overrides} and held_out:  # curves, unless the user chose
            steps = run_length(train_cfg, cache.count("task", "train")).max_steps
            train_cfg = dataclasses.replace(train_cfg, eval_every=max(1, steps // 8))
        try:
            check_inputs(train_cfg, cache, source, log=lambda *_: None)
            _finished(run_dir, train_cfg, cache.fingerprint)
        except PipelineError as e:
            problems.append(f"run {run.name}: {e}")
            continue
        configs.append(train_cfg)
    if problems:
        raise ConfigError(problems)
    return configs


def write_outputs(out: Path, rows: list[dict], tolerance: float | None, *, command: str,
                  log=print) -> Recommendation | None:
    """Everything a sweep hands over once its runs are evaluated: the recommendation (recommendation.json and
    OUT/recommended/), report.md, tradeoff.png, curves.png and rows.json."""
    rec = recommend(rows, tolerance)
    if rec is not None:
        write_recommended(out, rec)
        atomic_write_json(out / "recommendation.json",
                          {**rec.to_json(), "adapter": str(out / "recommended" / "adapter"),
                           "run_adapter": str(out / rec.name / "adapter")})
        if not one_run(rows):  # one run (and the base) leaves nothing to choose
            log(f"recommended: {rec.name}. {rec.reason}" + (f" {rec.fallback}" if rec.fallback else ""))
    else:  # nothing to recommend: no stale pick from an earlier sweep in this directory either
        (out / "recommendation.json").unlink(missing_ok=True)
        shutil.rmtree(out / "recommended", ignore_errors=True)
    curves = plot_curves(out, rows)
    if curves is None:
        (out / "curves.png").unlink(missing_ok=True)  # not one left from an earlier sweep with other runs
    plot_tradeoff(out, rows, rec)
    write_report(out, rows, rec, command=command, curves=curves is not None)
    atomic_write_json(out / "rows.json", rows)
    return rec


def metric_lines(metrics: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl that carry a step; [] when there is no file."""
    if not metrics.is_file():
        return []
    docs = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of an interrupted run
        if isinstance(doc, dict) and "step" in doc:
            docs.append(doc)
    return docs


def eval_curve(lines: list[dict]) -> list[dict]:
    """From a run's metric_lines, its eval lines (train --eval-every): step, task_ce, kl_topk; [] when none."""
    return [{"step": d["step"], "task_ce": d.get("task_ce"), "kl_topk": d.get("kl_topk")}
            for d in lines if d.get("eval")]


def budget_curve(lines: list[dict]) -> list[dict]:
    """From a run's metric_lines, the multiplier and the constraint of a --max-forgetting run: step, lambda (the KL
    weight the step used) and constraint (the running KL per rehearsal token); [] when none."""
    return [{"step": d["step"], "lambda": d["lambda"], "constraint": d.get("constraint")}
            for d in lines if not d.get("eval") and "lambda" in d]


def write_recommended(out: Path, rec: Recommendation) -> Path:
    """OUT/recommended/: `adapter`, a relative link to ../<run>/adapter (a copy where links cannot be made), and
    a README naming the run; replaced as a whole, so a rerun that picks another run leaves no trace of the old."""
    target = Path("..") / rec.name / "adapter"
    with atomic_dir(out / "recommended") as tmp:
        try:
            (tmp / "adapter").symlink_to(target, target_is_directory=True)
            how = f"`adapter` is a link to `{target}`"
        except OSError:  # no symlinks here (some Windows and network file systems): a real copy, a few MB
            shutil.copytree(out / rec.name / "adapter", tmp / "adapter")
            how = f"`adapter` is a copy of `{rec.name}/adapter` (this file system cannot hold links)"
        (tmp / "README.md").write_text(
            f"# The recommended run: {rec.name}\n\n{rec.reason}" + (f" {rec.fallback}" if rec.fallback else "")
            + f"\n\n{how}. Use it with\n\n    pipeline generate --adapter {out}/recommended/adapter --prompt ...\n"
            f"    pipeline merge --adapter {out}/recommended/adapter --out merged/\n\nSee ../report.md and "
            "../recommendation.json.\n", encoding="utf-8")
    return out / "recommended"
