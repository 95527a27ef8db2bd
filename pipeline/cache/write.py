"""Stage one, `pipeline cache-teacher`: run the frozen 4-bit teacher once and store its top-k log-probs.

Layout of a cache directory (docs/design.md, "The cache")::

    CACHE/
      manifest.json          written last, atomically
      shard-00000.parquet    one (role, split) per shard, rows sorted by length; tmp name, then renamed

The shard plan is a pure function of the tokenised inputs and the settings, so a rerun recomputes the
same plan, keeps every shard that is already complete (its embedded settings and example ids match, and
it reads back whole), and computes the rest: the result equals an uninterrupted run. Every shard embeds
the full settings in its Parquet metadata, so a rerun with other settings is refused, naming the field,
even before the manifest exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import __version__, distributed
from pipeline.batches import collate, length_batches, padding_waste
from pipeline.cache.schema import (
    FORMAT_VERSION,
    MANIFEST,
    PARQUET_ENCODING,
    ROW_GROUP_SIZE,
    SHARD_META_KEY,
    describe_differences,
    ids_digest,
    is_shard_name,
    settings_differences,
    shard_name,
    shard_table,
    storage_settings,
)
from pipeline.config import MAX_HELD_OUT, CacheConfig, given
from pipeline.device import resolve_runtime
from pipeline.errors import PipelineError
from pipeline.faults import crash_point
from pipeline.fileio import TMP_MARK, atomic_path, atomic_write_json, read_json, sha256_file
from pipeline.forward import output_head
from pipeline.inputs import ROLES, SPLITS, Example, Tokenized, input_sha256, read_examples, tokenize_example
from pipeline.memory import footprint
from pipeline.model_source import ModelSource, open_model_source, output_vocab_size
from pipeline.models import load_model, quantization_settings
from pipeline.run_dir import create_dir
from pipeline.teacher import LOGPROB_DTYPES, teacher_topk


@dataclass
class ShardPlan:
    index: int
    role: str
    split: str
    rows: list[int]  # indices into the tokenised examples, in storage order (sorted by length)

    @property
    def name(self) -> str:
        return shard_name(self.index)


def plan_shards(examples: Sequence[Tokenized], shard_size: int) -> list[ShardPlan]:
    """Deterministic shard plan: one (role, split) per shard, examples sorted by length within each."""
    plans: list[ShardPlan] = []
    for role in ROLES:
        for split in SPLITS:
            idx = [i for i, e in enumerate(examples) if e.role == role and e.split == split]
            idx.sort(key=lambda i: (len(examples[i].input_ids), examples[i].id))
            for start in range(0, len(idx), shard_size):
                plans.append(ShardPlan(len(plans), role, split, idx[start:start + shard_size]))
    return plans


def write_shard(path: Path, table: pa.Table, meta: dict) -> None:
    """Write one shard crash-safely (tmp name, fsync, rename), zstd-compressed, metadata embedded."""
    table = table.replace_schema_metadata({SHARD_META_KEY: json.dumps(meta, ensure_ascii=False).encode()})
    # Our own file object, closed on any error: pyarrow leaves the file it opened open when a write fails
    # (a full disk), and the deleted temporary file would hold its space until garbage collection.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP_SIZE, **PARQUET_ENCODING)


def read_shard_meta(path: Path) -> dict | None:
    """The metadata embedded in a shard, or None if the file is not a readable shard."""
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[SHARD_META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def shard_is_complete(path: Path, meta: dict, rows: int) -> bool:
    """A finished shard reads back whole with the expected number of rows."""
    try:
        return pq.read_table(path).num_rows == rows and meta.get("rows") == rows
    except (OSError, pa.ArrowException):
        return False


@dataclass
class CacheSummary:
    examples: int
    response_tokens: int
    truncated: int
    skipped_too_long: int
    skipped_bad_lines: int
    bytes: int
    seconds: float
    computed_examples: int
    padding_waste: float
    out: Path
    teacher_seconds: float = 0.0  # the teacher loop alone: forward, top-k, Parquet writing (no model load)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.response_tokens, 1)

    def lines(self) -> list[str]:
        return [
            f"cache: {self.out}",
            f"  examples          {self.examples} ({self.computed_examples} computed now, "
            f"{self.examples - self.computed_examples} kept from an earlier run)",
            f"  response tokens   {self.response_tokens}",
            f"  truncated         {self.truncated} (response cut at max_length)",
            f"  skipped           {self.skipped_too_long} (prompt fills max_length), "
            f"{self.skipped_bad_lines} bad lines",
            f"  size              {self.bytes / 1e6:.2f} MB, {self.bytes_per_token:.1f} bytes per response token",
            f"  padding waste     {self.padding_waste:.1%} of batch positions",
            f"  wall time         {self.seconds:.1f} s",
        ]


GENERATED = "generated"  # CACHE/generated/: the rehearsal data cache-teacher made itself
PROMPTS = Path(__file__).resolve().parents[1] / "prompts"  # the general prompts that ship with pipeline


@dataclass(frozen=True)
class Input:
    """One input file of a cache and the part it fills."""

    path: str
    role: str  # "task" or "rehearsal"
    split: str  # "train" or "eval"
    made_from: str | None = None  # the shipped prompt file the base model answers to make this file (rehearsal)


def planned_inputs(cfg: CacheConfig, out: Path) -> list[Input]:
    """The inputs of a cache: the files given and, when task training rows come without any rehearsal file, a
    generated one for each rehearsal part (`none` opts out of a part). A cache of held-out rows alone (no
    --task-train, e.g. to score a model) gets nothing generated."""
    inputs = [Input(p, "task", split) for p, split in ((cfg.task_train, "train"), (cfg.task_eval, "eval")) if p]
    make = cfg.task_train is not None and cfg.rehearsal_train is None and cfg.rehearsal_eval is None
    for split, value in (("train", cfg.rehearsal_train), ("eval", cfg.rehearsal_eval)):
        if value is None and make:
            inputs.append(Input(str(out / GENERATED / f"rehearsal_{split}.jsonl"), "rehearsal", split,
                                made_from=f"general_{split}.jsonl"))
        elif given(value):
            inputs.append(Input(value, "rehearsal", split))
    return inputs


def make_missing_rehearsal(cfg: CacheConfig, inputs: Sequence[Input], log=print) -> None:
    """The rehearsal files cache-teacher makes itself: the base model answers the shipped general prompts, exactly as
    `pipeline make-rehearsal` does (sampled at T = 1, resumable), once; a finished file is kept."""
    from pipeline.config import RehearsalConfig
    from pipeline.rehearsal import make_rehearsal, partial_path

    for inp in inputs:
        target = Path(inp.path)
        if inp.made_from is None or (target.is_file() and not partial_path(target).exists()):
            continue
        prompts = PROMPTS / inp.made_from
        n = sum(1 for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip())
        log(f"no --rehearsal-{inp.split}: the base model answers the {n} general prompts that ship with pipeline "
            f"({inp.split} part) into {target}; give --rehearsal-{inp.split} FILE to use your own, or none")
        create_dir(target.parent, "cache directory")
        make_rehearsal(RehearsalConfig(model=cfg.model, seed=cfg.seed, precision=cfg.precision, device=cfg.device,
                                       attn=cfg.attn, prompts=str(prompts), out=str(target)), log=log)


def hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): round(fraction * n) of the examples (at least 1 of 2 or more, at most MAX_HELD_OUT) moved
    to the eval split, chosen by a seeded hash of their ids, so the choice does not depend on the file's order."""
    n = len(examples)
    k = min(MAX_HELD_OUT, max(1, round(fraction * n))) if fraction > 0 and n >= 2 else 0
    ranked = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}\0{e.id}".encode()).digest())
    held = {e.id for e in ranked[:k]}
    return ([e for e in examples if e.id not in held],
            [dataclasses.replace(e, split="eval") for e in examples if e.id in held])


