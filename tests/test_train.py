"""`pipeline train` (pipeline/train.py) on the tiny model, each part against a value computed the obvious way:

* one optimiser step: the loss and LoRA gradients at T = 2 with `kd_on: rehearsal` from plain HF logits and the
  float64 reference KL; token-normalised accumulation (8 x 1 == 2 x 4), with a control showing that
  per-micro-batch normalisation would fail the same comparison; clipping at norm 1.0; the warm-up + cosine
  schedule; gradient checkpointing on vs off; one host sync per step;
* the KL term: on rehearsal tokens only, lambda 0 as plain cross-entropy, closer to the teacher with it;
* the steps: per-rank slices of the global draw, --epochs, rehearsal that cannot happen refused;
* the loop: held-out eval lines that leave training untouched, divergence stops it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from pipeline.batches import collate_rows
from pipeline.cache.read import open_cache
from pipeline.cache.schema import MANIFEST
from pipeline.cache.write import build_cache
from pipeline.config import DEFAULT_TASK_ROWS, CacheConfig, TrainConfig, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.mixing import draw_step, rehearsal_total
from pipeline.models import base_of
from pipeline.train import (
    forward_backward,
    micro_batches,
    optimizer_step,
    run_length,
    setup,
    steps_for_epochs,
    train,
)
from tests.helpers import (
    GENERAL_ROWS,
    QUIET,
    TASK_ROWS,
    cfg_for,
    fp32_cfg_for,
    reference_token_kl,
    write_jsonl,
)

# --------------------------------------------------------------------------------------------------- one optimiser step


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


T = 2.0  # the temperature cache_t2 was built at


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def first_step(run) -> None:
    """One update, so that LoRA B is no longer 0: before it the student is the teacher (KL 0) and LoRA A has no
    gradient from the data (dL/dA = B^T dL/dy x^T)."""
    forward_backward(run, micro_batches(run, 1), measure_kl=False)
    optimizer_step(run)


def assert_grads_close(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * want[name].abs().max().item(),
                                   msg=name)


def test_loss_at_temperature_2_with_kd_on_rehearsal_equals_the_hf_reference(tiny_model_dir, cache_t2, tmp_path):
    """loss = CE / N + lambda * T^2 * sum_{rehearsal tokens} KL / N_rehearsal, and the same LoRA gradients."""
    lam = 0.7
    run = setup(fp32_cfg_for(tiny_model_dir, cache_t2, tmp_path / "r", kd_on="rehearsal", kd_lambda=lam,
                        rehearsal_ratio=0.5, batch_size=6, lr=3e-2), **QUIET)
    assert run.temperature == T
    first_step(run)
    rows = draw_step(run.task, run.rehearsal, 6, 0.5, run.cfg.seed, 2)
    batch = collate_rows(rows, run.tokenizer.pad_token_id)
    out = forward_backward(run, [batch], measure_kl=False)
    got = lora_grads(run.model)
    run.optimizer.zero_grad(set_to_none=True)

    # The obvious way: the PEFT model's own forward (full (B, T, V) logits), the response tokens of each row,
    # cross-entropy over all of them, the reference KL over the rehearsal rows' tokens only, in float64.
    logits = run.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    ce = kl = logits.new_zeros(())
    n_tokens = n_rehearsal = 0
    for b, row in enumerate(rows):
        positions = [t for t, m in enumerate(row.loss_mask) if m]  # token t is predicted at position t - 1
        pred = logits[b, [t - 1 for t in positions]]  # (n, V)
        ce = ce + F.cross_entropy(pred, torch.as_tensor(row.input_ids[positions]), reduction="sum")
        n_tokens += len(positions)
        if row.role == "rehearsal":
            logq = torch.log_softmax(pred / T, dim=-1)
            for j in range(len(positions)):
                kl = kl + reference_token_kl(logq[j], row.target_ids[j].tolist(),
                                             torch.as_tensor(row.target_logprobs[j]), "forward")
            n_rehearsal += len(positions)
    assert 0 < n_rehearsal < n_tokens
    kd_term = lam * T**2 * kl / n_rehearsal
    want = ce / n_tokens + kd_term
    want.backward()

    assert kd_term.item() > 1e-3  # a real KL term (the student has moved), so a wrong weight or count shows
    assert out.loss == pytest.approx(want.item(), rel=1e-5)
    assert out.ce == pytest.approx(ce.item() / n_tokens, rel=1e-5)
    assert out.kl == pytest.approx(kl.item() / n_rehearsal, rel=1e-4)
    assert all(g.abs().max() > 0 for g in got.values())
    assert_grads_close(got, lora_grads(run.model), rtol=1e-4)


@pytest.mark.parametrize("kd_on", ["all", "rehearsal"])
def test_accumulation_8x1_equals_2x4_with_a_data_gradient_on_lora_a(tiny_model_dir, cache_t2, tmp_path, kd_on):
    """warmup 0 and no L2: step 1 moves LoRA B, so step 2's gradient on LoRA A comes from the data alone."""
    grads, runs = [], []
    for bs, accum in ((8, 1), (2, 4)):
        run = setup(fp32_cfg_for(tiny_model_dir, cache_t2, tmp_path / f"r{bs}", batch_size=bs, grad_accum=accum,
                            kd_on=kd_on, kd_lambda=0.5), **QUIET)
        first_step(run)
        batches = micro_batches(run, 2)
        forward_backward(run, batches, measure_kl=False)
        grads.append(lora_grads(run.model))
        runs.append((run, batches))
    one, four = grads
    a_norm = math.sqrt(sum(g.pow(2).sum().item() for n, g in one.items() if "lora_A" in n))
    b_norm = math.sqrt(sum(g.pow(2).sum().item() for n, g in one.items() if "lora_B" in n))
    assert a_norm > 0.1 * b_norm > 0  # LoRA A's gradient is the data's, of the size of B's (measured 0.4 x)
    assert_grads_close(four, one, rtol=1e-4)

    # Control: normalising each micro-batch by its own token counts (and averaging the 4) gives another gradient,
    # which the comparison above would reject.
    run, batches = runs[1]
    assert len({b.n_tokens for b in batches}) > 1  # micro-batches of different sizes: the case that matters
    run.optimizer.zero_grad(set_to_none=True)
    for b in batches:
        forward_backward(run, [b], measure_kl=False)  # gradients add up over the calls
    per_micro = {n: g / len(batches) for n, g in lora_grads(run.model).items()}
    with pytest.raises(AssertionError):
        assert_grads_close(per_micro, one, rtol=1e-4)


