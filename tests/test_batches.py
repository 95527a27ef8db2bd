"""pipeline/batches.py: length bucketing and the padding it leaves, by hand."""

from __future__ import annotations

import pytest

from pipeline.batches import length_batches, padding_waste


def test_length_batches_by_hand():
    lengths = [5, 3, 9, 3, 7, 1, 8]
    # Sorted by (length, index): 5:1, 1:3, 3:3, 0:5, 4:7, 6:8, 2:9, then cut into threes.
    assert length_batches(lengths, 3) == [[5, 1, 3], [0, 4, 6], [2]]
    # Padded positions: batch 1 is 3 x 3 for 7 real tokens, batch 2 3 x 8 for 20, batch 3 1 x 9 for 9.
    assert padding_waste(length_batches(lengths, 3), lengths) == pytest.approx(1 - 36 / 42)
    assert padding_waste([[0, 1, 2], [3, 4, 5], [6]], lengths) == pytest.approx(1 - 36 / (27 + 21 + 8))
