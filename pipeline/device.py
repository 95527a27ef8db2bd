"""Where and how the model computes: the device, the precision of the matmuls, the attention implementation.

Every command that loads a model resolves these three settings through `resolve_runtime`, so `auto` means
the same thing everywhere and an attention implementation that cannot run here is refused before any
weight is read.
"""

from __future__ import annotations

import importlib.util

import torch

from pipeline import distributed
from pipeline.errors import PipelineError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device is available")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # AVX512-BF16 / AMX: oneDNN runs bf16 matmuls natively
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


# The dtype the 4-bit matmuls (and, on CUDA, autocast) compute in, per --precision. [fp16 note] fp16 is for GPUs
# without bf16 (T4, V100): the 4-bit matmuls, autocast and on CUDA the unquantised weights in fp16; the logits are
# upcast to fp32 per chunk and every loss, log-prob and KL is computed in fp32 as for bf16 (losses.py). The
# bitsandbytes CPU kernel computes in fp16 too (it dequantises and runs an fp16 matmul), so fp16 is not refused on
# CPU: tests/test_architectures.py trains, resumes and checks the step-0 KL with it there. No loss scaling: the
# LoRA weights and their gradients stay fp32, the activations' gradients pass through fp16 matmuls.
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def weights_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the unquantised weights (embeddings, norms, output head): on CUDA the compute dtype, as HF
    QLoRA loads them (most checkpoints are stored in bf16, so nothing is lost; an 8B model's embeddings and head
    take 2 GB instead of 4); fp32 on CPU.

    [fp32 weights on cpu note] bf16 weights do not slow the CPU path (SmolLM2-135M, batch 8, 2 shared cores:
    a train step 135 s against 145 s with fp32 weights, interleaved), but they break step 0: the cache and the
    training batches differ in shape, the attention and matmul kernels then round differently, and with a bf16
    residual stream and bf16 logits those differences no longer vanish. Step-0 KL against the cache on the
    built-in model (12 demo notes + 4 general rows, batch 4): 1.8e-4 per token with bf16 weights (1.2e-4 with
    the logits in fp32), 4.9e-6 with fp32 weights; the bound is 1e-4. On CUDA the same check is still to be
    run.
    """
    if device.type != "cuda":
        return torch.float32
    return COMPUTE_DTYPES.get(precision, torch.float32)


def check_attn(attn: str, device: torch.device) -> None:
    """Refuse an attention implementation that cannot run here, in one line, before any weight is read."""
    if attn != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise PipelineError("--attn flash_attention_2: the flash-attn package is not installed (pip install "
                            "flash-attn; it needs a CUDA GPU); use --attn sdpa")
    if device.type != "cuda":
        raise PipelineError(f"--attn flash_attention_2 runs on CUDA only, not on {device.type}; use --attn sdpa")


def autocast(device: torch.device, precision: str):
    """bf16 (fp16) autocast on CUDA when precision is bf16 (fp16); off on CPU.

    [cpu autocast note] On CPU the 4-bit matmuls already compute in bf16 (bnb_4bit_compute_dtype) and the rest
    (attention, norms, LoRA) is cheap: autocasting it too gave no measurable speed-up on SmolLM2-135M
    (8.0 vs 8.3 s per step) but doubled the largest top-5 log-prob difference to an fp32-compute
    recomputation (0.36 -> 0.89).
    """
    return torch.autocast(device.type, dtype=COMPUTE_DTYPES.get(precision, torch.float32),
                          enabled=precision in ("bf16", "fp16") and device.type == "cuda")


def resolve_runtime(device: str, precision: str, attn: str) -> tuple[torch.device, str]:
    """The device and precision a command computes in, from its --device, --precision and --attn settings.

    Under torchrun each process takes its own GPU (distributed.place). Raises PipelineError for a device or an
    attention implementation that is not available here, before any model is loaded.
    """
    where = distributed.place(resolve_device(device))
    check_attn(attn, where)
    return where, resolve_precision(precision, where)
