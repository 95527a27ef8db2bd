"""pipeline/mixing.py: rehearsal mixing. The per-step schedule (exact over the run, within a row every step), the
seeded row streams (a new permutation every epoch) and their resumption from a checkpointed state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.cache.read import MemoryRows, open_cache
from pipeline.cache.schema import CachedRow
from pipeline.mixing import RowStream, draw_step, rehearsal_count, rehearsal_total
from pipeline.train import micro_batches, setup
from tests.helpers import (
    QUIET,
    cfg_for,
)


def test_rehearsal_mixing_per_step(tiny_model_dir, tiny_cache, tmp_path):
    cache = open_cache(tiny_cache)
    for ratio, n in ((0.3, 8), (0.5, 4), (0.0, 4), (1.0, 4)):
        run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / f"m{ratio}", rehearsal_ratio=ratio, batch_size=n),
                    **QUIET)
        counts = []
        for step in range(1, 5):
            (batch,) = micro_batches(run, step)
            assert batch.n_rehearsal_examples == rehearsal_count(ratio, n, step)
            counts.append(batch.n_rehearsal_examples)
        assert sum(counts) == round(ratio * n * 4 + 1e-9)
    # Streams cycle endlessly, each epoch a new permutation, each row exactly once per epoch.
    stream = RowStream(cache, "task", "train", seed=0, window=1)
    first = [r.example_id for r in stream.take(stream.size)]
    second = [r.example_id for r in stream.take(stream.size)]
    assert sorted(first) == sorted(second) and len(set(first)) == stream.size and first != second


class _Stream:
    """A stand-in for mixing.RowStream: an endless numbered stream of one role."""

    def __init__(self, role: str):
        self.role, self.pos = role, 0

    def take(self, n: int) -> list[tuple[str, int]]:
        self.pos += n
        return [(self.role, i) for i in range(self.pos - n, self.pos)]


def test_rehearsal_ratio_is_exact_over_the_run_and_within_a_row_per_step():
    """docs/design.md, "Rehearsal mixing": step s takes round(r n s) - round(r n (s-1)) rehearsal rows."""
    # Hand-computed: 2.4 s rounded = 2, 5, 7, 10, 12, 14, 17, 19, 22, 24.
    assert [rehearsal_count(0.3, 8, s) for s in range(1, 11)] == [2, 3, 2, 3, 2, 2, 3, 2, 3, 2]
    assert rehearsal_count(0.3, 5, 1) == 2  # 1.5: a half rounds up
    # [exact ratio note] 0.3 * 9 * 5 is 13.5 exactly, 13.499999999999998 in floats: the exact half still rounds up.
    assert rehearsal_total(0.3, 9, 5) == 14 and rehearsal_total(0.3, 9, 4) == 11
    for batch in range(1, 17):
        for accum in (1, 2):
            for procs in (1, 2, 3):
                n = batch * accum * procs
                for ratio in (0.1, 0.3, 0.5):
                    task, rehearsal = _Stream("task"), _Stream("rehearsal")
                    total = 0
                    for step in range(1, 101):
                        rows = draw_step(task, rehearsal, n, ratio, seed=0, step=step)
                        k = sum(role == "rehearsal" for role, _ in rows)
                        assert len(rows) == n and abs(k - ratio * n) < 1, (batch, accum, procs, ratio, step)
                        total += k
                    assert abs(total - ratio * n * 100) <= 0.5, (batch, accum, procs, ratio)
                    assert total == rehearsal.pos and n * 100 - total == task.pos


def _memory_rows() -> MemoryRows:
    def row(i: int, role: str) -> CachedRow:
        return CachedRow(f"{role}-{i:03d}", role, "train", np.arange(4), np.array([0, 0, 1, 1], bool),
                         np.zeros((2, 1), np.int64), np.zeros((2, 1), np.float32))
    return MemoryRows([row(i, "task") for i in range(37)] + [row(i, "rehearsal") for i in range(11)], group_size=5)


def _draw_ids(steps: range, state: dict | None) -> tuple[list[list[str]], dict]:
    """The example ids of `steps` drawn from fresh streams (at `state`, if given); and the streams' state after."""
    rows = _memory_rows()
    task, reh = RowStream(rows, "task", "train", seed=3), RowStream(rows, "rehearsal", "train", seed=3)
    if state:
        task.load_state_dict(state["task"])
        reh.load_state_dict(state["rehearsal"])
    ids = [[r.example_id for r in draw_step(task, reh, 7, 0.3, seed=3, step=s)] for s in steps]
    return ids, {"task": task.state_dict(), "rehearsal": reh.state_dict()}


def test_mixing_resumes_with_the_same_sequence():
    """Steps 38-100 drawn by a new process from the streams' checkpointed state equal an uninterrupted draw."""
    whole, _ = _draw_ids(range(1, 101), None)
    first, state = _draw_ids(range(1, 38), None)
    code = ("import json, sys; from tests.test_mixing import _draw_ids; "
            "print(json.dumps(_draw_ids(range(38, 101), json.loads(sys.argv[1]))[0]))")
    rest = subprocess.run([sys.executable, "-c", code, json.dumps(state)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    assert first + json.loads(rest.stdout) == whole
    assert sum(i.startswith("rehearsal") for step in whole for i in step) == round(0.3 * 7 * 100)