def read_inputs(cfg: CacheConfig, inputs: Sequence[Input], tokenizer, log=print) -> tuple[list[Tokenized], dict, dict]:
    """Read, validate and tokenise every input; return (examples, input records, counters). No model needed.

    Without --task-eval, --eval-fraction of the task training rows become the task's held-out part (hold_out).
    """
    examples: list[Tokenized] = []
    records = []
    counts = Counter()
    first_source: dict[str, str] = {}
    split_task = cfg.eval_fraction > 0 and not any(i.role == "task" and i.split == "eval" for i in inputs)
    for inp in inputs:
        path, role, split = inp.path, inp.role, inp.split
        columns = None if inp.made_from else cfg.columns  # the generated files use the documented fields
        exs, stats = read_examples(path, role=role, split=split, skip_bad_lines=cfg.skip_bad_lines, columns=columns)
        held_out: dict = {}
        if split_task and role == "task" and split == "train":
            exs, held = hold_out(exs, cfg.eval_fraction, cfg.seed)
            exs += held
            held_out = {"held_out": {"fraction": cfg.eval_fraction, "seed": cfg.seed, "rows": len(held)}}
            log(f"no --task-eval: {len(held)} of the {len(exs)} task rows held out to score the task "
                f"(--eval-fraction {cfg.eval_fraction:g}, chosen by example id with seed {cfg.seed}); give --task-eval "
                "FILE to use your own, or --eval-fraction 0 to train on all")
        counts["skipped_bad_lines"] += len(stats.skipped)
        for line in stats.skipped[:5]:
            log(f"skipped bad line {line}")
        if len(stats.skipped) > 5:
            log(f"... and {len(stats.skipped) - 5} more bad lines in {path}")
        too_long = []
        for ex in exs:
            if ex.id in first_source:
                raise PipelineError(f"{ex.source}: duplicate id {ex.id!r} (also at {first_source[ex.id]}); ids must "
                                    "be unique across all inputs")
            first_source[ex.id] = ex.source
            tok = tokenize_example(tokenizer, ex, cfg.max_length)
            if tok is None:
                too_long.append(ex.source)
                continue
            counts["truncated"] += tok.truncated
            examples.append(tok)
        counts["skipped_too_long"] += len(too_long)
        if too_long:
            log(f"skipped {len(too_long)} examples of {path} whose prompt fills max_length={cfg.max_length} "
                f"(first: {', '.join(too_long[:3])})")
        records.append({"path": str(Path(path).resolve()), "sha256": input_sha256(path), "role": role,
                        "split": split, "examples": len(exs), "skipped_bad_lines": len(stats.skipped),
                        **({"columns": dict(columns)} if columns else {}),
                        **({"made_from": f"pipeline/prompts/{inp.made_from}, answered by the base model"}
                           if inp.made_from else {}),
                        **held_out})
    if not examples:
        raise PipelineError(f"no examples left to cache: {counts['skipped_too_long']} skipped because the prompt "
                            f"fills max_length={cfg.max_length}, {counts['skipped_bad_lines']} bad lines skipped")
    return examples, records, dict(counts)


