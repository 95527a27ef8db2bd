"""Tests for pipeline.losses: chunked == unchunked == a dense full-vocabulary reference, hand-computed values,
gradients, edge cases (no tokens, everything masked, fp16 teacher), the teacher-side top-k, the full-vocabulary
KL and top-1 agreement that evaluate scores forgetting with, and the L2 penalty.

The reference below (with reference_token_kl in tests/helpers.py) is written the obvious way on purpose (full
logits, full log-softmax, a Python loop over tokens and buckets, residual mass as a plain sum of probabilities,
float64) and shares no helper with the module under test.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import losses
from pipeline.losses import (
    KL_KINDS,
    full_kl_and_agreement,
    l2_penalty,
    response_losses,
    topk_logprobs,
)
from tests.helpers import reference_token_kl

N, V, H, K = 13, 64, 16, 5  # 13 tokens: not a multiple of the chunk sizes 3 and 7, so the last chunk is partial
CHUNK_SIZES = (3, 7, 1024)  # 1024 >= N: the unchunked case


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------- dense reference


def dense_reference(
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
    logit_softcap: float | None = None,
    round_logits_to: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(ce_sum, kl_sum) in float64 from the full (N, V) logits at once, their product rounded to `round_logits_to`
    first if given (what a low-precision matmul returns)."""
    logits = hidden.double() @ weight.double().T
    if round_logits_to is not None:
        logits = logits.to(round_logits_to).double()
    if bias is not None:
        logits = logits + bias.double()
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    ce = F.cross_entropy(logits, labels, reduction="sum")
    total = logits.new_zeros(())
    if teacher_ids is None or teacher_logprobs is None:
        return ce, total
    logq = torch.log_softmax(logits / temperature, dim=-1)
    for t in range(hidden.shape[0]):
        if kd_mask is None or kd_mask[t]:
            total = total + reference_token_kl(logq[t], teacher_ids[t].tolist(), teacher_logprobs[t], kl)
    return ce, total


def make_problem(
    n: int = N, vocab: int = V, dim: int = H, k: int = K, temperature: float = 1.0, bias: bool = False
) -> dict[str, Tensor | None]:
    """Random student hidden states / lm_head and a teacher's top-k at temperature T (fp32)."""
    hidden = torch.randn(n, dim)
    weight = torch.randn(vocab, dim) / dim**0.5 * 3  # logits of order a few units: a peaked-ish distribution
    teacher_full = torch.log_softmax(torch.randn(n, vocab) * 3 / temperature, dim=-1)
    teacher_logprobs, teacher_ids = teacher_full.topk(k, dim=-1)
    return {
        "hidden": hidden,
        "weight": weight,
        "labels": torch.randint(0, vocab, (n,)),
        "bias": torch.randn(vocab) if bias else None,
        "teacher_ids": teacher_ids,
        "teacher_logprobs": teacher_logprobs,
        "teacher_full": teacher_full,
    }


