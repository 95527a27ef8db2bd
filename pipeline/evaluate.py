"""`pipeline evaluate`: how much an adapter learned and how much it forgot.

Everything is scored on the cache's held-out rows, so evaluation needs neither the original JSONL nor the
teacher model:

* task: mean per-token CE on the task eval rows, and the task's own score - exact match of the greedy
  answer (prompt = the cached prompt tokens) against the cached reference, whitespace trimmed;
* forgetting: mean per-token KL(base || tuned) on the rehearsal eval rows against the cached teacher
  targets (k+1 buckets, as in training), and the rehearsal CE of the tuned model next to the base's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.config import EvalConfig
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write_json
from pipeline.format import CachedRow
from pipeline.generate import generate_all
from pipeline.losses import response_losses
from pipeline.models import forward_hidden, load_for_inference, open_model_source, output_head, response_positions
from pipeline.reader import Cache, collate_rows, open_cache


@torch.inference_mode()
def score_rows(model, rows: Sequence[CachedRow], *, pad_id: int, batch_size: int, device: torch.device,
               precision: str, temperature: float, with_kl: bool, desc: str) -> dict:
    """Mean per-token CE (and forward KL to the cached teacher) over the response tokens of `rows`."""
    from tqdm.auto import tqdm

    head = output_head(model)
    ce = kl = 0.0
    n = 0
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        batch = collate_rows(rows[start:start + batch_size], pad_id).to(device)
        hidden = forward_hidden(model, batch.input_ids, batch.attention_mask, precision)
        r, c = response_positions(batch.loss_mask)
        teacher = {"teacher_ids": batch.teacher_ids, "teacher_logprobs": batch.teacher_logprobs,
                   "temperature": temperature, "kl": "forward"} if with_kl else {}
        sums = response_losses(hidden[r, c], head.weight, batch.input_ids[r, c + 1], bias=head.bias,
                               logit_softcap=head.softcap, **teacher)
        ce += sums.ce.item()
        kl += sums.kl.item()
        n += sums.n_tokens
    return {"ce": ce / max(n, 1), "kl": kl / max(n, 1) if with_kl else None, "tokens": n}


def split_prompt(row: CachedRow) -> tuple[list[int], list[int]]:
    """(prompt ids, reference response ids) of a cached row."""
    first = int(row.loss_mask.argmax())
    return row.input_ids[:first].tolist(), row.input_ids[first:].tolist()


def exact_match(model, tokenizer, rows: Sequence[CachedRow], *, batch_size: int, max_new_tokens: int,
                device: torch.device, precision: str, seed: int) -> dict:
    """Greedy answers against the cached references (special tokens dropped, whitespace trimmed)."""
    prompts, refs = zip(*(split_prompt(r) for r in rows), strict=True)
    outs = generate_all(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        temperature=0.0, seed=seed, device=device, precision=precision, desc="task answers")
    refs_text = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in refs]
    preds = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    hits = [p == r for p, r in zip(preds, refs_text, strict=True)]
    samples = [{"id": row.example_id, "reference": r, "prediction": p}
               for row, r, p in list(zip(rows, refs_text, preds, strict=True))[:5]]
    return {"exact_match": sum(hits) / max(len(hits), 1), "examples": len(hits), "samples": samples}


def eval_rows(cache: Cache, role: str, limit: int | None) -> list[CachedRow]:
    """The eval rows of one role; with `limit`, the first ones by example id (not the shortest), in length order."""
    rows = list(cache.iter_rows(role, "eval"))
    if limit is not None and limit < len(rows):
        keep = set(sorted(r.example_id for r in rows)[:limit])
        rows = [r for r in rows if r.example_id in keep]
    return rows


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Score the base model (no adapter) or base + adapter on the cache's eval rows; returns the report."""
    t0 = time.perf_counter()
    cache = open_cache(cfg.cache)
    task_rows = eval_rows(cache, "task", cfg.limit)
    reh_rows = eval_rows(cache, "rehearsal", cfg.limit)
    if not task_rows and not reh_rows:
        raise PipelineError(f"{cache.path}: no eval rows; cache --task-eval and/or --rehearsal-eval data")
    source = open_model_source(cfg.model)
    tokenizer = source.tokenizer
    cache.check_compatible(model_fingerprint=source.fingerprint, tokenizer_fingerprint=source.tokenizer_fingerprint)
    model, device, precision = load_for_inference(source, cfg.device, cfg.precision, cfg.adapter)
    common = {"pad_id": tokenizer.pad_token_id, "batch_size": cfg.batch_size, "device": device,
              "precision": precision, "temperature": cache.temperature}
    report: dict = {"model": cfg.model, "adapter": cfg.adapter, "cache": str(cache.path),
                    "cache_fingerprint": cache.fingerprint}
    if task_rows:
        task = score_rows(model, task_rows, with_kl=False, desc="task CE", **common)
        report["task"] = {"examples": len(task_rows), "ce": task["ce"], "tokens": task["tokens"]}
        if cfg.task_score == "exact_match":
            em = exact_match(model, tokenizer, task_rows, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                             device=device, precision=precision, seed=cfg.seed)
            report["task"].update(em)
    if reh_rows:
        tuned = score_rows(model, reh_rows, with_kl=True, desc="forgetting", **common)
        if cfg.adapter:
            with model.disable_adapter():
                base = score_rows(model, reh_rows, with_kl=False, desc="base CE", **common)
        else:
            base = tuned
        report["forgetting"] = {"examples": len(reh_rows), "kl": tuned["kl"], "ce": tuned["ce"],
                                "base_ce": base["ce"], "tokens": tuned["tokens"]}
    report["settings"] = {"max_new_tokens": cfg.max_new_tokens, "task_score": cfg.task_score, "limit": cfg.limit,
                          "precision": precision, "device": str(device), "top_k": cache.top_k,
                          "temperature": cache.temperature}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["package_version"] = __version__
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(cfg.out), report)
    return report


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
