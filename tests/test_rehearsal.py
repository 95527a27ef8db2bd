"""`pipeline make-rehearsal` (pipeline/rehearsal.py): its output is valid training input, in the prompts' order,
and a killed run resumes to the same bytes as an uninterrupted one ([rehearsal order note] in generate.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest
from click.testing import CliRunner

from pipeline import rehearsal
from pipeline.cli import main
from pipeline.config import RehearsalConfig
from pipeline.inputs import read_jsonl
from pipeline.rehearsal import make_rehearsal, partial_path
from tests.helpers import (
    GENERATE_ARGS,
    PROMPTS,
    QUIET,
    ids_in,
    write_jsonl,
)


def test_make_rehearsal_output_is_valid_input_and_resumes(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": f"p{i}", "instruction": q} for i, q in enumerate(["What is the capital of France?", "Write a poem.",
                                                                  "def add(a, b):", "医療文書を要約してください。",
                                                                  "Say hi.", "Count to three."])] + [
        {"id": "m1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}])
    full = tmp_path / "full.jsonl"
    summary = make_rehearsal(RehearsalConfig(model=str(tiny_model_dir), prompts=str(prompts), out=str(full),
                                             max_new_tokens=12, batch_size=2), **QUIET)
    assert summary.answered_now + summary.empty == 7
    examples, _ = read_jsonl(full, role="rehearsal")  # valid training input
    assert {e.id for e in examples} <= {f"p{i}" for i in range(6)} | {"m1"}
    by_id = {json.loads(line)["id"]: json.loads(line) for line in full.read_text().splitlines()}
    if "m1" in by_id:
        assert by_id["m1"]["messages"][-1]["role"] == "assistant"

    # Killed after the first batch, then rerun: same answers as the uninterrupted run, none twice.
    out = tmp_path / "resumed.jsonl"
    cmd = [sys.executable, "-m", "pipeline", "make-rehearsal", "--model", str(tiny_model_dir), "--prompts",
           str(prompts), "--out", str(out), "--max-new-tokens", "12", "--batch-size", "2"]
    died = subprocess.run(cmd, env={**os.environ, "PIPELINE_CRASH_AT": "rehearsal_batch_written:1"},
                          capture_output=True, text=True)
    assert died.returncode == -9
    with open(out.with_name(out.name + ".partial"), "a") as f:  # answered batches go there until the end
        f.write('{"id": "p9", "instruc')  # a torn line, as a crash mid-write would leave
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["id"] for r in resumed}) == len(resumed)
    assert {r["id"]: r for r in resumed} == by_id
    assert out.read_bytes() == full.read_bytes()  # in the prompts' order, as the uninterrupted run wrote it


class Killed(BaseException):
    """Stands in for a SIGKILL (test_make_rehearsal_output_is_valid_input_and_resumes kills a real process): what was
    fsynced stays, nothing more."""


def test_make_rehearsal_writes_prompt_order_and_resumes_to_the_same_bytes(tiny_model_dir, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)

    def run(out, kill_at_batch: int | None = None):
        passed = []

        def crash_point(name: str) -> None:
            passed.append(name)
            if name == "rehearsal_batch_written" and len(passed) == kill_at_batch:
                raise Killed

        monkeypatch.setattr(rehearsal, "crash_point", crash_point)
        return make_rehearsal(RehearsalConfig(model=str(tiny_model_dir), prompts=str(prompts), out=str(out),
                                              max_new_tokens=6, batch_size=2, seed=3), log=lambda *_: None)

    full = tmp_path / "full.jsonl"
    run(full)
    written = ids_in(full)
    assert written == [p["id"] for p in PROMPTS if p["id"] in written] and len(written) >= 4  # empty ones: left out
    assert not partial_path(full).exists()
    read_jsonl(full, role="rehearsal")  # valid training input

    # Killed after the 2nd batch: no OUT yet (it only ever exists complete), the answered batches in OUT.partial,
    # in batch order.
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        run(out, kill_at_batch=2)
    assert not out.exists()
    kept = ids_in(partial_path(out))
    assert set(kept) <= {"p3", "p1", "p4", "p0"} and kept != sorted(kept, key=[p["id"] for p in PROMPTS].index)
    with open(partial_path(out), "a", encoding="utf-8") as f:
        f.write('{"id": "p2", "instruc')  # a torn line, as a kill mid-write would leave
    summary = run(out)
    assert summary.kept == len(kept)
    assert out.read_bytes() == full.read_bytes()
    assert not partial_path(out).exists()


def test_rerun_puts_an_earlier_output_in_order_without_generating(tiny_model_dir, tmp_path):
    """An OUT written in batch order (as make-rehearsal did before) is rewritten in the prompts' order, with answers
    to prompts no longer in the file kept after them; nothing is generated."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "One."}, {"id": "b", "instruction": "2"}])
    out = write_jsonl(tmp_path / "r.jsonl", [{"id": "b", "instruction": "2", "output": "two"},
                                             {"id": "gone", "instruction": "?", "output": "!"},
                                             {"id": "a", "instruction": "One.", "output": "one"}])
    summary = make_rehearsal(RehearsalConfig(model=str(tmp_path / "no-model-needed"), prompts=str(prompts),
                                             out=str(out)), log=lambda *_: None)
    assert (summary.answered_now, summary.kept) == (0, 2)
    assert ids_in(out) == ["a", "b", "gone"]


def test_make_rehearsal_from_parquet_with_columns(tiny_model_dir, tmp_path):
    """Prompts from a Parquet file with their own column names: the answers come back in the documented form."""
    rows = [{"qid": p["id"], "question": p["instruction"], "topic": "general"} for p in PROMPTS if "instruction" in p]
    path = tmp_path / "prompts.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    out = tmp_path / "r.jsonl"
    result = CliRunner().invoke(main, ["make-rehearsal", "--model", str(tiny_model_dir), "--prompts", str(path),
                                       "--columns", "instruction=question,id=qid", "--out", str(out), *GENERATE_ARGS])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in lines] == [r["qid"] for r in rows if r["qid"] in {x["id"] for x in lines}]
    for r in lines:
        assert set(r) - {"truncated"} == {"id", "instruction", "topic", "output"}
    read_jsonl(out, role="rehearsal")
