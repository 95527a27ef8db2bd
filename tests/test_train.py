"""pipeline train on the tiny model: accumulation, mixing, cache checks, resume, adapter reload, lambda."""

from __future__ import annotations

import dataclasses
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

from pipeline.adapters import save_adapter
from pipeline.cache.read import MemoryRows, open_cache
from pipeline.cache.schema import MANIFEST, CachedRow
from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.mixing import RowStream, draw_step, rehearsal_count, rehearsal_total
from pipeline.train import forward_backward, micro_batches, optimizer_step, setup, train
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
    task_eval = write_jsonl(d / "task_eval.jsonl", [{**r, "id": f"t{i}"} for i, r in enumerate(TASK_ROWS[:3])])
    general_eval = write_jsonl(d / "general_eval.jsonl", [
        {"id": "g2", "instruction": "Name a colour.", "output": "Blue, like the sky."},
        {"id": "g0", "instruction": "Spell cat.", "output": "C, A, T."},
        {"id": "g1", "instruction": "What is two plus two?", "output": "Two plus two is four."}])
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), task_train=str(task), rehearsal_train=str(general),
                            task_eval=str(task_eval), rehearsal_eval=str(general_eval), top_k=8, max_length=256,
                            shard_size=4), **QUIET)
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
        forward_backward(run, micro_batches(run, 1), measure_kl=False)
        optimizer_step(run)
        forward_backward(run, micro_batches(run, 2), measure_kl=False)
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
    """A stand-in for reader.RowStream: an endless numbered stream of one role."""

    def __init__(self, role: str):
        self.role, self.pos = role, 0

    def take(self, n: int) -> list[tuple[str, int]]:
        self.pos += n
        return [(self.role, i) for i in range(self.pos - n, self.pos)]


def test_rehearsal_ratio_is_exact_over_the_run_and_within_a_row_per_step():
    """DESIGN.md section 6: step s takes round(r n s) - round(r n (s-1)) rehearsal rows."""
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
    code = ("import json, sys; from tests.test_train import _draw_ids; "
            "print(json.dumps(_draw_ids(range(38, 101), json.loads(sys.argv[1]))[0]))")
    rest = subprocess.run([sys.executable, "-c", code, json.dumps(state)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    assert first + json.loads(rest.stdout) == whole
    assert sum(i.startswith("rehearsal") for step in whole for i in step) == round(0.3 * 7 * 100)


def test_per_rank_slices_concatenate_to_the_one_process_draw(tiny_model_dir, tiny_cache, tmp_path, monkeypatch):
    """[global step note] Each of P processes (batch B/P) keeps its slice of the same global draw."""
    import dataclasses

    from pipeline import distributed

    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", batch_size=6, rehearsal_ratio=0.3), **QUIET)
    fresh = {name: s.state_dict() for name, s in (("task", run.task), ("rehearsal", run.rehearsal))}

    def draws(batch_size: int, grad_accum: int, world: int, rank: int) -> list[list[list[int]]]:
        """Per step, this rank's examples as token-id lists (padding removed)."""
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        run.cfg = dataclasses.replace(run.cfg, batch_size=batch_size, grad_accum=grad_accum)
        run.task.load_state_dict(fresh["task"])
        run.rehearsal.load_state_dict(fresh["rehearsal"])
        out = []
        for step in range(1, 6):
            out.append([ids[att.bool()].tolist() for b in micro_batches(run, step)
                        for ids, att in zip(b.input_ids, b.attention_mask, strict=True)])
        return out

    one = draws(6, 1, 1, 0)
    assert sum(len(step) for step in one) == 30
    for batch_size, grad_accum, world in ((3, 1, 2), (1, 3, 2), (2, 1, 3), (1, 2, 3)):
        ranks = [draws(batch_size, grad_accum, world, r) for r in range(world)]
        for s in range(5):
            assert [x for r in ranks for x in r[s]] == one[s], (batch_size, grad_accum, world, s + 1)


def test_rehearsal_that_cannot_happen_is_refused(tiny_model_dir, tiny_cache, tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"kd_on: rehearsal .* rehearsal_ratio is 0"):
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "kd_on": "rehearsal", "rehearsal_ratio": 0})
    # The defaults put lambda 1 on rehearsal examples: no rehearsal alone is refused, and says how to get plain QLoRA.
    with pytest.raises(ConfigError, match=r"for plain QLoRA give --kd-lambda 0"):
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "rehearsal_ratio": 0})
    plain = load_config(TrainConfig, None, {"cache": "c", "out": "o", "rehearsal_ratio": 0, "kd_lambda": 0})
    assert (plain.kd_on, plain.kd_lambda, plain.rehearsal_ratio) == ("rehearsal", 0, 0)
    # 0.01 * 4 examples * 6 steps = 0.24 rehearsal examples: rounds to none.
    with pytest.raises(PipelineError, match=r"rehearsal_ratio 0.01 of 4 examples per step over 6 steps rounds to no"):
        setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "o", rehearsal_ratio=0.01), **QUIET)
    # 0.125 * 4 * 1 = 0.5 rounds up: one rehearsal example, in the only step.
    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "o2", rehearsal_ratio=0.125, max_steps=1), **QUIET)
    assert micro_batches(run, 1)[0].n_rehearsal_examples == 1


