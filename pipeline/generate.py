"""`pipeline generate`, and the batched, seeded decoding it shares with make-rehearsal (rehearsal.py) and
evaluate's task answers (evaluate.py)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.config import GenerateConfig
from pipeline.device import autocast
from pipeline.fileio import atomic_write_text
from pipeline.inputs import Example, parse_line, read_examples, render_prompt_ids
from pipeline.model_source import open_model_source
from pipeline.models import load_for_inference


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
def end_of_turn_ids(model, tokenizer) -> set[int]:
    """The token ids generation stops at: the tokenizer's eos and the model's generation_config eos id(s)."""
    configured = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *([configured] if isinstance(configured, int) else configured or [])}
    eos.discard(None)
    return eos


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
    eos = end_of_turn_ids(model, tokenizer)
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
