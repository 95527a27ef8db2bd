"""evaluate, sweep, make-rehearsal, generate and merge on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import build_cache
from pipeline.cli import main
from pipeline.config import CacheConfig, EvalConfig, RehearsalConfig, SweepConfig, TrainConfig
from pipeline.data import read_jsonl
from pipeline.evaluate import evaluate
from pipeline.generate import make_rehearsal
from pipeline.sweep import plan_runs, sweep
from pipeline.train import train
from tests.conftest import GENERAL_ROWS, TASK_ROWS, write_jsonl

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory, tiny_model_dir) -> Path:
    d = tmp_path_factory.mktemp("eval-cache")
    rows = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    task = write_jsonl(d / "task.jsonl", rows)
    task_eval = write_jsonl(d / "task_eval.jsonl", [{**r, "id": f"e{i}"} for i, r in enumerate(rows[:4])])
    general = write_jsonl(d / "general.jsonl", GENERAL_ROWS)
    general_eval = write_jsonl(d / "general_eval.jsonl", [{**r, "id": f"g{i}"} for i, r in enumerate(GENERAL_ROWS)])
    out = d / "cache"
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), task_train=str(task), task_eval=str(task_eval),
                            rehearsal_train=str(general), rehearsal_eval=str(general_eval), top_k=8, max_length=256),
                **QUIET)
    return out


def test_evaluate_base_has_zero_kl_and_trained_adapter_does_not(tiny_model_dir, eval_cache, tmp_path):
    base = evaluate(EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache), max_new_tokens=24), **QUIET)
    assert base["forgetting"]["kl"] < 1e-5
    assert base["forgetting"]["ce"] == base["forgetting"]["base_ce"]
    assert base["task"]["examples"] == 4 and 0.0 <= base["task"]["exact_match"] <= 1.0
    assert len(base["task"]["samples"]) == 4 and base["task"]["samples"][0]["reference"].startswith('{"medication"')

    train(TrainConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(tmp_path / "r"), max_steps=12,
                      batch_size=4, lr=3e-3, warmup_steps=1, kd_lambda=0.0), **QUIET)
    out = tmp_path / "eval.json"
    tuned = evaluate(EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache), adapter=str(tmp_path / "r/adapter"),
                                out=str(out), max_new_tokens=24), **QUIET)
    assert tuned["forgetting"]["kl"] > 1e-3
    assert tuned["forgetting"]["base_ce"] == pytest.approx(base["forgetting"]["ce"], rel=1e-5)
    assert tuned["task"]["ce"] < base["task"]["ce"]  # it learned the task
    assert json.loads(out.read_text())["forgetting"]["kl"] == tuned["forgetting"]["kl"]


def test_sweep_reuses_cache_resumes_and_reports(tiny_model_dir, eval_cache, tmp_path, monkeypatch):
    import pipeline.cache
    import pipeline.sweep
    import pipeline.teacher

    def no_teacher(*a, **kw):
        raise AssertionError("the sweep must not run the teacher")

    monkeypatch.setattr(pipeline.cache, "teacher_topk", no_teacher)
    monkeypatch.setattr(pipeline.teacher, "teacher_topk", no_teacher)
    monkeypatch.setattr(pipeline.cache, "build_cache", no_teacher)
    manifest_before = (eval_cache / "manifest.json").read_bytes()
    cfg = SweepConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(tmp_path / "s"), lambdas=[0.0, 1.0],
                      runs=[{"name": "plain-qlora", "kd_lambda": 0, "rehearsal_ratio": 0}])
    fixed = {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 2}
    eval_cfg = EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache), max_new_tokens=16)
    rows = sweep(cfg, fixed, eval_cfg, command="test", **QUIET)
    assert [r["name"] for r in rows] == ["base", "kd_lambda=0", "kd_lambda=1", "plain-qlora"]
    assert (eval_cache / "manifest.json").read_bytes() == manifest_before
    report = (tmp_path / "s" / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and "run |" not in line]
    assert [line.split("|")[1].strip() for line in table] == ["base", "kd_lambda=0", "kd_lambda=1", "plain-qlora"]
    assert (tmp_path / "s" / "tradeoff.png").stat().st_size > 1000
    assert rows[3]["rehearsal_ratio"] == 0.0 and rows[1]["kd_lambda"] == 0.0
    # The recommendation names a trained run, and its adapter is handed over ready for generate.
    rec = json.loads((tmp_path / "s" / "recommendation.json").read_text())
    assert rec["name"] in ("kd_lambda=0", "kd_lambda=1", "plain-qlora") and report.split("\n\n")[1].startswith(
        f"**Recommended: `{rec['name']}`**")
    recommended = tmp_path / "s" / "recommended" / "adapter"
    assert recommended.resolve() == (tmp_path / "s" / rec["name"] / "adapter").resolve()
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "--adapter", str(recommended),
                                       "--prompt", "Hello", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output

    # Interrupted sweep: one run lost its evaluation, another its whole directory. The rest is kept.
    (tmp_path / "s" / "kd_lambda=1" / "eval.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "s" / "plain-qlora")
    trained = []
    real_train = pipeline.sweep.train
    monkeypatch.setattr(pipeline.sweep, "train",
                        lambda c, **kw: trained.append(Path(c.out).name) or real_train(c, **kw))
    rows2 = sweep(cfg, fixed, eval_cfg, command="test", **QUIET)
    assert trained == ["plain-qlora"]
    assert rows2[1]["eval"] == rows[1]["eval"]

    # The same sweep directory with other fixed settings is refused, naming the field.
    with pytest.raises(Exception, match="lr"):
        sweep(cfg, {**fixed, "lr": 1e-3}, eval_cfg, command="test", **QUIET)


def test_plan_runs_grid_and_errors():
    runs = plan_runs(SweepConfig(cache="c", out="o", lambdas=[0.0, 0.5], grid=["lora_r=4,8"]))
    assert [r.name for r in runs] == ["kd_lambda=0,lora_r=4", "kd_lambda=0,lora_r=8", "kd_lambda=0.5,lora_r=4",
                                      "kd_lambda=0.5,lora_r=8"]
    assert runs[1].overrides == {"kd_lambda": 0.0, "lora_r": 8}
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="not a train setting"):
        plan_runs(SweepConfig(cache="c", out="o", grid=["lora_rank=4"]))
    with pytest.raises(ConfigError, match="expected int"):
        plan_runs(SweepConfig(cache="c", out="o", grid=["lora_r=four"]))


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
    with open(out, "a") as f:
        f.write('{"id": "p9", "instruc')  # a torn line, as a crash mid-write would leave
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["id"] for r in resumed}) == len(resumed)
    assert {r["id"]: r for r in resumed} == by_id


def test_generate_cli(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "--prompt", "Hello",
                                       "--prompt", "What is the capital of France?", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["prompt"] for r in lines] == ["Hello", "What is the capital of France?"]
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "no prompt" in result.output


def test_merge_matches_base_plus_adapter(tiny_model_dir, eval_cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(TrainConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(tmp_path / "r"), max_steps=4,
                      batch_size=4, lr=3e-3, warmup_steps=1), **QUIET)
    result = CliRunner().invoke(main, ["merge", "--model", str(tiny_model_dir), "--adapter",
                                       str(tmp_path / "r/adapter"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 200, 11]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        unmerged = PeftModel.from_pretrained(base, tmp_path / "r/adapter").eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert (merged - plain).abs().max() > 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_inverse_cdf_sampler_draws_from_the_softmax():
    from pipeline.generate import InverseCdfSampler

    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, -30.0])
    for temperature in (1.0, 0.5):
        out = InverseCdfSampler(temperature)(None, logits.repeat(40000, 1))
        assert torch.isfinite(out).sum(-1).eq(1).all()  # exactly one finite score per row: greedy picks it
        freq = torch.bincount(out.argmax(-1), minlength=5).float() / 40000
        torch.testing.assert_close(freq, torch.softmax(logits / temperature, -1), atol=0.01, rtol=0)