def test_ratio_without_rehearsal_rows_is_an_error(tiny_model_dir, tmp_path):
    task = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(task), top_k=4,
                            max_length=256), **QUIET)
    with pytest.raises(PipelineError, match=r"no rehearsal training rows; .* pass --rehearsal-ratio 0 --kd-lambda 0 "
                                            r"\(plain QLoRA\)$"):  # the defaults put the KL on rehearsal examples
        setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o"), **QUIET)
    with pytest.raises(PipelineError, match=r"no rehearsal training rows; .* pass --rehearsal-ratio 0$"):
        setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o", kd_on="all"), **QUIET)
    run = setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o2", rehearsal_ratio=0.0), **QUIET)
    assert run.rehearsal is None and micro_batches(run, 1)[0].n_rehearsal_examples == 0
    with pytest.raises(PipelineError, match="--eval-every scores held-out rows, and the cache has none"):
        setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o3", rehearsal_ratio=0.0, eval_every=2), **QUIET)


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
            "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "2", "--save-every", "3", "--kd-lambda", "0.5",
            "--eval-every", "2"]
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
    # The eval lines (steps 2, 4, 6, 8; the crashed run's step 4 was dropped and scored again) are the same.
    evals = [json.loads(x) for x in full_metrics if json.loads(x).get("eval")]
    assert [e["step"] for e in evals] == [2, 4, 6, 8]
    assert [json.loads(x) for x in resumed_metrics if json.loads(x).get("eval")] == evals
    assert json.loads(resumed_metrics[-2])["ce"] == pytest.approx(json.loads(full_metrics[-2])["ce"], abs=1e-6)


