"""cache-teacher (pipeline/cache/write.py): the stored top-k against a plain recomputation (float16 and float32),
resume after SIGKILL, the manifest and its checks, reruns with other inputs, model or settings refused, length
bucketing of the teacher's batches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

import pipeline.cache.write
from pipeline.cache.read import open_cache
from pipeline.cache.schema import MANIFEST
from pipeline.cache.write import build_cache, hold_out
from pipeline.cli import main
from pipeline.config import CacheConfig
from pipeline.errors import PipelineError
from pipeline.fileio import sha256_file
from pipeline.inputs import Example
from pipeline.model_source import load_tokenizer
from pipeline.models import load_model
from pipeline.tiny import build_tiny_model_dir
from tests.helpers import (
    QUIET,
    TASK_ROWS,
    assert_one_line_error,
    cache_args,
    cache_rows,
    invoke,
    shard_tables,
    small_cache_cmd,
    snapshot,
    write_jsonl,
)


def make_cfg(model_dir: Path, corpus: dict[str, Path], out: Path, **kw) -> CacheConfig:
    args = {"model": str(model_dir), "out": str(out), "top_k": 8, "max_length": 256, "batch_size": 3,
            "precision": "fp32", **{k: str(v) for k, v in corpus.items()}}
    args.update(kw)
    return CacheConfig(**args)


def test_cache_matches_plain_log_softmax(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    summary = build_cache(make_cfg(tiny_model_dir, corpus, out), log=lambda *_: None)
    rows = cache_rows(out)
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


def test_float32_log_probs_are_the_teachers_unrounded(logprob_caches, tiny_model_dir):
    """--logprob-dtype float32 stores float32 log-probs equal to a plain full-vocabulary log-softmax, and the
    default cache holds exactly those values rounded to float16; the ids are the same in both."""
    c16, c32 = logprob_caches["float16"], logprob_caches["float32"]
    manifest = json.loads((c32 / MANIFEST).read_text())
    assert manifest["storage"]["logprobs"] == "float32"
    rows16 = {r["example_id"]: r for t in shard_tables(c16) for r in t.to_pylist()}
    tables32 = shard_tables(c32)
    assert all(t.schema.field("target_logprobs").type == pa.list_(pa.list_(pa.float32())) for t in tables32)
    rows32 = {r["example_id"]: r for t in tables32 for r in t.to_pylist()}
    assert rows16.keys() == rows32.keys()

    model = load_model(tiny_model_dir, torch.device("cpu"), "fp32")
    for ex_id, row in rows32.items():
        lp32 = np.asarray(row["target_logprobs"], dtype=np.float32)
        assert rows16[ex_id]["target_token_ids"] == row["target_token_ids"]
        np.testing.assert_array_equal(np.asarray(rows16[ex_id]["target_logprobs"], dtype=np.float16),
                                      lp32.astype(np.float16))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float()
        positions = [t - 1 for t, m in enumerate(row["loss_mask"]) if m]
        ref_vals, ref_ids = torch.log_softmax(logits, dim=-1)[positions].topk(8)
        torch.testing.assert_close(torch.from_numpy(lp32), ref_vals, atol=2e-5, rtol=0)  # float16: 2e-3
        assert row["target_token_ids"] == ref_ids.tolist()

    # Training reads them back unrounded.
    cache = open_cache(c32)
    got = {r.example_id: r for part in ("task", "rehearsal") for r in cache.iter_rows(part, "train")}
    for ex_id, r in got.items():
        assert r.target_logprobs.dtype == np.float32
        np.testing.assert_array_equal(r.target_logprobs, np.asarray(rows32[ex_id]["target_logprobs"], np.float32))

    # The storage type is part of a cache's settings: a rerun with the other one is refused, naming it.
    result = CliRunner().invoke(main, cache_args(tiny_model_dir, logprob_caches["corpus"], c32))
    assert result.exit_code == 1 and "storage.logprobs: cache has 'float32', asked for 'float16'" in result.output


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
    assert cache_rows(resumed) == cache_rows(full)
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


def test_cache_teacher_rerun_with_other_inputs_or_another_model_is_refused(tiny_model_dir, small_inputs, tmp_path):
    inputs = {k: Path(shutil.copy(p, tmp_path / p.name)) for k, p in small_inputs.items()}
    out = tmp_path / "cache"
    assert invoke(small_cache_cmd(tiny_model_dir, inputs, out)).exit_code == 0
    before = snapshot(out)

    task = inputs["task_train"]
    original = task.read_text()
    task.write_text(original.replace("metformin 250 mg", "metformin 275 mg"))  # one line edited, as many examples
    assert_one_line_error(invoke(small_cache_cmd(tiny_model_dir, inputs, out)),
                          f"error: {out}: holds a cache made with other settings (inputs[0].sha256: cache has ",
                          "use another --out or delete it")
    assert snapshot(out) == before
    task.write_text(original)

    other = build_tiny_model_dir(tmp_path / "other-model", seed=1)
    assert_one_line_error(invoke(small_cache_cmd(other, inputs, out)),
                          f"error: {out}: holds a cache made with other settings (teacher.fingerprint: cache has ")
    assert snapshot(out) == before


def test_cache_teacher_rerun_with_other_settings_before_any_manifest_is_refused(tiny_model_dir, small_inputs, tmp_path,
                                                                               monkeypatch):
    """Interrupted after its first shard: no manifest yet, and the shard's embedded settings decide."""
    out = tmp_path / "cache"
    real_write = pipeline.cache.write.write_shard

    def write_then_stop(path, table, meta):
        real_write(path, table, meta)
        raise KeyboardInterrupt  # Ctrl-C right after the first shard

    monkeypatch.setattr(pipeline.cache.write, "write_shard", write_then_stop)
    assert invoke(small_cache_cmd(tiny_model_dir, small_inputs, out)).exit_code == 130
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == ["shard-00000.parquet"]
    before = snapshot(out)

    assert_one_line_error(invoke(small_cache_cmd(tiny_model_dir, small_inputs, out, "--top-k", "8")),
                          f"error: {out}: holds a cache made with other settings (top_k: cache has 4, asked for 8)")
    assert_one_line_error(invoke(small_cache_cmd(tiny_model_dir, small_inputs, out, "--logprob-dtype", "float32")),
                          "(storage.logprobs: cache has 'float16', asked for 'float32')")
    assert snapshot(out) == before and not (out / MANIFEST).exists()


