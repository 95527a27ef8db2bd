"""pipeline/checkpoint.py and `train --resume`: a run killed mid-way and resumed from its last checkpoint equals
the uninterrupted run; a checkpoint written by another number of processes is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    assert_one_line_error,
    error_lines,
    invoke,
    short_train_cmd,
    snapshot,
    torchrun,
)


def test_resume_after_sigkill_equals_uninterrupted(tiny_model_dir, tiny_cache, tmp_path):
    args = ["--model", str(tiny_model_dir), "--cache", str(tiny_cache), "--max-steps", "8", "--batch-size", "4",
            "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "2", "--save-every", "3", "--kd-lambda", "0.5",
            "--eval-every", "2"]
    run = [sys.executable, "-m", "pipeline", "train", *args]
    ok = subprocess.run([*run, "--out", str(tmp_path / "full")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr

    out = tmp_path / "crashed"
    env = {**os.environ, "PIPELINE_CRASH_AT": "train_step:5"}
    died = subprocess.run([*run, "--out", str(out)], env=env, capture_output=True, text=True)
    assert died.returncode == -9, died.stderr
    assert not (out / "adapter").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    resumed = subprocess.run([*run, "--out", str(out), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr  # progress notes on stderr; stdout is the JSON summary alone
    assert json.loads(resumed.stdout)["steps"] == 8

    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_metrics = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    resumed_metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in resumed_metrics] == [json.loads(x)["step"] for x in full_metrics]
    # The eval lines (steps 2, 4, 6, 8; the crashed run's step 4 was dropped and scored again) are the same.
    evals = [json.loads(x) for x in full_metrics if json.loads(x).get("eval")]
    assert [e["step"] for e in evals] == [2, 4, 6, 8]
    assert [json.loads(x) for x in resumed_metrics if json.loads(x).get("eval")] == evals
    assert json.loads(resumed_metrics[-2])["ce"] == pytest.approx(json.loads(full_metrics[-2])["ce"], abs=1e-6)


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_resume_with_another_number_of_processes_is_refused(tiny_model_dir, cache_and_other, finished_run, tmp_path,
                                                            torchrun_env):
    """1 process -> 2 and 2 -> 1: each process draws its own examples and random state; refused, printed once."""
    one = tmp_path / "one"
    shutil.copytree(finished_run, one)
    before = snapshot(one)
    job = torchrun(short_train_cmd(tiny_model_dir, cache_and_other["cache"], one, "--resume"), torchrun_env)
    assert job.returncode != 0
    ckpt = one / "checkpoints" / "step-000002"
    assert error_lines(job.stderr) == [f"error: {ckpt}: written by a run on 1 process(es), now 2; resume with 1: a "
                                       "step draws batch_size * grad_accum examples per process, and each process "
                                       "has its own random state"], job.stderr[-3000:]
    assert snapshot(one) == before

    two = tmp_path / "two"
    job = torchrun(short_train_cmd(tiny_model_dir, cache_and_other["cache"], two), torchrun_env)
    assert job.returncode == 0, job.stderr[-3000:]
    before = snapshot(two)
    assert_one_line_error(invoke(short_train_cmd(tiny_model_dir, cache_and_other["cache"], two, "--resume")),
                          f"error: {two / 'checkpoints' / 'step-000002'}: written by a run on 2 process(es), now 1")
    assert snapshot(two) == before