def test_eval_every_writes_held_out_curves_without_touching_training(tiny_model_dir, tiny_cache, tmp_path):
    """[training eval note] Eval lines every N steps and at the end, scored as evaluate scores, in eval mode; the
    adapter is bit for bit that of a run without them (LoRA dropout on: the random stream is untouched)."""
    from pipeline.evaluate import eval_rows, score_rows
    from pipeline.model_source import open_model_source
    from pipeline.models import load_for_inference

    common = {"max_steps": 5, "kd_lambda": 0.5, "lora_dropout": 0.1, "save_every": 100, "log_every": 2}
    with_eval = train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "e", eval_every=2, eval_limit=2, **common),
                      **QUIET)
    train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "n", **common), **QUIET)
    a = load_file(tmp_path / "e" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "n" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    lines = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(x) for x in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if m.get("eval")]
    assert [m["step"] for m in evals] == [2, 4, 5]  # every 2 steps and at the end
    assert all(m.keys() == {"step", "eval", "task_ce", "kl_topk", "task_rows", "general_rows"} for m in evals)
    assert all((m["task_rows"], m["general_rows"]) == (2, 2) for m in evals)  # --eval-limit 2 of 3 each
    assert [m["step"] for m in lines if not m.get("eval")] == [m["step"] for m in plain]
    assert evals[-1] == with_eval["final_eval"]

    # The last line equals evaluate's own scoring of the saved adapter on the first 2 rows by example id.
    source = open_model_source(str(tiny_model_dir))
    model, device, precision = load_for_inference(source, "cpu", "auto", str(tmp_path / "e" / "adapter"))
    cache = open_cache(tiny_cache)
    task_rows, general_rows = eval_rows(cache, "task", 2), eval_rows(cache, "rehearsal", 2)
    assert sorted(r.example_id for r in task_rows) == ["t0", "t1"] and sorted(
        r.example_id for r in general_rows) == ["g0", "g1"]
    common = {"pad_id": source.tokenizer.pad_token_id, "batch_size": 4, "device": device, "precision": precision,
              "temperature": cache.temperature, "desc": "test"}
    task = score_rows(model, task_rows, with_kl=False, **common)
    general = score_rows(model, general_rows, with_kl=True, **common)
    assert evals[-1]["task_ce"] == pytest.approx(task["ce"], abs=1e-5)
    assert evals[-1]["kl_topk"] == pytest.approx(general["kl"], abs=1e-6) and general["kl"] > 1e-6


def test_held_out_eval_leaves_the_model_training(tiny_model_dir, tiny_cache, tmp_path):
    from pipeline.train import held_out_eval

    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", eval_every=1), **QUIET)
    before = torch.get_rng_state()
    line = held_out_eval(run, 7)
    assert run.model.training and torch.equal(torch.get_rng_state(), before)
    assert line["step"] == 7 and line["eval"] is True and (line["task_rows"], line["general_rows"]) == (3, 3)
    assert line["kl_topk"] < 1e-5  # the untrained student is the teacher


def test_sweep_sets_eval_every_unless_given(tiny_model_dir, tiny_cache, tmp_path, monkeypatch):
    import pipeline.sweep
    from pipeline.config import EvalConfig, SweepConfig

    class Stop(Exception):
        pass

    seen = []

    def fake_train(cfg, **kw):
        seen.append(cfg.eval_every)
        raise Stop

    monkeypatch.setattr(pipeline.sweep, "evaluate", lambda *a, **kw: {})
    monkeypatch.setattr(pipeline.sweep, "train", fake_train)
    eval_cfg = EvalConfig(model=str(tiny_model_dir), cache=str(tiny_cache))
    for fixed, grid, want in (({"max_steps": 20}, [], 2), ({"max_steps": 7}, [], 1),
                              ({"max_steps": 20, "eval_every": 5}, [], 5), ({"max_steps": 20}, ["eval_every=0"], 0)):
        cfg = SweepConfig(model=str(tiny_model_dir), cache=str(tiny_cache), out=str(tmp_path / f"s{len(seen)}"),
                          lambdas=[0.5], grid=grid)
        with pytest.raises(Stop):
            pipeline.sweep.sweep(cfg, fixed, eval_cfg, command="test", **QUIET)
        assert seen[-1] == want, (fixed, grid)


