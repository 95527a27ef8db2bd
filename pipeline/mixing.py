"""Rehearsal mixing: which examples each optimiser step trains on.

Every step draws `rehearsal_count` rehearsal (general) examples and the rest from the task, each from an
endless, seeded, shuffled stream over the cache (`RowStream`). The schedule and the order are functions of
(seed, step) and the streams' positions, so a resumed run and every process of a distributed run draw the
same examples as an uninterrupted single-process run (docs/design.md, "Rehearsal mixing").
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from pipeline.cache.read import Cache, MemoryRows
from pipeline.cache.schema import CachedRow
from pipeline.errors import PipelineError


def rehearsal_total(ratio: float, n_examples: int, steps: int) -> int:
    """Rehearsal examples in the first `steps` optimiser steps of n_examples each: round(ratio * n * steps).

    [exact ratio note] The product is taken as a fraction of the ratio's decimal text (Fraction("0.3") is
    exactly 3/10, where the float 0.3 is 0.29999999999999998...), and a half rounds up: 0.3 * 5 * 1 = 1.5 -> 2.
    Float arithmetic would put some exact halves on either side of .5 depending on the step, and the
    per-step counts of two processes or of a resumed run could then differ from one machine to another.
    """
    exact = Fraction(repr(float(ratio))) * n_examples * steps
    return math.floor(exact + Fraction(1, 2))


def rehearsal_count(ratio: float, n_examples: int, step: int) -> int:
    """Rehearsal examples in optimiser step `step` (1-based): rehearsal_total(step) - rehearsal_total(step - 1).

    The remainder is carried from step to step without any state: over any run of s steps the count is
    round(ratio * n * s), within half a row of the ratio, and every step is within one row of ratio * n
    (0.3 at n = 8 gives 2, 3, 2, 3, 2, 2, 3, ... = 30%, where rounding each step alone gave 2 = 25%).
    Being a function of the step alone, it is the same after --resume and on every process.
    """
    return rehearsal_total(ratio, n_examples, step) - rehearsal_total(ratio, n_examples, step - 1)


def draw_step(task, rehearsal, n_examples: int, ratio: float, seed: int, step: int) -> list:
    """The examples of one optimiser step: rehearsal_count(...) from `rehearsal`, the rest from `task`.

    Both streams are endless, seeded and independently shuffled (`RowStream`); the mixed list is
    shuffled with a generator seeded by (seed, step), so the order needs no state to resume.
    """
    n_rehearsal = rehearsal_count(ratio, n_examples, step)
    rows = task.take(n_examples - n_rehearsal) + (rehearsal.take(n_rehearsal) if n_rehearsal else [])
    order = np.random.default_rng([seed, step]).permutation(len(rows))
    return [rows[i] for i in order]


class RowStream:
    """An endless, seeded, shuffled stream over the rows of one part of a cache.

    Each epoch permutes the row groups, then shuffles rows within windows of `window` consecutive row
    groups (a window is decoded at a time, so memory stays bounded). The state is (epoch, position),
    so a resumed run continues exactly where the checkpoint was taken.
    """

    def __init__(self, cache: Cache | MemoryRows, role: str, split: str, seed: int, window: int = 8):
        self.cache, self.role, self.seed, self.window = cache, role, seed, window
        self.groups = cache.row_groups(role, split)
        self.size = sum(n for _, _, n in self.groups)
        self.epoch, self.pos = 0, 0
        self._order: list[tuple[int, int]] = []
        self._order_epoch = -1

    def _epoch_order(self) -> list[tuple[int, int]]:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, 0 if self.role == "task" else 1, self.epoch])
            perm = rng.permutation(len(self.groups))
            order: list[tuple[int, int]] = []
            for start in range(0, len(perm), self.window):
                window = [(int(g), r) for g in perm[start:start + self.window] for r in range(self.groups[g][2])]
                order += [window[i] for i in rng.permutation(len(window))]
            self._order, self._order_epoch = order, self.epoch
        return self._order

    def take(self, n: int) -> list[CachedRow]:
        if n and not self.size:
            raise PipelineError(f"{self.cache.path}: no {self.role} training rows in the cache")
        out = []
        while len(out) < n:
            order = self._epoch_order()
            g, r = order[self.pos]
            name, group, _ = self.groups[g]
            out.append(self.cache.read_group(name, group, keep=2 * self.window)[r])
            self.pos += 1
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
