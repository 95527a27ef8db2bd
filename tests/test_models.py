"""pipeline/models.py on the tiny model: the dtype of the unquantised weights for teacher and student, LoRA on
every linear layer, and the CPU dropout of the LoRA inputs (RandDropout)."""

from __future__ import annotations

import pytest
import torch

from pipeline import models
from pipeline.forward import forward_hidden
from pipeline.models import RandDropout, attach_lora, load_model
from pipeline.train import setup
from tests.helpers import (
    QUIET,
    fp32_cfg_for,
)

CPU = torch.device("cpu")


def is_4bit(param: torch.Tensor) -> bool:
    return type(param).__name__ == "Params4bit"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unquantised_weights_in_weights_dtype_for_teacher_and_student(tiny_model_dir, monkeypatch, dtype):
    precision = "bf16"
    monkeypatch.setattr(models, "weights_dtype", lambda *_: dtype)  # bf16 is CUDA's choice: asked for here
    teacher = load_model(tiny_model_dir, CPU, precision)
    plain = {name: p.dtype for name, p in teacher.named_parameters() if not is_4bit(p)}
    assert "lm_head.weight" in plain and "model.embed_tokens.weight" in plain and "model.norm.weight" in plain
    assert set(plain.values()) == {dtype}

    student = attach_lora(load_model(tiny_model_dir, CPU, precision), r=4, alpha=8, dropout=0.0,
                          target_modules="all-linear", gradient_checkpointing=True)
    # [no upcast note]: the student's frozen weights keep the teacher's dtype; only LoRA is fp32 (for AdamW).
    frozen = {p.dtype for p in student.parameters() if not p.requires_grad and not is_4bit(p)}
    assert frozen == {dtype}
    assert {p.dtype for p in student.parameters() if p.requires_grad} == {torch.float32}

    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():  # LoRA B starts at zero: the student computes exactly what the teacher did
        assert torch.equal(forward_hidden(teacher, ids, mask, precision), forward_hidden(student, ids, mask, precision))


def test_lora_adapts_every_linear_layer_but_the_output_head(tiny_model_dir, cache_t2, tmp_path):
    base = load_model(tiny_model_dir, torch.device("cpu"), "fp32")
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linear) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)

    def adapted(run) -> dict[str, int]:
        """Module name -> its LoRA rank, for every module that carries a LoRA adapter."""
        return {n.removeprefix("base_model.model."): m.lora_A["default"].out_features
                for n, m in run.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}

    run = setup(fp32_cfg_for(tiny_model_dir, cache_t2, tmp_path / "all", lora_r=4), **QUIET)
    assert adapted(run) == dict.fromkeys(linear, 4)
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{n}.lora_{ab}.default.weight" for n in linear for ab in "AB"}

    run = setup(fp32_cfg_for(tiny_model_dir, cache_t2, tmp_path / "qv", lora_target_modules="q_proj,v_proj"), **QUIET)
    assert set(adapted(run)) == {n for n in linear if n.endswith(("q_proj", "v_proj"))}


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
