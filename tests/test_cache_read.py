"""pipeline/cache/read.py: opening a cache for training refuses one made by another model or with other settings,
and a shard whose checksum differs from the manifest."""

from __future__ import annotations

import json

import pytest

from pipeline.cache.schema import MANIFEST
from pipeline.errors import PipelineError
from pipeline.tiny import build_tiny_model_dir
from pipeline.train import setup
from tests.helpers import (
    QUIET,
    cfg_for,
)


def test_cache_from_other_model_and_bad_checksum_refused(tiny_model_dir, tiny_cache, tmp_path):
    other = build_tiny_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(PipelineError, match=r"teacher\.fingerprint differs: cache has [0-9a-f]{12}…, asked for"):
        setup(cfg_for(other, tiny_cache, tmp_path / "o"), **QUIET)
    with pytest.raises(PipelineError, match=r"top_k differs: cache has 8, asked for 4"):
        setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "o", top_k=4), **QUIET)

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_cache, broken)
    shard = broken / json.loads((broken / MANIFEST).read_text())["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=rf"{shard.name}: checksum differs"):
        setup(cfg_for(tiny_model_dir, broken, tmp_path / "o3"), **QUIET)
