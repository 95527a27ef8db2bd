"""The forward pass teacher and student share: final hidden states, response positions, the output head.

The output head is applied by losses.py chunk by chunk, with fp32 logits, at the response positions only,
so no (B, T, V) logits tensor is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.batches import TrainBatch
from pipeline.device import autocast
from pipeline.errors import PipelineError
from pipeline.losses import LossSums, response_losses
from pipeline.models import base_of


@dataclass
class OutputHead:
    """The output projection applied by losses.py, chunk by chunk: logits = hidden @ weight.T + bias (then softcap)."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None
    softcap: float | None


def output_head(model) -> OutputHead:
    base = base_of(model)
    head = base.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PipelineError(f"{type(base).__name__}: the output head is not a plain (unquantised) linear layer")
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return OutputHead(weight=weight, bias=getattr(head, "bias", None), softcap=softcap)


def forward_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, precision: str, *,
                   body: torch.nn.Module | None = None) -> torch.Tensor:
    """Final hidden states (after the last norm) of the decoder body: (B, T, H).

    The output head is NOT applied here: losses.py applies it chunk by chunk, with fp32 logits, only at the
    response positions, so no (B, T, V) logits tensor is ever built.

    Args:
        body: the module to call instead of the model's decoder. Under torchrun, train passes its
            DistributedDataParallel wrapper of that decoder: DDP syncs gradients only of forwards it runs.
    """
    body = body if body is not None else base_of(model).get_decoder()
    with autocast(input_ids.device, precision):
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def response_positions(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where to read hidden states for the response tokens, and where their labels are.

    loss_mask[b, t] is true when input_ids[b, t] is a response token; it is predicted from position t-1.

    Returns:
        (rows, cols) of the predicting positions, each (N,), in row-major order (the cache's order).
    """
    rows, cols = loss_mask.nonzero(as_tuple=True)
    return rows, cols - 1


def head_losses(head: OutputHead, hidden: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024,
                **targets) -> LossSums:
    """losses.response_losses with this model's output head: CE sums at (N, H) `hidden`, and KL sums when teacher
    `targets` are given (teacher_ids, teacher_logprobs, kd_mask, temperature, kl)."""
    return response_losses(hidden, head.weight, labels, bias=head.bias, logit_softcap=head.softcap,
                           chunk_size=chunk_size, **targets)


def student_losses(model, head: OutputHead, batch: TrainBatch, precision: str, *, chunk_size: int = 1024,
                   body: torch.nn.Module | None = None,
                   positions: tuple[torch.Tensor, torch.Tensor] | None = None,
                   **targets) -> tuple[LossSums, torch.Tensor, torch.Tensor]:
    """The student's loss sums on a batch: forward, the response positions, their labels, the head's losses.

    train and evaluate both score a batch through here, so a training step and a held-out score compute the same
    quantity the same way.

    Args:
        body: as forward_hidden's (the DDP-wrapped decoder under torchrun).
        positions: response_positions(batch.loss_mask), when the caller already has them on the device.
        targets: the teacher's targets for the KL (see head_losses); none: CE only.

    Returns:
        (sums, hidden (N, H) at the response positions, labels (N,)).
    """
    hidden = forward_hidden(model, batch.input_ids, batch.attention_mask, precision, body=body)  # (B, T, H)
    rows, cols = positions if positions is not None else response_positions(batch.loss_mask)
    h = hidden[rows, cols]  # (N, H): only response positions reach the output head
    labels = batch.input_ids[rows, cols + 1]
    return head_losses(head, h, labels, chunk_size=chunk_size, **targets), h, labels