def test_gradients_are_clipped_to_norm_1(tiny_model_dir, cache_t2, tmp_path):
    """AdamW's first moment after one step is (1 - beta1) times the gradient it was given: the clipped one."""
    assert TrainConfig.max_grad_norm == 1.0  # the default, used below
    for scale in (1e3, 1e-3):  # a norm far above 1 is scaled down to 1; one below 1 is left alone
        run = setup(fp32_cfg_for(tiny_model_dir, cache_t2, tmp_path / f"r{scale}"), **QUIET)
        forward_backward(run, micro_batches(run, 1), measure_kl=False)
        params = [p for p in run.model.parameters() if p.requires_grad]
        for p in params:
            p.grad.mul_(scale)
        grads = [p.grad.clone() for p in params]
        norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))
        assert (norm > 1) == (scale > 1)
        reported = optimizer_step(run)
        assert reported == pytest.approx(norm, rel=1e-5)  # the norm before clipping, as logged
        factor = min(1.0, 1.0 / norm)
        for p, g in zip(params, grads, strict=True):
            torch.testing.assert_close(run.optimizer.state[p]["exp_avg"], 0.1 * g * factor, rtol=1e-5, atol=1e-12)


def test_learning_rate_warms_up_linearly_then_decays_on_a_cosine(tiny_model_dir, cache_t2, tmp_path):
    peak, warmup, steps = 1e-3, 3, 10
    run = setup(fp32_cfg_for(tiny_model_dir, cache_t2, tmp_path / "r", lr=peak, warmup_steps=warmup, max_steps=steps),
                **QUIET)
    used = []
    for _ in range(steps):
        used.append(run.optimizer.param_groups[0]["lr"])  # the lr of the coming step
        optimizer_step(run)  # no gradients: only the schedule moves
    # Step s (1-based) has done s - 1 steps before it: linear from 0 over the warm-up, then half a cosine to 0.
    want = [peak * (s - 1) / warmup if s - 1 < warmup
            else peak * 0.5 * (1 + math.cos(math.pi * (s - 1 - warmup) / (steps - warmup))) for s in range(1, 11)]
    assert used == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert max(used) == pytest.approx(peak) and used.index(max(used)) == warmup


