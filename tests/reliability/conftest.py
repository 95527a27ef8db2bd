"""Session fixtures of the reliability tests: one small corpus and one uninterrupted reference cache, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import GENERAL_ROWS, TASK_ROWS, invoke, write_jsonl
from tests.reliability.util import CACHE_ARGS, train_cmd


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """The PIPELINE_HOME of this test session (the same one tests/conftest.py's autouse fixture sets)."""
    os.environ.setdefault("PIPELINE_TEST_HOME", str(tmp_path_factory.getbasetemp() / "pipeline-home"))
    return Path(os.environ["PIPELINE_TEST_HOME"])


@pytest.fixture(scope="session")
def rel_corpus(tmp_path_factory) -> dict[str, Path]:
    """6 + 2 task and 4 + 2 rehearsal examples: 7 shards of <= 2 examples with CACHE_ARGS."""
    d = tmp_path_factory.mktemp("rel-data")
    task_eval = [{**r, "output": r["output"].replace("twice", "three times")} for r in TASK_ROWS[:2]]
    general_eval = [{"instruction": "Name a colour.", "output": "Blue."},
                    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                                  {"role": "assistant", "content": "4"}]}]
    return {
        "task_train": write_jsonl(d / "task_train.jsonl", TASK_ROWS),
        "task_eval": write_jsonl(d / "task_eval.jsonl", task_eval),
        "rehearsal_train": write_jsonl(d / "gen_train.jsonl", GENERAL_ROWS),
        "rehearsal_eval": write_jsonl(d / "gen_eval.jsonl", general_eval),
    }


@pytest.fixture(scope="session")
def cache_cmd(tiny_model_dir, rel_corpus) -> list[str]:
    """`pipeline cache-teacher ...` minus --out: every cache in these tests is built by exactly this command."""
    inputs = [arg for key, path in rel_corpus.items() for arg in (f"--{key.replace('_', '-')}", str(path))]
    return ["cache-teacher", "--model", str(tiny_model_dir), *inputs, *CACHE_ARGS]


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, cache_cmd, home) -> Path:
    """The cache of an uninterrupted run: what every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_HOME", str(home))
        result = invoke([*cache_cmd, "--out", out])
    assert result.exit_code == 0, result.output
    assert "examples          14 (14 computed now" in result.output, result.output
    assert len(list(out.glob("shard-*.parquet"))) == 7
    return out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_model_dir, reference_cache, home) -> Path:
    """An uninterrupted `train_cmd` run on the reference cache: 8 steps, checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("reference-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_HOME", str(home))
        result = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    return out
