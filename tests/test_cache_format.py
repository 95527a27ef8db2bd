"""Issue 17, item 6: a cache is plain Parquet that other tools read as documented (DESIGN.md section 4), with no
code from this package: pyarrow, and `datasets.load_dataset("parquet", data_files="CACHE/shard-*.parquet")`."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cache.schema import MANIFEST
from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig

COLUMNS = ["example_id", "role", "split", "input_ids", "loss_mask", "target_token_ids", "target_logprobs"]


@pytest.mark.parametrize("logprob_dtype", ["float16", "float32"])
def test_cache_reads_with_pyarrow_and_datasets(logprob_dtype, tiny_model_dir, corpus, tmp_path):
    datasets.disable_progress_bars()
    cache = tmp_path / "cache"
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(cache), top_k=6, max_length=256, precision="fp32",
                            logprob_dtype=logprob_dtype, **{k: str(v) for k, v in corpus.items()}), log=lambda *_: None)
    manifest = json.loads((cache / MANIFEST).read_text())
    k, id_type = manifest["top_k"], manifest["storage"]["token_ids"]
    assert manifest["storage"]["logprobs"] == logprob_dtype

    # pyarrow: the documented columns, in order, with the manifest's physical types.
    table = pa.concat_tables([pq.read_table(cache / s["file"]) for s in manifest["shards"]])
    assert table.schema.names == COLUMNS and table.num_rows == manifest["totals"]["examples"]
    schema = table.schema
    for name in ("example_id", "role", "split"):
        assert schema.field(name).type == pa.string(), name
    ids_type, float_type = pa.from_numpy_dtype(np.dtype(id_type)), pa.from_numpy_dtype(np.dtype(logprob_dtype))
    assert schema.field("input_ids").type.value_type == ids_type
    assert schema.field("loss_mask").type.value_type == pa.bool_()
    assert schema.field("target_token_ids").type.value_type.value_type == ids_type
    assert schema.field("target_logprobs").type.value_type.value_type == float_type

    # datasets, from the shard files alone (the directory also holds manifest.json, which is not a shard).
    ds = datasets.load_dataset("parquet", data_files=str(cache / "shard-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-datasets"))  # (it copies the rows into its cache)
    assert ds.column_names == COLUMNS and ds.num_rows == manifest["totals"]["examples"]
    f = ds.features
    assert [f[c].dtype for c in ("example_id", "role", "split")] == ["string"] * 3
    assert (f["input_ids"].feature.dtype, f["loss_mask"].feature.dtype) == (id_type, "bool")
    assert (f["target_token_ids"].feature.feature.dtype, f["target_logprobs"].feature.feature.dtype) == (
        id_type, logprob_dtype)
    assert ds.to_list() == table.to_pylist()

    # What the columns mean: one k-list of targets per true position of loss_mask, log-probs most likely first.
    parts = {f"{r['role']}/{r['split']}" for r in ds}
    assert parts == set(manifest["totals"]["examples_by_part"])
    for row in ds.with_format("numpy"):
        mask = row["loss_mask"]
        assert len(mask) == len(row["input_ids"]) and mask.any() and not mask[0]
        ids, lps = np.stack(row["target_token_ids"]), np.stack(row["target_logprobs"]).astype(np.float64)
        assert ids.shape == lps.shape == (mask.sum(), k)
        assert (lps <= 0).all() and (np.diff(lps, axis=1) <= 1e-3).all()
        residual = 1 - np.exp(lps).sum(axis=1)
        assert ((residual > -1e-2) & (residual < 1)).all()