def test_gradient_checkpointing_on_and_off_give_the_same_gradients(tiny_model_dir, cache_t2, tmp_path):
    """With dropout on: the recomputed forward must draw the same masks as the first one."""
    grads = {}
    for on in (True, False):
        run = setup(fp32_cfg_for(tiny_model_dir, cache_t2, tmp_path / f"gc{on}", gradient_checkpointing=on,
                            lora_dropout=0.1), **QUIET)
        assert base_of(run.model).is_gradient_checkpointing == on
        torch.manual_seed(1)
        first_step(run)
        forward_backward(run, micro_batches(run, 2), measure_kl=False)
        grads[on] = lora_grads(run.model)
    assert all(g.abs().max() > 0 for g in grads[True].values())
    assert_grads_close(grads[True], grads[False], rtol=1e-5)


@pytest.mark.parametrize("budget", [None, 0.01])
def test_reading_the_losses_back_costs_one_conversion_per_step_not_per_micro_batch(tiny_model_dir, cache_t2,
                                                                                    tmp_path, monkeypatch, budget):
    """On CUDA every .item()/.tolist()/float() of a device tensor waits for the device. The step reads its loss sums
    back once, whatever the number of micro-batches: 8 x 1 and 1 x 8 make the same number of such calls."""
    calls = {"n": 0}
    for name in ("item", "tolist", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            calls["n"] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    seen = []
    for bs, accum in ((8, 1), (1, 8)):
        run = setup(fp32_cfg_for(tiny_model_dir, cache_t2, tmp_path / f"s{bs}", batch_size=bs, grad_accum=accum,
                            kd_on="rehearsal", kd_lambda=0.5, max_forgetting=budget), **QUIET)
        batches = micro_batches(run, 1)
        calls["n"] = 0
        forward_backward(run, batches, measure_kl=True)
        seen.append(calls["n"])
    assert seen[0] == seen[1] <= 2, seen


# ---------------------------------------------------------------------------------------------------------- the KL term


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
    """With kd_on: rehearsal the KL term, its value and its gradient, does not depend on the teacher targets of the
    task rows: scrambling those changes nothing, to the bit, while scrambling the rehearsal rows' targets changes
    both."""
    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", kd_on="rehearsal", rehearsal_ratio=0.5,
                        kd_lambda=1.0, lora_dropout=0.0, precision="fp32", lr=1e-2, warmup_steps=0), **QUIET)
    forward_backward(run, micro_batches(run, 1), measure_kl=False)
    optimizer_step(run)  # LoRA B leaves 0: the student is no longer the teacher, so the KL and its gradient are not 0
    (batch,) = micro_batches(run, 2)
    rehearsal = batch.is_rehearsal  # (N,) over the response tokens, as the teacher targets are
    assert 0 < int(rehearsal.sum()) < batch.n_tokens

    def scrambled(tokens: torch.Tensor):
        """The batch with other targets, still valid, at `tokens`: each gets the top-k ids of the token before it,
        with the log-probs in reverse order."""
        ids, lps = batch.teacher_ids.clone(), batch.teacher_logprobs.clone()
        ids[tokens] = batch.teacher_ids[tokens].roll(1, dims=0)
        lps[tokens] = batch.teacher_logprobs[tokens].flip(-1)
        return dataclasses.replace(batch, teacher_ids=ids, teacher_logprobs=lps)

    def kl_and_grads(b) -> tuple[float, dict[str, torch.Tensor]]:
        run.optimizer.zero_grad(set_to_none=True)
        out = forward_backward(run, [b], measure_kl=True)
        return out.kl, {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}

    kl, grads = kl_and_grads(batch)
    assert kl > 1e-4
    task_kl, task_grads = kl_and_grads(scrambled(~rehearsal))
    assert task_kl == kl
    assert all(torch.equal(task_grads[n], g) for n, g in grads.items())
    rehearsal_kl, rehearsal_grads = kl_and_grads(scrambled(rehearsal))  # control: the scrambling does change targets
    assert abs(rehearsal_kl - kl) > 0.01 * kl
    assert any(not torch.allclose(rehearsal_grads[n], g) for n, g in grads.items())


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