def test_truncation_counted_and_prompt_too_long_skipped(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [
        {"instruction": "short", "output": "ok"},
        {"instruction": "short", "output": "a long answer " * 40},
        {"instruction": "a very long prompt " * 60, "output": "cut"},
    ])
    summary = build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(data),
                                      max_length=48, top_k=4, precision="fp32", eval_fraction=0,
                                      rehearsal_train="none"), log=lambda *_: None)
    assert (summary.examples, summary.truncated, summary.skipped_too_long) == (2, 1, 1)
    rows = cache_rows(tmp_path / "c")
    assert all(len(r["input_ids"]) <= 48 for r in rows.values())


def test_out_dir_with_other_content_refused(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not a cache directory"):
        build_cache(make_cfg(tiny_model_dir, corpus, out), log=lambda *_: None)


def test_cache_teacher_batches_examples_of_similar_length(tiny_model_dir, tmp_path, monkeypatch):
    """Every teacher batch holds neighbours in the length order of its shard; the reported padding waste is
    that of those batches."""
    rows = [{"instruction": "Repeat.", "output": " ".join(["word"] * n)} for n in (9, 1, 14, 4, 22, 2, 6, 17, 3)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    seen: list[list[int]] = []
    real_collate = pipeline.cache.write.collate

    def collate(batch_rows, pad_id):
        seen.append([len(r.input_ids) for r in batch_rows])
        return real_collate(batch_rows, pad_id)

    monkeypatch.setattr(pipeline.cache.write, "collate", collate)
    summary = build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(data),
                                      top_k=4, max_length=256, batch_size=2, shard_size=5, eval_fraction=0,
                                      rehearsal_train="none"), **QUIET)
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    tokenizer = load_tokenizer(tiny_model_dir)
    assert [s["rows"] for s in manifest["shards"]] == [5, 4]
    # The obvious plan: all lengths sorted, the first 5 in shard 0 and the rest in shard 1, each cut into pairs.
    lengths = sorted(len(r["input_ids"]) for t in shard_tables(tmp_path / "c") for r in t.to_pylist())
    assert len(set(lengths)) == len(lengths) == 9 and tokenizer is not None
    want = [lengths[0:2], lengths[2:4], lengths[4:5], lengths[5:7], lengths[7:9]]
    assert seen == want
    waste = 1 - sum(lengths) / sum(len(b) * max(b) for b in want)
    assert summary.padding_waste == pytest.approx(waste)
    assert manifest["totals"]["padding_waste"] == round(waste, 4)


@pytest.mark.slow
def test_builtin_model_caches_a_few_examples(tmp_path):
    pytest.importorskip("gguf")
    try:
        from pipeline.model_source import builtin_gguf

        builtin_gguf("smollm2-135m-instruct")
    except PipelineError as e:
        pytest.skip(str(e))

    repo = Path(__file__).resolve().parents[1]
    lines = (repo / "data/demo/task_eval.jsonl").read_text().splitlines()[:4]
    data = write_jsonl(tmp_path / "t.jsonl", [json.loads(line) for line in lines])
    summary = build_cache(CacheConfig(out=str(tmp_path / "c"), task_eval=str(data), top_k=16, max_length=256),
                          log=lambda *_: None)
    rows = cache_rows(tmp_path / "c")
    assert summary.examples == len(rows) == 4
    for r in rows.values():
        lp = torch.tensor(r["target_logprobs"]).float()
        assert (lp <= 0).all() and (lp[:, :-1] >= lp[:, 1:] - 1e-3).all()  # log-probs, most likely first
        assert lp.exp().sum(-1).max() <= 1.0 + 1e-2


