"""The cache format (docs/design.md, "The cache"): columns, physical types, encodings, manifest fields, and how two
caches' settings are compared. The writer (cache.py), the reader (reader.py) and everything that checks
compatibility import it from here; nothing else defines a part of the format.

    CACHE/
      manifest.json          MANIFEST, written last, atomically; REQUIRED_MANIFEST_FIELDS at least
      shard-00000.parquet    one (role, split) per shard; SHARD_META_KEY holds the settings in its metadata

One Parquet row per example, columns as `shard_table` builds them and `rows_from_table` reads them back:
`example_id`, `role`, `split` (strings), `input_ids` list<int>, `loss_mask` list<bool>, and for each true
position of loss_mask `target_token_ids` list<list<int>> and `target_logprobs` list<list<float>> (k each,
most likely first). Physical types (uint16 or int32 ids, float16 or float32 log-probs) are in the manifest's
`storage` setting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.inputs import Tokenized

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_META_KEY = b"pipeline"
ROW_GROUP_SIZE = 128  # rows per Parquet row group: the unit the reader decodes at a time
# Settings that decide the content of a cache; a rerun or a reader must agree on all of them.
SETTINGS_KEYS = ("format_version", "teacher", "quantization", "precision", "attn", "tokenizer", "max_length",
                 "top_k", "temperature", "inputs", "storage", "shard_size", "batch_size", "skip_bad_lines")

REQUIRED_MANIFEST_FIELDS = ("format_version", "teacher", "tokenizer", "max_length", "top_k", "temperature", "shards")
SHARD_FIELDS = ("file", "role", "split", "rows", "bytes", "sha256")


def storage_settings(vocab_size: int, logprob_dtype: str) -> dict:
    """The physical types and encodings of a cache, recorded in its settings (section 4 leaves them to us)."""
    return {"token_ids": "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32",
            "logprobs": logprob_dtype,
            "compression": f"{PARQUET_ENCODING['compression']}-{PARQUET_ENCODING['compression_level']}",
            "byte_stream_split": [c.split(".")[0] for c in PARQUET_ENCODING["use_byte_stream_split"]]}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def is_shard_name(name: str) -> bool:
    return name.startswith("shard-") and name.endswith(".parquet")


def content_fingerprint(manifest: dict) -> str:
    """Identity of a cache's content: the checksums of its shards, in order."""
    return hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()


def _flatten(d: object, prefix: str = "") -> dict[str, object]:
    if isinstance(d, dict):
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix[:-1]}[{i}]."))
        if not d:
            out[prefix[:-1]] = []
        return out
    return {prefix[:-1]: d}


def _informational(key: str) -> bool:
    """Recorded for people, not compared: where the model and the inputs were (content is compared by hash)."""
    return key == "teacher.model" or key.endswith(".path")


def settings_differences(have: dict, want: dict, keys: Sequence[str] = SETTINGS_KEYS) -> list[str]:
    """'field: cache has X, asked for Y' for every setting that differs (dotted paths into nested values)."""
    a = _flatten({k: have.get(k) for k in keys})
    b = _flatten({k: want.get(k) for k in keys})
    return [f"{k}: cache has {a.get(k)!r}, asked for {b.get(k)!r}" for k in sorted(set(a) | set(b), key=str)
            if a.get(k) != b.get(k) and not _informational(k)]


def describe_differences(diffs: list[str], limit: int = 3) -> str:
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


@dataclass
class CachedRow:
    """One cached example. Shapes: input_ids/loss_mask (T,), target_ids/target_logprobs (n, k), n = loss_mask.sum()."""

    example_id: str
    role: str
    split: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    target_ids: np.ndarray
    target_logprobs: np.ndarray


