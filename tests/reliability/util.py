"""Helpers shared by the fault-injection tests: start processes that SIGKILL themselves, compare caches and runs.

Running the CLI in this process (invoke) and checking its one-line error are in tests/helpers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from pipeline.fileio import TMP_MARK
from tests.helpers import cache_rows, manifest_without_time

# Small enough that a crash/resume round trip costs seconds: 7 shards of <= 2 examples, one example per batch
# (so a crash can land between two batches of one shard), 4 teacher tokens per position.
CACHE_ARGS = ["--top-k", "4", "--max-length", "96", "--batch-size", "1", "--shard-size", "2", "--precision", "fp32"]
TRAIN_ARGS = ["--max-steps", "8", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "2",
              "--save-every", "3", "--keep-checkpoints", "2", "--precision", "fp32"]


def crash_env(point: str | None, home: Path) -> dict[str, str]:
    # One compute thread per process: the killed runs go several at a time on a small CI machine, and
    # oversubscribed OpenMP threads spin (measured: 2 s per tiny example instead of 0.1 s).
    env = {**os.environ, "PIPELINE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("PIPELINE_CRASH_AT", None)
    if point:
        env["PIPELINE_CRASH_AT"] = point
    return env


def run_until_killed(args: Sequence[str], points: Sequence[str], home: Path) -> list[subprocess.CompletedProcess]:
    """Run `python -m pipeline ARGS` once per crash point, in order, each run dying by SIGKILL at its point.

    A real process death (no except/finally runs, open files are not flushed by Python), not an exception.
    """
    done = []
    for point in points:
        proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], env=crash_env(point, home),
                              capture_output=True, text=True, timeout=300)
        done.append(proc)
        assert proc.returncode == -9, f"{point}: expected SIGKILL, got rc {proc.returncode}\n{proc.stderr[-3000:]}"
    return done


def tmp_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if TMP_MARK in p.name)


def assert_same_cache(got: Path, want: Path) -> None:
    """Same rows and values (by example_id), same shard files byte for byte, same manifest, no temp files."""
    assert tmp_files(got) == []
    rows_got, rows_want = cache_rows(got), cache_rows(want)
    assert sorted(rows_got) == sorted(rows_want), "missing or extra examples"
    for ex_id, row in rows_want.items():
        assert rows_got[ex_id] == row, ex_id
    assert manifest_without_time(got) == manifest_without_time(want)  # includes every shard's sha256
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())


def train_cmd(model: Path, cache: Path, out: Path) -> list[str]:
    """`pipeline train` with TRAIN_ARGS. --resume from the very first run: a script can always pass it (with no
    checkpoint yet it starts at step 0), and the killed runs and their reruns are then one and the same command.
    """
    return ["train", "--model", model, "--cache", cache, *TRAIN_ARGS, "--out", out, "--resume"]


def assert_same_run(got: Path, want: Path) -> None:
    """Bit-identical adapter, the same metrics lines (bar the speed), the same checkpoints, nothing temporary."""
    a = load_file(got / "adapter" / "adapter_model.safetensors")
    b = load_file(want / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    def metrics(run: Path) -> list[dict]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]

    assert metrics(got) == metrics(want)
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert tmp_files(got) == []
    assert yaml.safe_load((got / "run.yaml").read_text())["status"] == "finished"
