"""Generation: `pipeline make-rehearsal`, `pipeline generate`, and the batched decoding they share.

make-rehearsal lets the base model answer general prompts when the user has no general instruction
data; the answers become rehearsal data for cache-teacher. It samples at temperature 1 with no top-k or
top-p truncation by default: cross-entropy on the base model's own samples preserves its distribution in
expectation, while greedy answers sharpen it (DESIGN.md section 3).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import GenerateConfig, RehearsalConfig
from pipeline.data import Example, parse_line, read_examples, render_prompt_ids
from pipeline.errors import PipelineError
from pipeline.faults import crash_point
from pipeline.fileio import atomic_write_text
from pipeline.models import autocast, load_for_inference, open_model_source


class InverseCdfSampler:
    """A logits processor that samples from softmax(scores / T) and leaves only the sampled token finite, so
    that greedy decoding emits it.

    [sampling note] transformers samples with torch.multinomial, which draws one exponential per vocabulary
    entry: 77 ms per decoding step for 64 x 49152 scores on 2 CPU cores (softmax included). Inverse-CDF sampling
    (one uniform per row, a cumulative sum, a binary search) draws from the same distribution in 21 ms, most of
    it the softmax and the output mask. No top-k/top-p truncation: make-rehearsal wants the model's full
    distribution. Used off CUDA only (sampler_for).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        cdf = probs.cumsum(dim=-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
        return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)


class MultinomialSampler(InverseCdfSampler):
    """As InverseCdfSampler, drawing with torch.multinomial: exact, and fast on CUDA, where [sampling note]'s
    cost does not arise (the GPU draws the exponentials in parallel)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        token = torch.multinomial(probs, 1)  # (B, 1)
        return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)


def sampler_for(device: torch.device, temperature: float) -> InverseCdfSampler:
    """The sampling logits processor for a device: torch.multinomial on CUDA, inverse-CDF elsewhere (CPU)."""
    return MultinomialSampler(temperature) if device.type == "cuda" else InverseCdfSampler(temperature)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
                   device: torch.device, precision: str) -> list[list[int]]:
    """Decode one batch of prompts (token ids); returns the new tokens of each, cut after the end of turn.

    temperature 0 is greedy; otherwise plain sampling from the full softmax (no top-k/top-p truncation).
    """
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([sampler_for(device, temperature)] if temperature > 0 else [])
    greedy = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}
    eos.discard(None)
    with autocast(device, precision):
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=sorted(eos), use_cache=True, logits_processor=processors,
                             **greedy)
    results = []
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in eos), None)
        results.append(row[:cut] if cut is not None else row)
    return results


def generate_all(model, tokenizer, prompts: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
                 temperature: float, seed: int, device: torch.device, precision: str, desc: str,
                 on_batch=None, done: set[int] | frozenset = frozenset()) -> list[list[int]]:
    """Generate for many prompts in length-sorted batches.

    Batches are planned over ALL prompts and sampling is seeded per batch, so a resumed run (`done`: indices
    answered before; a batch is skipped only when all of its prompts are done) samples exactly what an
    uninterrupted one would.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results: list[list[int] | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), initial=len(done), desc=desc, unit="prompt", dynamic_ncols=True)
    t0, n_new = time.perf_counter(), 0
    try:
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start:start + batch_size]
            if all(i in done for i in idx):
                continue
            torch.manual_seed(seed * 1_000_003 + b)
            outs = generate_batch(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                                  temperature=temperature, device=device, precision=precision)
            for i, o in zip(idx, outs, strict=True):
                results[i] = o
            if on_batch is not None:
                on_batch(idx, outs)
            n_new += sum(len(o) for o in outs)
            bar.update(sum(i not in done for i in idx))
            bar.set_postfix_str(f"{n_new / (time.perf_counter() - t0):.0f} new tok/s", refresh=False)
    finally:
        bar.close()
    return [r if r is not None else [] for r in results]


# ----------------------------------------------------------------------------------------------------------------
# make-rehearsal
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RehearsalSummary:
    prompts: int
    answered_now: int
    kept: int
    empty: int
    hit_max_tokens: int
    seconds: float
    out: Path

    def lines(self) -> list[str]:
        return [f"rehearsal data: {self.out}",
                f"  prompts        {self.prompts} ({self.answered_now} answered now, {self.kept} kept from an "
                "earlier run)",
                f"  empty answers  {self.empty} (left out)",
                f"  cut at --max-new-tokens  {self.hit_max_tokens}",
                f"  wall time      {self.seconds:.1f} s"]


def partial_path(out: Path) -> Path:
    """Where make-rehearsal appends answered batches until it writes `out` (see [rehearsal order note])."""
    return out.with_name(out.name + ".partial")


