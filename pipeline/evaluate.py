"""`pipeline evaluate`: how much an adapter learned and how much it forgot.

Everything is scored on the cache's held-out rows, so evaluation needs neither the original JSONL nor the
teacher model:

* task: mean per-token CE on the task eval rows, and the task's own score (--task-score, scoring.py: exact match
  by default, or normalized, json, contains, regex, or the user's function) of the greedy answer (prompt = the
  cached prompt tokens) against the cached reference, both decoded with special tokens dropped and surrounding
  whitespace trimmed (`answer_text`): its mean over the rows and the standard error of that mean, and how many
  references no answer can match (longer than --max-new-tokens, or cut at the cache's max_length; a warning says
  so when there are any);
* forgetting, on the rehearsal eval rows (refused if a prompt is also among the rehearsal train rows): per
  batch one forward with the adapter on and one with it off (the same loaded model: no second copy), then at
  the response positions
    kl               mean per-token KL(base || tuned) over the full vocabulary, at T = 1
    top1_agreement   share of positions where both models' most likely next token is the same
    kl_topk          mean per-token KL over the cached k+1 buckets (as in training, at the cache's T): cheap,
                     and a lower bound of kl (at T = 1; merging the tail into one bucket can only lower a KL)
    ce, base_ce      the general CE of the tuned model and of the base.
  Without an adapter the tuned model is the base: kl is 0 and top1_agreement 1 by definition.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.batches import collate_rows
from pipeline.cache.read import Cache, open_cache
from pipeline.cache.schema import CachedRow
from pipeline.config import EvalConfig
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write_json
from pipeline.forward import output_head, response_positions, student_losses
from pipeline.generate import end_of_turn_ids, generate_all
from pipeline.losses import full_kl_and_agreement
from pipeline.model_source import open_model_source
from pipeline.models import load_for_inference
from pipeline.scoring import NONE, Scorer, load_scorer, score_all, summary


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
        teacher = {"teacher_ids": batch.teacher_ids, "teacher_logprobs": batch.teacher_logprobs,
                   "temperature": temperature, "kl": "forward"} if with_kl else {}
        sums, _, _ = student_losses(model, head, batch, precision, **teacher)
        ce += sums.ce.item()
        kl += sums.kl.item()
        n += sums.n_tokens
    return {"ce": ce / max(n, 1), "kl": kl / max(n, 1) if with_kl else None, "tokens": n}


def split_prompt(row: CachedRow) -> tuple[list[int], list[int]]:
    """(prompt ids, reference response ids) of a cached row: input_ids before and from the first loss position."""
    first = int(row.loss_mask.argmax())
    return row.input_ids[:first].tolist(), row.input_ids[first:].tolist()


@torch.inference_mode()
def score_forgetting(model, rows: Sequence[CachedRow], *, has_adapter: bool, pad_id: int, batch_size: int,
                     device: torch.device, precision: str, temperature: float) -> dict:
    """The forgetting figures of the module docstring over the response tokens of `rows`.

    "Base" is `model` with its adapter switched off (`model.disable_adapter()`): one forward with the adapter and
    one without per batch, and the full-vocabulary comparison is chunked (losses.full_kl_and_agreement).
    """
    from tqdm.auto import tqdm

    head = output_head(model)
    sums = {"kl": 0.0, "kl_topk": 0.0, "ce": 0.0, "base_ce": 0.0, "agree": 0}
    n = 0
    for start in tqdm(range(0, len(rows), batch_size), desc="forgetting", unit="batch", dynamic_ncols=True,
                      leave=False):
        batch = collate_rows(rows[start:start + batch_size], pad_id).to(device)
        positions = response_positions(batch.loss_mask)
        tuned, h_tuned, _ = student_losses(model, head, batch, precision, positions=positions,
                                           teacher_ids=batch.teacher_ids, teacher_logprobs=batch.teacher_logprobs,
                                           temperature=temperature, kl="forward")
        sums["ce"] += tuned.ce.item()
        sums["kl_topk"] += tuned.kl.item()
        n += tuned.n_tokens
        if not has_adapter:  # the tuned model is the base: KL 0, every position agrees (no need to compute either)
            sums["base_ce"] += tuned.ce.item()
            sums["agree"] += tuned.n_tokens
            continue
        with model.disable_adapter():
            base, h_base, _ = student_losses(model, head, batch, precision, positions=positions)
        sums["base_ce"] += base.ce.item()
        kl, agree = full_kl_and_agreement(h_base, h_tuned, head.weight, **head.losses_kwargs())
        sums["kl"] += kl.item()
        sums["agree"] += int(agree)
    per_token = max(n, 1)
    return {"kl": sums["kl"] / per_token, "top1_agreement": sums["agree"] / per_token,
            "kl_topk": sums["kl_topk"] / per_token, "ce": sums["ce"] / per_token,
            "base_ce": sums["base_ce"] / per_token, "tokens": n}


def answer_text(tokenizer, ids: Sequence[int]) -> str:
    """An answer as exact match compares it: decoded with special tokens dropped, surrounding whitespace trimmed."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def same_answer(tokenizer, prediction: Sequence[int], reference: Sequence[int]) -> bool:
    """Exact match of two token-id sequences after `answer_text` normalisation."""
    return answer_text(tokenizer, prediction) == answer_text(tokenizer, reference)