def refuse_foreign(out: Path) -> list[str]:
    """Refuse an --out that holds something other than a cache; returns the names in it (temporary files aside)."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise PipelineError(f"{out}: exists and is not a directory")
    names = [p.name for p in out.iterdir() if TMP_MARK not in p.name]
    foreign = [n for n in names if n not in (MANIFEST, GENERATED) and not is_shard_name(n)]
    if foreign:
        raise PipelineError(f"{out}: not empty and not a cache directory (found {foreign[0]}); choose another --out")
    return names


def check_out_dir(out: Path, settings: dict) -> dict | None:
    """Refuse an output directory that holds something else or a cache made with other settings.

    Returns:
        The existing manifest if there is one that parses (with matching settings), else None. A damaged
        manifest is not an error here: it is rewritten at the end, and the shards are judged by their own
        embedded settings meanwhile.
    """
    if not out.exists():
        return None
    names = refuse_foreign(out)
    manifest = None
    if MANIFEST in names:
        with contextlib.suppress(PipelineError):
            manifest = read_json(out / MANIFEST, "cache manifest")
        if not isinstance(manifest, dict):
            manifest = None
    existing = manifest
    if existing is None:
        for n in sorted(names):
            meta = read_shard_meta(out / n) if is_shard_name(n) else None
            if meta is not None and isinstance(meta.get("settings"), dict):
                existing = meta["settings"]
                break
    if existing is not None:
        diffs = settings_differences(existing, settings)
        if diffs:
            raise PipelineError(f"{out}: holds a cache made with other settings ({describe_differences(diffs)}); "
                                "use another --out or delete it")
    return manifest


def listed_checksums(manifest: dict | None) -> dict[str, str | None]:
    """file -> sha256 of the shards an earlier run's manifest lists (tolerating a hand-edited manifest)."""
    shards = manifest.get("shards") if manifest else None
    if not isinstance(shards, list):
        return {}
    return {s.get("file"): s.get("sha256") for s in shards if isinstance(s, dict)}


