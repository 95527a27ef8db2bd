"""Refusals that the README and the code promise (issue 15): each stops with one line naming what differs, and
leaves what is on disk as it was.

    train --resume      with other settings, with another cache, with another number of processes
    under torchrun      the single-process commands (evaluate, sweep, generate, make-rehearsal, merge)
    cache-teacher       rerun with other inputs or another model; with other settings before any manifest exists
    config              lora_dropout >= 1, listed with the other problems
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pipeline.cache.write
from pipeline.cache.schema import MANIFEST
from pipeline.cli import main
from pipeline.config import TrainConfig, load_config
from pipeline.errors import ConfigError
from tests.conftest import GENERAL_ROWS, TASK_ROWS, build_tiny_model_dir, write_jsonl
from tests.reliability.util import assert_one_line_error, invoke

CACHE_FLAGS = ["--top-k", "4", "--max-length", "256", "--shard-size", "4", "--precision", "fp32"]
TRAIN_FLAGS = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--save-every", "2",
               "--log-every", "1", "--precision", "fp32"]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: what a refusal must leave untouched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("refusal-data")
    task = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    return {"task_train": write_jsonl(d / "task.jsonl", task),
            "rehearsal_train": write_jsonl(d / "general.jsonl", GENERAL_ROWS)}


def cache_cmd(model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    inputs = [a for key, path in data.items() for a in (f"--{key.replace('_', '-')}", str(path))]
    return ["cache-teacher", "--model", str(model), *inputs, *CACHE_FLAGS, "--out", str(out), *extra]


def train_cmd(model: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--cache", str(cache), "--out", str(out), *TRAIN_FLAGS, *extra]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_model_dir, data) -> dict[str, Path]:
    """A cache, and another one made by the same model with the same settings from other task rows."""
    d = tmp_path_factory.mktemp("refusal-caches")
    other = {**data, "task_train": write_jsonl(d / "other-task.jsonl", TASK_ROWS)}
    for name, inputs in (("cache", data), ("other", other)):
        result = invoke(cache_cmd(tiny_model_dir, inputs, d / name))
        assert result.exit_code == 0, result.output
    return {"cache": d / "cache", "other": d / "other"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, caches) -> Path:
    """3 steps, a checkpoint at step 2. Tests resume copies of it."""
    out = tmp_path_factory.mktemp("refusal-run") / "run"
    result = invoke(train_cmd(tiny_model_dir, caches["cache"], out))
    assert result.exit_code == 0, result.output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    return out


# ------------------------------------------------------------------------------------------------- train --resume


def test_resume_with_other_settings_is_refused(tiny_model_dir, caches, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    for flags, what in ((["--lr", "2e-3"], "lr was 0.001, now 0.002"),
                        (["--kd-lambda", "0.5"], "kd_lambda was 1.0, now 0.5"),
                        (["--lora-r", "4", "--lr", "2e-3"], "lora_r was 8, now 4")):  # the first difference, by name
        assert_one_line_error(invoke(train_cmd(tiny_model_dir, caches["cache"], out, "--resume", *flags)),
                              f"error: {out}: --resume with other settings: {what}; resume with the same settings or "
                              "use --overwrite")
        assert snapshot(out) == before


def test_resume_with_another_cache_is_refused_but_a_moved_one_is_not(tiny_model_dir, caches, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    assert_one_line_error(invoke(train_cmd(tiny_model_dir, caches["other"], out, "--resume")),
                          f"error: {out}: --resume with another cache (its shards differ from the ones this run "
                          "started with)")
    assert snapshot(out) == before

    moved = tmp_path / "moved-cache"  # the same content at another path: where things are is not what they are
    shutil.copytree(caches["cache"], moved)
    result = invoke(train_cmd(tiny_model_dir, moved, out, "--resume"))
    assert result.exit_code == 0 and "(step 2)" in result.output, result.output


# ------------------------------------------------------------------------------------------------------ torchrun


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    os.environ.setdefault("PIPELINE_TEST_HOME", str(tmp_path_factory.getbasetemp() / "pipeline-home"))
    env = {**os.environ, "PIPELINE_HOME": os.environ["PIPELINE_TEST_HOME"]}
    env.pop("PIPELINE_CRASH_AT", None)
    return env


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_resume_with_another_number_of_processes_is_refused(tiny_model_dir, caches, finished_run, tmp_path, env):
    """1 process -> 2 and 2 -> 1: each process draws its own examples and random state; refused, printed once."""
    from tests.test_distributed import torchrun

    one = tmp_path / "one"
    shutil.copytree(finished_run, one)
    before = snapshot(one)
    job = torchrun(train_cmd(tiny_model_dir, caches["cache"], one, "--resume"), env)
    assert job.returncode != 0
    ckpt = one / "checkpoints" / "step-000002"
    assert error_lines(job.stderr) == [f"error: {ckpt}: written by a run on 1 process(es), now 2; resume with 1: a "
                                       "step draws batch_size * grad_accum examples per process, and each process "
                                       "has its own random state"], job.stderr[-3000:]
    assert snapshot(one) == before

    two = tmp_path / "two"
    job = torchrun(train_cmd(tiny_model_dir, caches["cache"], two), env)
    assert job.returncode == 0, job.stderr[-3000:]
    before = snapshot(two)
    assert_one_line_error(invoke(train_cmd(tiny_model_dir, caches["cache"], two, "--resume")),
                          f"error: {two / 'checkpoints' / 'step-000002'}: written by a run on 2 process(es), now 1")
    assert snapshot(two) == before


SINGLE_PROCESS = {
    "evaluate": ["--cache", "{tmp}/cache", "--out", "{tmp}/out.json"],
    "sweep": ["--cache", "{tmp}/cache", "--out", "{tmp}/out", "--lambdas", "0,1"],
    "generate": ["--prompt", "hi", "--out", "{tmp}/out.jsonl"],
    "make-rehearsal": ["--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/out.jsonl"],
    "merge": ["--adapter", "{tmp}/adapter", "--out", "{tmp}/out"],
}


@pytest.mark.parametrize("command", sorted(SINGLE_PROCESS))
def test_single_process_commands_refuse_to_run_under_torchrun(command, tiny_model_dir, tmp_path):
    """With WORLD_SIZE > 1 (as torchrun sets it) rank 0 prints one line, every rank exits 2, nothing is written."""
    args = [command, "--model", str(tiny_model_dir), *(a.format(tmp=tmp_path) for a in SINGLE_PROCESS[command])]
    for rank in ("0", "1"):
        result = CliRunner().invoke(main, args, env={"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank})
        assert result.exit_code == 2, result.output
        if rank == "0":
            assert result.stderr.splitlines() == [f"error: {command} runs in one process; run it without torchrun "
                                                  "(only cache-teacher and train use several)"]
        else:
            assert result.output == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_generate_under_real_torchrun_is_refused_once(tiny_model_dir, tmp_path, env):
    from tests.test_distributed import torchrun

    job = torchrun(["generate", "--model", tiny_model_dir, "--prompt", "hi", "--out", tmp_path / "a.jsonl"], env,
                   timeout=120)
    assert job.returncode != 0
    assert error_lines(job.stderr) == ["error: generate runs in one process; run it without torchrun (only "
                                       "cache-teacher and train use several)"], job.stderr[-3000:]
    assert not (tmp_path / "a.jsonl").exists()


# -------------------------------------------------------------------------------------------------- cache-teacher


def test_cache_teacher_rerun_with_other_inputs_or_another_model_is_refused(tiny_model_dir, data, tmp_path):
    inputs = {k: Path(shutil.copy(p, tmp_path / p.name)) for k, p in data.items()}
    out = tmp_path / "cache"
    assert invoke(cache_cmd(tiny_model_dir, inputs, out)).exit_code == 0
    before = snapshot(out)

    task = inputs["task_train"]
    original = task.read_text()
    task.write_text(original.replace("metformin 250 mg", "metformin 275 mg"))  # one line edited, as many examples
    assert_one_line_error(invoke(cache_cmd(tiny_model_dir, inputs, out)),
                          f"error: {out}: holds a cache made with other settings (inputs[0].sha256: cache has ",
                          "use another --out or delete it")
    assert snapshot(out) == before
    task.write_text(original)

    other = build_tiny_model_dir(tmp_path / "other-model", seed=1)
    assert_one_line_error(invoke(cache_cmd(other, inputs, out)),
                          f"error: {out}: holds a cache made with other settings (teacher.fingerprint: cache has ")
    assert snapshot(out) == before


def test_cache_teacher_rerun_with_other_settings_before_any_manifest_is_refused(tiny_model_dir, data, tmp_path,
                                                                               monkeypatch):
    """Interrupted after its first shard: no manifest yet, and the shard's embedded settings decide."""
    out = tmp_path / "cache"
    real_write = pipeline.cache.write.write_shard

    def write_then_stop(path, table, meta):
        real_write(path, table, meta)
        raise KeyboardInterrupt  # Ctrl-C right after the first shard

    monkeypatch.setattr(pipeline.cache.write, "write_shard", write_then_stop)
    assert invoke(cache_cmd(tiny_model_dir, data, out)).exit_code == 130
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == ["shard-00000.parquet"]
    before = snapshot(out)

    assert_one_line_error(invoke(cache_cmd(tiny_model_dir, data, out, "--top-k", "8")),
                          f"error: {out}: holds a cache made with other settings (top_k: cache has 4, asked for 8)")
    assert_one_line_error(invoke(cache_cmd(tiny_model_dir, data, out, "--logprob-dtype", "float32")),
                          "(storage.logprobs: cache has 'float16', asked for 'float32')")
    assert snapshot(out) == before and not (out / MANIFEST).exists()


# --------------------------------------------------------------------------------------------------------- config


def test_lora_dropout_must_be_below_1_listed_with_the_other_problems():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "lora_dropout": "1", "lora_r": "0"})
    assert "lora_dropout: must be < 1 (1 drops every input of the adapter), got 1.0" in e.value.problems
    assert "lora_r: must be > 0, got 0" in e.value.problems
    with pytest.raises(ConfigError, match=r"lora_dropout: must be >= 0, got -0.1"):
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "lora_dropout": "-0.1"})
    assert load_config(TrainConfig, None, {"cache": "c", "out": "o", "lora_dropout": "0.99"}).lora_dropout == 0.99

    result = CliRunner().invoke(main, ["train", "--model", "/no/such/model", "--cache", "c", "--out", "o",
                                       "--lora-dropout", "1.5", "--max-steps", "0"])
    assert result.exit_code == 2  # reported before any model is looked for
    assert result.stderr.splitlines() == ["error: max_steps: must be > 0, got 0",
                                          "error: lora_dropout: must be < 1 (1 drops every input of the adapter), "
                                          "got 1.5"]
