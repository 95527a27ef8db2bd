"""pipeline/cache/schema.py: the cache format. A cache is plain Parquet that other tools read as documented
(docs/design.md, "The cache") with no code from this package: pyarrow, and
`datasets.load_dataset("parquet", data_files="CACHE/shard-*.parquet")`. The column types and encodings of a
shard, and token ids wide enough for the model's whole output vocabulary."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.schema import MANIFEST, SHARD_META_KEY
from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig
from pipeline.models import load_model
from tests.helpers import (
    QUIET,
    TASK_ROWS,
    shard_tables,
    write_jsonl,
)

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


def test_shard_columns_types_and_encodings(logprob_caches):
    cache = logprob_caches["float16"]
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["storage"] == {"token_ids": "uint16", "logprobs": "float16", "compression": "zstd-9",
                                   "byte_stream_split": ["target_logprobs", "target_token_ids"]}
    want = pa.schema([("example_id", pa.string()), ("role", pa.string()), ("split", pa.string()),
                      ("input_ids", pa.list_(pa.uint16())), ("loss_mask", pa.list_(pa.bool_())),
                      ("target_token_ids", pa.list_(pa.list_(pa.uint16()))),
                      ("target_logprobs", pa.list_(pa.list_(pa.float16())))])
    # The column chunks as written: dictionary pages for the short repeated strings only, byte-stream-split for
    # the two k-wide target columns, zstd everywhere.
    dictionary = {"example_id", "role", "split"}
    split = {"target_token_ids.list.element.list.element", "target_logprobs.list.element.list.element"}
    for s in manifest["shards"]:
        f = pq.ParquetFile(cache / s["file"])
        assert f.schema_arrow.remove_metadata() == want
        embedded = json.loads(f.schema_arrow.metadata[SHARD_META_KEY])
        assert embedded["settings"]["storage"] == manifest["storage"] and embedded["rows"] == s["rows"]
        for g in range(f.metadata.num_row_groups):
            group = f.metadata.row_group(g)
            for c in (group.column(i) for i in range(group.num_columns)):
                assert c.compression == "ZSTD", c.path_in_schema
                assert c.has_dictionary_page == (c.path_in_schema in dictionary), c.path_in_schema
                assert ("BYTE_STREAM_SPLIT" in c.encodings) == (c.path_in_schema in split), c.path_in_schema


def test_token_ids_hold_the_models_whole_output_vocabulary(tmp_path):
    """A model whose output head is wider than uint16 (70,000 here) while its tokenizer is small: the teacher's
    top-k ids range over the head, so they must be stored as int32, not wrapped round modulo 65,536."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=70_000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, tie_word_embeddings=False))
    model_dir = tmp_path / "wide"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS[:2])
    build_cache(CacheConfig(model=str(model_dir), out=str(tmp_path / "c"), task_train=str(data), top_k=8,
                            max_length=256, precision="fp32", eval_fraction=0, rehearsal_train="none"), **QUIET)
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["storage"]["token_ids"] == "int32"

    plain = load_model(model_dir, torch.device("cpu"), "fp32")
    wide = 0
    for row in (r for t in shard_tables(tmp_path / "c") for r in t.to_pylist()):
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        positions = [t - 1 for t, m in enumerate(row["loss_mask"]) if m]
        want = logits[positions].topk(8).indices
        assert row["target_token_ids"] == want.tolist()
        wide += int((want >= 65_536).sum())
    assert wide > 0  # the case that matters did occur