def _list_array(values: np.ndarray, counts: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def shard_table(rows: Sequence[Tokenized], top_ids: np.ndarray, top_lps: np.ndarray, id_type: str) -> pa.Table:
    """Build the Parquet table of one shard.

    Args:
        top_ids, top_lps: (N, k) for all response tokens of `rows`, in row order then position order.
    """
    n_resp = np.array([sum(r.loss_mask) for r in rows], dtype=np.int64)
    lengths = np.array([len(r.input_ids) for r in rows], dtype=np.int64)
    flat_ids = np.concatenate([np.asarray(r.input_ids) for r in rows]).astype(id_type)
    flat_mask = np.concatenate([np.asarray(r.loss_mask, dtype=bool) for r in rows])
    return pa.table({
        "example_id": pa.array([r.id for r in rows], type=pa.string()),
        "role": pa.array([r.role for r in rows], type=pa.string()),
        "split": pa.array([r.split for r in rows], type=pa.string()),
        "input_ids": _list_array(flat_ids, lengths),
        "loss_mask": _list_array(flat_mask, lengths),
        "target_token_ids": _nested(top_ids.astype(id_type), n_resp),
        "target_logprobs": _nested(top_lps, n_resp),
    })


def _nested(values: np.ndarray, n_per_row: np.ndarray) -> pa.ListArray:
    """(N, k) -> list<list<T>> with n_per_row[i] inner lists of k values in row i."""
    n, k = values.shape
    inner = _list_array(values.reshape(-1), np.full(n, k, dtype=np.int64))
    offsets = np.zeros(len(n_per_row) + 1, dtype=np.int32)
    np.cumsum(n_per_row, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _offsets(arr: pa.Array) -> np.ndarray:
    return arr.offsets.to_numpy()


def rows_from_table(table: pa.Table) -> list[CachedRow]:
    """Turn a decoded Parquet table into CachedRows with numpy arrays (no per-value Python objects)."""
    table = table.combine_chunks()
    ids_col = table.column("input_ids").chunk(0)
    mask_col = table.column("loss_mask").chunk(0)
    tid_col = table.column("target_token_ids").chunk(0)
    tlp_col = table.column("target_logprobs").chunk(0)
    id_off, pos_off = _offsets(ids_col), _offsets(tid_col)
    flat_ids = ids_col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    flat_mask = mask_col.values.to_numpy(zero_copy_only=False)
    inner_ids, inner_lps = tid_col.values, tlp_col.values  # list<T> per response position
    k = int(inner_ids.value_lengths()[0].as_py()) if len(inner_ids) else 0
    tok_ids = inner_ids.values.to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, k) if k else \
        np.zeros((0, 0), np.int64)
    tok_lps = inner_lps.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, k) if k else \
        np.zeros((0, 0), np.float32)
    example_ids = table.column("example_id").to_pylist()
    roles = table.column("role").to_pylist()
    splits = table.column("split").to_pylist()
    rows = []
    for i in range(table.num_rows):
        a, b = id_off[i], id_off[i + 1]
        p, q = pos_off[i], pos_off[i + 1]
        rows.append(CachedRow(example_ids[i], roles[i], splits[i], flat_ids[a:b], flat_mask[a:b],
                              tok_ids[p:q], tok_lps[p:q]))
    return rows


# [parquet encoding note] Measured on the demo cache (SmolLM2, k=32, 26k response tokens), bytes per response
# token: zstd-3 with pyarrow's defaults 112; without dictionary pages for the nested columns (49k-token
# vocabulary: the dictionary falls back anyway) 103; plus byte-stream-split of the float16 log-probs and the
# ids (uint16 is stored as 4-byte INT32; split, its zero high bytes compress away) 94.9; zstd-9 93.5,
# zstd-15 92.5 (slower to write, for 1%).
PARQUET_ENCODING = {
    "compression": "zstd",
    "compression_level": 9,
    "use_dictionary": ["example_id", "role", "split"],
    "use_byte_stream_split": ["target_logprobs.list.element.list.element",
                              "target_token_ids.list.element.list.element"],
}
