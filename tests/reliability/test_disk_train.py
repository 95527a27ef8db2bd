"""`train` on a really full disk: the run directory on a small tmpfs that fills up just before one of
the run's writes - a checkpoint, the adapter, metrics.jsonl, run.yaml. Each stops with one line naming the file,
keeps everything written before, and `--resume` once room is made ends with the adapter of an uninterrupted run.

The disk is filled by a filler file written until the kernel says ENOSPC (needs root to mount the tmpfs; skipped
otherwise), so what fails is the library's own write on a full file system (torch.save, safetensors, a text
file), not a mock. Room is made by deleting the filler.
"""

from __future__ import annotations

import errno
import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import pipeline.metrics
import pipeline.train
from tests.helpers import assert_one_line_error, invoke, mounted_tmpfs
from tests.reliability.util import assert_same_run, tmp_files, train_cmd


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A real 4 MiB file system: room for the run (two checkpoints of ~200 KB, the adapter) and the filler."""
    with mounted_tmpfs(tmp_path / "disk", "4m") as mnt:
        yield mnt


def fill(mnt: Path) -> Path:
    """Write a filler file until the file system is full; returns it (delete it to make room)."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    if os.write(fd, block) < size:
                        break
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)
    return filler


def fill_before(monkeypatch, owner: object, name: str, mnt: Path, call: int) -> list:
    """Replace owner.name with a wrapper that fills the disk right before its `call`-th call (1-based)."""
    real, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            fill(mnt)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


# (what to wrap, its call that meets the full disk, the path the one-line error names relative to OUT, what else it
# says, the checkpoints kept, the metrics lines kept)
CASES = {
    "checkpoint": (pipeline.train, "save_checkpoint", 2, "checkpoints/step-000006", "is the disk full?",
                   ["step-000003"], 5),  # torch.save reports a full disk without errno: "unexpected pos ..."
    "adapter": (pipeline.train, "save_adapter", 1, "adapter", "No space left on device",
                ["step-000003", "step-000006"], 6),
    "metrics.jsonl": (pipeline.metrics.MetricsLog, "write", 1, "metrics.jsonl", "No space left on device", [], 0),
    "run.yaml-start": (pipeline.train, "write_run_yaml", 1, "run.yaml", "No space left on device", [], None),
    "run.yaml-end": (pipeline.train, "write_run_yaml", 2, "run.yaml", "No space left on device",
                     ["step-000003", "step-000006"], 6),
}


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", list(CASES))
def test_train_on_a_really_full_disk_then_resume(case, tmpfs, tiny_model_dir, reference_cache, reference_run,
                                                 monkeypatch):
    owner, name, call, named, says, checkpoints, n_lines = CASES[case]
    out = tmpfs / "run"
    fill_before(monkeypatch, owner, name, tmpfs, call)
    failed = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    monkeypatch.undo()
    try:
        assert_one_line_error(failed, f"error: {out / named}: cannot write", says)
    finally:
        del failed  # its traceback holds the file torch.save left open (and its space) until collected
        gc.collect()
    assert tmp_files(out) == []

    # Nothing written before the disk filled up is lost: checkpoints whole, metrics lines, run.yaml (and the adapter
    # when only run.yaml failed after it).
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
    for ckpt in checkpoints:
        assert sorted(p.name for p in (out / "checkpoints" / ckpt).iterdir()) == ["state.json", "tensors.pt"]
    if n_lines is not None:
        assert metrics(out) == metrics(reference_run)[:n_lines]
        assert yaml.safe_load((out / "run.yaml").read_text())["status"] == "running"
    else:
        assert not (out / "run.yaml").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "adapter").exists() == (case == "run.yaml-end")

    (tmpfs / "filler").unlink()  # room again: the same command continues
    resumed = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    assert resumed.exit_code == 0, resumed.output
    if checkpoints:
        assert f"(step {int(checkpoints[-1][-6:])})" in resumed.output
    assert_same_run(out, reference_run)
