"""Right-padded batches, and grouping examples of similar length so that little of a batch is padding.

    Batch        tokenised input examples: what the teacher pass of cache-teacher runs on
    TrainBatch   cached rows with the teacher's targets: what train and evaluate run on

Both are padded by `right_pad`, the one place that says how: token ids padded with the tokenizer's pad id,
attention 1 on real tokens, the loss mask true on response tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache.schema import CachedRow
from pipeline.inputs import Tokenized


def right_pad(sequences: Sequence[tuple[Sequence[int], Sequence[bool]]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, loss mask) pairs as (B, T) tensors: ids (int64, padded with pad_id), attention mask (int64, 1 on
    real tokens) and loss mask (bool), T the longest sequence."""
    width = max(len(ids) for ids, _ in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    att = np.zeros((len(sequences), width), dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=bool)
    for i, (seq, seq_mask) in enumerate(sequences):
        n = len(seq)
        ids[i, :n], att[i, :n], mask[i, :n] = seq, 1, seq_mask
    return torch.from_numpy(ids), torch.from_numpy(att), torch.from_numpy(mask)


@dataclass
class Batch:
    """Tokenised examples, right-padded. Shapes: (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))


def collate(rows: Sequence[Tokenized], pad_id: int) -> Batch:
    """Right-pad tokenised examples into one batch."""
    return Batch(*right_pad([(r.input_ids, r.loss_mask) for r in rows], pad_id))


@dataclass
class TrainBatch:
    """Cached rows, right-padded: (B, T) tensors, and (N, k) teacher targets for the N response tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    is_rehearsal: torch.Tensor  # (N,) bool: the token belongs to a rehearsal example
    n_rehearsal_examples: int

    @property
    def n_tokens(self) -> int:
        """Response tokens (N)."""
        return int(self.is_rehearsal.shape[0])

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask,
                                                    self.teacher_ids, self.teacher_logprobs, self.is_rehearsal)),
                          self.n_rehearsal_examples)


def collate_rows(rows: Sequence[CachedRow], pad_id: int) -> TrainBatch:
    """Right-pad cached rows into a batch; teacher targets concatenated in row-major response order."""
    ids, att, mask = right_pad([(r.input_ids, r.loss_mask) for r in rows], pad_id)
    reh = np.concatenate([np.full(int(r.loss_mask.sum()), r.role == "rehearsal") for r in rows])
    return TrainBatch(ids, att, mask,
                      torch.from_numpy(np.concatenate([r.target_ids for r in rows])),
                      torch.from_numpy(np.concatenate([r.target_logprobs for r in rows])),
                      torch.from_numpy(reh), sum(r.role == "rehearsal" for r in rows))


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, ties by index) to keep padding low."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_waste(batches: Iterable[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions over all (B x T_max) positions of the given batches."""
    total = real = 0
    for b in batches:
        if b:
            total += len(b) * max(lengths[i] for i in b)
            real += sum(lengths[i] for i in b)
    return 1 - real / total if total else 0.0