def unreachable_references(rows: Sequence[CachedRow], stops: set[int], *, max_new_tokens: int,
                           max_length: int) -> dict[str, int]:
    """How many task references an answer of at most `max_new_tokens` tokens cannot reproduce.

    Args:
        stops: the ids that end an answer (the end of turn and the other special tokens, which answer_text drops).
        max_length: the cache's: a row that long whose reference holds no stop token was cut there.
    Returns:
        references_over_max_new_tokens: the references with more answer tokens (those before the first stop
            token) than max_new_tokens: generation stops before it could write them out;
        references_cut_by_max_length: the references cut at the cache's max_length: an answer that says all of
            what the reference said before the cut says more than the reference.
    """
    over = cut = 0
    for row in rows:
        _, ref = split_prompt(row)
        answer = next((j for j, t in enumerate(ref) if t in stops), None)
        over += (len(ref) if answer is None else answer) > max_new_tokens
        cut += answer is None and len(row.input_ids) >= max_length
    return {"references_over_max_new_tokens": over, "references_cut_by_max_length": cut}


def task_score(model, tokenizer, rows: Sequence[CachedRow], scorer: Scorer, *, batch_size: int,
               max_new_tokens: int, max_length: int, device: torch.device, precision: str, seed: int,
               log=print) -> dict:
    """Greedy answers scored against the cached references (both as `answer_text` gives them) by `scorer`.

    Returns:
        scoring.summary's keys (score, score_name, score_error, and exact_match or fields where they apply),
        examples, samples: the first five answers as compared, each with its score, and the counts of
        unreachable_references (a warning is logged when either is not 0).
    """
    stops = end_of_turn_ids(model, tokenizer) | set(tokenizer.all_special_ids)
    unreachable = unreachable_references(rows, stops, max_new_tokens=max_new_tokens, max_length=max_length)
    over, cut = unreachable.values()
    if over or cut:
        log(f"warning: of {len(rows)} task references, {over} are longer than --max-new-tokens {max_new_tokens} and "
            f"{cut} were cut at the cache's max_length {max_length}: no answer can match those exactly, so the task "
            "score is lower than the model's; raise --max-new-tokens, or cache with a larger --max-length")
    prompts, refs = zip(*(split_prompt(r) for r in rows), strict=True)
    outs = generate_all(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        temperature=0.0, seed=seed, device=device, precision=precision, desc="task answers")
    predictions = [answer_text(tokenizer, o) for o in outs]
    references = [answer_text(tokenizer, r) for r in refs]
    # What a user scorer sees besides the two answers: the id, and the prompt as the model saw it (chat template).
    examples = [{"id": row.example_id, "prompt": tokenizer.decode(list(p), skip_special_tokens=False)}
                for row, p in zip(rows, prompts, strict=True)]
    scores = score_all(scorer, predictions, references, examples)
    samples = [{"id": row.example_id, "reference": ref, "prediction": pred, "score": score}
               for row, ref, pred, score in list(zip(rows, references, predictions, scores, strict=True))[:5]]
    return {**summary(scorer.name, scores, predictions, references), "examples": len(scores), "samples": samples,
            **unreachable}


