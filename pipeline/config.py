"""Typed settings for every command: the dataclasses are the single source of defaults, help and checks.

Precedence: built-in defaults < `--config FILE.yaml` < command-line flags. A config file has the shared
keys (`model`, `seed`, `precision`, `device`) at the top level and one section per command::

    model: smollm2-135m-instruct
    cache_teacher: {top_k: 32, max_length: 512}
    train: {kd_lambda: 1.0, max_steps: 200}

Every problem (unknown keys, wrong types, values out of range, missing required settings) is collected
and reported together, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError
from pipeline.scoring import spec_problem

BUILTIN_MODEL = "smollm2-135m-instruct"
# The default --model when neither a flag nor a config file names one: this variable if set, else BUILTIN_MODEL (the
# README's quickstart runs verbatim in the tests on a tiny model this way).
MODEL_ENV = "PIPELINE_MODEL"
# [default length note] train's length when neither --max-steps nor --epochs is given: as many steps as it takes to
# draw this many task rows (so a rehearsal share never shortens the task's exposure). In the forgetting study (both
# demo tasks, 1200 training rows each, lr 1e-3, batch 8) the held-out task CE had levelled off by 400-480 task rows
# (docs/study/*-curves.png) and forgetting kept growing with length; 480 is the exposure every compared run had.
DEFAULT_TASK_ROWS = 480
# Settings that are alternatives to each other: one given at a higher level of precedence (a flag over the config
# file, a sweep run's own setting over the sweep's fixed part) replaces the other given below it.
ALTERNATIVES = {"max_steps": "epochs", "epochs": "max_steps"}
# Groups of settings (opt(group=...)), for the checks that treat a group alike:
#   reporting  what a train run reports or keeps, not what it trains (the adapter is bit for bit the same:
#              tests/test_train.py): may differ on --resume and in a kept sweep run (e.g. resuming with --report-to
#              tensorboard to watch a run started without it, or a sweep rerun with sparser curves)
#   path       where things are, not what they are: a run directory or cache may be moved or spelled another way;
#              the cache's content is checked by its fingerprint instead
#   run        how this invocation treats its output directory (--resume, --overwrite)
#   scoring    the evaluation settings that decide evaluate's figures (a sweep reuses an eval.json made with them)
GROUPS = ("reporting", "path", "run", "scoring")


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, min: float | None = None,
        max: float | None = None, required: bool = False, positive: bool = False, repeat: bool = False,
        group: str | None = None) -> Any:
    """A dataclass field carrying its CLI help and its checks.

    Args:
        repeat: for list fields, the flag is given once per value (`--prompt a --prompt b`); other list
            fields take one comma-separated value (`--lambdas 0,0.5,1`).
        group: one of GROUPS, for the checks that treat a group of settings alike (settings_in).
    """
    assert group is None or group in GROUPS, group
    meta = {"help": help, "choices": choices, "min": min, "max": max, "required": required,
            "positive": positive, "repeat": repeat, "group": group}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# The fields of an input row that a --columns mapping may name (docs/design.md, "Input data").
INPUT_FIELDS = ("input", "instruction", "output", "messages", "id")


def settings_in(cls: type, *groups: str) -> tuple[str, ...]:
    """The names of `cls`'s settings in any of `groups` (see GROUPS)."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("group") in groups)


def columns_opt() -> Any:
    return opt({}, "Map the input's own column names onto the documented fields, FIELD=COLUMN,... e.g. "
               "instruction=question,output=answer (fields: " + ", ".join(INPUT_FIELDS) + ").")


def column_problems(columns: dict[str, str]) -> list[str]:
    problems = [f"columns: {k!r} is not a field the input reads (one of {', '.join(INPUT_FIELDS)})"
                for k in columns if k not in INPUT_FIELDS]
    return problems + [f"columns: {k}= names no column" for k, v in columns.items() if not v]


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# cache-teacher's rehearsal inputs: this value opts out of the data it would otherwise make itself.
NONE = "none"
MAX_HELD_OUT = 500  # cache-teacher --eval-fraction holds out at most this many task rows


def given(path: str | None) -> bool:
    """An input file option that names a file: set, and not NONE."""
    return bool(path) and path != NONE
