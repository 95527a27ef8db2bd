"""`pipeline inspect CACHE`: what a cache holds, for a person to read (or as JSON).

    overview   from manifest.json alone: the teacher and its fingerprints, the settings, the inputs, rows and
               tokens per role/split, bytes per response token, padding
    --example  one example: its prompt and response as text and, at every response position, the target
               token, the teacher's top 5 tokens as text with their probabilities, and the residual mass
               1 - sum(exp(target_logprobs)) over all k cached tokens (docs/design.md, "The cache")

The cache is read through reader.open_cache (the shards' checksums are left to train, which relies on
them) and the tokens decoded with the teacher's tokenizer, loaded as cache-teacher loads it.
"""

from __future__ import annotations

import functools
import json
import re

import numpy as np

from pipeline.cache.read import Cache, open_cache
from pipeline.cache.schema import CachedRow
from pipeline.config import InspectConfig
from pipeline.errors import PipelineError
from pipeline.inputs import ROLES, SPLITS

TOP = 5  # teacher tokens shown per position


def inspect_cache(cfg: InspectConfig) -> dict:
    """The report printed by `pipeline inspect`: {"cache": overview, "example": view (with --example only)}."""
    cache = open_cache(cfg.cache, verify=False)
    report = {"cache": overview(cache)}
    if cfg.example is not None:
        row = find_example(cache, cfg.example)
        report["example"] = example_view(row, _tokenizer(cache, cfg.model))
    return report


def overview(cache: Cache) -> dict:
    """The manifest, regrouped: per role/split rows, tokens and bytes summed over its shards."""
    m = cache.manifest
    parts = {}
    for role in ROLES:
        for split in SPLITS:
            shards = cache.shards(role, split)
            if shards:
                parts[f"{role}/{split}"] = {k: sum(s.get(k, 0) for s in shards)
                                            for k in ("rows", "tokens", "response_tokens", "bytes")}
                parts[f"{role}/{split}"]["shards"] = len(shards)
    return {
        "path": str(cache.path),
        "format_version": m["format_version"],
        "package_version": m.get("package_version"),
        "created": m.get("created"),
        "teacher": m["teacher"],
        "tokenizer": m["tokenizer"],
        "quantization": m.get("quantization"),
        "precision": m.get("precision"),
        "settings": {k: m.get(k) for k in ("top_k", "max_length", "temperature", "shard_size", "batch_size",
                                           "skip_bad_lines")},
        "storage": m.get("storage"),
        "inputs": m.get("inputs", []),
        "parts": parts,
        "totals": m.get("totals", {}),
    }


def find_example(cache: Cache, example_id: str) -> CachedRow:
    """The cached row of one example (a scan of the example_id column, part by part)."""
    first = None
    for role in ROLES:
        for split in SPLITS:
            for row in cache.iter_rows(role, split):
                if row.example_id == example_id:
                    return row
                first = first or row.example_id
    hint = f"ids look like {first!r}" if first else "the cache has no rows"
    raise PipelineError(f"{cache.path}: no example {example_id!r} ({hint}; they are the inputs' `id` fields, or "
                        "file:line)")


def _tokenizer(cache: Cache, model: str | None):
    """The tokenizer of --model, or of the model that made the cache; refused if it is not the cache's tokenizer."""
    from pipeline.model_source import open_model_source

    name = model or cache.manifest["teacher"]["model"]
    try:
        source = open_model_source(name)
    except PipelineError as e:
        if model:
            raise
        raise PipelineError(f"{e} (the model that made {cache.path}, from its manifest; pass --model to decode "
                            "the tokens with another copy of it)") from e
    if source.tokenizer_fingerprint != cache.manifest["tokenizer"]:
        raise PipelineError(f"{cache.path}: the tokenizer of {name} is not the one that made the cache (tokenizer: "
                            f"cache has {cache.manifest['tokenizer'][:12]}, {name} has "
                            f"{source.tokenizer_fingerprint[:12]}); pass --model of the cache's teacher")
    return source.tokenizer


def example_view(row: CachedRow, tokenizer) -> dict:
    """One example, token by token. Probabilities are at the cache's temperature, as train uses them.

    For the j-th response position t (loss_mask[t] true) the cached targets are the teacher's distribution of
    input_ids[t] given input_ids[:t]: `target` is the token that stands there, `top` the teacher's first TOP.
    """
    ids = row.input_ids.tolist()
    positions = np.flatnonzero(row.loss_mask).tolist()
    n_prompt = positions[0] if positions else len(ids)
    probs = np.exp(row.target_logprobs.astype(np.float64))  # (n, k)

    def token(token_id: int, **more) -> dict:
        return {"id": token_id, **_token_text(tokenizer, token_id), **more}

    rows = []
    for j, t in enumerate(positions):
        target = ids[t]
        top_ids = row.target_ids[j].tolist()
        rank = top_ids.index(target) + 1 if target in top_ids else None
        rows.append({
            "position": t,
            "target": token(target, rank=rank, p=float(probs[j, rank - 1]) if rank else None),
            "top": [token(i, p=float(p)) for i, p in zip(top_ids[:TOP], probs[j, :TOP], strict=True)],
            "residual": max(0.0, 1.0 - float(probs[j].sum())),
        })
    return {
        "example_id": row.example_id,
        "role": row.role,
        "split": row.split,
        "tokens": len(ids),
        "prompt_tokens": n_prompt,
        "response_tokens": len(positions),
        "prompt": tokenizer.decode(ids[:n_prompt]),
        "response": tokenizer.decode([ids[t] for t in positions]),
        "positions": rows,
    }