def test_adapter_reloads_with_peft_and_gives_same_logits(tiny_model_dir, tiny_cache, tmp_path):
    from peft import PeftModel

    from pipeline.models import load_model

    cfg = cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", max_steps=3)
    run = setup(cfg, **QUIET)
    for step in (1, 2, 3):
        forward_backward(run, micro_batches(run, step), measure_kl=False)
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
    import pipeline.forward

    calls = []
    real = pipeline.forward.response_losses
    monkeypatch.setattr(pipeline.forward, "response_losses",
                        lambda *a, **kw: calls.append("teacher_ids" in kw) or real(*a, **kw))
    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", kd_lambda=0.0, lora_dropout=0.0), **QUIET)
    batches = micro_batches(run, 1)
    out = forward_backward(run, batches, measure_kl=False)
    assert calls == [False] and out.kl is None and out.loss == out.ce

    # The obvious CE: full logits from the HF forward, cross-entropy at the response positions.
    (batch,) = batches
    run.model.eval()
    with torch.no_grad():
        logits = run.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    shift_logits, shift_labels = logits[:, :-1], batch.input_ids[:, 1:]
    mask = batch.loss_mask[:, 1:]
    want = F.cross_entropy(shift_logits[mask], shift_labels[mask])
    assert out.ce == pytest.approx(want.item(), rel=1e-4)


def test_kd_on_rehearsal_only_touches_rehearsal_tokens(tiny_model_dir, tiny_cache, tmp_path):
    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", kd_on="rehearsal", rehearsal_ratio=0.0), **QUIET)
    out = forward_backward(run, micro_batches(run, 1), measure_kl=True)
    assert out.kl == 0.0  # no rehearsal example in the step, so no KL term at all
    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r2", kd_on="rehearsal", rehearsal_ratio=0.5), **QUIET)
    (batch,) = micro_batches(run, 1)
    assert 0 < int(batch.is_rehearsal.sum()) < batch.n_tokens


def test_kd_keeps_student_closer_to_teacher(tiny_model_dir, tiny_cache, tmp_path):
    results = {}
    for lam in (0.0, 16.0):
        summary = train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / f"l{lam}", kd_lambda=lam, kd_on="all",
                                max_steps=16, lr=3e-3, log_every=4, save_every=100), **QUIET)
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
    # 16 steps x 4 examples at 0.3: round(19.2) = 19 rehearsal examples (per-step rounding gave 16, 25%).
    summary = run_yaml["summary"]
    assert (summary["rehearsal_examples"], summary["examples"]) == (rehearsal_total(0.3, 4, 16), 64) == (19, 64)
    assert summary["rehearsal_ratio"] == pytest.approx(19 / 64)
    assert run_yaml["cache"]["fingerprint"] == open_cache(tiny_cache).fingerprint


@pytest.mark.parametrize(("scale", "message"), [(float("nan"), r"step 5: loss is nan"),
                                                (50.0, r"step 5: loss .* is more than 4.0x its best running average")])
def test_divergence_stops_and_keeps_checkpoint(tiny_model_dir, tiny_cache, tmp_path, monkeypatch, scale, message):
    import pipeline.train as train_mod

    real, calls = train_mod.forward_backward, []

    def exploding(run, batches, **kw):  # the loss goes bad from step 5 on
        out = real(run, batches, **kw)
        calls.append(1)
        if len(calls) >= 5:
            out = dataclasses.replace(out, loss=out.loss * scale)
        return out

    monkeypatch.setattr(train_mod, "forward_backward", exploding)
    cfg = cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", max_steps=10, save_every=2)
    with pytest.raises(PipelineError, match=message + r".*last good checkpoint is .*step-000004"):
        train(cfg, **QUIET)
    assert not (tmp_path / "r" / "adapter").exists()


def test_budget_growing_the_kl_term_is_not_divergence(tiny_model_dir, tiny_cache, tmp_path, monkeypatch):
    """[budget divergence note] A multiplier that grows 50-fold raises the loss, not the CE: training goes on."""
    import pipeline.train as train_mod

    real, calls = train_mod.forward_backward, []

    def kl_term_grows(run, batches, **kw):  # from step 5 on, the KL term is 50x the rest of the loss
        out = real(run, batches, **kw)
        calls.append(1)
        return dataclasses.replace(out, loss=out.loss * 50) if len(calls) >= 5 else out

    monkeypatch.setattr(train_mod, "forward_backward", kl_term_grows)
    summary = train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", max_steps=8, save_every=100,
                            max_forgetting=0.01), **QUIET)
    assert summary["steps"] == 8


