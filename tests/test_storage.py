"""What cache-teacher stores and how it batches (issue 15): the Parquet column types and encodings that
pipeline/format.py declares, the `--logprob-dtype float32` path, the id type for a model whose output vocabulary
outgrows uint16, and length bucketing - each against a value computed the obvious way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import pipeline.cache.write
from pipeline.batches import length_batches, padding_waste
from pipeline.cache.read import open_cache
from pipeline.cache.schema import MANIFEST, SHARD_META_KEY
from pipeline.cache.write import build_cache
from pipeline.cli import main
from pipeline.config import CacheConfig
from pipeline.model_source import load_tokenizer
from pipeline.models import load_model
from tests.conftest import GENERAL_ROWS, TASK_ROWS, write_jsonl

QUIET = {"log": lambda *_: None}


def cache_args(model_dir: Path, corpus: dict[str, Path], out: Path) -> list[str]:
    inputs = [a for key, path in corpus.items() for a in (f"--{key.replace('_', '-')}", str(path))]
    return ["cache-teacher", "--model", str(model_dir), *inputs, "--top-k", "8", "--max-length", "256",
            "--batch-size", "3", "--precision", "fp32", "--out", str(out)]


def run_cli(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The same corpus cached twice: float16 log-probs (the default) and --logprob-dtype float32."""
    d = tmp_path_factory.mktemp("storage")
    corpus = {"task_train": write_jsonl(d / "task.jsonl", TASK_ROWS[:4]),
              "task_eval": write_jsonl(d / "task_eval.jsonl", TASK_ROWS[4:]),
              "rehearsal_train": write_jsonl(d / "general.jsonl", GENERAL_ROWS)}
    run_cli(cache_args(tiny_model_dir, corpus, d / "float16"))
    run_cli([*cache_args(tiny_model_dir, corpus, d / "float32"), "--logprob-dtype", "float32"])
    return {"float16": d / "float16", "float32": d / "float32", "corpus": corpus}


def shard_tables(cache: Path) -> list[pa.Table]:
    manifest = json.loads((cache / MANIFEST).read_text())
    return [pq.read_table(cache / s["file"]) for s in manifest["shards"]]


def test_shard_columns_types_and_encodings(caches):
    cache = caches["float16"]
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


def test_float32_log_probs_are_the_teachers_unrounded(caches, tiny_model_dir):
    """--logprob-dtype float32 stores float32 log-probs equal to a plain full-vocabulary log-softmax, and the
    default cache holds exactly those values rounded to float16; the ids are the same in both."""
    c16, c32 = caches["float16"], caches["float32"]
    manifest = json.loads((c32 / MANIFEST).read_text())
    assert manifest["storage"]["logprobs"] == "float32"
    rows16 = {r["example_id"]: r for t in shard_tables(c16) for r in t.to_pylist()}
    tables32 = shard_tables(c32)
    assert all(t.schema.field("target_logprobs").type == pa.list_(pa.list_(pa.float32())) for t in tables32)
    rows32 = {r["example_id"]: r for t in tables32 for r in t.to_pylist()}
    assert rows16.keys() == rows32.keys()

    model = load_model(tiny_model_dir, torch.device("cpu"), "fp32")
    for ex_id, row in rows32.items():
        lp32 = np.asarray(row["target_logprobs"], dtype=np.float32)
        assert rows16[ex_id]["target_token_ids"] == row["target_token_ids"]
        np.testing.assert_array_equal(np.asarray(rows16[ex_id]["target_logprobs"], dtype=np.float16),
                                      lp32.astype(np.float16))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float()
        positions = [t - 1 for t, m in enumerate(row["loss_mask"]) if m]
        ref_vals, ref_ids = torch.log_softmax(logits, dim=-1)[positions].topk(8)
        torch.testing.assert_close(torch.from_numpy(lp32), ref_vals, atol=2e-5, rtol=0)  # float16: 2e-3
        assert row["target_token_ids"] == ref_ids.tolist()

    # Training reads them back unrounded.
    cache = open_cache(c32)
    got = {r.example_id: r for part in ("task", "rehearsal") for r in cache.iter_rows(part, "train")}
    for ex_id, r in got.items():
        assert r.target_logprobs.dtype == np.float32
        np.testing.assert_array_equal(r.target_logprobs, np.asarray(rows32[ex_id]["target_logprobs"], np.float32))

    # The storage type is part of a cache's settings: a rerun with the other one is refused, naming it.
    result = CliRunner().invoke(main, cache_args(tiny_model_dir, caches["corpus"], c32))
    assert result.exit_code == 1 and "storage.logprobs: cache has 'float32', asked for 'float16'" in result.output


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
                            max_length=256, precision="fp32"), **QUIET)
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


# ----------------------------------------------------------------------------------------------- length bucketing


def test_length_batches_by_hand():
    lengths = [5, 3, 9, 3, 7, 1, 8]
    # Sorted by (length, index): 5:1, 1:3, 3:3, 0:5, 4:7, 6:8, 2:9, then cut into threes.
    assert length_batches(lengths, 3) == [[5, 1, 3], [0, 4, 6], [2]]
    # Padded positions: batch 1 is 3 x 3 for 7 real tokens, batch 2 3 x 8 for 20, batch 3 1 x 9 for 9.
    assert padding_waste(length_batches(lengths, 3), lengths) == pytest.approx(1 - 36 / 42)
    assert padding_waste([[0, 1, 2], [3, 4, 5], [6]], lengths) == pytest.approx(1 - 36 / (27 + 21 + 8))


def test_cache_teacher_batches_examples_of_similar_length(tiny_model_dir, tmp_path, monkeypatch):
    """Every teacher batch holds neighbours in the length order of its shard; the reported padding waste is
    that of those batches."""
    rows = [{"instruction": "Repeat.", "output": " ".join(["word"] * n)} for n in (9, 1, 14, 4, 22, 2, 6, 17, 3)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    seen: list[list[int]] = []
    real_collate = pipeline.cache.write.collate

    def collate(batch_rows, pad_id):
        seen.append([len(r.input_ids) for r in batch_rows])
        return real_collate(batch_rows, pad_id)

    monkeypatch.setattr(pipeline.cache.write, "collate", collate)
    summary = build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(data),
                                      top_k=4, max_length=256, batch_size=2, shard_size=5), **QUIET)
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    tokenizer = load_tokenizer(tiny_model_dir)
    assert [s["rows"] for s in manifest["shards"]] == [5, 4]
    # The obvious plan: all lengths sorted, the first 5 in shard 0 and the rest in shard 1, each cut into pairs.
    lengths = sorted(len(r["input_ids"]) for t in shard_tables(tmp_path / "c") for r in t.to_pylist())
    assert len(set(lengths)) == len(lengths) == 9 and tokenizer is not None
    want = [lengths[0:2], lengths[2:4], lengths[4:5], lengths[5:7], lengths[7:9]]
    assert seen == want
    waste = 1 - sum(lengths) / sum(len(b) * max(b) for b in want)
    assert summary.padding_waste == pytest.approx(waste)
    assert manifest["totals"]["padding_waste"] == round(waste, 4)
