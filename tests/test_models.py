"""Tests for pipeline.models on the tiny model: the dtype of the unquantised weights, for teacher and student, and
what the loaded model occupies."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import models
from pipeline.config import TrainConfig
from pipeline.device import weights_dtype
from pipeline.forward import forward_hidden
from pipeline.memory import footprint
from pipeline.models import attach_lora, load_model
from pipeline.train import setup

CPU = torch.device("cpu")


def is_4bit(param: torch.Tensor) -> bool:
    return type(param).__name__ == "Params4bit"


def test_weights_dtype_is_the_compute_dtype_on_cuda_and_fp32_on_cpu():
    cuda = torch.device("cuda")  # (a device object only: no GPU needed)
    assert weights_dtype("bf16", cuda) == torch.bfloat16 and weights_dtype("fp32", cuda) == torch.float32
    assert weights_dtype("bf16", CPU) == weights_dtype("fp32", CPU) == torch.float32  # [fp32 weights on cpu note]


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


def test_footprint_matches_a_count_from_the_shapes(tiny_model_dir, corpus, tmp_path, monkeypatch):
    """4-bit weights, other weights by dtype and LoRA + AdamW state, against a count from the layer shapes and the
    NF4 double-quantisation layout (blocks of 64 weights, their absmax in blocks of 256)."""
    from transformers import AutoConfig

    from pipeline.cache.write import build_cache
    from pipeline.config import CacheConfig

    monkeypatch.setattr(models, "weights_dtype", lambda *_: torch.bfloat16)  # as on CUDA: two dtypes to tell apart
    model = attach_lora(load_model(tiny_model_dir, CPU, "bf16"), r=4, alpha=8, dropout=0.0,
                        target_modules="all-linear", gradient_checkpointing=False)
    fp = footprint(model)

    config = AutoConfig.from_pretrained(tiny_model_dir)
    vocab, dim, layers = config.vocab_size, config.hidden_size, config.num_hidden_layers
    inter = config.intermediate_size
    kv = config.num_key_value_heads * dim // config.num_attention_heads
    linears = [(dim, dim), (dim, kv), (dim, kv), (dim, dim), (dim, inter), (dim, inter), (inter, dim)] * layers
    assert fp.four_bit == sum(i * o // 2 for i, o in linears)  # two 4-bit values per byte
    absmax = [math.ceil(i * o / 64) for i, o in linears]  # one uint8 per block of 64 weights (double-quantised)
    # + a 16-entry fp32 NF4 codebook; the absmax's own fp32 absmax per 256 blocks, 256-entry codebook, offset
    assert fp.quant_constants == sum(n + 16 * 4 + math.ceil(n / 256) * 4 + 256 * 4 + 4 for n in absmax)
    # Embeddings and head (untied) and 2 norms per layer + the final one, all bf16 (LoRA, trainable, is fp32).
    assert fp.other == {"bfloat16": (2 * vocab * dim + (2 * layers + 1) * dim) * 2}
    assert fp.trainable == sum(4 * (i + o) for i, o in linears) * 4  # LoRA A (4 x in) and B (out x 4), fp32
    assert fp.optimizer_state == 2 * fp.trainable
    assert fp.describe().startswith("model memory: 4-bit weights ")

    # Printed once at the start of cache-teacher and of train.
    lines: list[str] = []
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(corpus["task_train"]),
                            rehearsal_train=str(corpus["rehearsal_train"]), top_k=4, max_length=128), log=lines.append)
    assert sum(line.startswith("model memory: 4-bit weights") for line in lines) == 1
    lines.clear()
    setup(TrainConfig(model=str(tiny_model_dir), cache=str(tmp_path / "c"), out=str(tmp_path / "t"), max_steps=1),
          log=lines.append)
    assert sum(line.startswith("model memory: 4-bit weights") and "AdamW state" in line for line in lines) == 1
