"""The `pipeline` command. Each subcommand parses flags, builds its config, and calls one function.

Options are generated from the config dataclasses (config.py), so every flag is also a config-file
key and the help text lives next to the default.
"""

from __future__ import annotations

import functools
import json
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields

import click

from pipeline import __version__
from pipeline.config import (
    CacheConfig,
    TrainConfig,
    load_config,
)
from pipeline.errors import ConfigError, PipelineError

_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _default_text(f) -> str:
    default = f.default_factory() if f.default is MISSING else f.default
    if default is None or default == []:
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
                choices = f.metadata.get("choices")
                ctype = click.Choice(choices) if choices else _CLICK_TYPES.get(inner, click.STRING)
                fn = click.option(f"--{name}", type=ctype, default=None, help=help_text)(fn)
        fn = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                          help="YAML config file (see configs/); flags override it.")(fn)
        return fn

    return decorate


def user_errors(fn: Callable) -> Callable:
    """Print a PipelineError as one line (each config problem on its own line) and exit non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            for p in e.problems:
                click.echo(f"error: {p}", err=True)
            sys.exit(e.exit_code)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is kept; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="pipeline")
def main() -> None:
    """Fine-tune an instruction LLM on a new task without forgetting: QLoRA + distillation from a cached
    teacher (Learning without Forgetting) + rehearsal of general data.

    \b
    Typical flow:
      pipeline make-rehearsal --prompts general.jsonl --out rehearsal.jsonl   # only if you have no general data
      pipeline cache-teacher --task-train task.jsonl --rehearsal-train rehearsal.jsonl --out cache/
      pipeline train --cache cache/ --out run/ --kd-lambda 0.5
      pipeline evaluate --cache cache/ --adapter run/adapter
    """


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
    from pipeline.cache import build_cache

    cfg = load_config(CacheConfig, config_file, flags)
    summary = build_cache(cfg)
    for line in summary.lines():
        click.echo(line)


@main.command("train")
@config_options(TrainConfig)
@user_errors
def train_cmd(config_file: str | None, **flags) -> None:
    """Train a LoRA adapter on the cached soft targets (CE + lambda * KL, rehearsal mixing).

    \b
    Example:
      pipeline train --cache runs/demo/cache --out runs/demo/lambda-0.5 --kd-lambda 0.5 --max-steps 100
    """
    from pipeline.train import train

    cfg = load_config(TrainConfig, config_file, flags)
    result = train(cfg)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False))

