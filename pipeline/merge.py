"""`pipeline merge`: fold a trained adapter into a full-precision copy of the base, as a plain HF model."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.adapters import load_adapter
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_dir
from pipeline.model_source import open_model_source, quiet_transformers


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