def _answered(path: Path) -> dict[str, str]:
    """id -> JSONL line of the answers already in `path` (an earlier run's OUT or OUT.partial); a torn last line
    from a crash is cut off first."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    answers = {}
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(keepends=True), start=1):
        try:
            answers[str(json.loads(line)["id"])] = line
        except (ValueError, KeyError, TypeError):
            raise PipelineError(f"{path}:{lineno}: not a line written by make-rehearsal; use another --out") from None
    return answers


def with_answer(ex: Example, answer: str, *, hit_limit: bool) -> dict:
    """The prompt line written back with the model's answer, in the prompt's own form."""
    obj = {k: v for k, v in (ex.raw or {}).items() if k != "id"}
    if "messages" in obj:
        obj["messages"] = [*obj["messages"], {"role": "assistant", "content": answer}]
    else:
        obj["output"] = answer
    record = {"id": ex.id, **obj}
    if hit_limit:
        record["truncated"] = True
    return record


def make_rehearsal(cfg: RehearsalConfig, log=print) -> RehearsalSummary:
    """Answer every prompt with the base model and write OUT in the prompts' order.

    [rehearsal order note] Generation runs in length-sorted batches (little padding), so answers arrive out of
    order. Each answered batch is appended to OUT.partial and fsynced: a killed run loses at most the batch in
    flight, and a rerun skips the prompts found there (sampling is seeded per batch, so it draws what an
    uninterrupted run would). Only when every prompt is answered is OUT written, in the prompts' order, atomically
    (tmp file + rename), and OUT.partial removed: OUT is complete whenever it exists, and a killed-and-rerun run
    writes the same bytes as an uninterrupted one. A rerun also reads an existing OUT, so a finished file is
    kept (and rewritten in order if an older version wrote it in batch order); answers to ids that are no longer
    among the prompts stay, after the others.
    """
    t0 = time.perf_counter()
    prompts, stats = read_examples(cfg.prompts, with_response=False, skip_bad_lines=cfg.skip_bad_lines,
                                   columns=cfg.columns)
    for line in stats.skipped[:5]:
        log(f"skipped bad line {line}")
    out = Path(cfg.out)
    if out.is_dir():
        raise PipelineError(f"{out}: is a directory, expected a JSONL file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    answers = {**_answered(out), **_answered(partial)}
    done = {i for i, ex in enumerate(prompts) if ex.id in answers}
    counts = {"empty": 0, "hit": 0, "new": 0}
    if len(done) < len(prompts):
        source = open_model_source(cfg.model)
        tokenizer = source.tokenizer
        model, device, precision = load_for_inference(source, cfg.device, cfg.precision, attn=cfg.attn)
        prompt_ids = [render_prompt_ids(tokenizer, ex.messages) for ex in prompts]
        temperature = 0.0 if cfg.greedy else cfg.temperature
        try:
            f = open(partial, "a", encoding="utf-8")  # noqa: SIM115 - appended batch by batch, fsynced
        except OSError as e:
            raise PipelineError(f"{partial}: cannot write: {e.strerror}") from e

        def write(idx: list[int], outs: list[list[int]]) -> None:
            lines = []
            for i, ids in zip(idx, outs, strict=True):
                if i in done:
                    continue  # answered before the interruption; the same sample again, not written twice
                answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
                if not answer:
                    counts["empty"] += 1
                    continue
                hit = len(ids) >= cfg.max_new_tokens
                counts["hit"] += hit
                counts["new"] += 1
                line = json.dumps(with_answer(prompts[i], answer, hit_limit=hit), ensure_ascii=False) + "\n"
                answers[prompts[i].id] = line
                lines.append(line)
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            crash_point("rehearsal_batch_written")

        try:
            generate_all(model, tokenizer, prompt_ids, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                         temperature=temperature, seed=cfg.seed, device=device, precision=precision,
                         desc="make-rehearsal", on_batch=write, done=done)
        except OSError as e:
            raise PipelineError(f"{partial}: cannot write: {e.strerror or e}") from e
        finally:
            f.close()
    ids = {ex.id for ex in prompts}
    text = "".join([answers[ex.id] for ex in prompts if ex.id in answers] +
                   [line for key, line in answers.items() if key not in ids])
    if not out.exists() or out.read_bytes() != text.encode("utf-8"):
        atomic_write_text(out, text)
    partial.unlink(missing_ok=True)
    return RehearsalSummary(len(prompts), counts["new"], len(done), counts["empty"], counts["hit"],
                            time.perf_counter() - t0, out)


# ----------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------

def read_prompts(cfg: GenerateConfig) -> list[Example]:
    examples = [Example(f"prompt-{i + 1}", parse_line({"instruction": p}, with_response=False), f"--prompt #{i + 1}",
                        raw={"instruction": p}) for i, p in enumerate(cfg.prompt)]
    if cfg.prompts:
        more, _ = read_examples(cfg.prompts, with_response=False, columns=cfg.columns)
        examples += more
    return examples


def generate(cfg: GenerateConfig) -> list[dict]:
    """Answer the prompts; returns one record per prompt (also written to cfg.out as JSONL if given)."""
    examples = read_prompts(cfg)
    source = open_model_source(cfg.model)
    tokenizer = source.tokenizer
    model, device, precision = load_for_inference(source, cfg.device, cfg.precision, cfg.adapter, attn=cfg.attn)
    prompt_ids = [render_prompt_ids(tokenizer, ex.messages) for ex in examples]
    outs = generate_all(model, tokenizer, prompt_ids, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, seed=cfg.seed, device=device, precision=precision,
                        desc="generate")
    records = [{"id": ex.id, "prompt": ex.messages[-1]["content"],
                "answer": tokenizer.decode(ids, skip_special_tokens=True).strip()}
               for ex, ids in zip(examples, outs, strict=True)]
    if cfg.out:  # in the prompts' order (generate_all returns them so), atomically
        atomic_write_text(Path(cfg.out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records
