"""What one optimiser step of `train` computes, each against a value computed the obvious way (issue 15):

* the loss and LoRA gradients at T = 2 with `kd_on: rehearsal`, from plain HF logits and the float64 reference
  KL of tests/test_losses.py;
* token-normalised accumulation (8 x 1 == 2 x 4) with a data gradient on LoRA A, and a control showing that
  per-micro-batch normalisation would fail the same comparison;
* clipping at norm 1.0, the warm-up + cosine schedule, LoRA on every linear layer, gradient checkpointing on
  vs off, and the independence of the CPU dropout's masks.

All on the tiny model, in fp32, from one cache built at temperature 2 (so a lost T^2 shows).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.batches import collate_rows
from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig, TrainConfig
from pipeline.mixing import draw_step
from pipeline.models import RandDropout, base_of, load_model
from pipeline.train import forward_backward, micro_batches, optimizer_step, setup
from tests.conftest import GENERAL_ROWS, TASK_ROWS, write_jsonl
from tests.test_losses import reference_token_kl

QUIET = {"log": lambda *_: None}
T = 2.0


@pytest.fixture(scope="module")
def cache_t2(tmp_path_factory, tiny_model_dir) -> Path:
    """12 task and 9 rehearsal training rows, teacher top-8 at temperature 2, fp32."""
    d = tmp_path_factory.mktemp("cache-t2")
    task = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    general = GENERAL_ROWS + [{"instruction": f"Count to {n}.", "output": " ".join(map(str, range(1, n + 1)))}
                              for n in range(2, 7)]
    out = d / "cache"
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), task_train=str(write_jsonl(d / "t.jsonl", task)),
                            rehearsal_train=str(write_jsonl(d / "g.jsonl", general)), top_k=8, max_length=256,
                            temperature=T, precision="fp32"), **QUIET)
    return out


def cfg_for(model_dir: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    base = {"model": str(model_dir), "cache": str(cache), "out": str(out), "max_steps": 10, "batch_size": 8,
            "lr": 1e-2, "warmup_steps": 0, "lora_dropout": 0.0, "precision": "fp32", "l2": 0.0}
    return TrainConfig(**{**base, **kw})


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


# ----------------------------------------------------------------------------------------------- the loss at T = 2


def test_loss_at_temperature_2_with_kd_on_rehearsal_equals_the_hf_reference(tiny_model_dir, cache_t2, tmp_path):
    """loss = CE / N + lambda * T^2 * sum_{rehearsal tokens} KL / N_rehearsal, and the same LoRA gradients."""
    lam = 0.7
    run = setup(cfg_for(tiny_model_dir, cache_t2, tmp_path / "r", kd_on="rehearsal", kd_lambda=lam,
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


# ----------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("kd_on", ["all", "rehearsal"])
def test_accumulation_8x1_equals_2x4_with_a_data_gradient_on_lora_a(tiny_model_dir, cache_t2, tmp_path, kd_on):
    """warmup 0 and no L2: step 1 moves LoRA B, so step 2's gradient on LoRA A comes from the data alone."""
    grads, runs = [], []
    for bs, accum in ((8, 1), (2, 4)):
        run = setup(cfg_for(tiny_model_dir, cache_t2, tmp_path / f"r{bs}", batch_size=bs, grad_accum=accum,
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


# ----------------------------------------------------------------------------------------- clipping and schedule


def test_gradients_are_clipped_to_norm_1(tiny_model_dir, cache_t2, tmp_path):
    """AdamW's first moment after one step is (1 - beta1) times the gradient it was given: the clipped one."""
    assert TrainConfig.max_grad_norm == 1.0  # the default, used below
    for scale in (1e3, 1e-3):  # a norm far above 1 is scaled down to 1; one below 1 is left alone
        run = setup(cfg_for(tiny_model_dir, cache_t2, tmp_path / f"r{scale}"), **QUIET)
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
    run = setup(cfg_for(tiny_model_dir, cache_t2, tmp_path / "r", lr=peak, warmup_steps=warmup, max_steps=steps),
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


# ------------------------------------------------------------------------------------------- the adapter itself


def test_lora_adapts_every_linear_layer_but_the_output_head(tiny_model_dir, cache_t2, tmp_path):
    base = load_model(tiny_model_dir, torch.device("cpu"), "fp32")
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linear) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)

    def adapted(run) -> dict[str, int]:
        """Module name -> its LoRA rank, for every module that carries a LoRA adapter."""
        return {n.removeprefix("base_model.model."): m.lora_A["default"].out_features
                for n, m in run.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}

    run = setup(cfg_for(tiny_model_dir, cache_t2, tmp_path / "all", lora_r=4), **QUIET)
    assert adapted(run) == dict.fromkeys(linear, 4)
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{n}.lora_{ab}.default.weight" for n in linear for ab in "AB"}

    run = setup(cfg_for(tiny_model_dir, cache_t2, tmp_path / "qv", lora_target_modules="q_proj,v_proj"), **QUIET)
    assert set(adapted(run)) == {n for n in linear if n.endswith(("q_proj", "v_proj"))}


def test_gradient_checkpointing_on_and_off_give_the_same_gradients(tiny_model_dir, cache_t2, tmp_path):
    """With dropout on: the recomputed forward must draw the same masks as the first one."""
    grads = {}
    for on in (True, False):
        run = setup(cfg_for(tiny_model_dir, cache_t2, tmp_path / f"gc{on}", gradient_checkpointing=on,
                            lora_dropout=0.1), **QUIET)
        assert base_of(run.model).is_gradient_checkpointing == on
        torch.manual_seed(1)
        first_step(run)
        forward_backward(run, micro_batches(run, 2), measure_kl=False)
        grads[on] = lora_grads(run.model)
    assert all(g.abs().max() > 0 for g in grads[True].values())
    assert_grads_close(grads[True], grads[False], rtol=1e-5)


def test_cpu_dropout_masks_are_independent_across_lanes_and_calls():
    """RandDropout cuts four 16-bit lanes from each random int64: neighbouring lanes, the four lane positions and
    successive calls must behave as independent draws (correlations ~ 1/sqrt(n) = 0.001 here)."""
    torch.manual_seed(0)
    drop = RandDropout(0.3).train()
    x = torch.ones(1000, 1024)  # 1,024,000 elements = 256,000 int64 draws
    kept = [(drop(x) != 0).double().flatten() for _ in range(2)]

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    first = kept[0]
    for lane in range(4):  # each lane of the int64 keeps 70% on its own
        assert abs(first[lane::4].mean().item() - 0.7) < 0.005, lane
    for shift in (1, 2, 3, 4, 1024):  # lanes of one int64, the next int64, the next row
        assert abs(corr(first[:-shift], first[shift:])) < 0.01, shift
    assert abs(corr(kept[0], kept[1])) < 0.01  # a new mask at every call


# ----------------------------------------------------------------------------------------------- host syncs


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
        run = setup(cfg_for(tiny_model_dir, cache_t2, tmp_path / f"s{bs}", batch_size=bs, grad_accum=accum,
                            kd_on="rehearsal", kd_lambda=0.5, max_forgetting=budget), **QUIET)
        batches = micro_batches(run, 1)
        calls["n"] = 0
        forward_backward(run, batches, measure_kl=True)
        seen.append(calls["n"])
    assert seen[0] == seen[1] <= 2, seen