def test_online_teacher_targets_equal_the_cache(tiny_model_dir, tmp_path):
    from pipeline.batches import collate_rows
    from pipeline.train import online_targets

    task = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS)
    general = write_jsonl(tmp_path / "g.jsonl", GENERAL_ROWS)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(task),
                            rehearsal_train=str(general), top_k=8, max_length=256, precision="fp32"), **QUIET)
    run = setup(TrainConfig(model=str(tiny_model_dir), out=str(tmp_path / "o"), online_teacher=True, top_k=8,
                            max_length=256, task_train=str(task), rehearsal_train=str(general), precision="fp32",
                            max_steps=3, batch_size=4, warmup_steps=1, kd_on="all"), **QUIET)
    cached = {r.example_id: r for part in ("task", "rehearsal") for r in open_cache(tmp_path / "c").iter_rows(
        part, "train")}
    rows = [r for g in range(len(run.rows.row_groups("task", "train")))
            for r in run.rows.read_group("task/train", g)]
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
        out = forward_backward(run, micro_batches(run, 1), measure_kl=True)
        assert out.kl < 1e-4, attn


def test_online_teacher_flags_checked():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="give --task-train"):
        load_config(TrainConfig, None, {"out": "o", "online_teacher": True})
    with pytest.raises(ConfigError, match="drop --cache"):
        load_config(TrainConfig, None, {"out": "o", "online_teacher": True, "cache": "c", "task_train": "t"})
    with pytest.raises(ConfigError, match="--eval-every scores the cache's held-out rows"):
        load_config(TrainConfig, None, {"out": "o", "online_teacher": True, "task_train": "t", "eval_every": 5})


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
    from pipeline.metrics import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    before = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < before - 300


# ----------------------------------------------------------------------------------------------------------------
# --max-forgetting: the forgetting budget (issue 14)
# ----------------------------------------------------------------------------------------------------------------

def test_dual_ascent_follows_the_hand_computed_sequence():
    """[forgetting budget note] with BUDGET_STEP 0.2, BUDGET_EMA 0.8, EPS 0.01, lambda from 0.5."""
    from pipeline.budget import BUDGET_EMA, BUDGET_STEP, dual_ascent

    assert (BUDGET_STEP, BUDGET_EMA) == (0.2, 0.8)
    # kl:   0.0 -> avg 0;      lambda 0.5 + 0.2 * (0 - 0.01) / 0.01      = 0.3
    # None: nothing measured (a step without rehearsal tokens): unchanged
    # 0.02 -> avg 0.004;       0.3  + 0.2 * (0.004  - 0.01) / 0.01       = 0.18
    # 0.03 -> avg 0.0092;      0.18 + 0.2 * (0.0092 - 0.01) / 0.01       = 0.164
    # 0.05 -> avg 0.01736;     0.164 + 0.2 * 0.736                        = 0.3112
    # 0.0  -> avg 0.013888;    0.3112 + 0.2 * 0.3888                      = 0.38896
    want = [(0.3, 0.0), (0.3, 0.0), (0.18, 0.004), (0.164, 0.0092), (0.3112, 0.01736), (0.38896, 0.013888)]
    lam, avg = 0.5, None
    for kl, (want_lam, want_avg) in zip([0.0, None, 0.02, 0.03, 0.05, 0.0], want, strict=True):
        lam, avg = dual_ascent(lam, avg, kl, 0.01)
        assert (lam, avg) == (pytest.approx(want_lam, abs=1e-12), pytest.approx(want_avg, abs=1e-12))
    assert dual_ascent(0.1, 0.0, 0.0, 0.01) == (0.0, 0.0)  # never below 0