# The KL variants losses.per_token_kl computes (train --kl).
KL_KINDS = ("forward", "reverse", "topk_renorm")


@dataclass
class CommonConfig:
    """Settings every command takes."""

    model: str = opt(BUILTIN_MODEL, "Base model: a local Hugging Face model directory, a Hugging Face id ORG/NAME "
                     "already in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME; never downloaded), a .gguf "
                     f"file, or the name of a built-in model ({BUILTIN_MODEL}). Default: ${MODEL_ENV} when set.")
    seed: int = opt(0, "Random seed (data order, LoRA init, dropout, sampling).")
    precision: str = opt("auto", "Compute precision of the 4-bit matmuls and autocast: bf16 where the CPU/GPU supports "
                         "it (auto), or force bf16/fp32; fp16 for GPUs without bf16 (T4, V100). Log-probs and "
                         "losses are always fp32.", choices=("auto", "bf16", "fp16", "fp32"))
    device: str = opt("auto", "cuda, cpu, or auto (CUDA when available).", choices=("auto", "cpu", "cuda"))
    attn: str = opt("sdpa", "Attention implementation of the model (transformers' attn_implementation); "
                    "flash_attention_2 needs the flash-attn package and a CUDA GPU.",
                    choices=ATTN_IMPLEMENTATIONS)

    def check(self) -> list[str]:
        """Problems beyond what the field metadata checks; subclasses extend."""
        return []


@dataclass
class CacheConfig(CommonConfig):
    """`pipeline cache-teacher`: run the frozen 4-bit teacher once and store its top-k log-probs."""

    task_train: str | None = opt(None, "The new task, training part (JSONL, JSON, Parquet, CSV or a save_to_disk "
                                 "directory, as every data option).")
    task_eval: str | None = opt(None, "The new task, held-out part.")
    rehearsal_train: str | None = opt(None, "General instruction data to rehearse, training part. When --task-train "
                                      "comes without either rehearsal option, the base model answers the general "
                                      "prompts that ship with pipeline (as make-rehearsal does) into "
                                      "CACHE/generated/, a train and a held-out part; none: no rehearsal training "
                                      "data.")
    rehearsal_eval: str | None = opt(None, "General instruction data, held-out part (measures forgetting); made from "
                                     "the shipped prompts as above when --task-train comes without either rehearsal "
                                     "option; none: "
                                     "forgetting is not measured.")
    eval_fraction: float = opt(0.1, "Without --task-eval: hold out this share of the --task-train rows to score the "
                               f"task (at most {MAX_HELD_OUT} rows, at least 1; chosen by example id and --seed). 0: "
                               "hold out nothing.", min=0, max=0.5)
    columns: dict[str, str] = columns_opt()
    out: str | None = opt(None, "Cache directory to write (rerun on the same directory to resume).", required=True)
    top_k: int = opt(32, "Teacher tokens kept per response position (the rest becomes one residual bucket).",
                     positive=True)
    max_length: int = opt(512, "Truncate prompt + response to this many tokens.", min=8)
    batch_size: int = opt(8, "Examples per teacher forward pass (batched by length).", positive=True)
    temperature: float = opt(1.0, "Softmax temperature of the stored teacher log-probs.", positive=True)
    shard_size: int = opt(1024, "Examples per Parquet shard (the unit of resuming).", positive=True)
    logprob_dtype: str = opt("float16", "Storage type of the log-probs.", choices=("float16", "float32"))
    skip_bad_lines: bool = opt(False, "Skip (and count) malformed input lines instead of stopping at the first one.")

    def check(self) -> list[str]:
        problems = column_problems(self.columns)
        if not any(given(p) for p in (self.task_train, self.task_eval, self.rehearsal_train, self.rehearsal_eval)):
            problems.append("no input: give at least one of --task-train, --task-eval, --rehearsal-train, "
                            "--rehearsal-eval")
        if self.task_eval == NONE:
            problems.append("task_eval: 'none' is not a file; to score no task rows, leave it out and pass "
                            "--eval-fraction 0")
        return problems


