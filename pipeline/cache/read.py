"""Reading a cache: verify it, then stream its rows without loading the whole cache into memory.

`open_cache` checks everything a training run relies on before any model work starts: the manifest
parses, every listed shard exists with its recorded checksum, no unlisted shard lies beside them, and
(`check_compatible`) the cache was made by the same model and tokenizer with the same settings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.schema import (
    FORMAT_VERSION,
    MANIFEST,
    REQUIRED_MANIFEST_FIELDS,
    SHARD_FIELDS,
    CachedRow,
    content_fingerprint,
    rows_from_table,
)
from pipeline.errors import PipelineError
from pipeline.fileio import TMP_MARK, read_json, sha256_file


def _short(value: object) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 and all(c in "0123456789abcdef" for c in text) else repr(value)


class Cache:
    """A verified cache directory. Use `open_cache`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._files: dict[str, pq.ParquetFile] = {}
        self._groups: OrderedDict[tuple[str, int], list[CachedRow]] = OrderedDict()

    # -- what is in it ----------------------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def fingerprint(self) -> str:
        """Identity of this cache's content: the checksums of its shards."""
        return content_fingerprint(self.manifest)

    def shards(self, role: str, split: str) -> list[dict]:
        return [s for s in self.manifest["shards"] if s["role"] == role and s["split"] == split]

    def count(self, role: str, split: str) -> int:
        return sum(s["rows"] for s in self.shards(role, split))

    def row_groups(self, role: str, split: str) -> list[tuple[str, int, int]]:
        """(file, row group index, rows) of one part, in storage order."""
        out = []
        for s in self.shards(role, split):
            meta = self._file(s["file"]).metadata
            out += [(s["file"], g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        return out

    def check_compatible(self, *, model_fingerprint: str, tokenizer_fingerprint: str, max_length: int | None = None,
                         top_k: int | None = None, temperature: float | None = None) -> None:
        """Refuse a cache made by another model/tokenizer or with other settings, naming the field and both values."""
        m = self.manifest
        checks = [("teacher.fingerprint", m["teacher"]["fingerprint"], model_fingerprint, "model"),
                  ("tokenizer", m["tokenizer"], tokenizer_fingerprint, "tokenizer")]
        for name, asked in (("max_length", max_length), ("top_k", top_k), ("temperature", temperature)):
            if asked is not None:
                checks.append((name, m[name], asked, "setting"))
        for name, have, want, what in checks:
            if have != want:
                hint = {"model": f"it was made from {m['teacher'].get('model')!r}; pass that --model or rebuild "
                                 "the cache", "tokenizer": "rebuild the cache with this model",
                        "setting": "omit the flag to use the cache's value, or rebuild the cache"}[what]
                raise PipelineError(f"{self.path}: {name} differs: cache has {_short(have)}, asked for {_short(want)} "
                                    f"({hint})")

    # -- reading ----------------------------------------------------------------------------------------------
    def _file(self, name: str) -> pq.ParquetFile:
        if name not in self._files:
            try:
                self._files[name] = pq.ParquetFile(self.path / name)
            except (OSError, pa.ArrowException) as e:
                raise PipelineError(f"{self.path / name}: unreadable shard ({e})") from e
        return self._files[name]

    def read_group(self, name: str, group: int, keep: int = 16) -> list[CachedRow]:
        """Decode one row group (memoised: the last `keep` groups stay in memory)."""
        key = (name, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        try:
            table = self._file(name).read_row_group(group)
        except (OSError, pa.ArrowException) as e:
            raise PipelineError(f"{self.path / name}: unreadable shard ({e})") from e
        rows = rows_from_table(table)
        self._groups[key] = rows
        while len(self._groups) > keep:
            self._groups.popitem(last=False)
        return rows

    def iter_rows(self, role: str, split: str) -> Iterator[CachedRow]:
        """Every row of one part, in storage order (sorted by length: good batches for evaluation)."""
        for name, group, _ in self.row_groups(role, split):
            yield from self.read_group(name, group, keep=1)


def open_cache(path: str | Path, *, verify: bool = True) -> Cache:
    """Open and verify a cache directory (manifest, shard list, checksums).

    Raises:
        PipelineError: naming the file, for a missing/unparsable manifest, a missing, unlisted, truncated or
            modified shard.
    """
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{path}: no such cache directory (run pipeline cache-teacher --out {path})")
    if not (path / MANIFEST).exists():
        partial = sorted(path.glob("shard-*.parquet"))
        hint = "an unfinished cache: rerun the same cache-teacher command to finish it" if partial else \
            "not a cache directory"
        raise PipelineError(f"{path / MANIFEST}: missing ({hint})")
    rebuild = "rerun the same cache-teacher command on this directory to rewrite it"
    try:
        manifest = read_json(path / MANIFEST, "cache manifest")
    except PipelineError as e:
        raise PipelineError(f"{e}; {rebuild}") from e
    if not isinstance(manifest, dict) or any(k not in manifest for k in REQUIRED_MANIFEST_FIELDS):
        raise PipelineError(f"{path / MANIFEST}: not a cache manifest (missing fields); {rebuild}")
    if not isinstance(manifest["shards"], list) or not all(
            isinstance(s, dict) and all(k in s for k in SHARD_FIELDS) for s in manifest["shards"]):
        raise PipelineError(f"{path / MANIFEST}: not a cache manifest (each shard needs {', '.join(SHARD_FIELDS)}); "
                            f"{rebuild}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise PipelineError(f"{path / MANIFEST}: format_version {manifest['format_version']} is not supported "
                            f"(this pipeline reads {FORMAT_VERSION}); rebuild the cache")
    listed = {s["file"] for s in manifest["shards"]}
    for p in sorted(path.glob("shard-*.parquet")):
        if p.name not in listed and TMP_MARK not in p.name:
            raise PipelineError(f"{p}: shard not listed in the manifest (left from another run?); remove it or "
                                "rebuild the cache")
    for s in manifest["shards"]:
        shard = path / s["file"]
        if not shard.is_file():
            raise PipelineError(f"{shard}: shard listed in the manifest is missing; rerun cache-teacher to rebuild it")
        if verify:
            if shard.stat().st_size != s["bytes"]:
                raise PipelineError(f"{shard}: size {shard.stat().st_size} differs from the manifest's {s['bytes']} "
                                    "(truncated or modified); rerun cache-teacher on this directory to redo it")
            if sha256_file(shard) != s["sha256"]:
                raise PipelineError(f"{shard}: checksum differs from the manifest (corrupted or modified); rerun "
                                    "cache-teacher on this directory to redo it")
    return Cache(path, manifest)


class MemoryRows:
    """Tokenised rows held in memory, read through the same interface as Cache (count, row_groups,
    read_group), so that RowStream serves them too: training without a cache (--online-teacher)."""

    def __init__(self, rows: Sequence[CachedRow], group_size: int = 128):
        self.path = Path("<in memory>")
        self._parts: dict[tuple[str, str], list[list[CachedRow]]] = {}
        for role, split in {(r.role, r.split) for r in rows}:
            part = [r for r in rows if r.role == role and r.split == split]
            self._parts[(role, split)] = [part[i:i + group_size] for i in range(0, len(part), group_size)]

    def count(self, role: str, split: str) -> int:
        return sum(len(g) for g in self._parts.get((role, split), []))

    def row_groups(self, role: str, split: str) -> list[tuple[str, int, int]]:
        return [(f"{role}/{split}", i, len(g)) for i, g in enumerate(self._parts.get((role, split), []))]

    def read_group(self, name: str, group: int, keep: int = 0) -> list[CachedRow]:
        role, split = name.split("/")
        return self._parts[(role, split)][group]


def describe(cache: Cache) -> str:
    parts = ", ".join(f"{k} {v}" for k, v in cache.manifest.get("totals", {}).get("examples_by_part", {}).items())
    return f"{cache.path} ({parts}; top_k {cache.top_k}, T {cache.temperature})"

