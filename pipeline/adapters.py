"""A trained LoRA adapter on disk: load it onto a base model, save it crash-safely."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.faults import crash_point
from pipeline.fileio import atomic_dir


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
