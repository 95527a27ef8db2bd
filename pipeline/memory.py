"""What a loaded model occupies: its 4-bit weights, the other frozen weights, LoRA and the optimiser's state."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
