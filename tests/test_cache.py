"""cache-teacher: contents against a plain recomputation, resume after SIGKILL, manifest checks, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache.schema import MANIFEST
from pipeline.cache.write import build_cache
from pipeline.cli import main
from pipeline.config import CacheConfig
from pipeline.errors import PipelineError
from pipeline.fileio import sha256_file
from pipeline.model_source import load_tokenizer
from pipeline.models import load_model


def make_cfg(model_dir: Path, corpus: dict[str, Path], out: Path, **kw) -> CacheConfig:
    args = {"model": str(model_dir), "out": str(out), "top_k": 8, "max_length": 256, "batch_size": 3,
            "precision": "fp32", **{k: str(v) for k, v in corpus.items()}}
    args.update(kw)
    return CacheConfig(**args)


def read_rows(cache: Path) -> dict[str, dict]:
    manifest = json.loads((cache / MANIFEST).read_text())
    rows = {}
    for shard in manifest["shards"]:
        for r in pq.read_table(cache / shard["file"]).to_pylist():
            assert r["example_id"] not in rows, "duplicated example"
            rows[r["example_id"]] = r
    return rows


def test_cache_matches_plain_log_softmax(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    summary = build_cache(make_cfg(tiny_model_dir, corpus, out), log=lambda *_: None)
    rows = read_rows(out)
    n_inputs = sum(len(p.read_text().splitlines()) for p in corpus.values())
    assert summary.examples == len(rows) == n_inputs

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, torch.device("cpu"), "fp32")
    by_source = {**{f"task_train.jsonl:{i}": ("task", "train") for i in range(1, 5)},
                 **{f"gen_eval.jsonl:{i}": ("rehearsal", "eval") for i in range(1, 2)}}
    for ex_id, (role, split) in by_source.items():
        assert (rows[ex_id]["role"], rows[ex_id]["split"]) == (role, split)

    for row in rows.values():
        ids = row["input_ids"]
        mask = row["loss_mask"]
        # The loss mask covers exactly the tokens after the rendered prompt (with its generation header).
        n_prompt = mask.index(True)
        assert all(mask[n_prompt:]) and not any(mask[:n_prompt])
        prompt_text = tokenizer.decode(ids[:n_prompt])
        assert prompt_text.endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(ids[n_prompt:]).endswith("<|im_end|>\n")
        # The obvious recomputation: full logits of the whole sequence, full-vocabulary log-softmax.
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        positions = [t - 1 for t, m in enumerate(mask) if m]
        assert len(row["target_token_ids"]) == len(positions) == sum(mask)
        for j, t in enumerate(positions):
            ref_vals, ref_ids = logp[t].topk(8)
            got_vals = torch.tensor(row["target_logprobs"][j])
            torch.testing.assert_close(got_vals, ref_vals, atol=2e-3, rtol=1e-3)  # float16 storage
            # ids: the top-k set, most likely first (ties in fp16 may swap neighbours)
            assert row["target_token_ids"][j][0] == ref_ids[0].item()
            assert set(row["target_token_ids"][j]) == set(ref_ids.tolist())


def test_cache_resume_after_sigkill_equals_uninterrupted(tiny_model_dir, corpus, tmp_path):
    base_args = ["--model", str(tiny_model_dir), "--top-k", "4", "--max-length", "256", "--batch-size", "2",
                 "--shard-size", "2", "--precision", "fp32", "--task-train", str(corpus["task_train"]),
                 "--task-eval", str(corpus["task_eval"]), "--rehearsal-train", str(corpus["rehearsal_train"])]
    full = tmp_path / "full"
    CliRunner().invoke(main, ["cache-teacher", *base_args, "--out", str(full)], catch_exceptions=False)

    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "pipeline", "cache-teacher", *base_args, "--out", str(resumed)]
    env = {**os.environ, "PIPELINE_CRASH_AT": "shard_written:2"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # killed by SIGKILL after the 2nd shard
    assert not (resumed / MANIFEST).exists()
    assert len(list(resumed.glob("shard-*.parquet"))) == 2

    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "kept from an earlier run" in proc.stdout and "5 computed now, 4 kept" in proc.stdout
    assert read_rows(resumed) == read_rows(full)
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in full.iterdir())


def test_manifest_checksums_and_settings_refused(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    build_cache(make_cfg(tiny_model_dir, corpus, out), log=lambda *_: None)
    manifest = json.loads((out / MANIFEST).read_text())
    for shard in manifest["shards"]:
        assert sha256_file(out / shard["file"]) == shard["sha256"]
    assert manifest["top_k"] == 8 and manifest["max_length"] == 256
    assert manifest["totals"]["response_tokens"] == sum(s["response_tokens"] for s in manifest["shards"])
    assert {i["role"] + "/" + i["split"] for i in manifest["inputs"]} == {
        "task/train", "task/eval", "rehearsal/train", "rehearsal/eval"}

    with pytest.raises(PipelineError, match=r"top_k: cache has 8, asked for 5"):
        build_cache(make_cfg(tiny_model_dir, corpus, out, top_k=5), log=lambda *_: None)
    # The attention implementation can change the numbers (bf16): recorded, and another one is another cache.
    assert manifest["attn"] == "sdpa"
    with pytest.raises(PipelineError, match=r"attn: cache has 'sdpa', asked for 'eager'"):
        build_cache(make_cfg(tiny_model_dir, corpus, out, attn="eager"), log=lambda *_: None)

    # Another tokenizer (same vocabulary, other chat template) is another cache.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    template_file = other / "chat_template.jinja"
    template_file.write_text("{{ 'Chat log\\n' }}" + template_file.read_text())
    with pytest.raises(PipelineError, match=r"tokenizer: cache has"):
        build_cache(make_cfg(other, corpus, out), log=lambda *_: None)


def test_rerun_of_complete_cache_computes_nothing(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    cfg = make_cfg(tiny_model_dir, corpus, out)
    build_cache(cfg, log=lambda *_: None)
    before = (out / MANIFEST).read_text()
    again = build_cache(cfg, log=lambda *_: None)
    assert again.computed_examples == 0
    assert json.loads((out / MANIFEST).read_text())["shards"] == json.loads(before)["shards"]


def test_truncation_counted_and_prompt_too_long_skipped(tiny_model_dir, tmp_path):
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "t.jsonl", [
        {"instruction": "short", "output": "ok"},
        {"instruction": "short", "output": "a long answer " * 40},
        {"instruction": "a very long prompt " * 60, "output": "cut"},
    ])
    summary = build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(data),
                                      max_length=48, top_k=4, precision="fp32"), log=lambda *_: None)
    assert (summary.examples, summary.truncated, summary.skipped_too_long) == (2, 1, 1)
    rows = read_rows(tmp_path / "c")
    assert all(len(r["input_ids"]) <= 48 for r in rows.values())


@pytest.mark.parametrize(("content", "message"), [
    ('{"instruction": "hi", "output": "ok"}\nnot json\n', r"t\.jsonl:2: not valid JSON"),
    ('{"instruction": "hi"}\n', r"t\.jsonl:1: missing 'output'"),
    ('[1, 2]\n', r"t\.jsonl:1: expected a JSON object"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"t\.jsonl:1: messages\[0\]\.role must be one of"),
])
def test_bad_lines_give_one_line_errors(tiny_model_dir, tmp_path, content, message):
    bad = tmp_path / "t.jsonl"
    bad.write_text(content)
    result = CliRunner().invoke(main, ["cache-teacher", "--model", str(tiny_model_dir), "--task-train", str(bad),
                                       "--out", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: ")
    import re

    assert re.search(message, result.output), result.output


def test_flash_attention_without_the_package_is_one_line(tiny_model_dir, corpus, tmp_path):
    # flash-attn is not installed where the tests run; where it is, CPU is refused instead (also in one line).
    result = CliRunner().invoke(main, ["cache-teacher", "--model", str(tiny_model_dir), "--task-train",
                                       str(corpus["task_train"]), "--out", str(tmp_path / "c"), "--attn",
                                       "flash_attention_2", "--device", "cpu"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: --attn flash_attention_2: ") and "--attn sdpa" in result.output
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_skip_bad_lines_counts(tiny_model_dir, tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ok"}\nnot json\n{"instruction": "x", "output": ""}\n')
    result = CliRunner().invoke(main, ["cache-teacher", "--model", str(tiny_model_dir), "--task-train", str(bad),
                                       "--out", str(tmp_path / "c"), "--skip-bad-lines", "--top-k", "4"])
    assert result.exit_code == 0, result.output
    assert "2 bad lines" in result.output


def test_missing_file_and_config_problems_reported_together(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["cache-teacher", "--model", str(tiny_model_dir),
                                       "--task-train", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "nope.jsonl: file not found" in result.output

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("cache_teacher:\n  top_kk: 3\n  max_length: -1\n  temperature: hot\ntrain:\n  kd_lambda: x\n")
    result = CliRunner().invoke(main, ["cache-teacher", "--config", str(cfg)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert any("top_kk: unknown setting (did you mean top_k?)" in line for line in lines)
    assert any("train.kd_lambda: expected float" in line for line in lines)
    assert any("cache_teacher.temperature: expected float" in line for line in lines)
    assert any("max_length: must be >= 8" in line for line in lines)
    assert any("out: required" in line for line in lines)
    assert any("no input" in line for line in lines)


def test_out_dir_with_other_content_refused(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not a cache directory"):
        build_cache(make_cfg(tiny_model_dir, corpus, out), log=lambda *_: None)


@pytest.mark.slow
def test_builtin_model_caches_a_few_examples(tmp_path):
    pytest.importorskip("gguf")
    try:
        from pipeline.model_source import builtin_gguf

        builtin_gguf("smollm2-135m-instruct")
    except PipelineError as e:
        pytest.skip(str(e))
    from tests.conftest import write_jsonl

    repo = Path(__file__).resolve().parents[1]
    lines = (repo / "data/demo/task_eval.jsonl").read_text().splitlines()[:4]
    data = write_jsonl(tmp_path / "t.jsonl", [json.loads(line) for line in lines])
    summary = build_cache(CacheConfig(out=str(tmp_path / "c"), task_eval=str(data), top_k=16, max_length=256),
                          log=lambda *_: None)
    rows = read_rows(tmp_path / "c")
    assert summary.examples == len(rows) == 4
    for r in rows.values():
        lp = torch.tensor(r["target_logprobs"]).float()
        assert (lp <= 0).all() and (lp[:, :-1] >= lp[:, 1:] - 1e-3).all()  # log-probs, most likely first
        assert lp.exp().sum(-1).max() <= 1.0 + 1e-2


def test_cut_answers_learn_no_end_of_turn(tiny_model_dir, tmp_path):
    from pipeline.inputs import read_jsonl, tokenize_example
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "r.jsonl", [
        {"id": "a", "instruction": "Write a poem.", "output": "The sea is wide"},
        {"id": "b", "instruction": "Write a poem.", "output": "The sea is wide", "truncated": True},
    ])
    tokenizer = load_tokenizer(tiny_model_dir)
    (whole, cut), _ = read_jsonl(data)
    a, b = tokenize_example(tokenizer, whole, 256), tokenize_example(tokenizer, cut, 256)
    assert tokenizer.decode(a.input_ids).endswith("The sea is wide<|im_end|>\n")
    assert tokenizer.decode(b.input_ids).endswith("The sea is wide")  # no end-of-turn to learn
    assert a.input_ids[:len(b.input_ids)] == b.input_ids and sum(b.loss_mask) == sum(a.loss_mask) - 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y", "truncated": "yes"}])
    with pytest.raises(PipelineError, match="'truncated' must be true or false"):
        read_jsonl(bad)
