"""Plain functions and constants that several test files share (fixtures live in conftest.py).

    input rows        TASK_ROWS, GENERAL_ROWS, GENERAL_EVAL_ROWS, PROMPTS; write_jsonl
    running commands  invoke, assert_one_line_error, error_lines, snapshot, torchrun
    small caches      cache_args, run_cli, small_cache_cmd, build_eval_cache; reading them back: cache_rows,
                      shard_tables, manifest_without_time
    small runs        cfg_for (the tiny cache), fp32_cfg_for (the fp32 cache at temperature 2), short_train_cmd
    references        reference_token_kl: the KL of one token, bucket by bucket, in float64
    sweep rows        sweep_row, DEMO_ROWS: made-up rows as sweep.py builds them
    file systems      mounted_tmpfs: a real, small tmpfs
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner, Result
from torch import Tensor

from pipeline.cache.schema import MANIFEST
from pipeline.cache.write import build_cache
from pipeline.cli import main
from pipeline.config import CacheConfig, TrainConfig
from pipeline.losses import REVERSE_RESIDUAL_FLOOR

# cache-teacher flags that keep a cache to the files given (no rehearsal data made from the shipped prompts, no task
# rows held out); a flag given after them wins.
TASK_ONLY = ["--rehearsal-train", "none", "--eval-fraction", "0"]
QUIET = {"log": lambda *_: None}  # the `log` argument of build_cache, setup, train, ...: print nothing

# ------------------------------------------------------------------------------------------------------ input rows

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
# Held-out general prompts: none of them is a rehearsal training prompt (GENERAL_ROWS), as evaluate requires.
GENERAL_EVAL_ROWS = [
    {"id": "g0", "instruction": "What is the capital of Italy?", "output": "Rome is the capital of Italy."},
    {"id": "g1", "instruction": "Write a short poem about the fox.", "output": "The quick brown fox jumps."},
    {"id": "g2", "messages": [{"role": "user", "content": "患者の治療を要約してください。"},
                              {"role": "assistant", "content": "患者は高血圧の治療中です。"}]},
    {"id": "g3", "input": "def sub(a, b):", "output": "    return a - b"},
]
# Prompts for make-rehearsal and generate. Lengths chosen so that the length-sorted batches (2 prompts each) visit
# them as p3 p1 | p4 p0 | p2 p5.
PROMPTS = [{"id": "p0", "instruction": "Write a short poem about the sea, please."},
           {"id": "p1", "instruction": "Say hi."},
           {"id": "p2", "instruction": "What is the capital of France? Answer in one short sentence, please."},
           {"id": "p3", "instruction": "Hi."},
           {"id": "p4", "instruction": "Count to three."},
           {"id": "p5", "messages": [{"role": "system", "content": "Be brief and answer in Japanese."},
                                     {"role": "user", "content": "医療文書を日本語で要約してください。"}]}]
GENERATE_ARGS = ["--max-new-tokens", "6", "--batch-size", "2", "--seed", "3"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def ids_in(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------ running commands

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


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: what a refusal must leave untouched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def torchrun(args: list, env: dict[str, str], *, rank1: str = ":", timeout: float = 240
             ) -> subprocess.CompletedProcess:
    """`pipeline ARGS` as 2 processes under torchrun; `rank1` is shell code run by rank 1 alone before it starts.

    A job that does not end within `timeout` (a rank left waiting) is killed with all its processes, and fails.
    """
    script = f'if [ "$RANK" = 1 ]; then {rank1}; fi; exec "$0" -m pipeline "$@"'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           "sh", "-c", script, sys.executable, *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {args[0]} did not finish in {timeout} s (a rank left waiting?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ---------------------------------------------------------------------------------------------------- small caches

SMALL_CACHE_FLAGS = ["--top-k", "4", "--max-length", "256", "--shard-size", "4", "--precision", "fp32"]
SHORT_TRAIN_FLAGS = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--save-every",
                     "2", "--log-every", "1", "--precision", "fp32"]


def only_given(corpus: dict) -> list[str]:
    """The flags that keep a cache to the inputs given: no rehearsal data made from the shipped prompts, no task rows
    held out (tests of those two say so themselves)."""
    extra = [] if "task_eval" in corpus else ["--eval-fraction", "0"]
    if not {"rehearsal_train", "rehearsal_eval"} & corpus.keys():
        extra += ["--rehearsal-train", "none"]
    return extra


def cache_args(model_dir: Path, corpus: dict[str, Path], out: Path) -> list[str]:
    inputs = [a for key, path in corpus.items() for a in (f"--{key.replace('_', '-')}", str(path))]
    return ["cache-teacher", "--model", str(model_dir), *inputs, *only_given(corpus), "--top-k", "8", "--max-length",
            "256", "--batch-size", "3", "--precision", "fp32", "--out", str(out)]


def run_cli(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


def small_cache_cmd(model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """`pipeline cache-teacher` of `data` with SMALL_CACHE_FLAGS (top-4, shards of 4 examples)."""
    inputs = [a for key, path in data.items() for a in (f"--{key.replace('_', '-')}", str(path))]
    return ["cache-teacher", "--model", str(model), *inputs, *only_given(data), *SMALL_CACHE_FLAGS, "--out", str(out),
            *extra]


def short_train_cmd(model: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    """`pipeline train` with SHORT_TRAIN_FLAGS: 3 steps of 4 examples, a checkpoint at step 2."""
    return ["train", "--model", str(model), "--cache", str(cache), "--out", str(out), *SHORT_TRAIN_FLAGS, *extra]


def build_eval_cache(d: Path, model_dir: Path, general_eval: list[dict]) -> Path:
    """A cache with all four parts: 12 task and 4 general training rows, 4 task and `general_eval` held-out rows."""
    rows = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    task = write_jsonl(d / "task.jsonl", rows)
    task_eval = write_jsonl(d / "task_eval.jsonl", [{**r, "id": f"e{i}"} for i, r in enumerate(rows[:4])])
    general = write_jsonl(d / "general.jsonl", GENERAL_ROWS)
    out = d / "cache"
    build_cache(CacheConfig(model=str(model_dir), out=str(out), task_train=str(task), task_eval=str(task_eval),
                            rehearsal_train=str(general),
                            rehearsal_eval=str(write_jsonl(d / "general_eval.jsonl", general_eval)), top_k=8,
                            max_length=256), **QUIET)
    return out


def cache_rows(cache: Path) -> dict[str, dict]:
    """Every row of a finished cache by example_id, asserting that no example appears twice."""
    manifest = json.loads((cache / MANIFEST).read_text())
    rows: dict[str, dict] = {}
    for shard in manifest["shards"]:
        for row in pq.read_table(cache / shard["file"]).to_pylist():
            assert row["example_id"] not in rows, f"duplicated example {row['example_id']}"
            rows[row["example_id"]] = row
    return rows


def shard_tables(cache: Path) -> list[pa.Table]:
    manifest = json.loads((cache / MANIFEST).read_text())
    return [pq.read_table(cache / s["file"]) for s in manifest["shards"]]


def manifest_without_time(cache: Path) -> dict:
    """The manifest minus its creation time: everything else must be reproduced exactly by a resumed run."""
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest.pop("created")
    return manifest


# ------------------------------------------------------------------------------------------------------ small runs


def cfg_for(model_dir: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    """6 steps of 4 examples, lr 1e-3, logs every 2 steps and a checkpoint every 3; `kw` overrides."""
    base = {"model": str(model_dir), "cache": str(cache), "out": str(out), "max_steps": 6, "batch_size": 4,
            "lr": 1e-3, "warmup_steps": 1, "log_every": 2, "save_every": 3}
    return TrainConfig(**{**base, **kw})


def fp32_cfg_for(model_dir: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    """fp32, no dropout, no L2, no warm-up: 10 steps of 8 examples at lr 1e-2; `kw` overrides."""
    base = {"model": str(model_dir), "cache": str(cache), "out": str(out), "max_steps": 10, "batch_size": 8,
            "lr": 1e-2, "warmup_steps": 0, "lora_dropout": 0.0, "precision": "fp32", "l2": 0.0}
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------------ references


def reference_token_kl(logq_row: Tensor, ids: list[int], lp: Tensor, kind: str) -> Tensor:
    """KL of one token, bucket by bucket. logq_row: (V,) float64 full student log-probs; lp: (k,) teacher log-probs.

    The reference of tests/test_losses.py and tests/test_train.py, written the obvious way on purpose: a Python loop
    over the buckets, the residual mass as a plain sum of probabilities.
    """
    outside = [v for v in range(logq_row.shape[0]) if v not in set(ids)]
    lp = lp.double()
    p = lp.exp()
    log_q = logq_row[ids]
    q = log_q.exp()
    total = logq_row.new_zeros(())
    if kind == "topk_renorm":
        p_s, q_s = p / p.sum(), q / q.sum()
        for j in range(len(ids)):
            total = total + p_s[j] * (torch.log(p_s[j]) - torch.log(q_s[j]))
        return total
    p_r = max(1.0 - p.sum().item(), 0.0)
    if kind == "forward":
        for j in range(len(ids)):
            total = total + p[j] * (lp[j] - log_q[j])
        if outside and p_r > 0:
            q_r = logq_row[outside].exp().sum()
            total = total + p_r * (math.log(p_r) - torch.log(q_r))
        return total
    assert kind == "reverse"
    for j in range(len(ids)):
        total = total + q[j] * (log_q[j] - lp[j])
    if outside:
        q_r = logq_row[outside].exp().sum()
        total = total + q_r * (torch.log(q_r) - math.log(max(p_r, REVERSE_RESIDUAL_FLOOR)))
    return total


# ------------------------------------------------------------------------------------------------------ sweep rows


def sweep_row(name: str, score: float | None, kl: float | None, seconds: float = 100.0, *, ce: float = 0.5,
              n: int = 100, curve: list | None = None) -> dict:
    """A sweep row as sweep.py builds it, with the evaluate report keys it reads."""
    return {"name": name, "kd_lambda": 0.0, "rehearsal_ratio": 0.3, "kd_on": "all", "train_seconds": seconds,
            "curve": curve or [],
            "eval": {"task": {"exact_match": score, "examples": n, "ce": ce},
                     "forgetting": {"kl": kl, "top1_agreement": 0.9, "kl_topk": kl and kl / 2, "ce": 2.4,
                                    "base_ce": 2.3}}}


# The README's demo table, roughly: plain QLoRA learns most and forgets most.
DEMO_ROWS = [sweep_row("base", 0.00, 0.0, 0, ce=1.57), sweep_row("plain-qlora", 0.53, 0.2646, 166, ce=0.09),
             sweep_row("kd_lambda=0", 0.46, 0.0368, 192, ce=0.12),
             sweep_row("kd_lambda=1,kd_on=rehearsal", 0.44, 0.0132, 180, ce=0.12),
             sweep_row("kd_lambda=1", 0.10, 0.0069, 178, ce=0.48)]


# ---------------------------------------------------------------------------------------------------- file systems


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` (mount's notation: 16k, 4m) mounted on the new directory `mnt`, unmounted after.

    Needs root and CAP_SYS_ADMIN; the test is skipped where it cannot be mounted. Unmounting fails the test when
    the file system is busy (a file left open on it: a leak); it is then detached anyway.
    """
    mnt.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield mnt
    finally:
        um = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if um.returncode != 0:  # busy: a file left open on it (a leak); detach it anyway, then fail
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        assert um.returncode == 0, um.stderr