@dataclass
class TrainConfig(CommonConfig):
    """`pipeline train`: train a LoRA adapter against the cached soft targets."""

    cache: str | None = opt(None, "Cache directory written by cache-teacher (required unless --online-teacher).",
                             group="path")
    out: str | None = opt(None, "Output directory (adapter/, metrics.jsonl, run.yaml, checkpoints/).", required=True,
                           group="path")
    online_teacher: bool = opt(False, "No cache: compute the teacher's top-k at every step with the adapter switched "
                               "off (one extra forward per step; reads --task-train/--rehearsal-train).")
    task_train: str | None = opt(None, "With --online-teacher: the new task (any input format).", group="path")
    rehearsal_train: str | None = opt(None, "With --online-teacher: general data to rehearse.", group="path")
    columns: dict[str, str] = columns_opt()
    skip_bad_lines: bool = opt(False, "With --online-teacher: skip (and count) malformed input lines.")
    # The defaults come from the forgetting study (README): on both tasks, lambda 1 with the KL on rehearsal
    # examples only forgot the least among the settings that kept the task score; the KL on all tokens pulls
    # the task answers back towards the base and costs task score at every lambda.
    kd_lambda: float = opt(1.0, "Weight of the distillation term: Loss = CE + lambda * T^2 * KL. 0 = plain SFT.", min=0)
    kd_on: str = opt("rehearsal", "Which examples get the KL term: the rehearsal (general) examples only, or all.",
                     choices=("rehearsal", "all"))
    kl: str = opt("forward", "KL variant over the k+1 buckets (topk_renorm drops the residual: an ablation).",
                  choices=KL_KINDS)
    rehearsal_ratio: float = opt(0.3, "Share of rehearsal (general) examples in every optimiser step.", min=0, max=1)
    l2: float = opt(0.0, "mu: weight of the L2 penalty on the LoRA parameters.", min=0)
    max_forgetting: float | None = opt(None, "Forgetting budget EPS, a bound on the running average (EMA 0.8 over "
                                       "steps) of the forward KL(base || student) per rehearsal token, over the k+1 "
                                       "buckets of the cached targets (the top-k ids and one for the rest) at the "
                                       "cache's temperature, on the training batches with LoRA dropout on. It is not "
                                       "the forgetting KL evaluate reports (full vocabulary, T = 1, eval mode, "
                                       "held-out prompts; at T = 1 the bucket KL is a lower bound of it). kd_lambda "
                                       "then only starts a multiplier that training raises while the running KL is "
                                       "over EPS and lowers while it is under (dual ascent). Off: lambda is fixed.",
                                       positive=True)
    lora_r: int = opt(8, "LoRA rank.", positive=True)
    lora_alpha: float = opt(16, "LoRA alpha (scale = alpha / r).", positive=True)
    lora_dropout: float = opt(0.05, "LoRA dropout (below 1).", min=0)
    lora_target_modules: str = opt("all-linear", "Comma-separated module names to adapt, or all-linear.")
    max_steps: int | None = opt(None, "Optimiser steps. Neither this nor --epochs: enough steps to draw "
                                f"{DEFAULT_TASK_ROWS} task rows (e.g. 86 at batch 8 and 30% rehearsal), the "
                                "exposure at which the study's task CE had levelled off.", positive=True)
    epochs: float | None = opt(None, "Instead of --max-steps: passes over the task training rows at the rehearsal "
                               "ratio, e.g. 1.5 (steps = ceil(epochs * task rows / task rows per step)).",
                               positive=True)
    batch_size: int = opt(8, "Examples per micro-batch.", positive=True)
    grad_accum: int = opt(1, "Micro-batches per optimiser step (the loss is normalised by the step's tokens).",
                          positive=True)
    lr: float = opt(1e-3, "Peak learning rate (AdamW, cosine schedule; 1e-3 is what every measured run of the study "
                    "used, on a 135M model: larger models usually want less, see the README).", positive=True)
    warmup_steps: int = opt(10, "Linear warm-up steps before the cosine decay.", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables; the setup diverges without it).", min=0)
    gradient_checkpointing: bool = opt(True, "Recompute activations in the backward pass to save memory.")
    loss_chunk_size: int = opt(1024, "Response tokens per chunk of full-vocabulary log-probs.", positive=True)
    divergence_factor: float = opt(4.0, "Stop when the loss exceeds this multiple of its best running average.",
                                   min=1)
    log_every: int = opt(10, "Write a line to metrics.jsonl every N steps.", positive=True,
                         group="reporting")
    eval_every: int = opt(0, "Every N steps and at the end, score the cache's held-out rows (task CE, and the cached "
                          "k+1-bucket forgetting KL; no generation) as an eval line in metrics.jsonl: the training "
                          "curves. 0 = off.", min=0, group="reporting")
    eval_limit: int = opt(64, "With --eval-every: at most this many held-out rows of each kind (the first by example "
                          "id, as evaluate --limit).", positive=True, group="reporting")
    report_to: str = opt("none", "Also write metrics.jsonl's numbers as TensorBoard scalars under OUT/tb/ (needs "
                         "pip install 'lwf-pipeline[tensorboard]').", choices=("none", "tensorboard"),
                         group="reporting")
    save_every: int = opt(50, "Write a resumable checkpoint every N steps.", positive=True,
                          group="reporting")
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep.", positive=True,
                                group="reporting")
    temperature: float | None = opt(None, "Distillation temperature; must equal the cache's (default: the cache's; "
                                    "1.0 with --online-teacher).", positive=True)
    max_length: int | None = opt(None, "Must equal the cache's max_length if given (512 with --online-teacher).",
                                 positive=True)
    top_k: int | None = opt(None, "Must equal the cache's top_k if given (32 with --online-teacher).", positive=True)
    resume: bool = opt(False, "Continue from the last complete checkpoint in --out.", group="run")
    overwrite: bool = opt(False, "Delete a non-empty --out and start afresh.", group="run")

    def check(self) -> list[str]:
        problems = column_problems(self.columns)
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite exclude each other")
        if self.max_forgetting is not None and self.rehearsal_ratio == 0:
            problems.append("max_forgetting: the budget is measured on the rehearsal examples of each step, but "
                            "rehearsal_ratio is 0; give --rehearsal-ratio > 0 or drop --max-forgetting")
        if self.kd_on == "rehearsal" and self.rehearsal_ratio == 0 and self.kd_lambda > 0 \
                and self.max_forgetting is None:
            problems.append("kd_on: rehearsal (the default) puts the KL on rehearsal examples only, but "
                            "rehearsal_ratio is 0: no step would have any; for plain QLoRA give --kd-lambda 0, else "
                            "--rehearsal-ratio > 0 or --kd-on all")
        if self.lora_dropout >= 1:
            problems.append(f"lora_dropout: must be < 1 (1 drops every input of the adapter), got {self.lora_dropout}")
        if self.epochs is not None and self.max_steps is not None:
            problems.append("--epochs and --max-steps exclude each other: give one")
        if self.max_steps is None and self.rehearsal_ratio == 1:
            problems.append(("--epochs counts passes over the task rows" if self.epochs is not None else
                             f"the default length draws {DEFAULT_TASK_ROWS} task rows")
                            + ", and rehearsal_ratio 1 draws none: give --max-steps")
        if self.online_teacher:
            if self.cache:
                problems.append("--online-teacher trains without a cache: drop --cache (or --online-teacher)")
            if not (self.task_train or self.rehearsal_train):
                problems.append("--online-teacher reads the data itself: give --task-train and/or --rehearsal-train")
            if self.eval_every:
                problems.append("--eval-every scores the cache's held-out rows: train with --cache, or drop it")
        else:
            if not self.cache:
                problems.append("cache: required (--cache), or train without one with --online-teacher")
            if self.task_train or self.rehearsal_train:
                problems.append("--task-train/--rehearsal-train are for --online-teacher; with a cache the data "
                                "comes from the cache")
        return problems


