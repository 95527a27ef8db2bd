"""Shared fixtures: a tiny Llama-style model and a byte-level BPE tokenizer built here, never downloaded, and the small
caches and runs that several test files read (built once per session; tests copy them before changing anything)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.cache.write
from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig
from pipeline.tiny import build_tiny_model_dir
from tests.helpers import (
    GENERAL_EVAL_ROWS,
    GENERAL_ROWS,
    QUIET,
    TASK_ROWS,
    build_eval_cache,
    cache_args,
    invoke,
    run_cli,
    short_train_cmd,
    small_cache_cmd,
    write_jsonl,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory, monkeypatch):
    """Fixed seeds, a private PIPELINE_HOME so tests never touch the user's cache, and no $PIPELINE_MODEL."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    if "PIPELINE_TEST_HOME" not in os.environ:
        os.environ["PIPELINE_TEST_HOME"] = str(tmp_path_factory.getbasetemp() / "pipeline-home")
    monkeypatch.setenv("PIPELINE_HOME", os.environ["PIPELINE_TEST_HOME"])
    monkeypatch.delenv("PIPELINE_MODEL", raising=False)  # the built-in default, whatever the shell sets


@pytest.fixture
def corpus(tmp_path) -> dict[str, Path]:
    """Small task/rehearsal train/eval files in all three line forms."""
    d = tmp_path / "data"
    d.mkdir()
    return {
        "task_train": write_jsonl(d / "task_train.jsonl", TASK_ROWS[:4]),
        "task_eval": write_jsonl(d / "task_eval.jsonl", TASK_ROWS[4:]),
        "rehearsal_train": write_jsonl(d / "gen_train.jsonl", GENERAL_ROWS[:3]),
        "rehearsal_eval": write_jsonl(d / "gen_eval.jsonl", GENERAL_ROWS[3:]),
    }


# ---------------------------------------------------------------------------------------------------------- caches


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_model_dir) -> Path:
    """12 task and 10 rehearsal training rows, 3 + 3 held out; top-8, shards of 4."""
    d = tmp_path_factory.mktemp("train-cache")
    more_task = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    task = write_jsonl(d / "task.jsonl", more_task)
    general = write_jsonl(d / "general.jsonl", GENERAL_ROWS * 1 + [
        {"instruction": f"Count to {n}.", "output": " ".join(str(i) for i in range(1, n + 1))} for n in range(2, 8)])
    out = d / "cache"
    task_eval = write_jsonl(d / "task_eval.jsonl", [{**r, "id": f"t{i}"} for i, r in enumerate(TASK_ROWS[:3])])
    general_eval = write_jsonl(d / "general_eval.jsonl", [
        {"id": "g2", "instruction": "Name a colour.", "output": "Blue, like the sky."},
        {"id": "g0", "instruction": "Spell cat.", "output": "C, A, T."},
        {"id": "g1", "instruction": "What is two plus two?", "output": "Two plus two is four."}])
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), task_train=str(task), rehearsal_train=str(general),
                            task_eval=str(task_eval), rehearsal_eval=str(general_eval), top_k=8, max_length=256,
                            shard_size=4), **QUIET)
    return out


@pytest.fixture(scope="session")
def cache_t2(tmp_path_factory, tiny_model_dir) -> Path:
    """12 task and 9 rehearsal training rows, teacher top-8 at temperature 2 (so a lost T^2 shows), fp32."""
    d = tmp_path_factory.mktemp("cache-t2")
    task = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    general = GENERAL_ROWS + [{"instruction": f"Count to {n}.", "output": " ".join(map(str, range(1, n + 1)))}
                              for n in range(2, 7)]
    out = d / "cache"
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), task_train=str(write_jsonl(d / "t.jsonl", task)),
                            rehearsal_train=str(write_jsonl(d / "g.jsonl", general)), top_k=8, max_length=256,
                            temperature=2.0, precision="fp32", eval_fraction=0), **QUIET)
    return out