def test_budget_constraint_is_the_forward_kl_on_rehearsal_tokens(tiny_model_dir, tiny_cache, tmp_path):
    """kd_on: rehearsal reuses the KD term; kd_on: all measures it apart, without grad: the same number."""
    import dataclasses

    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", max_forgetting=0.01, lora_dropout=0.0,
                        precision="fp32", batch_size=8, lr=1e-2), **QUIET)
    for step in (1, 2):  # two updates, so that the KL is not ~0
        forward_backward(run, micro_batches(run, step), measure_kl=True)
        optimizer_step(run)
    batches = micro_batches(run, 3)
    got = {}
    for kd_on in ("all", "rehearsal"):  # the same parameters, the same batches
        run.cfg = dataclasses.replace(run.cfg, kd_on=kd_on)
        got[kd_on] = forward_backward(run, batches, measure_kl=True)
        run.optimizer.zero_grad(set_to_none=True)
    assert got["rehearsal"].kl_rehearsal == got["rehearsal"].kl > 1e-5
    assert got["all"].kl_rehearsal == pytest.approx(got["rehearsal"].kl_rehearsal, rel=1e-5)
    assert got["all"].kl_rehearsal != pytest.approx(got["all"].kl, rel=1e-2)  # not the all-token KL


def test_budget_multiplier_resumes_bit_exactly(tiny_model_dir, tiny_cache, tmp_path):
    """A run resumed from its step-3 checkpoint ends with the uninterrupted run's lambda, to the bit."""
    import shutil

    settings = {"max_steps": 6, "save_every": 3, "log_every": 1, "max_forgetting": 1e-4, "kd_lambda": 0.5,
                "lr": 3e-3}
    full = train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "full", **settings), **QUIET)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000003", resumed_dir / "checkpoints" / "step-000003")
    shutil.copy(tmp_path / "full" / "run.yaml", resumed_dir / "run.yaml")
    resumed = train(cfg_for(tiny_model_dir, tiny_cache, resumed_dir, resume=True, **settings), **QUIET)

    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lambdas = [m["lambda"] for m in lines if "lambda" in m]
    assert len(lambdas) == 6 and lambdas[0] == 0.5 and len(set(lambdas)) > 2  # it moved
    assert all(m["constraint"] > 0 for m in lines[1:])
    assert full["max_forgetting"] == 1e-4 and full["final_lambda"] != lambdas[-1]  # updated after the last step
    assert (resumed["final_lambda"], resumed["final_constraint"]) == (full["final_lambda"], full["final_constraint"])
    tail = [json.loads(x) for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["lambda"] for m in tail] == lambdas[3:]  # steps 4-6, each with the uninterrupted run's multiplier
    summary = yaml.safe_load((tmp_path / "full" / "run.yaml").read_text())["summary"]
    assert summary["final_lambda"] == full["final_lambda"]


def test_budget_without_rehearsal_is_refused_and_sweeps(tiny_model_dir, tmp_path):
    from pipeline.config import SweepConfig, load_config
    from pipeline.errors import ConfigError
    from pipeline.sweep import plan_runs

    with pytest.raises(ConfigError, match=r"max_forgetting: the budget is measured on the rehearsal examples .* "
                                          r"rehearsal_ratio is 0") as e:
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "max_forgetting": 0.01, "rehearsal_ratio": 0})
    assert len(e.value.problems) == 1
    task = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(task), top_k=4,
                            max_length=256), **QUIET)
    with pytest.raises(PipelineError, match="--max-forgetting is measured on rehearsal examples, and there are no"):
        setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o", max_forgetting=0.01), **QUIET)

    runs = plan_runs(SweepConfig(cache="c", out="o", grid=["max_forgetting=0.013,0.0065"]))
    assert [(r.name, r.overrides) for r in runs] == [("max_forgetting=0.013", {"max_forgetting": 0.013}),
                                                     ("max_forgetting=0.0065", {"max_forgetting": 0.0065})]