@dataclass
class EvalConfig(CommonConfig):
    """`pipeline evaluate`: how much the adapter learned (task) and forgot (general data)."""

    cache: str | None = opt(None, "Cache directory (its eval rows are scored).", required=True)
    adapter: str | None = opt(None, "Adapter directory; omit to score the base model (the baseline row).")
    out: str | None = opt(None, "Write the JSON report here (default: print it).")
    batch_size: int = opt(16, "Examples per forward pass / generation batch.", positive=True)
    max_new_tokens: int = opt(64, "Generation length for the task score.", positive=True,
                              group="scoring")
    task_score: str = opt("exact_match", "How a greedy answer is scored against the reference: exact_match, "
                          "normalized (case, whitespace and trailing punctuation folded), json (equal as JSON values; "
                          "per-field accuracy too), contains (the reference is in the answer), regex (the reference "
                          "is a pattern), python:PATH_OR_MODULE:FUNCTION (your own function (prediction, reference, "
                          "example) -> [0, 1], e.g. python:my_scorer.py:score), or none (skip generation).",
                          group="scoring")
    limit: int | None = opt(None, "Score at most this many examples of each eval set.", positive=True,
                                 group="scoring")

    def check(self) -> list[str]:
        problem = spec_problem(self.task_score)  # a python: scorer is imported here, before any model is loaded
        return [f"task_score: {problem}"] if problem else []


