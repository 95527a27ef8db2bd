"""Losses: next-token cross-entropy, sparse KL to a cached top-k teacher (with a residual bucket), L2; and the
full-vocabulary KL and top-1 agreement between two sets of hidden states that `evaluate` scores forgetting with.

Pure functions of tensors: no model code, no I/O. docs/design.md ("The loss") gives the maths:

    KL_t = sum_{i in S} p_i (log p_i - log q_i)  +  p_r (log p_r - log q_r)        (k+1 buckets)
    Loss = CE  +  lambda * T^2 * mean_t KL_t  +  mu * sum ||LoRA params||^2

`response_losses` returns SUMS over the tokens of one micro-batch (raw KL, not multiplied by T^2 or lambda) so the
training loop can divide by the token count of the whole optimiser step and apply lambda * T^2 itself.

Memory: the full-vocabulary logits are only ever built for `chunk_size` tokens at a time, in fp32, and (through
activation checkpointing) the backward pass also rebuilds them one chunk at a time. A bf16 head is used as it is,
never copied to fp32 (see [low-precision head note]).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipeline.config import KL_KINDS

# [reverse residual floor note] In reverse KL the teacher residual appears as log p_r. p_r = 1 - sum_S p_i is a
# difference of numbers near 1, so below ~1e-7 it is rounding noise (and exactly 0 after the clamp when fp16 storage
# makes sum_S p_i > 1). Flooring p_r at 1e-8 inside the log keeps the reverse term finite: a student that puts mass
# q_r where the teacher put "nothing" pays q_r * (log q_r + 18.4) instead of infinity.
REVERSE_RESIDUAL_FLOOR = 1e-8

# [teacher log-prob floor note] A cached teacher log-prob of -inf (fp16 overflow, or a cache that pads with -inf)
# would make reverse KL infinite and poison the gradient with inf * 0 = NaN. Anything below about -104 is exactly
# p = 0 in fp32 already, so clamping at -1000 changes nothing for forward / topk_renorm; for reverse it turns an
# infinite penalty into a huge finite one, q_i * (log q_i + 1000).
TEACHER_LOGPROB_FLOOR = -1000.0


@dataclass
class LossSums:
    """Sums (not means) over the response tokens of one micro-batch, so the caller can normalise by
    the token count of the whole optimiser step.

    The KL sum is the raw divergence at temperature T: the caller multiplies it by lambda * T^2.
    """

    ce: Tensor  # scalar fp32: sum of next-token cross-entropy over all N tokens
    kl: Tensor  # scalar fp32: sum of per-token KL over the tokens where kd_mask is true (0 when no teacher given)
    n_tokens: int  # N
    n_kd_tokens: int  # number of true entries of kd_mask (0 when no teacher given)


def per_token_kl(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    kind: str,
    student_log_residual: Tensor | None = None,
) -> Tensor:
    """KL between teacher and student over the k teacher ids plus one residual bucket, per token.

    Args:
        student_logprobs: (n, k) log q_i of the student at the teacher's ids, from a full-vocabulary log-softmax at
            temperature T. Carries the gradient.
        teacher_logprobs: (n, k) log p_i cached by the teacher (full-vocabulary log-softmax at T), any float dtype.
        kind: one of KL_KINDS.
            "forward":     sum_S p_i (log p_i - log q_i) + p_r (log p_r - log q_r)
            "reverse":     sum_S q_i (log q_i - log p_i) + q_r (log q_r - log p_r)
            "topk_renorm": both renormalised over S, residual dropped: sum_S p~_i (log p~_i - log q~_i)
        student_log_residual: (n,) log q_r, the student's log-mass on every token outside S, computed stably by the
            caller. None means S covers the whole vocabulary: the residual bucket holds no token, so its term is 0
            (whatever rounding left in p_r). Unused by "topk_renorm".

    Returns:
        (n,) per-token KL in the dtype of student_logprobs.
    """
    lq = student_logprobs
    # See [teacher log-prob floor note].
    lp = teacher_logprobs.to(lq.dtype).clamp_min(TEACHER_LOGPROB_FLOOR)

    if kind == "topk_renorm":
        lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True)
        return (lp.exp() * (lp - lq)).sum(-1)

    p = lp.exp()  # (n, k); lp >= -1000 so p * lp is 0 * finite = 0 where p underflows: 0 log 0 = 0
    # fp16 storage can make sum_S p_i exceed 1 by a little: the residual is then empty, not negative.
    p_r = (1.0 - p.sum(-1)).clamp_min(0.0)  # (n,)

    if kind == "forward":
        kl = (p * (lp - lq)).sum(-1)
        if student_log_residual is not None:
            # xlogy gives p_r log p_r = 0 at p_r = 0; log q_r is finite whenever the residual bucket is non-empty.
            kl = kl + torch.xlogy(p_r, p_r) - p_r * student_log_residual
        return kl

    if kind == "reverse":
        kl = (lq.exp() * (lq - lp)).sum(-1)
        if student_log_residual is not None:
            # See [reverse residual floor note].
            log_p_r = torch.log(p_r.clamp_min(REVERSE_RESIDUAL_FLOOR))
            kl = kl + student_log_residual.exp() * (student_log_residual - log_p_r)
        return kl

    raise ValueError(f"unknown kl kind {kind!r}; expected one of {KL_KINDS}")


def _logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, logit_softcap: float | None, dtype: torch.dtype,
    logit_scale: float | None = None,
) -> Tensor:
    """(n, H) hidden -> (n, V) logits in `dtype`: hidden @ weight.T + bias, times logit_scale, then softcapped, in
    the order the architectures' own forwards apply them (forward.HEAD_FORMS). The only full-vocabulary tensor's birth.

    [low-precision head note] A bf16 / fp16 head is never upcast: `weight.to(fp32)` would be an fp32 copy of the
    whole (V, H) head, in the forward and again in the checkpointed recomputation of every chunk (2 GB at
    V=128k, H=4096). The matmul runs in the head's dtype (accumulating in fp32 inside the kernel, as HF and Liger
    compute logits) and only the chunk's (n, V) result is upcast. The logits are then rounded to bf16 once,
    a relative error of at most 2^-8 (tests/test_losses.py bounds what that does to CE, KL and gradients).
    Teacher (topk_logprobs) and student take the same path, so step 0 still reproduces the cache. An fp32 head
    takes the fp32 path below, unchanged.
    """
    if torch.finfo(weight.dtype).bits < 32:  # See [low-precision head note].
        logits = (hidden.to(weight.dtype) @ weight.T).to(dtype)  # (n, V) <- the big one, one chunk of tokens only
    else:
        logits = hidden.to(dtype) @ weight.to(dtype).T  # (n, V) <- the big one, one chunk of tokens only
    if bias is not None:
        logits = logits + bias.to(dtype)
    if logit_scale is not None:
        logits = logits * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits


def head_logits(hidden: Tensor, weight: Tensor, *, bias: Tensor | None = None, logit_softcap: float | None = None,
                logit_scale: float | None = None) -> Tensor:
    """(n, H) hidden -> (n, V) logits, fp32 (fp64 for fp64 hidden), exactly as every loss here computes them: for
    comparing the head path with a model's own forward (forward.check_output_head). Arguments as in response_losses.
    """
    return _logits(hidden, weight, bias, logit_softcap, torch.promote_types(hidden.dtype, torch.float32), logit_scale)


def _chunk_losses(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    teacher_ids: Tensor | None,
    teacher_logprobs: Tensor | None,
    kd_mask: Tensor | None,
    temperature: float,
    kind: str,
    logit_softcap: float | None,
    dtype: torch.dtype,
    logit_scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """CE sum and KL sum of one chunk of n tokens. Shapes as in response_losses with N -> n.

    Returns:
        (ce_sum, kl_sum): scalars in `dtype`; kl_sum is None when no teacher is given.
    """
    logits = _logits(hidden, weight, bias, logit_softcap, dtype, logit_scale)  # (n, V)
    vocab = logits.shape[-1]

    # Cross-entropy at temperature 1, written as lse - logit[label] (= F.cross_entropy(..., reduction="sum")) so the
    # logsumexp can be shared with the KL term when T == 1 and no (n, V) log-softmax block is allocated.
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    ce = (lse - logits.gather(-1, labels[:, None]).squeeze(-1)).sum()
    if teacher_ids is None or teacher_logprobs is None:
        return ce, None

    scaled = logits if temperature == 1.0 else logits / temperature  # (n, V)
    lse_t = lse if temperature == 1.0 else torch.logsumexp(scaled, dim=-1)  # (n,)
    student_logprobs = scaled.gather(-1, teacher_ids) - lse_t[:, None]  # (n, k) log q_i

    student_log_residual = None
    # With distinct ids, S covers the vocabulary exactly when k >= V: then the residual bucket is empty (q_r = 0).
    if kind != "topk_renorm" and teacher_ids.shape[-1] < vocab:
        # log q_r = logsumexp over the tokens outside S - logsumexp over all tokens. Never log(1 - sum_S q_i): that
        # cancels catastrophically when the student is confident on S.
        rest = scaled.scatter(-1, teacher_ids, float("-inf"))  # (n, V) with the S entries masked out
        student_log_residual = torch.logsumexp(rest, dim=-1) - lse_t  # (n,)

    if kd_mask is not None:
        # Rows that get no KL still go through the maths; give them a harmless teacher (all log-probs 0) so garbage in
        # an unused cache row cannot turn into NaN gradients through the `where` below (0 * NaN = NaN).
        teacher_logprobs = torch.where(kd_mask[:, None], teacher_logprobs, torch.zeros_like(teacher_logprobs))
    kl_tok = per_token_kl(student_logprobs, teacher_logprobs, kind, student_log_residual)  # (n,)
    if kd_mask is not None:
        kl_tok = torch.where(kd_mask, kl_tok, torch.zeros_like(kl_tok))
    return ce, kl_tok.sum()


def response_losses(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    kd_mask: Tensor | None = None,
    temperature: float = 1.0,
    kl: str = "forward",
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
    logit_scale: float | None = None,
) -> LossSums:
    """Cross-entropy and sparse KL sums over the response tokens of one micro-batch, chunk by chunk.

    Student log q = log_softmax(logits / T) in fp32 over the full vocabulary; CE uses the plain logits (T = 1). The KL
    is the raw divergence at T (see per_token_kl); the caller multiplies it by lambda * T^2 and divides both sums by
    the token counts of the whole optimiser step.

    Args:
        hidden: (N, H) final hidden states (after the final norm) at the N response positions, any float dtype.
        weight: (V, H) output embedding (lm_head) weight, frozen.
        labels: (N,) long, the next token to predict at each position. Every entry is a real token (no ignore index):
            select the response positions before calling.
        bias: (V,) lm_head bias, if the model has one.
        teacher_ids: (N, k) long, teacher top-k ids, most likely first, distinct within a row, valid ids even in rows
            that kd_mask switches off.
        teacher_logprobs: (N, k) float (fp16 fine), teacher log-probs of those ids (full-vocabulary softmax at T).
        kd_mask: (N,) bool, which tokens get the KL term; None = all. Passing it on the CPU lets n_kd_tokens be
            counted without a device sync.
        temperature: T, applied to the student logits for the KL term only.
        kl: one of KL_KINDS.
        chunk_size: tokens per chunk; only one chunk's (chunk, V) fp32 logits (and their few same-size temporaries)
            exist at a time, in the forward and in the backward.
        logit_softcap: if set, logits = softcap * tanh(logits / softcap) (gemma-style), after the bias and the scale
            and before everything else.
        logit_scale: if set, logits = (hidden @ weight.T + bias) * logit_scale, before the softcap (Granite:
            1 / logits_scaling, Cohere: logit_scale).

    Returns:
        LossSums with fp32 scalar sums (fp64 if hidden is fp64) connected to the autograd graph of hidden.
    """
    if kl not in KL_KINDS:
        raise ValueError(f"unknown kl kind {kl!r}; expected one of {KL_KINDS}")
    if (teacher_ids is None) != (teacher_logprobs is None):
        raise ValueError("teacher_ids and teacher_logprobs must be given together")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    n_tokens = hidden.shape[0]
    has_teacher = teacher_ids is not None
    if not has_teacher:
        n_kd_tokens = 0
    elif kd_mask is None:
        n_kd_tokens = n_tokens
    else:
        n_kd_tokens = int(kd_mask.sum())  # a host sync only if kd_mask lives on an accelerator

    # fp32 at least; fp64 inputs stay fp64 so tests can compare against an exact reference.
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    # [zero-token note] N == 0 is known from the shape (no host sync). The sum over an empty slice is exactly 0 (even
    # if hidden holds inf) and is still part of hidden's graph, so the caller's .backward() works on a micro-batch
    # without response tokens, and the "no teacher" KL can be added to the loss like any other.
    zero = hidden[:0].sum().to(dtype)
    if n_tokens == 0:
        return LossSums(ce=zero, kl=zero.clone(), n_tokens=0, n_kd_tokens=0)

    device = hidden.device
    labels = labels.to(device)
    if has_teacher:
        teacher_ids = teacher_ids.to(device)
        teacher_logprobs = teacher_logprobs.to(device)
    if kd_mask is not None:
        kd_mask = kd_mask.to(device=device, dtype=torch.bool)

    # [chunk checkpoint note] Autograd keeps what each chunk's backward needs: without checkpointing that is every
    # chunk's (chunk, V) logits, i.e. the full-vocabulary block for all N tokens, the thing chunking is meant to
    # avoid. Checkpointing keeps only the chunk's inputs and recomputes its logits during backward, one chunk at a
    # time. No random ops inside, so there is no RNG state to preserve.
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )

    ce_total: Tensor | None = None
    kl_total: Tensor | None = None
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        args = (
            hidden[start:end],
            weight,
            bias,
            labels[start:end],
            teacher_ids[start:end] if has_teacher else None,
            teacher_logprobs[start:end] if has_teacher else None,
            kd_mask[start:end] if kd_mask is not None else None,
            temperature,
            kl,
            logit_softcap,
            dtype,
            logit_scale,
        )
        if needs_grad:
            ce, kl_sum = checkpoint(_chunk_losses, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            ce, kl_sum = _chunk_losses(*args)
        ce_total = ce if ce_total is None else ce_total + ce
        if kl_sum is not None:
            kl_total = kl_sum if kl_total is None else kl_total + kl_sum
    assert ce_total is not None  # n_tokens > 0, so the loop ran at least once
    return LossSums(ce=ce_total, kl=zero if kl_total is None else kl_total, n_tokens=n_tokens, n_kd_tokens=n_kd_tokens)


@torch.no_grad()
def topk_logprobs(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
    logit_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher side (used by cache-teacher, no grad): top-k ids and log-probs under log_softmax(logits / T).

    Args:
        hidden: (N, H) final hidden states of the teacher at the positions to cache, any float dtype.
        weight: (V, H) lm_head weight.
        k: how many ids to keep per token (clamped to V).
        bias: (V,) lm_head bias, if any.
        temperature: T of the cached distribution; the student's KL must use the same T.
        chunk_size: tokens per chunk; one chunk's (chunk, V) fp32 block at a time.
        logit_softcap, logit_scale: as in response_losses.

    Returns:
        (ids, logprobs): (N, k) long and (N, k) fp32, most likely first, computed chunk by chunk.
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    k = min(k, vocab)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    ids_chunks, lp_chunks = [], []
    for start in range(0, n_tokens, chunk_size):
        h = hidden[start : start + chunk_size]
        logits = _logits(h, weight, bias, logit_softcap, dtype, logit_scale)  # (n, V)
        logprobs = torch.log_softmax(logits / temperature, dim=-1)  # (n, V)
        values, ids = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
        ids_chunks.append(ids)
        lp_chunks.append(values.float())
    if not ids_chunks:
        empty = torch.empty(0, k, device=hidden.device)
        return empty.long(), empty.float()
    return torch.cat(ids_chunks), torch.cat(lp_chunks)


@torch.no_grad()
def full_kl_and_agreement(
    h_base: Tensor,
    h_tuned: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
    logit_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """KL(base || tuned) over the whole vocabulary, and top-1 agreement, summed over N tokens (no grad).

    Both hidden-state sets go through the same output head (the same model with its adapter off and on), so
    this needs no cached targets: per token, with p = softmax(base logits / T) and q = softmax(tuned logits / T),

        KL_t = sum_v p_v (log p_v - log q_v)          agree_t = [argmax_v p_v == argmax_v q_v]

    Args:
        h_base: (N, H) final hidden states of the base model at the N positions to score, any float dtype.
        h_tuned: (N, H) the tuned model's at the same positions.
        weight: (V, H) lm_head weight, shared by both.
        bias: (V,) lm_head bias, if any.
        temperature: T of both distributions (1: the models as they are); argmax does not depend on it.
        chunk_size: tokens per chunk; only one chunk's two (chunk, V) fp32 log-prob blocks (and a few same-size
            temporaries) exist at a time.
        logit_softcap, logit_scale: as in response_losses.

    Returns:
        (kl_sum, n_agree): an fp32 scalar (fp64 if the hidden states are) and a long scalar, on the device of
        the hidden states; no host sync here.
    """
    if h_base.shape != h_tuned.shape:
        raise ValueError(f"h_base {tuple(h_base.shape)} and h_tuned {tuple(h_tuned.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.promote_types(torch.promote_types(h_base.dtype, h_tuned.dtype), torch.float32)
    kl_sum = torch.zeros((), dtype=dtype, device=h_base.device)
    n_agree = torch.zeros((), dtype=torch.long, device=h_base.device)
    for start in range(0, h_base.shape[0], chunk_size):
        end = start + chunk_size
        base = _logits(h_base[start:end], weight, bias, logit_softcap, dtype, logit_scale)  # (n, V)
        tuned = _logits(h_tuned[start:end], weight, bias, logit_softcap, dtype, logit_scale)  # (n, V)
        n_agree += (base.argmax(-1) == tuned.argmax(-1)).sum()
        log_p = torch.log_softmax(base / temperature if temperature != 1.0 else base, dim=-1)  # (n, V)
        log_q = torch.log_softmax(tuned / temperature if temperature != 1.0 else tuned, dim=-1)  # (n, V)
        del base, tuned
        # 0 log 0 = 0: a token the base gives no mass contributes nothing, whatever the tuned model gives it (its
        # log-ratio may be -inf - -inf = NaN there).
        diff = (log_p - log_q).masked_fill_(log_p == float("-inf"), 0.0)
        kl_sum += (log_p.exp() * diff).sum()
    return kl_sum, n_agree


def l2_penalty(params: Iterable[Tensor]) -> Tensor:
    """Sum of squared entries of every tensor in `params`, an fp32 scalar (the mu * sum ||LoRA params||^2 term).

    Args:
        params: tensors of any shape and float dtype (e.g. the trainable LoRA A and B matrices).

    Returns:
        () fp32 scalar connected to the graph of params; a CPU zero when params is empty.
    """
    total: Tensor | None = None
    for p in params:
        sq = p.float().pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total


__all__ = [
    "KL_KINDS",
    "REVERSE_RESIDUAL_FLOOR",
    "TEACHER_LOGPROB_FLOOR",
    "LossSums",
    "full_kl_and_agreement",
    "head_logits",
    "l2_penalty",
    "per_token_kl",
    "response_losses",
    "topk_logprobs",
]
