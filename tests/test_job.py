"""`pipeline run`: the whole job from task rows alone, through the CLI, on the tiny model."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.cli import main
from tests.helpers import TASK_ROWS, write_jsonl


def test_task_rows_alone_give_an_adapter_and_a_report(tiny_model_dir, few_prompts, tmp_path, monkeypatch):
    rows = [{**r, "id": f"t{i}"} for i, r in enumerate(TASK_ROWS * 5)]
    task = write_jsonl(tmp_path / "task.jsonl", rows)
    out = tmp_path / "job"
    args = ["run", "--model", str(tiny_model_dir), "--task-train", str(task), "--out", str(out), "--top-k", "4",
            "--max-length", "128", "--max-steps", "3", "--batch-size", "4", "--max-new-tokens", "8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "cache" / "manifest.json").is_file() and (out / "cache" / "generated").is_dir()
    assert (out / "adapter" / "adapter_config.json").is_file()
    report = (out / "report.md").read_text()
    assert "| base |" in report and "| train |" in report  # the base row and the run, side by side
    base = json.loads((out / "base" / "eval.json").read_text())
    tuned = json.loads((out / "train" / "eval.json").read_text())
    assert base["task"]["examples"] == tuned["task"]["examples"] == 3  # 10% of 30 task rows held out
    assert base["forgetting"]["kl"] == 0 and tuned["forgetting"]["kl"] > 0  # measured against the live base
    assert f"adapter: {out}/adapter" in result.output

    # Rerun: everything is kept.
    monkeypatch.setattr("pipeline.sweep.train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output


def test_every_problem_before_any_work(tiny_model_dir, tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", TASK_ROWS)
    result = CliRunner().invoke(main, ["run", "--model", str(tiny_model_dir), "--task-train", str(task), "--out",
                                       str(tmp_path / "job"), "--top-k", "0", "--lr", "-1", "--lambdas", "1",
                                       "--grid", "rehearsal_ratio=0"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert any("top_k: must be > 0" in line for line in lines)
    assert any(line.startswith("error: run kd_lambda=1,rehearsal_ratio=0: lr: must be > 0") for line in lines)
    assert any("run kd_lambda=1,rehearsal_ratio=0: kd_on: rehearsal" in line for line in lines)
    assert not (tmp_path / "job").exists()
