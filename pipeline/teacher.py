"""The teacher's soft targets: one function turns a batch into the top-k ids and log-probs at its response
positions. `cache-teacher` stores what it returns; `train --online-teacher` calls it at every step instead.

[same numeric path note] The teacher is the frozen 4-bit base loaded by models.load_model, run through
models.forward_hidden, with the output head applied in fp32 by losses.topk_logprobs: exactly the path the
student takes in training, so the student (LoRA B = 0) reproduces the targets at step 0.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from pipeline.forward import OutputHead, forward_hidden, response_positions
from pipeline.losses import topk_logprobs

# What a stored log-prob is rounded to: the cache's `storage.logprobs` setting names one of these.
LOGPROB_DTYPES = {"float16": np.float16, "float32": np.float32}


@torch.inference_mode()
def teacher_topk(model, head: OutputHead, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 loss_mask: torch.Tensor, *, top_k: int, temperature: float, precision: str, chunk_size: int = 1024,
                 adapter_off: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and fp32 log-probs of the teacher at every response position of a batch.

    Args:
        input_ids, attention_mask, loss_mask: (B, T).
        adapter_off: `model` is a PEFT student; switch its adapter off so the frozen base answers (the
            online teacher: one extra forward, no second copy of the weights).

    Returns:
        ids (N, k) long and logprobs (N, k) fp32, N = loss_mask.sum(), in row-major order (the cache's order).
    """
    with model.disable_adapter() if adapter_off else contextlib.nullcontext():
        hidden = forward_hidden(model, input_ids, attention_mask, precision)  # (B, T, H)
    rows, cols = response_positions(loss_mask)
    return topk_logprobs(hidden[rows, cols], head.weight, top_k, temperature=temperature, chunk_size=chunk_size,
                         **head.losses_kwargs())


def as_stored(logprobs: torch.Tensor, logprob_dtype: str = "float16") -> torch.Tensor:
    """fp32 log-probs rounded as the cache stores them (`--logprob-dtype`), so online targets equal cached ones."""
    return logprobs.to(getattr(torch, logprob_dtype)).float()