def refuse_trained_prompts(cache: Cache, rows: Sequence[CachedRow]) -> None:
    """Refuse held-out general rows whose prompt (token ids) is also a rehearsal training row's prompt.

    Forgetting must be measured on prompts the adapter never trained on. Prompts are compared by a digest of
    their token ids, so only 20 bytes per training row are held.
    """
    def digest(row: CachedRow) -> bytes:
        first = int(row.loss_mask.argmax())
        return hashlib.sha1(row.input_ids[:first].astype("<i8").tobytes()).digest()

    trained = {digest(r) for r in cache.iter_rows("rehearsal", "train")}
    seen = [r.example_id for r in rows if digest(r) in trained]
    if seen:
        raise PipelineError(f"{cache.path}: {len(seen)} of {len(rows)} held-out general (rehearsal eval) rows have "
                            f"a prompt that is also a rehearsal training prompt (e.g. {seen[0]!r}); forgetting must "
                            "be measured on prompts never trained on: rebuild the cache with disjoint "
                            "--rehearsal-train and --rehearsal-eval prompts")


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
    scorer = load_scorer(cfg.task_score) if cfg.task_score != NONE else None  # before any model is loaded
    cache = open_cache(cfg.cache)
    task_rows = eval_rows(cache, "task", cfg.limit)
    reh_rows = eval_rows(cache, "rehearsal", cfg.limit)
    if not task_rows and not reh_rows:
        raise PipelineError(f"{cache.path}: no eval rows; cache --task-eval and/or --rehearsal-eval data")
    if reh_rows:
        refuse_trained_prompts(cache, reh_rows)
    source = open_model_source(cfg.model)
    tokenizer = source.tokenizer
    cache.check_compatible(model_fingerprint=source.fingerprint, tokenizer_fingerprint=source.tokenizer_fingerprint)
    model, device, precision = load_for_inference(source, cfg.device, cfg.precision, cfg.adapter, attn=cfg.attn)
    common = {"pad_id": tokenizer.pad_token_id, "batch_size": cfg.batch_size, "device": device,
              "precision": precision, "temperature": cache.temperature}
    report: dict = {"model": cfg.model, "model_fingerprint": source.fingerprint, "adapter": cfg.adapter,
                    "cache": str(cache.path), "cache_fingerprint": cache.fingerprint}
    if task_rows:
        task = score_rows(model, task_rows, with_kl=False, desc="task CE", **common)
        report["task"] = {"examples": len(task_rows), "ce": task["ce"], "tokens": task["tokens"]}
        if scorer is not None:
            report["task"].update(task_score(model, tokenizer, task_rows, scorer, batch_size=cfg.batch_size,
                                             max_new_tokens=cfg.max_new_tokens,
                                             max_length=int(cache.manifest["max_length"]), device=device,
                                             precision=precision, seed=cfg.seed, log=log))
    if reh_rows:
        forgetting = score_forgetting(model, reh_rows, has_adapter=bool(cfg.adapter), **common)
        report["forgetting"] = {"examples": len(reh_rows), **forgetting}
    report["settings"] = {"max_new_tokens": cfg.max_new_tokens, "task_score": cfg.task_score,
                          "task_score_sha256": scorer.sha256 if scorer else None, "limit": cfg.limit,
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