@pytest.fixture(scope="session")
def epochs_cache(tmp_path_factory, tiny_model_dir) -> Path:
    """6 task and 4 rehearsal training rows: a pass over the task rows takes a few steps."""
    d = tmp_path_factory.mktemp("epochs-cache")
    task = write_jsonl(d / "task.jsonl", TASK_ROWS)
    general = write_jsonl(d / "general.jsonl", GENERAL_ROWS)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(d / "cache"), task_train=str(task),
                            rehearsal_train=str(general), top_k=8, max_length=256, eval_fraction=0), **QUIET)
    return d / "cache"


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory, tiny_model_dir) -> Path:
    return build_eval_cache(tmp_path_factory.mktemp("eval-cache"), tiny_model_dir, GENERAL_EVAL_ROWS)


@pytest.fixture(scope="session")
def logprob_caches(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The same corpus cached twice: float16 log-probs (the default) and --logprob-dtype float32."""
    d = tmp_path_factory.mktemp("storage")
    corpus = {"task_train": write_jsonl(d / "task.jsonl", TASK_ROWS[:4]),
              "task_eval": write_jsonl(d / "task_eval.jsonl", TASK_ROWS[4:]),
              "rehearsal_train": write_jsonl(d / "general.jsonl", GENERAL_ROWS)}
    run_cli(cache_args(tiny_model_dir, corpus, d / "float16"))
    run_cli([*cache_args(tiny_model_dir, corpus, d / "float32"), "--logprob-dtype", "float32"])
    return {"float16": d / "float16", "float32": d / "float32", "corpus": corpus}


# ---------------------------------------------------------------------------- a cache and a run that reruns refuse


@pytest.fixture(scope="session")
def small_inputs(tmp_path_factory) -> dict[str, Path]:
    """12 task and 4 rehearsal training rows."""
    d = tmp_path_factory.mktemp("refusal-data")
    task = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    return {"task_train": write_jsonl(d / "task.jsonl", task),
            "rehearsal_train": write_jsonl(d / "general.jsonl", GENERAL_ROWS)}


@pytest.fixture(scope="session")
def cache_and_other(tmp_path_factory, tiny_model_dir, small_inputs) -> dict[str, Path]:
    """A cache, and another one made by the same model with the same settings from other task rows."""
    d = tmp_path_factory.mktemp("refusal-caches")
    data = small_inputs
    other = {**data, "task_train": write_jsonl(d / "other-task.jsonl", TASK_ROWS)}
    for name, inputs in (("cache", data), ("other", other)):
        result = invoke(small_cache_cmd(tiny_model_dir, inputs, d / name))
        assert result.exit_code == 0, result.output
    return {"cache": d / "cache", "other": d / "other"}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_model_dir, cache_and_other) -> Path:
    """3 steps, a checkpoint at step 2. Tests resume copies of it."""
    out = tmp_path_factory.mktemp("refusal-run") / "run"
    result = invoke(short_train_cmd(tiny_model_dir, cache_and_other["cache"], out))
    assert result.exit_code == 0, result.output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    return out


@pytest.fixture(scope="module")
def torchrun_env(tmp_path_factory) -> dict[str, str]:
    """The environment of the torchrun jobs: this session's PIPELINE_HOME, no crash point."""
    os.environ.setdefault("PIPELINE_TEST_HOME", str(tmp_path_factory.getbasetemp() / "pipeline-home"))
    env = {**os.environ, "PIPELINE_HOME": os.environ["PIPELINE_TEST_HOME"]}
    env.pop("PIPELINE_CRASH_AT", None)
    return env


@pytest.fixture
def few_prompts(tmp_path, monkeypatch) -> Path:
    """The shipped prompt set, cut to a few prompts so that the tiny model answers them in a second."""
    d = tmp_path / "prompts"
    d.mkdir()
    for split, n in (("train", 5), ("eval", 3)):
        lines = (pipeline.cache.write.PROMPTS / f"general_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        (d / f"general_{split}.jsonl").write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    monkeypatch.setattr(pipeline.cache.write, "PROMPTS", d)
    return d
