"""Helpers shared by the fault-injection tests: run the CLI, start processes that SIGKILL themselves, compare caches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from pipeline.cache.schema import MANIFEST
from pipeline.cli import main
from pipeline.fileio import TMP_MARK

# Small enough that a crash/resume round trip costs seconds: 7 shards of <= 2 examples, one example per batch
# (so a crash can land between two batches of one shard), 4 teacher tokens per position.
CACHE_ARGS = ["--top-k", "4", "--max-length", "96", "--batch-size", "1", "--shard-size", "2", "--precision", "fp32"]
TRAIN_ARGS = ["--max-steps", "8", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "2",
              "--save-every", "3", "--keep-checkpoints", "2", "--precision", "fp32"]


# A tqdm bar on stderr ("cache-teacher:  43%|████ | 6/14 [...]"): shown before an error that stops a loop.
PROGRESS_BAR = re.compile(r"^[\w ()-]+: +\d+%\|")


def invoke(args: Sequence[str]) -> Result:
    """Run `pipeline ARGS` in this process; exceptions are caught and kept on the result, as a user would see them."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result: Result, *needles: str, exit_code: int = 1) -> str:
    """The command stopped with exactly one short `error:` line, the last on stderr, containing every needle, and
    no traceback. Progress notes (train and evaluate log to stderr, keeping stdout for JSON) may come before it."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"uncaught {type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in result.output
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_BAR.match(line)]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    line = errors[0]
    assert line.startswith("error: ") and len(line) < 600, line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


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


def cache_rows(cache: Path) -> dict[str, dict]:
    """Every row of a finished cache by example_id, asserting that no example appears twice."""
    manifest = json.loads((cache / MANIFEST).read_text())
    rows: dict[str, dict] = {}
    for shard in manifest["shards"]:
        for row in pq.read_table(cache / shard["file"]).to_pylist():
            assert row["example_id"] not in rows, f"duplicated example {row['example_id']}"
            rows[row["example_id"]] = row
    return rows


def manifest_without_time(cache: Path) -> dict:
    """The manifest minus its creation time: everything else must be reproduced exactly by a resumed run."""
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest.pop("created")
    return manifest


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