def test_kl_is_null_where_no_kl_was_measured(tiny_model_dir, tiny_cache, tmp_path):
    """`kl` (and step0_kl) is null, not 0.0, for a step without KL tokens, and a window's average skips those steps."""
    def metrics(name: str) -> dict[int, float | None]:
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {m["step"]: m["kl"] for m in lines if not m.get("eval")}

    # Plain QLoRA: no rehearsal and lambda 0, so no step has a KL token (kd_on: rehearsal).
    plain = train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "plain", kd_lambda=0.0, rehearsal_ratio=0.0,
                          max_steps=3, log_every=1, save_every=100), **QUIET)
    assert metrics("plain") == {0: None, 1: None, 2: None, 3: None}
    assert plain["step0_kl"] is None and plain["final"]["kl"] is None
    # 10% rehearsal of 4 examples: round(0.4 s) rehearsal rows by step s, so steps 2 and 4 have one, 1 and 3 none.
    assert [rehearsal_total(0.1, 4, s) for s in range(5)] == [0, 0, 1, 1, 2]
    moving = {"rehearsal_ratio": 0.1, "max_steps": 4, "warmup_steps": 0, "lr": 1e-2, "save_every": 100}  # KL > 0
    every = train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "every", log_every=1, **moving), **QUIET)
    kl = metrics("every")
    assert kl[0] is None and kl[1] is None and kl[3] is None and every["step0_kl"] is None
    assert kl[2] > 0 and kl[4] > 0
    # Logged every 2 steps (the same training: lambda > 0 measures the KL at every step): each line is the one
    # measured step of its window, not its mean with a 0.
    train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "pairs", log_every=2, **moving), **QUIET)
    pairs = metrics("pairs")
    assert pairs[2] == pytest.approx(kl[2], rel=1e-5) and pairs[4] == pytest.approx(kl[4], rel=1e-5)


def test_step0_kl_across_attention_implementations(tiny_model_dir, tmp_path):
    """A cache made with eager attention: a student with sdpa or eager starts at the teacher within the step-0
    tolerance (1e-4 per token). Measured in bf16: 3.2e-8 either way with CPU's fp32 weights; with bf16 weights (as on
    CUDA), where the two implementations round differently, 1.8e-6 across implementations, 4e-8 with the same one."""
    from pipeline.models import base_of

    task = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS * 2)
    general = write_jsonl(tmp_path / "g.jsonl", GENERAL_ROWS * 2)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(task),
                            rehearsal_train=str(general), top_k=8, max_length=256, precision="bf16", attn="eager",
                            eval_fraction=0),
                **QUIET)
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["attn"] == "eager"
    for attn in ("sdpa", "eager"):
        run = setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / attn, precision="bf16", attn=attn,
                            lora_dropout=0.0), **QUIET)
        assert base_of(run.model).config._attn_implementation == attn  # the setting reached the model
        out = forward_backward(run, micro_batches(run, 1), measure_kl=True)
        assert out.kl < 1e-4, attn


# --------------------------------------------------------------------------------------------------- the steps of a run


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
                            max_length=256, eval_fraction=0, rehearsal_train="none"), **QUIET)
    with pytest.raises(PipelineError, match=r"no rehearsal training rows; .* pass --rehearsal-ratio 0 --kd-lambda 0 "
                                            r"\(plain QLoRA\)$"):  # the defaults put the KL on rehearsal examples
        setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o"), **QUIET)
    with pytest.raises(PipelineError, match=r"no rehearsal training rows; .* pass --rehearsal-ratio 0$"):
        setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o", kd_on="all"), **QUIET)
    run = setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o2", rehearsal_ratio=0.0), **QUIET)
    assert run.rehearsal is None and micro_batches(run, 1)[0].n_rehearsal_examples == 0
    with pytest.raises(PipelineError, match="--eval-every scores held-out rows, and the cache has none"):
        setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o3", rehearsal_ratio=0.0, eval_every=2), **QUIET)


N_TASK = len(TASK_ROWS)  # 6 task training rows in the cache


