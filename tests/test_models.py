"""Tests for pipeline.models on the tiny model: the dtype of the unquantised weights, for teacher and student."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import attach_lora, forward_hidden, load_model

CPU = torch.device("cpu")


def is_4bit(param: torch.Tensor) -> bool:
    return type(param).__name__ == "Params4bit"


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_unquantised_weights_in_the_compute_dtype_for_teacher_and_student(tiny_model_dir, precision, dtype):
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