def build_cache(cfg: CacheConfig, log=print) -> CacheSummary:
    """Run cache-teacher end to end (see the module docstring). Returns the summary printed at the end.

    Under torchrun every rank plans the same shards and computes those with index % world_size == rank
    (teacher data parallelism: each rank holds a copy of the model), so the shard files are those of a
    single-process run; rank 0 writes the manifest once every rank is done.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    log = log if distributed.is_main() else lambda *_: None  # every rank reads the same inputs: rank 0 alone reports
    # A GGUF model is converted and the weights are hashed once per machine; the other ranks find the result.
    source = open_model_source(cfg.model)
    _ = source.fingerprint
    inputs = planned_inputs(cfg, out)
    if any(i.made_from for i in inputs):
        # The user's own files and the runtime settings are checked before the model is loaded to answer the shipped
        # prompts.
        distributed.agree(lambda: resolve_runtime(cfg.device, cfg.precision, cfg.attn))
        distributed.agree(lambda: refuse_foreign(out))
        distributed.agree(lambda: read_inputs(cfg, [i for i in inputs if not i.made_from], source.tokenizer,
                                              lambda *_: None) if any(not i.made_from for i in inputs) else None)
        distributed.main_first(lambda: make_missing_rehearsal(cfg, inputs, log if distributed.is_main() else
                                                              lambda *_: None))
    # Every rank reads and checks the inputs (cheap next to the teacher pass); a bad line stops all ranks alike.
    examples, counts, settings, device = distributed.agree(lambda: check_inputs(cfg, inputs, source, out, log))
    # Rank 0 clears leftovers of a killed run before any rank starts writing its own temporary shards.
    distributed.agree(lambda: create_dir(out, "cache directory") if distributed.is_main() else None)
    plans = plan_shards(examples, cfg.shard_size)
    if len(plans) < distributed.world_size():  # the shard is the unit of work a rank takes
        idle = distributed.world_size() - len(plans)
        log(f"note: {len(plans)} shard(s) for {distributed.world_size()} processes, so {idle} of them idle; a "
            "smaller --shard-size splits the work further")
    lengths = [len(e.input_ids) for e in examples]
    batches_of = {p.index: [[p.rows[i] for i in b] for b in length_batches([lengths[i] for i in p.rows],
                                                                            cfg.batch_size)] for p in plans}
    todo = shards_to_compute(out, plans, examples, settings)
    teacher_seconds = 0.0
    if todo:
        model = load_model(source.path, device, settings["precision"], attn=cfg.attn)
        log(footprint(model).describe())
        crash_point("model_loaded")
        t_teacher = time.perf_counter()
        run_teacher(model, source.tokenizer, examples, todo, batches_of, settings, out, cfg, device)
        teacher_seconds = time.perf_counter() - t_teacher
    distributed.wait_for_all()  # the manifest needs every rank's shards
    (computed,) = distributed.all_reduce_sum([sum(len(p.rows) for p in todo)])
    waste = padding_waste([b for p in plans for b in batches_of[p.index]], lengths)
    summary_counts = {**counts, "response_tokens": sum(sum(e.loss_mask) for e in examples)}
    total_bytes = 0
    if distributed.is_main():
        manifest = write_manifest(out, settings, plans, examples, summary_counts, waste)
        total_bytes = manifest["totals"]["bytes"]
    return CacheSummary(
        examples=len(examples), response_tokens=summary_counts["response_tokens"],
        truncated=counts.get("truncated", 0), skipped_too_long=counts.get("skipped_too_long", 0),
        skipped_bad_lines=counts.get("skipped_bad_lines", 0), bytes=total_bytes,
        seconds=time.perf_counter() - t0, computed_examples=int(computed), padding_waste=waste, out=out,
        teacher_seconds=teacher_seconds)


def check_inputs(cfg: CacheConfig, inputs: Sequence[Input], source: ModelSource, out: Path, log=print
                 ) -> tuple[list[Tokenized], dict, dict, torch.device]:
    """Read and tokenise every input, resolve where the teacher runs, and check --out against the settings; no
    model is loaded. Returns (examples, counters, the cache's settings, device)."""
    examples, input_records, counts = read_inputs(cfg, inputs, source.tokenizer, log)
    device, precision = resolve_runtime(cfg.device, cfg.precision, cfg.attn)
    settings = cache_settings(cfg, source, precision, input_records)
    check_out_dir(out, settings)
    return examples, counts, settings, device


def cache_settings(cfg: CacheConfig, source: ModelSource, precision: str, input_records: list[dict]) -> dict:
    """Everything that decides a cache's content (schema.SETTINGS_KEYS): recorded in the manifest and every shard."""
    tokenizer = source.tokenizer
    vocab = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0), output_vocab_size(source.path))
    return {
        "format_version": FORMAT_VERSION,
        "teacher": {"model": cfg.model, "fingerprint": source.fingerprint},
        "quantization": quantization_settings(precision),
        "precision": precision,
        "attn": cfg.attn,  # sdpa and eager attention round differently: the targets can differ slightly
        "tokenizer": source.tokenizer_fingerprint,
        "max_length": cfg.max_length,
        "top_k": cfg.top_k,
        "temperature": cfg.temperature,
        "inputs": input_records,
        "storage": storage_settings(vocab, cfg.logprob_dtype),
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "skip_bad_lines": cfg.skip_bad_lines,
    }