def epochs_cfg(model_dir: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    """No max_steps: the tests give --epochs (or max_steps) themselves."""
    base = {"model": str(model_dir), "cache": str(cache), "out": str(out), "batch_size": 4, "lr": 1e-3,
            "warmup_steps": 1, "log_every": 2, "save_every": 2}
    return TrainConfig(**{**base, **kw})


def test_steps_for_epochs_rounds_only_real_fractions():
    def steps(epochs, rows, batch, ratio):
        return steps_for_epochs(TrainConfig(out="o", cache="c", epochs=epochs, batch_size=batch,
                                            rehearsal_ratio=ratio), rows)

    assert steps(1, 21, 1, 0.3) == 30  # 21 / 0.7 is 30.000000000000004 in floating point
    assert steps(1.5, 7, 1, 0.3) == 15
    assert steps(1, 22, 1, 0.3) == 32  # 31.43 steps: the last one completes the pass
    assert steps(0.01, 6, 8, 0.3) == 1


def test_the_default_length_draws_the_same_task_rows_at_any_rehearsal_ratio():
    """Neither --max-steps nor --epochs: enough steps to draw DEFAULT_TASK_ROWS (480) task rows, computed here by
    hand; the rehearsal share adds steps instead of taking task rows away."""
    def length(ratio, batch=8, rows=1200):
        return run_length(TrainConfig(out="o", cache="c", batch_size=batch, rehearsal_ratio=ratio), rows)

    assert DEFAULT_TASK_ROWS == 480
    assert length(0).max_steps == 60 and length(0).epochs == 0.4  # plain QLoRA: 480 / 8
    assert length(0.3).max_steps == 86  # 480 / 5.6 = 85.7: the study's 86 steps
    assert length(0.5, batch=4).max_steps == 240 and length(0.3, rows=100).epochs == 4.816
    assert length(0.3).max_steps * 8 * 0.7 >= 480 > (length(0.3).max_steps - 1) * 8 * 0.7
    with pytest.raises(ConfigError, match="default length draws 480 task rows, and rehearsal_ratio 1 draws none"):
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "rehearsal_ratio": "1"})


def test_epochs_give_the_steps_of_that_many_passes(tiny_model_dir, epochs_cache, tmp_path):
    # 4 examples a step, 30% rehearsal: 2.8 task rows a step on average; 2 epochs of 6 rows = ceil(12 / 2.8) = 5.
    run = setup(epochs_cfg(tiny_model_dir, epochs_cache, tmp_path / "s", epochs=2), **QUIET)
    assert run.cfg.max_steps is None and run.length.max_steps == 5  # the config as asked; the length resolved
    assert run.scheduler.lr_lambdas[0](5) == 0.0 < run.scheduler.lr_lambdas[0](4)  # the schedule ends at step 5

    # 25% of 4: exactly 3 task rows every step; 2.2 epochs of 6 rows are 13.2 rows, which the fifth step completes.
    run = setup(epochs_cfg(tiny_model_dir, epochs_cache, tmp_path / "q", epochs=2.2, rehearsal_ratio=0.25), **QUIET)
    assert run.length.max_steps == 5
    task_rows = [sum(b.input_ids.shape[0] - b.n_rehearsal_examples for b in micro_batches(run, s))
                 for s in range(1, 6)]
    assert sum(task_rows[:4]) < 2.2 * N_TASK <= sum(task_rows)


def test_epochs_run_records_both_and_resumes(tiny_model_dir, epochs_cache, tmp_path):
    cfg = epochs_cfg(tiny_model_dir, epochs_cache, tmp_path / "r", epochs=2)
    summary = train(cfg, **QUIET)
    assert summary["steps"] == 5
    doc = yaml.safe_load((tmp_path / "r" / "run.yaml").read_text())
    assert doc["config"]["epochs"] == 2 and doc["config"]["max_steps"] is None  # as given
    assert doc["resolved"] == {"max_steps": 5, "epochs": 2, "task_rows": N_TASK, "task_rows_per_step": 2.8}
    # --resume with the same flags is the same run (its config is compared as given, not as resolved).
    assert train(TrainConfig(**{**cfg.__dict__, "resume": True}), **QUIET)["steps"] == 5

    train(epochs_cfg(tiny_model_dir, epochs_cache, tmp_path / "m", max_steps=3), **QUIET)
    resolved = yaml.safe_load((tmp_path / "m" / "run.yaml").read_text())["resolved"]
    assert resolved == {"max_steps": 3, "epochs": 1.4, "task_rows": N_TASK, "task_rows_per_step": 2.8}


# ------------------------------------------------------------------------------------------------------------- the loop


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