# ---------------------------------------------------------------- task rows alone: made rehearsal, held-out part

def cache_teacher(*args: str):
    return CliRunner().invoke(main, ["cache-teacher", "--top-k", "4", "--max-length", "128", *args])


def test_the_shipped_prompts_are_disjoint_and_readable():
    parts = {split: [json.loads(line) for line in (pipeline.cache.write.PROMPTS / f"general_{split}.jsonl")
                     .read_text(encoding="utf-8").splitlines()] for split in ("train", "eval")}
    assert len(parts["train"]) > 200 and len(parts["eval"]) > 50
    assert not {r["instruction"] for r in parts["train"]} & {r["instruction"] for r in parts["eval"]}
    assert all("output" not in r for rows in parts.values() for r in rows)  # prompts: the base model answers them


def test_task_rows_alone_give_a_cache_with_all_four_parts(tiny_model_dir, few_prompts, tmp_path):
    task = write_jsonl(tmp_path / "task.csv.jsonl", [{**r, "id": f"t{i}"} for i, r in enumerate(TASK_ROWS * 4)][:20])
    out = tmp_path / "cache"
    result = cache_teacher("--model", str(tiny_model_dir), "--task-train", str(task), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "no --rehearsal-train: the base model answers the 5 general prompts" in result.output
    assert "no --task-eval: 2 of the 20 task rows held out" in result.output
    cache = open_cache(out)
    counts = {(r, s): cache.count(r, s) for r in ("task", "rehearsal") for s in ("train", "eval")}
    assert counts == {("task", "train"): 18, ("task", "eval"): 2, ("rehearsal", "train"): 5, ("rehearsal", "eval"): 3}
    records = {(r["role"], r["split"]): r for r in cache.manifest["inputs"]}
    assert records[("task", "train")]["held_out"] == {"fraction": 0.1, "seed": 0, "rows": 2}
    assert records[("rehearsal", "train")]["made_from"].startswith("pipeline/prompts/general_train.jsonl")
    generated = [json.loads(line) for line in (out / "generated" / "rehearsal_train.jsonl").read_text().splitlines()]
    assert [g["id"] for g in generated] == [json.loads(line)["id"] for line in
                                            (few_prompts / "general_train.jsonl").read_text().splitlines()]
    assert all(g["output"] for g in generated)

    # A rerun resumes: nothing is answered or computed again.
    again = cache_teacher("--model", str(tiny_model_dir), "--task-train", str(task), "--out", str(out))
    assert again.exit_code == 0, again.output
    assert "the base model answers" not in again.output and "0 computed now" in again.output


def test_none_opts_out_and_eval_fraction_zero_keeps_every_row(tiny_model_dir, few_prompts, tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", TASK_ROWS)
    out = tmp_path / "cache"
    result = cache_teacher("--model", str(tiny_model_dir), "--task-train", str(task), "--rehearsal-train", "none",
                           "--eval-fraction", "0", "--out", str(out))  # none for one part: nothing is made
    assert result.exit_code == 0, result.output
    cache = open_cache(out)
    assert (cache.count("task", "train"), cache.count("task", "eval"), cache.count("rehearsal", "train")) == (6, 0, 0)
    assert not (out / "generated").exists()


def test_a_bad_task_line_stops_before_any_answer_is_generated(tiny_model_dir, few_prompts, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps(TASK_ROWS[0]) + "\n{not json\n")
    out = tmp_path / "cache"
    result = cache_teacher("--model", str(tiny_model_dir), "--task-train", str(task), "--out", str(out))
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith(f"error: {task}:2: not valid JSON")
    assert not (out / "generated").exists()


def test_hold_out_is_seeded_by_id_not_by_order():
    examples = [Example(f"id{i}", [], f"f:{i}") for i in range(50)]
    train, held = hold_out(examples, 0.1, seed=0)
    assert len(held) == 5 and len(train) == 45 and all(e.split == "eval" for e in held)
    assert {e.id for e in held} == {e.id for e in hold_out(examples[::-1], 0.1, seed=0)[1]}  # order does not matter
    assert {e.id for e in held} != {e.id for e in hold_out(examples, 0.1, seed=1)[1]}  # the seed does
    assert len(hold_out(examples * 0 + [Example(f"x{i}", [], "") for i in range(10_000)], 0.5, 0)[1]) == 500
    assert hold_out(examples[:1], 0.1, 0)[1] == [] and len(hold_out(examples[:2], 0.1, 0)[1]) == 1