@dataclass
class SweepConfig(CommonConfig):
    """`pipeline sweep`: train + evaluate each setting from ONE cache and write a report."""

    cache: str | None = opt(None, "Cache directory written by cache-teacher (never recomputed).", required=True)
    out: str | None = opt(None, "Sweep directory: one sub-directory per run, report.md, tradeoff.png, curves.png, "
                          "recommendation.json, recommended/adapter.", required=True)
    lambdas: list[float] = opt([], "Comma-separated kd_lambda values, e.g. 0,0.5,1.")
    grid: list[str] = opt([], "key=v1,v2 over any train setting (repeatable), e.g. lora_r=4,8,16.", repeat=True)
    runs: list[dict] = opt([], "Extra runs, each a mapping of train settings (config file only).")
    eval_limit: int | None = opt(None, "Score at most N examples of each eval set per run (overrides evaluate.limit).",
                                 positive=True)
    task_score: str | None = opt(None, "The task score every run is scored and compared by (overrides "
                                 "evaluate.task_score, default exact_match): exact_match, normalized, json, contains, "
                                 "regex or python:PATH_OR_MODULE:FUNCTION (see evaluate --help).")
    task_tolerance: float | None = opt(None, "The recommendation: among the runs whose task score is within this "
                                       "of the best run's, the one with the least forgetting (full-vocabulary KL); "
                                       "ties go to the cheaper run. Default (auto): each run's own, the sampling error "
                                       "of its score's difference from the best's, sqrt(e_best^2 + e_run^2), e being "
                                       "the standard error of a mean score on n examples (never below 1 / (2 (n + 1)), "
                                       "the Wilson interval's at a score of 0 or 1): runs that these examples cannot "
                                       "tell apart are all candidates. A number: absolute (0.02 = 2 points of a 0..1 "
                                       "score). Only when a run has no task score (or the runs were scored by "
                                       "different scores) is task CE used, the tolerance then relative (0.02 = 2%, "
                                       "also the auto value).", min=0)
    retry_failed: bool = opt(False, "Train and evaluate again the runs an earlier sweep recorded as failed "
                             "(OUT/<run>/failed.json); without it a rerun keeps them failed.")

    def check(self) -> list[str]:
        problem = spec_problem(self.task_score) if self.task_score is not None else None
        return [f"task_score: {problem}"] if problem else []


@dataclass
class RehearsalConfig(CommonConfig):
    """`pipeline make-rehearsal`: let the base model answer general prompts, for use as rehearsal data."""

    prompts: str | None = opt(None, "Prompts (instruction/input or messages ending in a user turn): JSONL, JSON, "
                              "Parquet, CSV or a save_to_disk directory.", required=True)
    columns: dict[str, str] = columns_opt()
    out: str | None = opt(None, "JSONL to write (rerun to resume).", required=True)
    max_new_tokens: int = opt(128, "Longest answer in tokens.", positive=True)
    batch_size: int = opt(16, "Prompts per generation batch.", positive=True)
    temperature: float = opt(1.0, "Sampling temperature (1 keeps the base distribution; see --greedy).", min=0)
    greedy: bool = opt(False, "Answer greedily instead of sampling (sharpens the base distribution).")
    skip_bad_lines: bool = opt(False, "Skip (and count) malformed prompt lines.")

    def check(self) -> list[str]:
        return column_problems(self.columns)