def shards_to_compute(out: Path, plans: Sequence[ShardPlan], examples: Sequence[Tokenized], settings: dict
                      ) -> list[ShardPlan]:
    """This rank's shards that an earlier run has not finished.

    A shard is finished when its embedded settings and example ids match and it reads back whole. A shard an
    earlier run's manifest lists must also still have the listed checksum: one modified after the manifest was
    written may still decode, and keeping it would launder the damage into a new manifest.
    """
    rank, world = distributed.rank(), distributed.world_size()
    listed = listed_checksums(check_out_dir(out, settings))
    todo = []
    for p in plans:
        if p.index % world != rank:
            continue
        path = out / p.name
        meta = read_shard_meta(path) if path.exists() else None
        ids = [examples[i].id for i in p.rows]
        if (meta is not None and not settings_differences(meta.get("settings", {}), settings)
                and meta.get("ids_sha256") == ids_digest(ids) and shard_is_complete(path, meta, len(ids))
                and (p.name not in listed or listed[p.name] == sha256_file(path))):
            continue  # finished by an earlier run
        todo.append(p)
    return todo


def run_teacher(model, tokenizer, examples: Sequence[Tokenized], todo: Sequence[ShardPlan],
                batches_of: dict[int, list[list[int]]], settings: dict, out: Path, cfg: CacheConfig,
                device: torch.device) -> None:
    """The teacher pass over this rank's unfinished shards: top-k log-probs at every response position, one
    Parquet shard written (crash-safely) as soon as its rows are done."""
    from tqdm.auto import tqdm

    head = output_head(model)
    precision, id_type = settings["precision"], settings["storage"]["token_ids"]
    pad_id = tokenizer.pad_token_id
    lp_dtype = LOGPROB_DTYPES[cfg.logprob_dtype]
    # One bar, rank 0's: it shows that rank's share, which is about 1/world_size of the work.
    desc = "cache-teacher" if distributed.world_size() == 1 else f"cache-teacher (rank 0 of {distributed.world_size()})"
    bar = tqdm(total=sum(len(p.rows) for p in todo), unit="ex", desc=desc, dynamic_ncols=True,
               disable=not distributed.is_main())
    t_start, n_tokens, n_resp = time.perf_counter(), 0, 0
    try:
        for plan in todo:
            rows = [examples[i] for i in plan.rows]
            pos_of = {i: j for j, i in enumerate(plan.rows)}
            row_ids: list[np.ndarray | None] = [None] * len(rows)
            row_lps: list[np.ndarray | None] = [None] * len(rows)
            for batch_rows in batches_of[plan.index]:
                batch = collate([examples[i] for i in batch_rows], pad_id).to(device)
                ids, lps = teacher_topk(model, head, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                        top_k=cfg.top_k, temperature=cfg.temperature, precision=precision)
                counts = batch.loss_mask.sum(1).tolist()
                ids_np, lps_np = ids.cpu().numpy(), lps.cpu().numpy().astype(lp_dtype)
                start = 0
                for i, n in zip(batch_rows, counts, strict=True):
                    row_ids[pos_of[i]], row_lps[pos_of[i]] = ids_np[start:start + n], lps_np[start:start + n]
                    start += n
                n_tokens += int(batch.attention_mask.sum())
                n_resp += sum(counts)
                bar.update(len(batch_rows))
                dt = max(time.perf_counter() - t_start, 1e-9)
                bar.set_postfix_str(f"{n_tokens / dt:.0f} tok/s, {n_resp / dt:.0f} resp tok/s", refresh=False)
                crash_point("teacher_batch")
            table = shard_table(rows, np.concatenate(row_ids), np.concatenate(row_lps), id_type)
            meta = {"settings": settings, "index": plan.index, "role": plan.role, "split": plan.split,
                    "rows": len(rows), "ids_sha256": ids_digest([r.id for r in rows])}
            write_shard(out / plan.name, table, meta)
            crash_point("shard_written")
    finally:
        bar.close()


