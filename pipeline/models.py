"""Load the base model in 4 bit (NF4, double quantisation), frozen, and attach a trainable LoRA adapter (QLoRA).

[same numeric path note] The teacher (cache-teacher) and the student (train) call the same `load_model`
(unquantised weights in the same dtype, see device.weights_dtype) and the same forward pass (forward.py).
LoRA's B matrix starts at zero, so the student at step 0 computes exactly what the teacher computed, and the
KL at step 0 is ~0 up to batch-shape rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.adapters import load_adapter
from pipeline.device import check_attn, resolve_runtime, weights_dtype
from pipeline.errors import PipelineError
from pipeline.model_source import ModelSource, quiet_transformers


def quantization_settings(precision: str) -> dict:
    """What goes into BitsAndBytesConfig, also recorded in the cache manifest."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")}


def load_model(model_dir: Path, device: torch.device, precision: str, *, quantize: bool = True,
               attn: str = "sdpa"):
    """Load a causal LM: frozen, eval mode, 4-bit NF4 with double quantisation unless quantize=False.

    Unquantised parameters (embeddings, norms, output head) are loaded in `weights_dtype(...)`; the
    4-bit matmuls compute in bf16 (fp16) when `precision` is bf16 (fp16). Used for the teacher and the student
    alike (see the module note).

    Args:
        attn: transformers' attn_implementation (config.ATTN_IMPLEMENTATIONS); it can change the numbers
            slightly, so cache-teacher records it.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_transformers()
    check_attn(attn, device)
    kwargs: dict = {"dtype": weights_dtype(precision, device), "attn_implementation": attn,
                    "device_map": {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}}
    if quantize:
        q = quantization_settings(precision)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            **{**q, "bnb_4bit_compute_dtype": getattr(torch, q["bnb_4bit_compute_dtype"])})
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        said = " ".join(str(e).split())
        if "does not support an attention implementation" in said:  # transformers' own refusal, e.g. Gemma 2's sdpa
            what = said.split(" through ")[0].split(" yet.")[0]  # "Gemma2ForCausalLM does not support an attention ..."
            raise PipelineError(f"--attn {attn}: {what}; use --attn eager") from e
        raise PipelineError(f"{model_dir}: cannot load model: {said[:300]}") from e
    if quantize:
        _disable_cpu_weight_repacking(model)
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def _disable_cpu_weight_repacking(model) -> None:
    """[cpu repacking note] On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place the
    first time it runs in eval mode without grad, and from then on uses another kernel - also in training,
    where that kernel has no backward. Teacher and student would then compute differently (measured on
    SmolLM2-135M: KL 0.001 per token between the two kernels) and a student evaluated mid-run would lose
    gradients through the frozen weights. One kernel for everything: never repack.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model, *, r: int, alpha: float, dropout: float, target_modules: str, gradient_checkpointing: bool):
    """Wrap a 4-bit model in a trainable PEFT LoRA adapter (QLoRA).

    [no upcast note] peft's prepare_model_for_kbit_training is not used: it casts every bf16 parameter to fp32,
    which would undo `weights_dtype` for the student alone (2 GB more for an 8B model's embeddings and head)
    and make it compute differently from the teacher that wrote the cache. What else it does is done here:
    freeze the base and turn on non-reentrant gradient checkpointing (which needs no input-grad hook).
    """
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets: str | list[str] = target_modules
    if target_modules != "all-linear":
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        if "ParamWrapper does not work with lora_dropout" in str(e):  # peft's own limit
            raise PipelineError(
                f"lora_dropout={dropout}: peft adapts the experts of a mixture-of-experts model (stacked 3-D "
                "parameters, not linear layers) only without dropout; pass --lora-dropout 0, or name the attention "
                "projections alone in --lora-target-modules") from e
        raise PipelineError(f"lora_target_modules={target_modules!r}: {e}") from e
    if dropout > 0 and next(model.parameters()).device.type == "cpu":
        for module in model.modules():
            drops = getattr(module, "lora_dropout", None)
            if isinstance(drops, torch.nn.ModuleDict):
                for name, drop in drops.items():
                    if isinstance(drop, torch.nn.Dropout):
                        drops[name] = RandDropout(drop.p)
    return model


class RandDropout(torch.nn.Module):
    """Inverted dropout, as nn.Dropout, with the keep-mask cut from 64-bit random integers.

    [cpu dropout note] On CPU the random numbers are the cost: nn.Dropout's bernoulli_ took 22% of a
    SmolLM2-135M training step (210 LoRA layers drop their inputs, twice with gradient checkpointing), and
    torch.rand still 18%. One random int64 gives four uniform 16-bit lanes, each compared with
    round(p * 65536): 3.0 ms instead of nn.Dropout's 7.5 ms for an fp32 (8, 110, 1536) input on 2 cores.
    Each element is kept with probability 1 - p' and scaled by 1 / (1 - p'), p' = round(p * 65536) / 65536
    (|p' - p| <= 7.6e-6).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.cut = round(p * 65536)  # drop a lane whose unsigned 16-bit value is below this
        self.scale = 65536 / (65536 - self.cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        lanes = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
        keep = lanes >= self.cut - 32768
        return x * (keep.to(x.dtype) * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def base_of(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def load_for_inference(source: ModelSource, device_name: str, precision_name: str, adapter: str | None = None,
                       attn: str = "sdpa"):
    """(model, device, precision) for generation/evaluation: the 4-bit base, plus the adapter if given."""
    device, precision = resolve_runtime(device_name, precision_name, attn)
    model = load_model(source.path, device, precision, attn=attn)
    if adapter:
        model = load_adapter(model, adapter)
    return model, device, precision