def _token_text(tokenizer, token_id: int) -> dict:
    """{"text": the token decoded}, plus {"bytes": hex} for a token that is only part of a character.

    Byte-level BPE (GPT-2, Llama 3, SmolLM2) and SentencePiece byte fallback split a character they have no token
    for into byte tokens; alone, such a token decodes to U+FFFD. Its bytes come from its vocabulary entry: a
    byte-level entry spells each byte as one printable character, a fallback entry is "<0xE6>".
    """
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return {"text": text}
    piece = tokenizer.convert_ids_to_tokens(token_id)
    fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if fallback:
        return {"text": text, "bytes": fallback.group(1).lower()}
    inverse = _byte_level_chars()
    if all(c in inverse for c in piece):
        return {"text": text, "bytes": bytes(inverse[c] for c in piece).hex()}
    return {"text": text}


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """The byte-level alphabet: character -> the byte it spells (GPT-2's bytes_to_unicode, inverted)."""
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:  # moved in some transformers version: partial tokens are then shown by id
        return {}
    return {c: b for b, c in bytes_to_unicode().items()}


# ----------------------------------------------------------------------------------------------------------------
# text form
# ----------------------------------------------------------------------------------------------------------------

def short(fingerprint: object) -> str:
    return str(fingerprint)[:12]


def render(report: dict) -> str:
    lines = render_overview(report["cache"])
    if "example" in report:
        lines += ["", *render_example(report["example"])]
    return "\n".join(lines)


def render_overview(c: dict) -> list[str]:
    s, t, q = c["settings"], c["totals"], c.get("quantization") or {}
    storage = c.get("storage") or {}
    quant = (f"{q.get('bnb_4bit_quant_type', '?')} 4-bit" + (", double quantisation" if q.get(
        "bnb_4bit_use_double_quant") else "") + f", compute {q.get('bnb_4bit_compute_dtype', '?')}") if q else "none"
    lines = [
        f"cache      {c['path']}",
        f"           format {c['format_version']}, written by pipeline {c.get('package_version')} at "
        f"{c.get('created')}",
        f"teacher    {c['teacher'].get('model')}",
        f"           weights {short(c['teacher'].get('fingerprint'))}, tokenizer {short(c['tokenizer'])}; {quant}",
        f"settings   top_k {s['top_k']}, max_length {s['max_length']}, temperature {s['temperature']}, "
        f"shard_size {s['shard_size']}, batch_size {s['batch_size']}, skip_bad_lines "
        f"{'on' if s['skip_bad_lines'] else 'off'}",
        f"storage    {storage.get('token_ids')} ids, {storage.get('logprobs')} log-probs, {storage.get('compression')}",
        "inputs",
    ]
    for i in c["inputs"]:
        cols = f", columns {','.join(f'{k}={v}' for k, v in i['columns'].items())}" if i.get("columns") else ""
        lines.append(f"  {i['role'] + '/' + i['split']:<15} {i['path']}  sha256 {short(i['sha256'])}, {i['examples']} "
                     f"examples, {i['skipped_bad_lines']} bad lines skipped{cols}")
    lines.append(f"  {'part':<15} {'rows':>7} {'tokens':>10} {'response':>10} {'bytes/resp tok':>15} {'shards':>7}")
    for name, p in c["parts"].items():
        lines.append(f"  {name:<15} {p['rows']:>7} {p['tokens']:>10} {p['response_tokens']:>10} "
                     f"{p['bytes'] / max(p['response_tokens'], 1):>15.1f} {p['shards']:>7}")
    if t:
        lines.append(f"  {'total':<15} {t['examples']:>7} {t['tokens']:>10} {t['response_tokens']:>10} "
                     f"{t['bytes_per_response_token']:>15.1f} {sum(p['shards'] for p in c['parts'].values()):>7}")
        lines += [
            f"size       {t['bytes'] / 1e6:.2f} MB, {t['bytes_per_response_token']} bytes per response token",
            f"padding    {t['padding_waste']:.1%} of the teacher's batch positions",
            f"skipped    {t.get('truncated', 0)} truncated (response cut at max_length), "
            f"{t.get('skipped_too_long', 0)} whose prompt fills max_length, {t.get('skipped_bad_lines', 0)} bad lines",
        ]
    return lines


def _token(t: dict, width: int = 0) -> str:
    """A token as JSON text (quotes show its spaces, escapes its newlines; non-ASCII as is); one that is part of a
    character as its bytes, <e6 97>, or failing those as #id."""
    if "bytes" in t:
        shown = f"<{' '.join(t['bytes'][i:i + 2] for i in range(0, len(t['bytes']), 2))}>"
    elif "\ufffd" in t["text"]:
        shown = f"#{t['id']}"
    else:
        shown = json.dumps(t["text"], ensure_ascii=False)
    return shown.ljust(width)


def render_example(e: dict) -> list[str]:
    lines = [
        f"example    {e['example_id']}  ({e['role']}/{e['split']}; {e['tokens']} tokens: {e['prompt_tokens']} prompt, "
        f"{e['response_tokens']} response)",
        "prompt     (as the model sees it, chat template included)",
        *(f"  | {line}" for line in e["prompt"].split("\n")),
        "response",
        *(f"  | {line}" for line in e["response"].split("\n")),
        "",
        f"  {'pos':>5}  {'target':<16} {'p':>6} {'rank':>4}  {'residual':>8}  teacher's top {TOP} (p)",
    ]
    for p in e["positions"]:
        tgt = p["target"]
        top = "  ".join(f"{_token(x)} {_prob(x['p'])}" for x in p["top"])
        lines.append(f"  {p['position']:>5}  {_token(tgt, 16)} {_prob(tgt['p']):>6} "
                     f"{tgt['rank'] if tgt['rank'] else '-':>4}  {_prob(p['residual']):>8}  {top}")
    return lines


def _prob(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.0e}"


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