def write_manifest(out: Path, settings: dict, plans: Sequence[ShardPlan], examples: Sequence[Tokenized],
                   counts: dict, waste: float) -> dict:
    """Checksum every shard and write manifest.json last, atomically."""
    shards = []
    for p in plans:
        path = out / p.name
        if not path.is_file():
            raise PipelineError(f"{path}: shard missing after the teacher pass; rerun the same command")
        rows = [examples[i] for i in p.rows]
        shards.append({"file": p.name, "role": p.role, "split": p.split, "rows": len(rows),
                       "tokens": sum(len(r.input_ids) for r in rows),
                       "response_tokens": sum(sum(r.loss_mask) for r in rows),
                       "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    total_bytes = sum(s["bytes"] for s in shards)
    per_part = Counter(f"{p.role}/{p.split}" for p in plans for _ in p.rows)
    manifest = {
        **settings,
        "package_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shards": shards,
        "totals": {
            "examples": len(examples),
            "examples_by_part": dict(sorted(per_part.items())),
            "tokens": sum(s["tokens"] for s in shards),
            "response_tokens": counts["response_tokens"],
            "truncated": counts.get("truncated", 0),
            "skipped_too_long": counts.get("skipped_too_long", 0),
            "skipped_bad_lines": counts.get("skipped_bad_lines", 0),
            "bytes": total_bytes,
            "bytes_per_response_token": round(total_bytes / max(counts["response_tokens"], 1), 2),
            "padding_waste": round(waste, 4),
        },
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest
