"""pipeline/memory.py: what a loaded model occupies, against a count from the layer shapes."""

from __future__ import annotations

import math

import torch

from pipeline import models
from pipeline.config import TrainConfig
from pipeline.memory import footprint
from pipeline.models import attach_lora, load_model
from pipeline.train import setup

CPU = torch.device("cpu")


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
                            rehearsal_train=str(corpus["rehearsal_train"]), top_k=4, max_length=128, eval_fraction=0),
                log=lines.append)
    assert sum(line.startswith("model memory: 4-bit weights") for line in lines) == 1
    lines.clear()
    setup(TrainConfig(model=str(tiny_model_dir), cache=str(tmp_path / "c"), out=str(tmp_path / "t"), max_steps=1),
          log=lines.append)
    assert sum(line.startswith("model memory: 4-bit weights") and "AdamW state" in line for line in lines) == 1
