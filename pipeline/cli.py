"""The `pipeline` command. Each subcommand parses flags, builds its config, and calls one function.

Options are generated from the config dataclasses (config.py), so every flag is also a config-file
key and the help text lives next to the default.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path

import click

from pipeline import __version__
from pipeline.config import (
    CacheConfig,
    EvalConfig,
    GenerateConfig,
    InspectConfig,
    MergeConfig,
    RehearsalConfig,
    SweepConfig,
    TrainConfig,
    load_config,
)
from pipeline.errors import ConfigError, PipelineError

_METAVARS = {int: "INTEGER", float: "FLOAT"}
DISTRIBUTED_COMMANDS = ("cache-teacher", "train")  # run under torchrun; the other commands run in one process


def log_to_stderr(message: str) -> None:
    """Progress notes for commands whose stdout is JSON, so that `pipeline train ... | jq` works."""
    click.echo(message, err=True)


def _default_text(f) -> str:
    default = f.default_factory() if f.default is MISSING else f.default
    if default is None or default == [] or default == {}:
        return ""
    if isinstance(default, bool):
        return f" [default: {'on' if default else 'off'}]"
    return f" [default: {','.join(map(str, default)) if isinstance(default, list) else default}]"


def config_options(*classes: type, skip: tuple[str, ...] = ()) -> Callable:
    """Add one click option per dataclass field (union of `classes`, first wins), plus --config."""

    def decorate(fn: Callable) -> Callable:
        seen: dict[str, object] = {}
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in fields(cls):
                if f.name not in seen and f.name not in skip and f.name != "runs":
                    seen[f.name] = (f, hints[f.name])
        for f, tp in reversed(list(seen.values())):
            name = f.name.replace("_", "-")
            help_text = f.metadata["help"] + _default_text(f)
            inner = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
            if tp is bool:
                fn = click.option(f"--{name}/--no-{name}", default=None, help=help_text)(fn)
            elif typing.get_origin(tp) is list:
                repeat = f.metadata.get("repeat")
                fn = click.option(f"--{name}", multiple=bool(repeat), default=None, help=help_text,
                                  metavar="TEXT" if repeat else "V1,V2,...")(fn)
            else:
                # Taken as text and checked by load_config, so that every bad flag is reported at once, next
                # to the config file's problems (click would stop at the first).
                choices = f.metadata.get("choices")
                metavar = f"[{'|'.join(choices)}]" if choices else _METAVARS.get(inner, "TEXT")
                if typing.get_origin(tp) is dict:
                    metavar = "KEY=VALUE,..."
                fn = click.option(f"--{name}", type=click.STRING, metavar=metavar, default=None, help=help_text)(fn)
        fn = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                          help="YAML config file (see configs/); flags override it.")(fn)
        return fn

    return decorate


def user_errors(fn: Callable) -> Callable:
    """Print a PipelineError as one line (each config problem on its own line) and exit non-zero.

    Under torchrun an error that every rank raised alike is printed by rank 0 only (distributed.agree); one
    raised by another rank alone is printed by that rank, as `error: [rank N] ...`.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            from pipeline.distributed import error_prefix

            if not getattr(e, "quiet", False):
                for p in e.problems if isinstance(e, ConfigError) else [str(e)]:
                    click.echo(f"error: {error_prefix()}{p}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is kept; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="pipeline")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Fine-tune an instruction LLM on a new task without forgetting: QLoRA + distillation from a cached
    teacher (Learning without Forgetting) + rehearsal of general data.

    \b
    The whole job in one command (cache, train, evaluate against the base, report; rerun to resume):
      pipeline run --task-train task.csv --out runs/my-task
    The same, step by step:
      pipeline cache-teacher --task-train task.csv --out cache/   # makes rehearsal data and a held-out part
      pipeline train --cache cache/ --out run/
      pipeline evaluate --cache cache/ --adapter run/adapter

    \b
    On several GPUs or machines, the two long stages run under torchrun:
      torchrun --nproc-per-node 8 -m pipeline cache-teacher ...
      torchrun --nproc-per-node 8 -m pipeline train ...
    """
    if os.environ.get("WORLD_SIZE", "1") != "1" and ctx.invoked_subcommand not in DISTRIBUTED_COMMANDS:
        # Under torchrun every process would run the whole command and write the same outputs.
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"error: {ctx.invoked_subcommand} runs in one process; run it without torchrun (only "
                       f"{' and '.join(DISTRIBUTED_COMMANDS)} use several)", err=True)
        sys.exit(2)


@main.command("cache-teacher")
@config_options(CacheConfig)
@user_errors
def cache_teacher_cmd(config_file: str | None, **flags) -> None:
    """Run the frozen 4-bit base model once over the corpus and store its top-k log-probs (sharded Parquet).

    Rerun the same command on the same --out to resume after an interruption.

    \b
    Example:
      pipeline cache-teacher --task-train data/demo/task_train.jsonl --task-eval data/demo/task_eval.jsonl \\
          --out runs/demo/cache --top-k 32 --max-length 384
    """
    from pipeline import distributed
    from pipeline.cache.write import build_cache

    with distributed.launched():  # one rank of a torchrun job, or a plain single process
        cfg = distributed.agree(lambda: load_config(CacheConfig, config_file, flags))
        summary = build_cache(cfg)
        if distributed.is_main():
            for line in summary.lines():
                click.echo(line)


@main.command("train")
@config_options(TrainConfig)
@user_errors
def train_cmd(config_file: str | None, **flags) -> None:
    """Train a LoRA adapter on the cached soft targets (CE + lambda * KL, rehearsal mixing).

    \b
    Example:
      pipeline train --cache runs/demo/cache --out runs/demo/lambda-2 --kd-lambda 2 --max-steps 100
    """
    from pipeline import distributed
    from pipeline.train import train

    with distributed.launched():  # one rank of a torchrun job, or a plain single process
        cfg = distributed.agree(lambda: load_config(TrainConfig, config_file, flags))
        result = train(cfg, log=log_to_stderr)
        if distributed.is_main():
            click.echo(json.dumps(result, indent=2, ensure_ascii=False))



@main.command("evaluate")
@config_options(EvalConfig)
@user_errors
def evaluate_cmd(config_file: str | None, **flags) -> None:
    """Score an adapter (or, without --adapter, the base model) on the cache's held-out rows, as JSON:
    task CE and the task score, exact match unless --task-score says otherwise (what it learned), KL(base || tuned)
    and CE on general data (what it forgot).

    \b
    Examples:
      pipeline evaluate --cache runs/demo/cache --adapter runs/demo/sweep/kd_lambda=0.5/adapter --out eval.json
      pipeline evaluate --cache runs/demo/cache --adapter run/adapter --task-score json   # + per-field accuracy
      pipeline evaluate --cache my/cache --adapter run/adapter --task-score python:my_scorer.py:score
    """
    from pipeline.evaluate import dumps, evaluate

    cfg = load_config(EvalConfig, config_file, flags)
    click.echo(dumps(evaluate(cfg, log=log_to_stderr)))


@main.command("sweep")
@config_options(SweepConfig, TrainConfig, skip=("resume", "overwrite"))
@user_errors
def sweep_cmd(config_file: str | None, **flags) -> None:
    """Train + evaluate several settings from ONE cache (the teacher is never rerun), then recommend one run and
    write OUT/report.md, OUT/tradeoff.png, OUT/curves.png and OUT/recommendation.json. Any train flag sets the
    fixed part of every run. Rerun to resume.

    The recommended run: among the runs whose task score (--task-score, exact match by default) is within the
    tolerance of the best run's (by default the sampling error of their difference; --task-tolerance fixes it),
    the one that forgets least (full-vocabulary KL on
    held-out general prompts); ties go to the cheaper run. Only when a run has no task score (or the runs were
    scored by different scores) is held-out task CE used instead (relative tolerance).
    Its adapter is linked at OUT/recommended/adapter, ready for `generate` and `merge`. A run that fails (e.g.
    diverges) is reported as failed and the others go on; the command then exits non-zero naming it, and a
    rerun keeps it failed unless given --retry-failed.

    \b
    Examples:
      pipeline sweep --cache runs/demo/cache --out runs/demo/sweep --lambdas 0,0.5,1 --max-steps 60
      pipeline sweep --cache runs/demo/cache --out runs/rank --grid lora_r=4,8,16
    """
    from dataclasses import fields as dc_fields

    from pipeline.config import overlay, section_values
    from pipeline.sweep import RunsFailed, sweep

    sweep_names = {f.name for f in dc_fields(SweepConfig)}
    train_names = {f.name for f in dc_fields(TrainConfig)} - sweep_names
    cfg = load_config(SweepConfig, config_file, {k: v for k, v in flags.items() if k in sweep_names})
    fixed = overlay(section_values(config_file, "train"),
                    {k: v for k, v in flags.items() if k in train_names and v is not None})
    eval_cfg = load_config(EvalConfig, config_file, {"cache": cfg.cache, "limit": cfg.eval_limit,
                                                     "task_score": cfg.task_score})
    command = "pipeline sweep " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["sweep"] else "pipeline sweep"
    try:
        rows = sweep(cfg, fixed, eval_cfg, command=command)
    except RunsFailed as failed:  # the other runs are reported: show them, then the one-line error
        show_sweep(cfg.out, failed.rows)
        raise
    show_sweep(cfg.out, rows)


def show_sweep(out: str, rows: list[dict]) -> None:
    """The sweep's table on stdout, and where its report and recommended adapter are."""
    from pipeline.report import report_table

    click.echo(report_table(rows))
    click.echo(f"report: {out}/report.md, plots: {out}/tradeoff.png, {out}/curves.png")
    if (Path(out) / "recommended" / "adapter").exists():
        click.echo(f"recommended adapter: {out}/recommended/adapter (why: {out}/recommendation.json)")


@main.command("run")
@config_options(CacheConfig, SweepConfig, TrainConfig, EvalConfig, skip=("cache", "resume", "overwrite", "adapter",
                                                                      "limit"))
@user_errors
def run_cmd(config_file: str | None, **flags) -> None:
    """The whole job in one command: cache the teacher's targets, train an adapter with the defaults, score the base
    and the adapter on held-out rows, and write OUT/report.md (task score and forgetting against the base),
    OUT/adapter and OUT/cache. Task rows alone are enough: without rehearsal data the base model answers the general
    prompts that ship with pipeline, and without --task-eval a part of the task rows is held out (--eval-fraction).
    With --lambdas or --grid it trains one run per setting and recommends one, as `sweep` does. Rerun to resume.

    \b
    Examples:
      pipeline run --model Qwen/Qwen2.5-1.5B-Instruct --task-train my_task.csv --out runs/mine
      pipeline run --task-train data/demo/task_train.jsonl --out runs/lambdas --lambdas 0,1 --max-steps 40
    """
    from pipeline.job import run_job

    command = "pipeline run " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["run"] else "pipeline run"
    out = run_job(config_file, flags, command=command, log=log_to_stderr)
    click.echo(f"report: {out}/report.md")
    if (out / "adapter").exists():
        click.echo(f"adapter: {out}/adapter (use it with pipeline generate --adapter {out}/adapter, or merge it)")


@main.command("make-rehearsal")
@config_options(RehearsalConfig)
@user_errors
def make_rehearsal_cmd(config_file: str | None, **flags) -> None:
    """Let the base model answer general prompts and write them as rehearsal data (JSONL) for cache-teacher.
    Samples at temperature 1 by default (keeps the base distribution); --greedy sharpens it. Rerun to resume.

    \b
    Example:
      pipeline make-rehearsal --prompts data/demo/general_prompts_train.jsonl --out runs/demo/rehearsal_train.jsonl
    """
    from pipeline.rehearsal import make_rehearsal

    cfg = load_config(RehearsalConfig, config_file, flags)
    for line in make_rehearsal(cfg).lines():
        click.echo(line)


@main.command("generate")
@config_options(GenerateConfig)
@user_errors
def generate_cmd(config_file: str | None, **flags) -> None:
    """Answer prompts with the base model plus an adapter (chat template applied).

    \b
    Examples:
      pipeline generate --adapter runs/demo/sweep/kd_lambda=0.5/adapter --prompt "What is the capital of France?"
      pipeline generate --adapter run/adapter --prompts data/templates/prompts.jsonl --out answers.jsonl
    """
    from pipeline.generate import generate

    cfg = load_config(GenerateConfig, config_file, flags)
    records = generate(cfg)
    if not cfg.out:
        for r in records:
            click.echo(json.dumps(r, ensure_ascii=False))


@main.command("merge")
@config_options(MergeConfig)
@user_errors
def merge_cmd(config_file: str | None, **flags) -> None:
    """Merge the adapter into a full-precision copy of the base model and save a plain Hugging Face model.

    \b
    Example:
      pipeline merge --adapter runs/demo/sweep/kd_lambda=0.5/adapter --out runs/demo/merged
    """
    from pipeline.merge import merge_adapter

    cfg = load_config(MergeConfig, config_file, flags)
    click.echo(f"merged model: {merge_adapter(cfg.model, cfg.adapter, cfg.out, cfg.dtype)}")


@main.command("inspect")
@click.argument("cache", metavar="CACHE")
@config_options(InspectConfig, skip=("cache",))
@user_errors
def inspect_cmd(cache: str, config_file: str | None, **flags) -> None:
    """Show what a cache holds: the teacher and settings that made it, rows and tokens per role/split, bytes per
    token, padding. With --example ID, that example's prompt and response and, at each response position, the
    teacher's top 5 tokens with their probabilities and the residual mass.

    \b
    Examples:
      pipeline inspect runs/demo/cache
      pipeline inspect runs/demo/cache --example task_train.jsonl:1
      pipeline inspect runs/demo/cache --example task_train.jsonl:1 --json | jq '.example.positions[0]'
    """
    from pipeline.cache.inspection import dumps, inspect_cache, render

    cfg = load_config(InspectConfig, config_file, {**flags, "cache": cache})
    report = inspect_cache(cfg)
    click.echo(dumps(report) if cfg.json else render(report))
