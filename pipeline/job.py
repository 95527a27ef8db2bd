"""`pipeline run`: the whole job in one command, for a user with a model and task data.

    OUT/cache/                  cache-teacher: the teacher's targets (rehearsal data and a held-out task part made
                                when not given)
    OUT/base/eval.json          the base model scored: the baseline
    OUT/<run>/                  train + evaluate: one run with the defaults ("train"), or one per setting of a sweep
    OUT/report.md               task score and forgetting against the base, and which run to use and why
    OUT/adapter                 the adapter to use (a link to the recommended run's)

It is cache-teacher followed by a sweep over the runs asked for (one run when neither --lambdas nor --grid is
given), so a rerun resumes each stage where it stopped. Every setting is checked before any model is loaded, as far
as that can be done before the cache exists (the runs' inputs are checked against the cache before any training).
"""

from __future__ import annotations

import shutil
from dataclasses import fields, replace
from pathlib import Path

from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig, EvalConfig, SweepConfig, TrainConfig, load_config, overlay, section_values
from pipeline.errors import ConfigError, PipelineError
from pipeline.fileio import atomic_dir
from pipeline.sweep import RunsFailed, plan_runs, run_config, sweep

CACHE = "cache"
SINGLE_RUN = "train"  # the run's name when no sweep is asked for


def names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def job_configs(config_file: str | None, flags: dict) -> tuple[CacheConfig, SweepConfig, dict, EvalConfig]:
    """The settings of each stage from one set of flags (and a config file's sections), every problem at once."""
    out = flags.get("out")
    if not out:
        raise ConfigError(["out: required (--out)"])
    out_dir = Path(out)
    problems: list[str] = []
    cache_cfg = sweep_cfg = eval_cfg = None
    try:
        cache_flags = {k: v for k, v in flags.items() if k in names(CacheConfig)}
        cache_cfg = load_config(CacheConfig, config_file, {**cache_flags, "out": str(out_dir / CACHE)})
    except ConfigError as e:
        problems += e.problems
    sweep_flags = {k: v for k, v in flags.items() if k in names(SweepConfig)}
    try:
        sweep_cfg = load_config(SweepConfig, config_file, {**sweep_flags, "cache": str(out_dir / CACHE),
                                                           "out": str(out_dir)})
        if not (sweep_cfg.lambdas or sweep_cfg.grid or sweep_cfg.runs):
            sweep_cfg = replace(sweep_cfg, runs=[{"name": SINGLE_RUN}])
    except ConfigError as e:
        problems += e.problems
    # The cache's settings (top_k, max_length, temperature, the inputs) are the cache's alone, which training then
    # reads from it; --batch-size sets both the teacher's and the training's batch.
    train_only = names(TrainConfig) - names(SweepConfig) - (names(CacheConfig) - {"batch_size"}) - {"resume",
                                                                                                  "overwrite"}
    fixed = overlay(section_values(config_file, "train"),
                    {k: v for k, v in flags.items() if k in train_only and v is not None})
    if sweep_cfg is not None:
        try:
            runs = plan_runs(sweep_cfg)
            if any(r.name in (CACHE, "adapter") for r in runs):
                problems.append(f"run names must not be {CACHE!r} or 'adapter' (the job's own outputs)")
            shared = {k: getattr(sweep_cfg, k) for k in ("model", "seed", "precision", "device", "attn")}
            for run in runs:
                try:
                    run_config(run, fixed, shared, str(out_dir / CACHE), out_dir)
                except ConfigError as e:
                    problems += e.problems
        except ConfigError as e:
            problems += e.problems
        try:
            eval_cfg = load_config(EvalConfig, config_file, {"cache": sweep_cfg.cache, "limit": sweep_cfg.eval_limit,
                                                             "task_score": getattr(sweep_cfg, "task_score", None),
                                                             "max_new_tokens": flags.get("max_new_tokens")})
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cache_cfg, sweep_cfg, fixed, eval_cfg


def run_job(config_file: str | None, flags: dict, *, command: str, log=print) -> Path:
    """cache-teacher, then the runs (train + evaluate, the base too), the report and OUT/adapter; returns OUT."""
    cache_cfg, sweep_cfg, fixed, eval_cfg = job_configs(config_file, flags)
    out = Path(sweep_cfg.out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: exists and is not a directory")
    log(f"== 1/2 cache-teacher -> {cache_cfg.out}")
    for line in build_cache(cache_cfg, log=log).lines():
        log(line)
    log(f"== 2/2 train and evaluate -> {out}")
    try:
        sweep(sweep_cfg, fixed, eval_cfg, command=command, log=log)
    except RunsFailed:  # the runs that did not fail are reported and recommended: hand the pick over all the same
        hand_over(out)
        raise
    hand_over(out)
    return out


def hand_over(out: Path) -> None:
    """OUT/adapter, when the sweep recommended a run."""
    recommended = out / "recommended" / "adapter"
    if recommended.exists():
        link_adapter(out, recommended)


def link_adapter(out: Path, recommended: Path) -> None:
    """OUT/adapter: a relative link to the recommended run's adapter (a copy where links cannot be made)."""
    target = out / "adapter"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    try:
        target.symlink_to(Path("recommended") / "adapter", target_is_directory=True)
    except OSError:  # no symlinks on this file system
        with atomic_dir(target) as tmp:
            shutil.copytree(recommended.resolve(), tmp, dirs_exist_ok=True)
