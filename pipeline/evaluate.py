"""`pipeline evaluate`: how much an adapter learned and how much it forgot, and the sweep's report and plot.

Everything is scored on the cache's held-out rows, so evaluation needs neither the original JSONL nor the
teacher model:

* task: mean per-token CE on the task eval rows, and the task's own score - exact match of the greedy
  answer (prompt = the cached prompt tokens) against the cached reference, whitespace trimmed;
* forgetting: mean per-token KL(base || tuned) on the rehearsal eval rows against the cached teacher
  targets (k+1 buckets, as in training), and the rehearsal CE of the tuned model next to the base's.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.config import EvalConfig
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write_json, atomic_write_text
from pipeline.generate import generate_all, load_adapter
from pipeline.losses import response_losses
from pipeline.models import (
    forward_hidden,
    load_model,
    load_tokenizer,
    model_fingerprint,
    output_head,
    resolve_device,
    resolve_model,
    resolve_precision,
    response_positions,
    tokenizer_fingerprint,
)
from pipeline.reader import Cache, CachedRow, collate_rows, open_cache


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
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    cache.check_compatible(model_fingerprint=model_fingerprint(model_dir),
                           tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model = load_model(model_dir, device, precision, attn=cfg.attn)
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter)
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


# ----------------------------------------------------------------------------------------------------------------
# sweep report
# ----------------------------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report_table(rows: list[dict]) -> str:
    """Markdown table, one row per run: setting, task score, task CE, forgetting KL, general CE, train time."""
    head = ["run", "kd_lambda", "rehearsal", "kd_on", "task exact match", "task CE", "forgetting KL", "general CE",
            "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ev = r.get("eval", {})
        task, forget = ev.get("task", {}), ev.get("forgetting", {})
        lines.append("| " + " | ".join([
            r["name"], _fmt(r.get("kd_lambda"), 2), _fmt(r.get("rehearsal_ratio"), 2), r.get("kd_on") or "-",
            _fmt(task.get("exact_match"), 3), _fmt(task.get("ce")), _fmt(forget.get("kl")), _fmt(forget.get("ce")),
            _fmt(r.get("train_seconds"), 0)]) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list[dict], *, command: str, extra: str = "") -> Path:
    """OUT/report.md: the table, the command and the date."""
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = (f"# Sweep report\n\nCommand: `{command}`  \nDate: {date}  \npipeline {__version__}\n\n"
            + report_table(rows) + "\n"
            "Task exact match: greedy answer equals the reference (higher is better). Forgetting KL: mean per-token "
            "KL(base || tuned) on held-out general prompts (lower is better; 0 for the base model). General CE: "
            "cross-entropy of the held-out general answers under the model.\n" + extra)
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def plot_tradeoff(out: Path, rows: list[dict]) -> Path | None:
    """OUT/tradeoff.png: task score against forgetting KL, one labelled point per run (base included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["name"], r["eval"]["forgetting"]["kl"], r["eval"]["task"].get("exact_match"))
              for r in rows if r.get("eval", {}).get("forgetting") and r.get("eval", {}).get("task")]
    points = [p for p in points if p[2] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    positive = [kl for name, kl, _ in points if name != "base" and kl > 0]
    if positive and max(positive) > 10 * min(positive):
        # Forgetting spans orders of magnitude (plain QLoRA far right, the distilled runs crowded near 0):
        # logarithmic above the smallest run's KL, linear below it so that the base model's 0 has a place.
        ax.set_xscale("symlog", linthresh=min(positive) / 2, linscale=0.5)
    span = (max(p[2] for p in points) - min(p[2] for p in points)) or 1.0
    for name, kl, score in points:
        ax.scatter(kl, score, s=36, color="tab:gray" if name == "base" else "tab:blue", zorder=3)
        # Label above-right, or below-right when a point just above and to the right would cover the label.
        crowded = any(0 <= s2 - score < 0.06 * span and k2 > kl for n2, k2, s2 in points if n2 != name)
        ax.annotate(name, (kl, score), textcoords="offset points", xytext=(6, -11 if crowded else 4), fontsize=8)
    scale = ", log scale" if ax.get_xscale() == "symlog" else ""
    ax.set_xlabel(f"forgetting: KL(base || tuned) on held-out general prompts{scale}  (lower is better)")
    ax.set_ylabel("task exact match  (higher is better)")
    ax.set_title("Learned vs forgotten")
    ax.grid(alpha=0.3)
    if ax.get_xscale() == "linear":
        ax.set_xlim(left=min(0.0, *(p[1] for p in points)) - 0.002)
    fig.tight_layout()
    path = out / "tradeoff.png"
    tmp = out / "tradeoff.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
