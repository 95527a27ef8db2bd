"""The forward pass teacher and student share: final hidden states, response positions, the output head.

The output head is applied by losses.py chunk by chunk, with fp32 logits, at the response positions only,
so no (B, T, V) logits tensor is ever built. Each architecture's head form (scale, softcap, bias) is read here and
checked once per loaded model against the model's own forward ([head forms note], [head check note]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.batches import TrainBatch
from pipeline.device import autocast
from pipeline.errors import PipelineError
from pipeline.losses import LossSums, head_logits, response_losses
from pipeline.models import base_of, eval_mode

# [head forms note] The losses never call the model's own forward for logits: they apply the output head to the
# final hidden states themselves, chunk by chunk (losses._logits). Every architecture's ForCausalLM computes
#     logits = softcap(scale * (hidden @ lm_head.weight.T + lm_head.bias))
# with some of the three transforms absent (read in transformers 5.24's modeling_*.py): Granite divides by
# config.logits_scaling, Cohere multiplies by config.logit_scale, Gemma 2/3 softcap by
# config.final_logit_softcapping (after the matmul, nothing before it); the others apply lm_head alone (a tied
# head is the embedding matrix itself, a padded vocabulary is just more rows). LOGIT_SCALE names, per model type,
# the factor; the softcap is read from config.final_logit_softcapping wherever it is set. A model type outside the
# table is taken to apply lm_head alone, and `check_output_head` (run once per loaded model) compares this path with
# the model's own forward and refuses, naming the model type, an architecture whose head is something else.
LOGIT_SCALE: dict[str, Callable[[Any], float]] = {
    "granite": lambda c: 1.0 / c.logits_scaling,
    "granitemoe": lambda c: 1.0 / c.logits_scaling,
    "granitemoeshared": lambda c: 1.0 / c.logits_scaling,
    "granitemoehybrid": lambda c: 1.0 / c.logits_scaling,
    "cohere": lambda c: c.logit_scale,
    "cohere2": lambda c: c.logit_scale,
}


@dataclass
class OutputHead:
    """The output projection applied by losses.py, chunk by chunk:
    logits = softcap(scale * (hidden @ weight.T + bias)), see [head forms note]."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None
    softcap: float | None
    scale: float | None = None
    model_type: str = ""

    def losses_kwargs(self) -> dict:
        """The head's keyword arguments of losses.response_losses / topk_logprobs / full_kl_and_agreement."""
        return {"bias": self.bias, "logit_softcap": self.softcap, "logit_scale": self.scale}


def output_head(model) -> OutputHead:
    """The output head of `model` (PEFT-wrapped or not) in the form losses.py applies; checked against the model's
    own forward the first time it is read from a model (check_output_head)."""
    base = base_of(model)
    config = base.config
    model_type = getattr(config, "model_type", type(base).__name__)
    head = base.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PipelineError(f"model type {model_type}: the output head is not a plain (unquantised) linear layer")
    scale = LOGIT_SCALE[model_type](config) if model_type in LOGIT_SCALE else None
    out = OutputHead(weight=weight, bias=getattr(head, "bias", None),
                     softcap=getattr(config, "final_logit_softcapping", None),
                     scale=None if scale == 1.0 else scale, model_type=model_type)
    if not getattr(base, "_pipeline_head_checked", False):
        check_output_head(model, out)
        base._pipeline_head_checked = True
    return out


# [head check note] The model's own forward against forward_hidden + this head on one row of 16 tokens, log-softmax
# in fp32, both without autocast (the same decoder call, so the difference is the head's alone). Allowed:
# 1e-3 + 4 eps(head dtype) * max |logit|: a bf16 head (eps 2^-7) rounds the logits once on each side, at most 2^-8
# relative apart, and the log-softmax moves by at most twice that, so rounding passes by a factor of 2 or more.
# A model read wrongly fails by orders of magnitude. Measured on the tiny models of tests/test_architectures.py (4 bit,
# CPU, fp32 and bf16): every family 0 (bit-equal); with the transform dropped, Granite (logits_scaling 8) 2.1,
# Cohere (logit_scale 0.0625) 2.6, Gemma 2 (softcap 2) 0.9, Dory's unhandled per-token scale 0.5. Not yet run on a
# GPU, where a bf16 head's two roundings are what the eps term is for.
CHECK_TOKENS = 16


@torch.no_grad()
def check_output_head(model, head: OutputHead) -> None:
    """Refuse, in one line naming the model type, a model whose own forward's log-probs differ from what the head
    path computes (see [head check note])."""
    vocab = head.weight.shape[0]
    device = head.weight.device
    ids = ((torch.arange(CHECK_TOKENS, device=device) * 7919 + 11) % vocab)[None]  # (1, T), any valid ids
    mask = torch.ones_like(ids)
    with eval_mode(model):
        own = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()  # (T, V)
        hidden = forward_hidden(model, ids, mask, "fp32")[0]  # (T, H)
    ours = head_logits(hidden.float(), head.weight, **head.losses_kwargs())  # (T, V)
    if own.shape != ours.shape:
        raise PipelineError(f"model type {head.model_type}: the model's logits have shape {tuple(own.shape)}, its "
                            f"output head gives {tuple(ours.shape)}; this architecture is not supported")
    diff = (torch.log_softmax(own, -1) - torch.log_softmax(ours, -1)).abs().max().item()
    bound = 1e-3 + 4 * torch.finfo(head.weight.dtype).eps * own.abs().max().item()
    if not diff <= bound:  # (NaN fails too)
        raise PipelineError(
            f"model type {head.model_type}: its own forward's log-probs differ by {diff:.3g} (allowed {bound:.2g}) "
            "from the output head the losses apply (lm_head, bias, logit scale, softcap): this architecture's head "
            "is not one of the handled forms (README: Architectures)")


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
    return response_losses(hidden, head.weight, labels, chunk_size=chunk_size, **head.losses_kwargs(), **targets)


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
