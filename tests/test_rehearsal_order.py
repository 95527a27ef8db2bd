"""Issue 17, item 5: make-rehearsal and generate --out write their rows in the prompts' order; make-rehearsal still
resumes after a kill, to the same bytes as an uninterrupted run ([rehearsal order note] in generate.py)."""

from __future__ import annotations

import json

import datasets
import pytest
from click.testing import CliRunner

from pipeline import rehearsal
from pipeline.cli import main
from pipeline.config import RehearsalConfig
from pipeline.inputs import read_jsonl
from pipeline.rehearsal import make_rehearsal, partial_path
from tests.conftest import write_jsonl

# Lengths chosen so that the length-sorted batches (2 prompts each) visit them as p3 p1 | p4 p0 | p2 p5.
PROMPTS = [{"id": "p0", "instruction": "Write a short poem about the sea, please."},
           {"id": "p1", "instruction": "Say hi."},
           {"id": "p2", "instruction": "What is the capital of France? Answer in one short sentence, please."},
           {"id": "p3", "instruction": "Hi."},
           {"id": "p4", "instruction": "Count to three."},
           {"id": "p5", "messages": [{"role": "system", "content": "Be brief and answer in Japanese."},
                                     {"role": "user", "content": "医療文書を日本語で要約してください。"}]}]
ARGS = ["--max-new-tokens", "6", "--batch-size", "2", "--seed", "3"]


def ids_in(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


class Killed(BaseException):
    """Stands in for a SIGKILL (tests/test_evaluate.py kills a real process): what was fsynced stays, nothing more."""


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
                                       "--columns", "instruction=question,id=qid", "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in lines] == [r["qid"] for r in rows if r["qid"] in {x["id"] for x in lines}]
    for r in lines:
        assert set(r) - {"truncated"} == {"id", "instruction", "topic", "output"}
    read_jsonl(out, role="rehearsal")


def test_generate_out_in_prompt_order(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "--prompt", "First, from the flag.",
                                       "--prompts", str(prompts), "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert ids_in(out) == ["prompt-1", *(p["id"] for p in PROMPTS)]
