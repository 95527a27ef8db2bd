"""pipeline train on the tiny model: accumulation, mixing, cache checks, resume, adapter reload, lambda."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from pipeline.cache import MANIFEST, build_cache
from pipeline.config import CacheConfig, TrainConfig
from pipeline.data import rehearsal_count
from pipeline.errors import PipelineError
from pipeline.reader import RowStream, open_cache
from pipeline.train import loss_step, micro_batches, optimizer_step, save_adapter, setup, train
from tests.conftest import GENERAL_ROWS, TASK_ROWS, build_tiny_model_dir, write_jsonl

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_model_dir) -> Path:
    d = tmp_path_factory.mktemp("train-cache")
    more_task = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    task = write_jsonl(d / "task.jsonl", more_task)
    general = write_jsonl(d / "general.jsonl", GENERAL_ROWS * 1 + [
        {"instruction": f"Count to {n}.", "output": " ".join(str(i) for i in range(1, n + 1))} for n in range(2, 8)])
    out = d / "cache"
    task_eval = write_jsonl(d / "task_eval.jsonl", TASK_ROWS[:2])
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), task_train=str(task), rehearsal_train=str(general),
                            task_eval=str(task_eval), top_k=8, max_length=256, shard_size=4), **QUIET)
    return out


def cfg_for(model_dir: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    base = {"model": str(model_dir), "cache": str(cache), "out": str(out), "max_steps": 6, "batch_size": 4,
            "lr": 1e-3, "warmup_steps": 1, "log_every": 2, "save_every": 3}
    return TrainConfig(**{**base, **kw})


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_token_normalised_accumulation_8x1_equals_2x4(tiny_model_dir, tiny_cache, tmp_path):
    grads, updates = [], []
    for bs, accum in ((8, 1), (2, 4)):
        run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / f"r{bs}", batch_size=bs, grad_accum=accum,
                            lora_dropout=0.0, kd_lambda=0.5, precision="fp32", l2=0.01), **QUIET)
        # Step 1 moves only LoRA B (it starts at 0); compare the gradients of step 2, where A moves too, and
        # the parameters after it. (Adam's first steps amplify rounding in near-zero gradients, hence the
        # looser tolerance on parameters.)
        loss_step(run, micro_batches(run, 1), measure_kl=False)
        optimizer_step(run)
        loss_step(run, micro_batches(run, 2), measure_kl=False)
        grads.append({n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad})
        optimizer_step(run)
        updates.append(lora_state(run.model))
    for a, b, tol in ((*grads, 1e-5), (*updates, 1e-4)):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=tol, rtol=1e-3, msg=name)
    assert all(g.abs().sum() > 0 for g in grads[0].values())


def test_rehearsal_mixing_per_step(tiny_model_dir, tiny_cache, tmp_path):
    cache = open_cache(tiny_cache)
    for ratio, n in ((0.3, 8), (0.5, 4), (0.0, 4), (1.0, 4)):
        run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / f"m{ratio}", rehearsal_ratio=ratio, batch_size=n),
                    **QUIET)
        for step in range(1, 5):
            (batch,) = micro_batches(run, step)
            assert batch.n_rehearsal_examples == rehearsal_count(ratio, n) == round(ratio * n + 1e-9)
    # Streams cycle endlessly, each epoch a new permutation, each row exactly once per epoch.
    stream = RowStream(cache, "task", "train", seed=0, window=1)
    first = [r.example_id for r in stream.take(stream.size)]
    second = [r.example_id for r in stream.take(stream.size)]
    assert sorted(first) == sorted(second) and len(set(first)) == stream.size and first != second


def test_ratio_without_rehearsal_rows_is_an_error(tiny_model_dir, tmp_path):
    task = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(task), top_k=4,
                            max_length=256), **QUIET)
    with pytest.raises(PipelineError, match="no rehearsal training rows"):
        setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o"), **QUIET)
    run = setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o2", rehearsal_ratio=0.0), **QUIET)
    assert run.rehearsal is None and micro_batches(run, 1)[0].n_rehearsal_examples == 0


def test_cache_from_other_model_and_bad_checksum_refused(tiny_model_dir, tiny_cache, tmp_path):
    other = build_tiny_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(PipelineError, match=r"teacher\.fingerprint differs: cache has [0-9a-f]{12}…, asked for"):
        setup(cfg_for(other, tiny_cache, tmp_path / "o"), **QUIET)
    with pytest.raises(PipelineError, match=r"top_k differs: cache has 8, asked for 4"):
        setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "o", top_k=4), **QUIET)

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_cache, broken)
    shard = broken / json.loads((broken / MANIFEST).read_text())["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=rf"{shard.name}: checksum differs"):
        setup(cfg_for(tiny_model_dir, broken, tmp_path / "o3"), **QUIET)


def test_refuses_non_empty_out(tiny_model_dir, tiny_cache, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(PipelineError, match="not empty; pass --resume"):
        setup(cfg_for(tiny_model_dir, tiny_cache, out), **QUIET)


def test_resume_after_sigkill_equals_uninterrupted(tiny_model_dir, tiny_cache, tmp_path):
    args = ["--model", str(tiny_model_dir), "--cache", str(tiny_cache), "--max-steps", "8", "--batch-size", "4",
            "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "2", "--save-every", "3", "--kd-lambda", "0.5"]
    run = [sys.executable, "-m", "pipeline", "train", *args]
    ok = subprocess.run([*run, "--out", str(tmp_path / "full")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr

    out = tmp_path / "crashed"
    env = {**os.environ, "PIPELINE_CRASH_AT": "train_step:5"}
    died = subprocess.run([*run, "--out", str(out)], env=env, capture_output=True, text=True)
    assert died.returncode == -9, died.stderr
    assert not (out / "adapter").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    resumed = subprocess.run([*run, "--out", str(out), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr  # progress notes on stderr; stdout is the JSON summary alone
    assert json.loads(resumed.stdout)["steps"] == 8

    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_metrics = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    resumed_metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in resumed_metrics] == [json.loads(x)["step"] for x in full_metrics]
    assert json.loads(resumed_metrics[-1])["ce"] == pytest.approx(json.loads(full_metrics[-1])["ce"], abs=1e-6)


def test_adapter_reloads_with_peft_and_gives_same_logits(tiny_model_dir, tiny_cache, tmp_path):
    from peft import PeftModel

    from pipeline.models import load_model

    cfg = cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", max_steps=3)
    run = setup(cfg, **QUIET)
    for step in (1, 2, 3):
        loss_step(run, micro_batches(run, step), measure_kl=False)
        optimizer_step(run)
    save_adapter(run.model, run.out / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 200, 11]])
    run.model.eval()
    with torch.no_grad():
        want = run.model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.device("cpu"), run.precision),
                                             run.out / "adapter")
        reloaded.eval()
        got = reloaded(input_ids=ids).logits
        base = load_model(tiny_model_dir, torch.device("cpu"), run.precision)(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert (want - base).abs().max() > 1e-4  # the adapter changed something


def test_lambda_zero_is_plain_cross_entropy_and_skips_kd(tiny_model_dir, tiny_cache, tmp_path, monkeypatch):
    import pipeline.train as train_mod

    calls = []
    real = train_mod.response_losses
    monkeypatch.setattr(train_mod, "response_losses",
                        lambda *a, **kw: calls.append("teacher_ids" in kw) or real(*a, **kw))
    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", kd_lambda=0.0, lora_dropout=0.0), **QUIET)
    batches = micro_batches(run, 1)
    out = loss_step(run, batches, measure_kl=False)
    assert calls == [False] and out["kl"] is None and out["loss"] == out["ce"]

    # The obvious CE: full logits from the HF forward, cross-entropy at the response positions.
    (batch,) = batches
    run.model.eval()
    with torch.no_grad():
        logits = run.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    shift_logits, shift_labels = logits[:, :-1], batch.input_ids[:, 1:]
    mask = batch.loss_mask[:, 1:]
    want = F.cross_entropy(shift_logits[mask], shift_labels[mask])
    assert out["ce"] == pytest.approx(want.item(), rel=1e-4)


def test_kd_on_rehearsal_only_touches_rehearsal_tokens(tiny_model_dir, tiny_cache, tmp_path):
    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", kd_on="rehearsal", rehearsal_ratio=0.0), **QUIET)
    out = loss_step(run, micro_batches(run, 1), measure_kl=True)
    assert out["kl"] == 0.0  # no rehearsal example in the step, so no KL term at all
    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r2", kd_on="rehearsal", rehearsal_ratio=0.5), **QUIET)
    (batch,) = micro_batches(run, 1)
    assert 0 < int(batch.is_rehearsal.sum()) < batch.n_tokens


def test_kd_keeps_student_closer_to_teacher(tiny_model_dir, tiny_cache, tmp_path):
    results = {}
    for lam in (0.0, 16.0):
        summary = train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / f"l{lam}", kd_lambda=lam, max_steps=16,
                                lr=3e-3, log_every=4, save_every=100), **QUIET)
        results[lam] = summary
        metrics = [json.loads(x) for x in (tmp_path / f"l{lam}" / "metrics.jsonl").read_text().splitlines()]
        assert metrics[0]["step"] == 0 and metrics[0]["kl"] < 1e-4  # step 0: the student is the teacher
        assert metrics[-1]["ce"] < metrics[1]["ce"]  # it learns
        for m in metrics[1:]:
            assert {"step", "loss", "ce", "kl", "l2", "lr", "tokens_per_s", "rehearsal_ratio"} <= m.keys()
    assert results[16.0]["final"]["kl"] < 0.6 * results[0.0]["final"]["kl"]
    out = tmp_path / "l16.0"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "metrics.jsonl", "run.yaml"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                   "adapter_model.safetensors"]
    run_yaml = yaml.safe_load((out / "run.yaml").read_text())
    assert run_yaml["status"] == "finished" and run_yaml["config"]["kd_lambda"] == 16.0
    assert run_yaml["cache"]["fingerprint"] == open_cache(tiny_cache).fingerprint


@pytest.mark.parametrize(("scale", "message"), [(float("nan"), r"step 5: loss is nan"),
                                                (50.0, r"step 5: loss .* is more than 4.0x its best running average")])
def test_divergence_stops_and_keeps_checkpoint(tiny_model_dir, tiny_cache, tmp_path, monkeypatch, scale, message):
    import pipeline.train as train_mod

    real, calls = train_mod.loss_step, []

    def exploding(run, batches, **kw):  # the loss goes bad from step 5 on
        out = real(run, batches, **kw)
        calls.append(1)
        if len(calls) >= 5:
            out = {**out, "loss": out["loss"] * scale}
        return out

    monkeypatch.setattr(train_mod, "loss_step", exploding)
    cfg = cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", max_steps=10, save_every=2)
    with pytest.raises(PipelineError, match=message + r".*last good checkpoint is .*step-000004"):
        train(cfg, **QUIET)
    assert not (tmp_path / "r" / "adapter").exists()


def test_online_teacher_targets_equal_the_cache(tiny_model_dir, tmp_path):
    from pipeline.reader import collate_rows
    from pipeline.train import online_targets

    task = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS)
    general = write_jsonl(tmp_path / "g.jsonl", GENERAL_ROWS)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(task),
                            rehearsal_train=str(general), top_k=8, max_length=256, precision="fp32"), **QUIET)
    run = setup(TrainConfig(model=str(tiny_model_dir), out=str(tmp_path / "o"), online_teacher=True, top_k=8,
                            max_length=256, task_train=str(task), rehearsal_train=str(general), precision="fp32",
                            max_steps=3, batch_size=4, warmup_steps=1), **QUIET)
    cached = {r.example_id: r for part in ("task", "rehearsal") for r in open_cache(tmp_path / "c").iter_rows(
        part, "train")}
    rows = [r for g in range(len(run.cache.row_groups("task", "train")))
            for r in run.cache.read_group("task/train", g)]
    batch = collate_rows(rows, run.tokenizer.pad_token_id)
    ids, lps = online_targets(run, batch)
    want = collate_rows([cached[r.example_id] for r in rows], run.tokenizer.pad_token_id)
    assert torch.equal(ids, want.teacher_ids)
    torch.testing.assert_close(lps, want.teacher_logprobs, atol=2e-3, rtol=0)

    from pipeline.train import fit

    fit(run, **QUIET)
    metrics = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and metrics[0]["kl"] < 1e-5  # the teacher is the student with the adapter off
    assert metrics[-1]["step"] == 3 and metrics[-1]["kl"] > 0


def test_step0_kl_across_attention_implementations(tiny_model_dir, tmp_path):
    """A cache made with eager attention: a student with sdpa or eager starts at the teacher within the step-0
    tolerance (1e-4 per token). Measured in bf16: 3.2e-8 either way with CPU's fp32 weights; with bf16 weights (as on
    CUDA), where the two implementations round differently, 1.8e-6 across implementations, 4e-8 with the same one."""
    from pipeline.models import base_of

    task = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS * 2)
    general = write_jsonl(tmp_path / "g.jsonl", GENERAL_ROWS * 2)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(task),
                            rehearsal_train=str(general), top_k=8, max_length=256, precision="bf16", attn="eager"),
                **QUIET)
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["attn"] == "eager"
    for attn in ("sdpa", "eager"):
        run = setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / attn, precision="bf16", attn=attn,
                            lora_dropout=0.0), **QUIET)
        assert base_of(run.model).config._attn_implementation == attn  # the setting reached the model
        out = loss_step(run, micro_batches(run, 1), measure_kl=True)
        assert out["kl"] < 1e-4, attn


def test_online_teacher_flags_checked():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="give --task-train"):
        load_config(TrainConfig, None, {"out": "o", "online_teacher": True})
    with pytest.raises(ConfigError, match="drop --cache"):
        load_config(TrainConfig, None, {"out": "o", "online_teacher": True, "cache": "c", "task_train": "t"})


def test_rand_dropout_matches_dropout_in_distribution():
    from pipeline.models import RandDropout

    torch.manual_seed(0)
    x = torch.ones(400, 500)
    drop = RandDropout(0.05).train()
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.95) < 0.003
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.95))
    assert abs(y.mean().item() - 1.0) < 0.005  # inverted dropout keeps the expectation
    assert torch.equal(drop.eval()(x), x)
    odd = drop.train()(torch.ones(3, 5, 7, dtype=torch.bfloat16))  # 105 elements: not a multiple of 4 lanes
    assert odd.shape == (3, 5, 7) and odd.dtype == torch.bfloat16


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_is_measured_from_the_reset():
    """The reported peak is the training loop's, not that of loading or of an earlier run in the process."""
    from pipeline.train import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    before = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < before - 300
