"""Shared fixtures: a tiny Llama-style model and a byte-level BPE tokenizer built here, never downloaded."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.tiny import CHAT_TEMPLATE, CORPUS, build_tiny_model_dir, build_tokenizer  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory, monkeypatch):
    """Fixed seeds, and a private PIPELINE_HOME so tests never touch the user's cache."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    if "PIPELINE_TEST_HOME" not in os.environ:
        os.environ["PIPELINE_TEST_HOME"] = str(tmp_path_factory.getbasetemp() / "pipeline-home")
    monkeypatch.setenv("PIPELINE_HOME", os.environ["PIPELINE_TEST_HOME"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


TASK_ROWS = [
    {"instruction": "Extract the medication.", "input": f"Patient on metformin {d} mg twice daily.",
     "output": json.dumps({"medication": "metformin", "dose": f"{d} mg", "frequency": "twice daily"})}
    for d in (250, 500, 750, 850, 1000, 1500)
]
GENERAL_ROWS = [
    {"instruction": "What is the capital of France?", "output": "Paris is the capital of France."},
    {"instruction": "Write a short poem about the sea.", "output": "The sea is wide and blue."},
    {"messages": [{"role": "user", "content": "医療文書を日本語で要約してください。"},
                  {"role": "assistant", "content": "患者は高血圧の治療中です。"}]},
    {"input": "def add(a, b):", "output": "    return a + b"},
]


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