def loss_kwargs(prob: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    return {key: prob[key] for key in ("bias", "teacher_ids", "teacher_logprobs")}


# ------------------------------------------------------------------------------------- chunked == unchunked == dense


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_unchunked_equals_dense(kind: str, temperature: float, masked: bool, bias: bool) -> None:
    prob = make_problem(temperature=temperature, bias=bias)
    kd_mask = torch.rand(N) < 0.6 if masked else None
    hidden = prob["hidden"].clone().requires_grad_(True)  # grad on: exercises the checkpointed path
    kwargs = {**loss_kwargs(prob), "kd_mask": kd_mask, "temperature": temperature, "kl": kind}
    ref_ce, ref_kl = dense_reference(hidden.detach(), prob["weight"], prob["labels"], **kwargs)
    assert ref_kl.item() > 0.05  # the comparison is about a real, non-trivial number

    results = {}
    for chunk_size in CHUNK_SIZES:
        out = response_losses(hidden, prob["weight"], prob["labels"], **kwargs, chunk_size=chunk_size)
        assert out.ce.dtype == torch.float32 and out.kl.dtype == torch.float32
        assert out.n_tokens == N
        assert out.n_kd_tokens == (int(kd_mask.sum()) if masked else N)
        torch.testing.assert_close(out.ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.kl.double(), ref_kl, rtol=1e-5, atol=1e-5)
        results[chunk_size] = out

    unchunked = results[CHUNK_SIZES[-1]]
    for chunk_size in CHUNK_SIZES[:-1]:
        torch.testing.assert_close(results[chunk_size].ce, unchunked.ce, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(results[chunk_size].kl, unchunked.kl, rtol=1e-6, atol=1e-6)

    with torch.no_grad():  # the plain (not checkpointed) path gives the same numbers
        plain = response_losses(hidden, prob["weight"], prob["labels"], **kwargs, chunk_size=3)
    torch.testing.assert_close(plain.ce, results[3].ce, rtol=0, atol=0)
    torch.testing.assert_close(plain.kl, results[3].kl, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_logit_softcap_matches_dense(kind: str) -> None:
    prob = make_problem(temperature=2.0, bias=True)
    kwargs = {**loss_kwargs(prob), "temperature": 2.0, "kl": kind, "logit_softcap": 3.0}
    ref_ce, ref_kl = dense_reference(prob["hidden"], prob["weight"], prob["labels"], **kwargs)
    out = response_losses(prob["hidden"], prob["weight"], prob["labels"], **kwargs, chunk_size=4)
    torch.testing.assert_close(out.ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl.double(), ref_kl, rtol=1e-5, atol=1e-5)
    # The cap really changes the numbers (logits reach beyond 3 here), so the test above is not vacuous.
    uncapped = response_losses(prob["hidden"], prob["weight"], prob["labels"], **loss_kwargs(prob), kl=kind)
    assert abs(uncapped.ce.item() - out.ce.item()) > 1e-2


def test_no_teacher_gives_ce_only() -> None:
    prob = make_problem()
    hidden = prob["hidden"].clone().requires_grad_(True)
    out = response_losses(hidden, prob["weight"], prob["labels"], chunk_size=4)
    ref_ce, _ = dense_reference(hidden.detach(), prob["weight"], prob["labels"])
    torch.testing.assert_close(out.ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
    assert out.kl.item() == 0.0 and out.n_kd_tokens == 0 and out.n_tokens == N
    (out.ce + 0.5 * out.kl).backward()  # the zero KL is part of the graph: adding it is harmless
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


# ------------------------------------------------------------------------------------------- exact / hand values


@pytest.mark.parametrize("kind", KL_KINDS)
def test_full_vocabulary_topk_equals_exact_kl(kind: str) -> None:
    """With k == V the k+1 buckets are the whole distribution: the sparse KL is the exact KL."""
    prob = make_problem(k=V, temperature=2.0)
    teacher_full = prob["teacher_full"]
    ids = teacher_full.argsort(dim=-1, descending=True)  # (N, V), a full permutation per token
    lp = teacher_full.gather(-1, ids)
    out = response_losses(prob["hidden"], prob["weight"], prob["labels"], teacher_ids=ids, teacher_logprobs=lp,
                          temperature=2.0, kl=kind, chunk_size=4)
    logq = torch.log_softmax(prob["hidden"].double() @ prob["weight"].double().T / 2.0, dim=-1)
    logp = teacher_full.double()
    if kind == "reverse":
        exact = F.kl_div(logp, logq, log_target=True, reduction="sum")  # sum_v q_v (log q_v - log p_v)
    else:  # forward; topk_renorm over the whole vocabulary renormalises nothing
        exact = F.kl_div(logq, logp, log_target=True, reduction="sum")  # sum_v p_v (log p_v - log q_v)
    assert exact.item() > 0.1
    torch.testing.assert_close(out.kl.double(), exact, rtol=1e-5, atol=1e-5)


def _one_token(student_probs: list[float], teacher_ids: list[int], teacher_probs: list[float], kind: str):
    """One token whose student distribution is exactly student_probs: weight = I, hidden = log(probs)."""
    vocab = len(student_probs)
    hidden = torch.tensor([student_probs], dtype=torch.float64).log()  # (1, V): logits = log q, softmax = q
    return response_losses(
        hidden,
        torch.eye(vocab, dtype=torch.float64),
        torch.tensor([0]),
        teacher_ids=torch.tensor([teacher_ids]),
        teacher_logprobs=torch.tensor([teacher_probs], dtype=torch.float64).log(),
        kl=kind,
    )


def test_hand_computed_k1() -> None:
    # Student q = (0.5, 0.3, 0.2). Teacher top-1 = token 0 with p_0 = 0.7, so p_r = 0.3; the student's residual is
    # q_r = q_1 + q_2 = 0.5.
    forward = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)  # 0.235531 - 0.153248 = 0.082283
    reverse = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)  # -0.168236 + 0.255413 = 0.087177
    assert _one_token([0.5, 0.3, 0.2], [0], [0.7], "forward").kl.item() == pytest.approx(forward, abs=1e-12)
    assert _one_token([0.5, 0.3, 0.2], [0], [0.7], "reverse").kl.item() == pytest.approx(reverse, abs=1e-12)
    assert forward == pytest.approx(0.082283, abs=1e-6) and reverse == pytest.approx(0.087177, abs=1e-6)
    # k = 1 renormalised is 1 vs 1: topk_renorm sees nothing.
    assert _one_token([0.5, 0.3, 0.2], [0], [0.7], "topk_renorm").kl.item() == pytest.approx(0.0, abs=1e-12)
    # CE of label 0 is -log q_0 = -log 0.5.
    assert _one_token([0.5, 0.3, 0.2], [0], [0.7], "forward").ce.item() == pytest.approx(math.log(2), abs=1e-12)


def test_hand_computed_k2() -> None:
    # Student q = (0.5, 0.3, 0.2). Teacher top-2 = tokens (1, 0) with p = (0.6, 0.3), so p_r = 0.1; q_r = q_2 = 0.2.
    forward = 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(0.3 / 0.5) + 0.1 * math.log(0.1 / 0.2)
    # = 0.415888 - 0.153248 - 0.069315 = 0.193326
    reverse = 0.3 * math.log(0.3 / 0.6) + 0.5 * math.log(0.5 / 0.3) + 0.2 * math.log(0.2 / 0.1)
    # = -0.207944 + 0.255413 + 0.138629 = 0.186098
    # Renormalised over S = (1, 0): p~ = (2/3, 1/3), q~ = (0.3/0.8, 0.5/0.8) = (0.375, 0.625).
    renorm = 2 / 3 * math.log((2 / 3) / 0.375) + 1 / 3 * math.log((1 / 3) / 0.625)
    # = 0.383576 - 0.209536 = 0.174040
    expected = {"forward": (forward, 0.193326), "reverse": (reverse, 0.186098), "topk_renorm": (renorm, 0.174040)}
    for kind, (exact, by_hand) in expected.items():
        assert exact == pytest.approx(by_hand, abs=1e-6)
        assert _one_token([0.5, 0.3, 0.2], [1, 0], [0.6, 0.3], kind).kl.item() == pytest.approx(exact, abs=1e-12)


# ---------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_dense(kind: str, dtype: torch.dtype) -> None:
    prob = make_problem(temperature=2.0, bias=True)
    kd_mask = torch.rand(N) < 0.6
    hidden = prob["hidden"].to(dtype, copy=True).requires_grad_(True)
    # The lm_head is frozen in training; giving it a gradient here also checks the checkpoint's recomputation.
    weight = prob["weight"].to(dtype, copy=True).requires_grad_(True)

    out = response_losses(
        hidden, weight, prob["labels"], **loss_kwargs(prob), kd_mask=kd_mask, temperature=2.0, kl=kind, chunk_size=3
    )
    (out.ce + 0.7 * out.kl).backward()

    ref_hidden = prob["hidden"].double().requires_grad_(True)
    ref_weight = prob["weight"].double().requires_grad_(True)
    ref_ce, ref_kl = dense_reference(
        ref_hidden, ref_weight, prob["labels"], **loss_kwargs(prob), kd_mask=kd_mask, temperature=2.0, kl=kind
    )
    (ref_ce + 0.7 * ref_kl).backward()

    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert hidden.grad is not None and weight.grad is not None
    assert hidden.grad.abs().max() > 1e-3
    torch.testing.assert_close(hidden.grad.double(), ref_hidden.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad.double(), ref_weight.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_gradcheck(kind: str) -> None:
    """Analytical gradients through the checkpointed chunks equal finite differences (float64)."""
    prob = make_problem(n=5, vocab=12, dim=4, k=3, temperature=2.0, bias=True)
    kd_mask = torch.tensor([True, False, True, True, False])

    def loss(hidden: Tensor) -> Tensor:
        out = response_losses(
            hidden,
            prob["weight"].double(),
            prob["labels"],
            **loss_kwargs(prob),
            kd_mask=kd_mask,
            temperature=2.0,
            kl=kind,
            chunk_size=2,
        )
        return out.ce + out.kl

    assert torch.autograd.gradcheck(loss, (prob["hidden"].double().requires_grad_(True),))


def test_checkpointing_keeps_no_vocabulary_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the checkpointed chunks, autograd saves nothing of vocabulary width; without checkpointing it would."""
    prob = make_problem()

    def saved_vocab_tensors() -> int:
        count = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal count
            count += int(t.dim() >= 1 and t.shape[-1] == V)
            return t

        hidden = prob["hidden"].clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = response_losses(hidden, prob["weight"], prob["labels"], **loss_kwargs(prob), chunk_size=4)
        (out.ce + out.kl).backward()
        return count

    assert saved_vocab_tensors() == 0
    monkeypatch.setattr(losses, "checkpoint", lambda fn, *args, **_: fn(*args))  # control: checkpointing off
    assert saved_vocab_tensors() > 0


# --------------------------------------------------------------------------------------------------- edge cases


def test_zero_tokens() -> None:
    hidden = torch.randn(0, H, requires_grad=True)
    out = response_losses(
        hidden,
        torch.randn(V, H),
        torch.zeros(0, dtype=torch.long),
        teacher_ids=torch.zeros(0, K, dtype=torch.long),
        teacher_logprobs=torch.zeros(0, K),
    )
    assert (out.n_tokens, out.n_kd_tokens) == (0, 0)
    assert out.ce.item() == 0.0 and out.kl.item() == 0.0
    assert out.ce.dtype == torch.float32
    (out.ce + out.kl).backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, H)


def test_all_masked() -> None:
    prob = make_problem()
    # Garbage in the unused teacher rows must not leak into the loss or its gradient.
    teacher_logprobs = torch.full((N, K), float("nan"))
    hidden = prob["hidden"].clone().requires_grad_(True)
    for kind in KL_KINDS:
        hidden.grad = None
        out = response_losses(hidden, prob["weight"], prob["labels"], teacher_ids=prob["teacher_ids"],
                              teacher_logprobs=teacher_logprobs, kd_mask=torch.zeros(N, dtype=torch.bool), kl=kind,
                              chunk_size=4)
        assert out.kl.item() == 0.0 and out.n_kd_tokens == 0 and out.n_tokens == N
        ref_ce, _ = dense_reference(hidden.detach(), prob["weight"], prob["labels"])
        torch.testing.assert_close(out.ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
        (out.ce + out.kl).backward()
        assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("kind", KL_KINDS)
def test_fp16_teacher_with_negative_residual(kind: str) -> None:
    prob = make_problem(n=4, k=2)
    # fp16 rounding of these log-probs makes p_0 + p_1 > 1: the raw residual 1 - sum p is slightly negative.
    teacher_logprobs = torch.tensor([[math.log(0.6), math.log(0.4 + 2e-3)]] * 4, dtype=torch.float16)
    assert 1.0 - teacher_logprobs.float().exp().sum(-1).max().item() < 0
    hidden = prob["hidden"].clone().requires_grad_(True)
    teacher = {"teacher_ids": prob["teacher_ids"], "teacher_logprobs": teacher_logprobs, "kl": kind}
    out = response_losses(hidden, prob["weight"], prob["labels"], **teacher, chunk_size=3)
    assert torch.isfinite(out.kl) and out.kl.item() > 0
    out.kl.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    # Same number as the reference, which clamps the residual at 0 (and floors it for reverse).
    _, ref_kl = dense_reference(hidden.detach(), prob["weight"], prob["labels"], **teacher)
    torch.testing.assert_close(out.kl.double(), ref_kl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_minus_inf_teacher_logprob_stays_finite(kind: str) -> None:
    prob = make_problem(n=4)
    teacher_logprobs = prob["teacher_logprobs"].clone()
    teacher_logprobs[:, -1] = float("-inf")  # e.g. a cache that stored -inf for a token it rounds to p = 0
    hidden = prob["hidden"].clone().requires_grad_(True)
    kwargs = {"teacher_ids": prob["teacher_ids"], "kl": kind, "chunk_size": 3}
    out = response_losses(hidden, prob["weight"], prob["labels"], teacher_logprobs=teacher_logprobs, **kwargs)
    assert torch.isfinite(out.kl)
    out.kl.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    if kind != "reverse":  # p = 0 either way: the same number as a very negative finite log-prob
        teacher_logprobs[:, -1] = -300.0
        finite = response_losses(hidden, prob["weight"], prob["labels"], teacher_logprobs=teacher_logprobs, **kwargs)
        torch.testing.assert_close(out.kl, finite.kl, rtol=0, atol=0)


def test_bf16_hidden_fp32_head_computes_in_fp32() -> None:
    prob = make_problem(temperature=2.0)
    hidden = prob["hidden"].bfloat16().requires_grad_(True)
    out = response_losses(hidden, prob["weight"], prob["labels"], **loss_kwargs(prob), temperature=2.0, chunk_size=4)
    assert out.ce.dtype == torch.float32 and out.kl.dtype == torch.float32
    # Exactly the fp32 maths on the bf16-rounded hidden states (upcasting bf16 -> fp32 is exact).
    ref_ce, ref_kl = dense_reference(
        hidden.detach().float(), prob["weight"], prob["labels"], **loss_kwargs(prob), temperature=2.0
    )
    torch.testing.assert_close(out.ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl.double(), ref_kl, rtol=1e-5, atol=1e-5)
    (out.ce + out.kl).backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KL_KINDS)
def test_bf16_head_matches_dense_within_rounding(kind: str) -> None:
    """A bf16 head computes its logits in bf16 ([low-precision head note]): that rounding is all that separates the
    result from the float64 reference on the same (bf16-valued) inputs, losses and gradients alike.

    Against the exact reference, rounding moves each logit by at most delta = 2^-8 * max|logit|, so every log q (and
    log q_r, and the renormalised log q~) moves by at most 2 * delta / T, and so does each token's CE (T = 1) and
    forward or renormalised KL (p-weighted sums of those). Reverse KL is q-weighted: to first order its change is
    sum_b q_b (1 + log q_b - log p_b) d(log q_b); we allow 4 * delta / T per token. Gradients: relative L2 error below
    2e-2 (measured 2.5e-3 to 3.3e-3). Against the reference that rounds its logits to bf16 too, the losses agree to
    1e-6 (measured 4e-7) and the gradients to 5e-3 (measured 1.7e-3: the gradient itself is bf16, 2^-9 on average).
    """
    temperature = 2.0
    prob = make_problem(temperature=temperature, bias=True)
    kd_mask = torch.rand(N) < 0.6
    hidden16, weight16 = prob["hidden"].bfloat16(), prob["weight"].bfloat16()
    hidden = hidden16.clone().requires_grad_(True)
    kwargs = {**loss_kwargs(prob), "kd_mask": kd_mask, "temperature": temperature, "kl": kind}
    out = response_losses(hidden, weight16, prob["labels"], **kwargs, chunk_size=4)
    (out.ce + 0.7 * out.kl).backward()
    assert out.ce.dtype == torch.float32 and out.kl.dtype == torch.float32
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16

    def reference(round_logits_to: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
        ref_hidden = hidden16.double().requires_grad_(True)
        ref_ce, ref_kl = dense_reference(
            ref_hidden, weight16.double(), prob["labels"], **kwargs, round_logits_to=round_logits_to
        )
        (ref_ce + 0.7 * ref_kl).backward()
        assert ref_hidden.grad is not None
        return ref_ce, ref_kl, ref_hidden.grad

    def grad_error(ref_grad: Tensor) -> float:
        assert hidden.grad is not None
        return ((hidden.grad.double() - ref_grad).norm() / ref_grad.norm()).item()

    ref_ce, ref_kl, ref_grad = reference(None)
    delta = 2**-8 * (hidden16.double() @ weight16.double().T).abs().max().item()
    n_kd = int(kd_mask.sum())
    kl_bound = (4 if kind == "reverse" else 2) * delta / temperature * n_kd
    assert abs(out.ce.item() - ref_ce.item()) <= 2 * delta * N
    assert abs(out.kl.item() - ref_kl.item()) <= kl_bound
    assert 2 * delta * N < 0.05 * ref_ce.item() and kl_bound < 0.5 * ref_kl.item()  # bounds that mean something
    assert grad_error(ref_grad) < 2e-2

    ref_ce, ref_kl, ref_grad = reference(torch.bfloat16)
    torch.testing.assert_close(out.ce.double(), ref_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.kl.double(), ref_kl, rtol=1e-6, atol=1e-6)
    assert grad_error(ref_grad) < 5e-3


def test_bf16_head_is_never_copied_to_fp32() -> None:
    """No op in the forward, the checkpointed recomputation or the backward makes an fp32 tensor as large as the
    (V, H) head; nor does the teacher's top-k. Every aten op is watched through a TorchDispatchMode."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    vocab, dim, chunk = 256, 32, 4  # one chunk's (4, 256) fp32 logits are 1/8 of the head's 256 * 32 entries
    prob = make_problem(vocab=vocab, dim=dim)
    weight = prob["weight"].bfloat16()

    class Watch(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest_fp32 = 0  # entries of the largest fp32 tensor any op returned
            self.grad_mms = 0  # backward matmuls that produce (chunk rows, H) gradients of the hidden states

        def __torch_dispatch__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    if t.dtype == torch.float32:
                        self.largest_fp32 = max(self.largest_fp32, t.numel())
                    self.grad_mms += int(func is torch.ops.aten.mm.default and t.shape[-1] == dim)
            return out

    hidden = prob["hidden"].bfloat16().requires_grad_(True)
    with Watch() as watch:
        out = response_losses(hidden, weight, prob["labels"], **loss_kwargs(prob), chunk_size=chunk)
        (out.ce + out.kl).backward()
        topk_logprobs(hidden.detach(), weight, K, chunk_size=chunk)
    assert watch.grad_mms == math.ceil(N / chunk)  # the watch saw the backward pass too
    assert chunk * vocab <= watch.largest_fp32 < vocab * dim


def test_bad_arguments() -> None:
    prob = make_problem()
    with pytest.raises(ValueError, match="kl kind"):
        response_losses(prob["hidden"], prob["weight"], prob["labels"], **loss_kwargs(prob), kl="jensen")
    with pytest.raises(ValueError, match="together"):
        response_losses(prob["hidden"], prob["weight"], prob["labels"], teacher_ids=prob["teacher_ids"])


# ------------------------------------------------------------------------------------------ teacher top-k and L2


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize(("temperature", "bias", "softcap"), [(1.0, False, None), (2.0, True, 3.0)])
def test_topk_logprobs_matches_dense(chunk_size: int, temperature: float, bias: bool, softcap: float | None) -> None:
    prob = make_problem(bias=bias)
    ids, lp = topk_logprobs(
        prob["hidden"],
        prob["weight"],
        K,
        bias=prob["bias"],
        temperature=temperature,
        chunk_size=chunk_size,
        logit_softcap=softcap,
    )
    logits = prob["hidden"] @ prob["weight"].T
    if bias:
        logits = logits + prob["bias"]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ref_lp, ref_ids = torch.log_softmax(logits / temperature, dim=-1).topk(K, dim=-1)
    assert ids.dtype == torch.long and lp.dtype == torch.float32 and ids.shape == (N, K)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-6)
    assert (lp[:, :-1] >= lp[:, 1:]).all()  # most likely first


def test_topk_logprobs_roundtrip_is_zero_kl() -> None:
    """A student identical to the teacher has zero KL against the teacher's own cache, for every kind."""
    prob = make_problem()
    ids, lp = topk_logprobs(prob["hidden"], prob["weight"], K, temperature=2.0, chunk_size=4)
    for kind in KL_KINDS:
        out = response_losses(prob["hidden"], prob["weight"], prob["labels"], teacher_ids=ids, teacher_logprobs=lp,
                              temperature=2.0, kl=kind)
        assert abs(out.kl.item()) < 1e-5


# ------------------------------------------------------------------------- full-vocabulary KL and top-1 agreement


def dense_full_kl(h_base: Tensor, h_tuned: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                  softcap: float | None) -> tuple[float, int]:
    """(sum of KL(base || tuned), count of equal argmaxes) in float64 from the full (N, V) logits at once."""
    def logits(h: Tensor) -> Tensor:
        z = h.double() @ weight.double().T
        z = z + bias.double() if bias is not None else z
        return softcap * torch.tanh(z / softcap) if softcap is not None else z

    zb, zt = logits(h_base), logits(h_tuned)
    log_p, log_q = F.log_softmax(zb / temperature, dim=-1), F.log_softmax(zt / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")  # sum_v p_v (log p_v - log q_v)
    return kl.item(), int((zb.argmax(-1) == zt.argmax(-1)).sum())


def full_kl_problem(bias: bool = False) -> dict[str, Tensor | None]:
    """Base and tuned hidden states close enough that some tokens' argmax agree and some do not."""
    h_base = torch.randn(N, H, dtype=torch.float64)
    return {"h_base": h_base, "h_tuned": h_base + 0.3 * torch.randn(N, H, dtype=torch.float64),
            "weight": torch.randn(V, H, dtype=torch.float64), "bias": torch.randn(V, dtype=torch.float64) if bias
            else None}


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize(("temperature", "bias", "softcap"), [(1.0, False, None), (2.0, True, 3.0)])
def test_full_kl_matches_dense(chunk_size: int, temperature: float, bias: bool, softcap: float | None) -> None:
    prob = full_kl_problem(bias)
    ref_kl, ref_agree = dense_full_kl(**prob, temperature=temperature, softcap=softcap)
    assert 0 < ref_agree < N and ref_kl > 1e-3  # the problem exercises both outcomes of the agreement count
    kl, agree = full_kl_and_agreement(**prob, temperature=temperature, chunk_size=chunk_size, logit_softcap=softcap)
    assert kl.dtype == torch.float64 and agree.dtype == torch.long
    assert kl.item() == pytest.approx(ref_kl, rel=1e-12) and int(agree) == ref_agree
    # fp32 hidden states compute in fp32 and still match the float64 reference closely.
    kl32, agree32 = full_kl_and_agreement(prob["h_base"].float(), prob["h_tuned"].float(), prob["weight"].float(),
                                          bias=None if prob["bias"] is None else prob["bias"].float(),
                                          temperature=temperature, chunk_size=chunk_size, logit_softcap=softcap)
    assert kl32.dtype == torch.float32 and int(agree32) == ref_agree
    assert kl32.item() == pytest.approx(ref_kl, rel=1e-4)


def test_full_kl_chunked_equals_unchunked_and_never_builds_more_than_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    prob = full_kl_problem(bias=True)
    whole = full_kl_and_agreement(**prob, chunk_size=1024)
    rows_seen: list[int] = []
    real_logits = losses._logits
    monkeypatch.setattr(losses, "_logits", lambda h, *a: rows_seen.append(h.shape[0]) or real_logits(h, *a))
    chunked = full_kl_and_agreement(**prob, chunk_size=4)
    assert chunked[0].item() == pytest.approx(whole[0].item(), rel=1e-12) and int(chunked[1]) == int(whole[1])
    assert max(rows_seen) == 4 and sum(rows_seen) == 2 * N  # base and tuned logits, one chunk of tokens at a time


def test_full_kl_hand_computed() -> None:
    """The identity head makes the hidden states the logits. Token 1: p = (3/4, 1/4), q = (2/3, 1/3), same argmax.
    Token 2: logits (1, 0) against (0, 1): KL = p_0 - p_1 = tanh(1/2), argmaxes differ."""
    h_base = torch.tensor([[math.log(3.0), 0.0], [1.0, 0.0]], dtype=torch.float64)
    h_tuned = torch.tensor([[math.log(2.0), 0.0], [0.0, 1.0]], dtype=torch.float64)
    kl, agree = full_kl_and_agreement(h_base, h_tuned, torch.eye(2, dtype=torch.float64), chunk_size=1)
    expected = 0.75 * math.log(0.75 / (2 / 3)) + 0.25 * math.log(0.25 / (1 / 3)) + math.tanh(0.5)
    assert kl.item() == pytest.approx(expected, rel=1e-12) and int(agree) == 1


def test_full_kl_edge_cases() -> None:
    prob = full_kl_problem()
    same = full_kl_and_agreement(prob["h_base"], prob["h_base"], prob["weight"], chunk_size=5)
    assert same[0].item() == 0.0 and int(same[1]) == N
    empty = full_kl_and_agreement(prob["h_base"][:0], prob["h_tuned"][:0], prob["weight"])
    assert empty[0].item() == 0.0 and int(empty[1]) == 0
    # A token no model can emit (a -inf bias, as padded vocabularies have): 0 log 0 = 0, not NaN.
    bias = torch.zeros(V, dtype=torch.float64)
    bias[3] = float("-inf")
    kl, _ = full_kl_and_agreement(prob["h_base"], prob["h_tuned"], prob["weight"], bias=bias)
    ref_kl, _ = dense_full_kl(prob["h_base"], prob["h_tuned"], prob["weight"], bias.clamp_min(-1e4), 1.0, None)
    assert kl.item() == pytest.approx(ref_kl, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        full_kl_and_agreement(prob["h_base"], prob["h_tuned"][:3], prob["weight"])
    with pytest.raises(ValueError, match="temperature"):
        full_kl_and_agreement(prob["h_base"], prob["h_tuned"], prob["weight"], temperature=0.0)


def test_l2_penalty() -> None:
    """The sum of the squared entries of every tensor, in fp32, against a loop over the entries in float64 and a
    value by hand; its gradient is 2 p."""
    params = [torch.randn(8, 4, requires_grad=True), torch.randn(4, 8).bfloat16(), torch.randn(3)]
    value = l2_penalty(params)
    reference = 0.0
    for p in params:
        for x in p.detach().double().flatten().tolist():
            reference += x * x
    assert value.dtype == torch.float32 and value.shape == ()
    assert value.item() == pytest.approx(reference, rel=1e-6)
    assert reference > 1.0
    assert l2_penalty(iter(params)).item() == value.item()  # train passes a generator
    # By hand: 1 + 4 + 0.25 + 0 from the fp32 matrix, 9 from the bf16 entry (3 and 9 are exact in bf16).
    by_hand = l2_penalty([torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([3.0], dtype=torch.bfloat16)])
    assert by_hand.item() == 14.25
    value.backward()
    torch.testing.assert_close(params[0].grad, 2 * params[0].detach())
    assert l2_penalty([]).item() == 0.0