@dataclass
class GenerateConfig(CommonConfig):
    """`pipeline generate`: answer prompts with base + adapter."""

    adapter: str | None = opt(None, "Adapter directory (omit for the base model).")
    prompt: list[str] = opt([], "A prompt (repeatable).", repeat=True)
    prompts: str | None = opt(None, "File of prompts (JSONL, JSON, Parquet, CSV or a save_to_disk directory).")
    columns: dict[str, str] = columns_opt()
    out: str | None = opt(None, "Write answers as JSONL here (default: print them).")
    max_new_tokens: int = opt(256, "Longest answer in tokens.", positive=True)
    batch_size: int = opt(8, "Prompts per generation batch.", positive=True)
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy.", min=0)

    def check(self) -> list[str]:
        problems = column_problems(self.columns)
        if not self.prompt and not self.prompts:
            problems.append("no prompt: give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
        return problems


@dataclass
class MergeConfig(CommonConfig):
    """`pipeline merge`: fold the adapter into a full-precision copy of the base."""

    adapter: str | None = opt(None, "Adapter directory.", required=True)
    out: str | None = opt(None, "Directory for the merged Hugging Face model.", required=True)
    dtype: str = opt("float32", "Weight dtype of the saved model.", choices=("float32", "bfloat16", "float16"))


@dataclass
class InspectConfig(CommonConfig):
    """`pipeline inspect CACHE`: what a cache holds; with --example, the teacher's targets of one example."""

    cache: str | None = opt(None, "Cache directory written by cache-teacher.", required=True)
    model: str | None = opt(None, "Model whose tokenizer decodes the tokens (default: the cache's teacher.model).")
    example: str | None = opt(None, "Show this example (its id, as in the input, or file:line) token by token.")
    json: bool = opt(False, "Print JSON instead of text.")


# The config-file section of each command. Sweep reads `train` and `evaluate` too (the fixed part of each run).
SECTIONS: dict[str, type[CommonConfig]] = {
    "cache_teacher": CacheConfig,
    "train": TrainConfig,
    "evaluate": EvalConfig,
    "sweep": SweepConfig,
    "make_rehearsal": RehearsalConfig,
    "generate": GenerateConfig,
    "merge": MergeConfig,
    "inspect": InspectConfig,
}
COMMON_KEYS = tuple(f.name for f in fields(CommonConfig))


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against a field type (int, float, str, bool, X | None, list[X], list[dict])."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None:
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, where, problems)
    if typing.get_origin(tp) is list:
        (inner,) = args
        if isinstance(value, str) and inner is not dict:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        return [_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif tp is dict and isinstance(value, dict):
        return value
    elif typing.get_origin(tp) is dict:  # dict[str, str]: a mapping, or KEY=VALUE items (a list, or comma-separated)
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(isinstance(i, str) and "=" in i for i in items):
            items = dict(tuple(part.strip() for part in i.split("=", 1)) for i in items)
        if isinstance(items, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
            return items
        problems.append(f"{where}: expected a mapping or KEY=VALUE,... items, got {value!r}")
        return {}
    problems.append(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return None


def _check_fields(cfg: CommonConfig, where: str) -> list[str]:
    problems = []
    for f in fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        key = f"{where}{f.name}"
        if value is None:
            if m.get("required"):
                problems.append(f"{key}: required (--{f.name.replace('_', '-')})")
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float | str):
                continue
            if m.get("choices") and v not in m["choices"]:
                problems.append(f"{key}: {v!r} is not one of {', '.join(m['choices'])}")
            if isinstance(v, int | float):
                if m.get("positive") and v <= 0:
                    problems.append(f"{key}: must be > 0, got {v}")
                if m.get("min") is not None and v < m["min"]:
                    problems.append(f"{key}: must be >= {m['min']}, got {v}")
                if m.get("max") is not None and v > m["max"]:
                    problems.append(f"{key}: must be <= {m['max']}, got {v}")
    return problems


def _unknown_keys(keys: list[str], known: list[str], where: str) -> list[str]:
    problems = []
    for k in keys:
        if k not in known:
            hint = difflib.get_close_matches(str(k), known, n=1)
            problems.append(f"{where}{k}: unknown setting" + (f" (did you mean {hint[0]}?)" if hint else ""))
    return problems


def read_config_file(path: str | Path) -> tuple[dict, list[str]]:
    """Parse a YAML config and check its structure (every section, not only the one in use)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, [f"{p}: config file not found"]
    except IsADirectoryError:
        return {}, [f"{p}: is a directory, expected a YAML file"]
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return {}, [f"{p}: not valid YAML: {' '.join(str(e).split())}"]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return {}, [f"{p}: expected a mapping of settings at the top level, got {type(data).__name__}"]
    problems = _unknown_keys(list(data), [*COMMON_KEYS, *SECTIONS], f"{p}: ")
    for section, cls in SECTIONS.items():
        body = data.get(section)
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"{p}: {section}: expected a mapping, got {body!r}")
            continue
        names = [f.name for f in fields(cls)]
        problems += _unknown_keys(list(body), names, f"{p}: {section}.")
        for k, v in body.items():
            if k in names:
                _coerce(v, _type_of(cls, k), f"{p}: {section}.{k}", problems)
    return data, problems


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """top's settings over base's, where a setting in top also replaces its alternative in base (ALTERNATIVES):
    `--epochs 2` over a config file's `max_steps: 40` trains 2 epochs instead of refusing both."""
    return {**{k: v for k, v in base.items() if ALTERNATIVES.get(k) not in top}, **top}


def load_config(cls: type[CommonConfig], config_file: str | None, flags: dict[str, Any],
                section: str | None = None, extra_problems: list[str] | None = None) -> Any:
    """Build a config: defaults < config file (shared keys, then `section`) < flags that were given.

    Raises:
        ConfigError: with every problem found, in the file, the flags and the values.
    """
    section = section or next(s for s, c in SECTIONS.items() if c is cls)
    problems = list(extra_problems or [])
    values: dict[str, Any] = {}
    where_of: dict[str, str] = {}
    if config_file:
        data, file_problems = read_config_file(config_file)
        problems += file_problems
        for k in COMMON_KEYS:
            if k in data:
                values[k], where_of[k] = data[k], f"{config_file}: {k}"
        for k, v in (data.get(section) or {}).items() if isinstance(data.get(section), dict) else []:
            values[k], where_of[k] = v, f"{config_file}: {section}.{k}"
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in flags.items()
             if k in names and v is not None and not (isinstance(v, tuple | list) and not v)}
    values = overlay(values, given)
    where_of.update({k: f"--{k.replace('_', '-')}" for k in given})
    if "model" in names and "model" not in values and os.environ.get(MODEL_ENV):
        values["model"], where_of["model"] = os.environ[MODEL_ENV], f"${MODEL_ENV}"
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            continue  # already reported by read_config_file
        before = len(problems)
        coerced = _coerce(list(v) if isinstance(v, tuple) else v, _type_of(cls, k), where_of[k], problems)
        if len(problems) == before:
            kwargs[k] = coerced
    cfg = cls(**kwargs)
    problems += _check_fields(cfg, "")
    problems += cfg.check()
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def section_values(config_file: str | None, section: str) -> dict[str, Any]:
    """The raw values of one section of a config file (already checked by read_config_file)."""
    if not config_file:
        return {}
    data, _ = read_config_file(config_file)
    body = data.get(section)
    return dict(body) if isinstance(body, dict) else {}


def config_differences(have: dict[str, Any], want: dict[str, Any], ignore: tuple[str, ...] = ()
                       ) -> list[tuple[str, Any, Any]]:
    """(key, have, want) for every setting whose value differs between two resolved configs (as in run.yaml),
    keys in `ignore` left out: how a resumed run and a kept sweep run are checked against what was asked."""
    return [(k, have.get(k), want.get(k)) for k in sorted(set(have) | set(want))
            if k not in ignore and have.get(k) != want.get(k)]


def run_differences(run: dict, want: Any, cache_fingerprint: str | None) -> tuple[list[tuple[str, Any, Any]], bool]:
    """How a run recorded in run.yaml (`run`, parsed) differs in what it trains from the settings `want`: the
    differing settings (as config_differences gives them), and whether it trained from a cache with other
    content. Settings of the groups reporting, path and run (GROUPS) may differ: how a resumed
    run and a kept sweep run are checked against what was asked."""
    diffs = config_differences(run.get("config", {}), to_dict(want),
                               ignore=settings_in(type(want), "reporting", "path", "run"))
    was = (run.get("cache") or {}).get("fingerprint")
    return diffs, bool(cache_fingerprint and was and was != cache_fingerprint)
