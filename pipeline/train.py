"""Stage two, `pipeline train`: a LoRA adapter trained against the cached teacher, top to bottom.

    setup   verify the cache against the model, load the 4-bit base + LoRA, optimiser, schedule, streams
    fit     for each optimiser step: draw the mixed examples, forward/backward each micro-batch with the
            loss normalised by the step's token counts, clip, step; log, checkpoint, stop on divergence
    finish  save OUT/adapter, OUT/run.yaml

Loss per step (DESIGN.md section 5), means over the response tokens of the WHOLE step:
    CE + kd_lambda * T^2 * KL  (+ l2 * sum ||LoRA||^2)
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline import __version__
from pipeline.config import TrainConfig, to_dict
from pipeline.data import draw_step
from pipeline.errors import PipelineError
from pipeline.faults import crash_point
from pipeline.fileio import TMP_MARK, atomic_write_text, fsync_dir, remove_tmp_files, replace_dir
from pipeline.losses import l2_penalty, response_losses
from pipeline.models import (
    attach_lora,
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
from pipeline.reader import Cache, RowStream, TrainBatch, collate_rows, describe, open_cache

CHECKPOINTS = "checkpoints"


@dataclass
class StepStats:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss: float = 0.0
    ce: float = 0.0
    kl: float = 0.0
    kl_steps: int = 0
    l2: float = 0.0
    tokens: int = 0  # all (non-pad) tokens processed
    response_tokens: int = 0
    examples: int = 0
    rehearsal_examples: int = 0
    seconds: float = 0.0


@dataclass
class Run:
    """Everything `fit` needs, built by `setup`."""

    cfg: TrainConfig
    out: Path
    cache: Cache
    model: object
    head: object
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    task: RowStream
    rehearsal: RowStream | None
    device: torch.device
    precision: str
    temperature: float
    step: int = 0
    history: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------

def prepare_out_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(out)
        elif not cfg.resume:
            raise PipelineError(f"{out}: not empty; pass --resume to continue the run in it or --overwrite to "
                                "start afresh")
    out.mkdir(parents=True, exist_ok=True)
    (out / CHECKPOINTS).mkdir(exist_ok=True)
    remove_tmp_files(out / CHECKPOINTS)
    return out


def check_resume_settings(cfg: TrainConfig, out: Path) -> None:
    """A resumed run must continue with the settings it started with (else the result is neither run)."""
    run_yaml = out / "run.yaml"
    if not cfg.resume or not run_yaml.exists():
        return
    try:
        have = (yaml.safe_load(run_yaml.read_text()) or {}).get("config", {})
    except yaml.YAMLError:
        return
    want = to_dict(cfg)
    for key in sorted(set(have) | set(want)):
        if key not in ("resume", "overwrite") and have.get(key) != want.get(key):
            raise PipelineError(f"{out}: --resume with other settings: {key} was {have.get(key)!r}, now "
                                f"{want.get(key)!r}; resume with the same settings or use --overwrite")


def setup(cfg: TrainConfig, log=print) -> Run:
    cache = open_cache(cfg.cache)
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    cache.check_compatible(model_fingerprint=model_fingerprint(model_dir),
                           tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                           max_length=cfg.max_length, top_k=cfg.top_k, temperature=cfg.temperature)
    n_task, n_reh = cache.count("task", "train"), cache.count("rehearsal", "train")
    if cfg.rehearsal_ratio > 0 and n_reh == 0:
        raise PipelineError(f"{cache.path}: rehearsal_ratio is {cfg.rehearsal_ratio} but the cache has no rehearsal "
                            "training rows; cache them with --rehearsal-train or pass --rehearsal-ratio 0")
    if cfg.rehearsal_ratio < 1 and n_task == 0:
        raise PipelineError(f"{cache.path}: the cache has no task training rows (--task-train)")
    out = prepare_out_dir(cfg)
    check_resume_settings(cfg, out)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if precision != cache.manifest.get("precision"):
        log(f"note: the cache was computed in {cache.manifest.get('precision')}, training runs in {precision}; "
            "the step-0 KL will not be ~0")

    torch.manual_seed(cfg.seed)  # LoRA init
    model = load_model(model_dir, device, precision)
    model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules, gradient_checkpointing=cfg.gradient_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps)
    task = RowStream(cache, "task", "train", cfg.seed)
    rehearsal = RowStream(cache, "rehearsal", "train", cfg.seed) if n_reh else None
    log(f"cache {describe(cache)}")
    log(f"model {cfg.model}: {sum(p.numel() for p in params):,} trainable LoRA parameters, {precision}, {device}")
    return Run(cfg, out, cache, model, output_head(model), tokenizer, optimizer, scheduler, task, rehearsal, device,
               precision, cache.temperature)


# ----------------------------------------------------------------------------------------------------------------
# one optimiser step
# ----------------------------------------------------------------------------------------------------------------

def micro_batches(run: Run, step: int) -> list[TrainBatch]:
    """The step's mixed examples (DESIGN.md section 6), split into micro-batches of cfg.batch_size."""
    cfg = run.cfg
    n = cfg.batch_size * cfg.grad_accum
    rows = draw_step(run.task, run.rehearsal, n, cfg.rehearsal_ratio, cfg.seed, step)
    pad = run.tokenizer.pad_token_id
    return [collate_rows(rows[i:i + cfg.batch_size], pad) for i in range(0, n, cfg.batch_size)]


def kd_mask_of(batch: TrainBatch, kd_on: str) -> torch.Tensor | None:
    return batch.is_rehearsal if kd_on == "rehearsal" else None


def loss_step(run: Run, batches: list[TrainBatch], *, measure_kl: bool) -> dict:
    """Forward + backward over all micro-batches of one step, gradients normalised by the step's tokens.

    [token-normalised accumulation note] Each micro-batch contributes sum_CE / N_step (and
    sum_KL / N_kd_step), where N counts the response tokens of the whole step, so batch 8 x accum 1 and
    batch 2 x accum 4 produce the same gradient. Dividing each micro-batch by its own count would weight
    tokens of short micro-batches more.

    Args:
        measure_kl: compute the KL for logging even when kd_lambda is 0 (no gradient flows through it then).
    """
    cfg, head = run.cfg, run.head
    kd = cfg.kd_lambda > 0
    n_tokens = sum(b.n_tokens for b in batches)
    n_kd = sum(b.n_tokens if cfg.kd_on == "all" else int(b.is_rehearsal.sum()) for b in batches)
    ce_sum = kl_sum = 0.0
    kd_weight = cfg.kd_lambda * run.temperature**2
    for batch in batches:
        batch = batch.to(run.device)
        hidden = forward_hidden(run.model, batch.input_ids, batch.attention_mask, run.precision)  # (B, T, H)
        rows, cols = response_positions(batch.loss_mask)
        h = hidden[rows, cols]  # (N, H): only response positions reach the output head
        labels = batch.input_ids[rows, cols + 1]
        teacher = {"teacher_ids": batch.teacher_ids, "teacher_logprobs": batch.teacher_logprobs,
                   "kd_mask": kd_mask_of(batch, cfg.kd_on), "temperature": run.temperature, "kl": cfg.kl}
        common = {"bias": head.bias, "chunk_size": cfg.loss_chunk_size, "logit_softcap": head.softcap}
        sums = response_losses(h, head.weight, labels, **common, **(teacher if kd else {}))
        loss = sums.ce / n_tokens
        if kd and n_kd:
            loss = loss + kd_weight * sums.kl / n_kd
        loss.backward()
        ce_sum += sums.ce.item()
        if kd:
            kl_sum += sums.kl.item()
        elif measure_kl:  # lambda = 0: the KL is only watched, never part of the loss
            with torch.no_grad():
                kl_sum += response_losses(h.detach(), head.weight, labels, **common, **teacher).kl.item()
    ce = ce_sum / max(n_tokens, 1)
    kl = kl_sum / max(n_kd, 1) if (kd or measure_kl) else None
    l2 = 0.0
    if cfg.l2 > 0:
        penalty = cfg.l2 * l2_penalty(p for p in run.model.parameters() if p.requires_grad)
        penalty.backward()
        l2 = penalty.item()
    loss = ce + (kd_weight * kl if kd and kl is not None else 0.0) + l2
    return {"loss": loss, "ce": ce, "kl": kl, "l2": l2, "response_tokens": n_tokens,
            "tokens": sum(int(b.attention_mask.sum()) for b in batches),
            "examples": sum(b.input_ids.shape[0] for b in batches),
            "rehearsal_examples": sum(b.n_rehearsal_examples for b in batches)}


def optimizer_step(run: Run) -> float:
    params = [p for p in run.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else math.inf)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_adapter(model, path: Path) -> None:
    """save_pretrained into a temporary directory, then rename: OUT/adapter is always complete."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    replace_dir(tmp, path)


def save_checkpoint(run: Run) -> Path:
    """OUT/checkpoints/step-NNNNNN/: adapter, optimiser, schedule, RNG and data-stream state; atomic."""
    from peft import get_peft_model_state_dict

    ckpt_dir = run.out / CHECKPOINTS
    final = ckpt_dir / f"step-{run.step:06d}"
    tmp = ckpt_dir / f"{final.name}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "step": run.step,
        "adapter": get_peft_model_state_dict(run.model),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(),
        "streams": {"task": run.task.state_dict(),
                    "rehearsal": run.rehearsal.state_dict() if run.rehearsal else None},
        "history": run.history,
    }
    try:
        torch.save(state, tmp / "state.pt")
        with open(tmp / "state.pt", "rb+") as f:
            os.fsync(f.fileno())
        crash_point("checkpoint_tmp_written")
        replace_dir(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PipelineError(f"{final}: cannot write checkpoint: {e.strerror or e}") from e
    for old in sorted(ckpt_dir.glob("step-*"))[:-run.cfg.keep_checkpoints]:
        if TMP_MARK not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = [p for p in (out / CHECKPOINTS).glob("step-*") if TMP_MARK not in p.name and (p / "state.pt").is_file()]
    return max(done, default=None, key=lambda p: p.name)


def load_checkpoint(run: Run, path: Path) -> None:
    from peft import set_peft_model_state_dict

    try:
        state = torch.load(path / "state.pt", map_location=run.device, weights_only=False)
    except Exception as e:  # a checkpoint that does not load is reported, never half-used
        raise PipelineError(f"{path / 'state.pt'}: unreadable checkpoint ({e}); delete {path} to resume from the "
                            "one before") from e
    set_peft_model_state_dict(run.model, state["adapter"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.task.load_state_dict(state["streams"]["task"])
    if run.rehearsal and state["streams"]["rehearsal"]:
        run.rehearsal.load_state_dict(state["streams"]["rehearsal"])
    set_rng_state(state["rng"])
    run.step = state["step"]
    run.history = state["history"]


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------

class MetricsLog:
    """OUT/metrics.jsonl, one JSON line per logged step; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _record(step: int, stats: StepStats, lr: float, grad_norm: float | None) -> dict:
    n = max(stats.steps, 1)
    return {
        "step": step,
        "loss": round(stats.loss / n, 6),
        "ce": round(stats.ce / n, 6),
        "kl": round(stats.kl / stats.kl_steps, 6) if stats.kl_steps else None,
        "l2": round(stats.l2 / n, 8),
        "lr": lr,
        "grad_norm": None if grad_norm is None else round(grad_norm, 4),
        "tokens_per_s": round(stats.tokens / max(stats.seconds, 1e-9), 1),
        "rehearsal_ratio": round(stats.rehearsal_examples / max(stats.examples, 1), 4),
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------

def fit(run: Run, log=print) -> dict:
    from tqdm.auto import tqdm

    cfg = run.cfg
    metrics = MetricsLog(run.out / "metrics.jsonl", run.step)
    stats, best_avg, avg = StepStats(), math.inf, None
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        while run.step < cfg.max_steps:
            t0 = time.perf_counter()
            step = run.step + 1
            log_now = step % cfg.log_every == 0 or step == cfg.max_steps or step == 1
            out = loss_step(run, micro_batches(run, step), measure_kl=log_now)
            if step == 1 and "step0" not in run.history:
                # The student has not been updated yet: this is the KL to the teacher at step 0 (expect ~0).
                run.history["step0"] = {"ce": out["ce"], "kl": out["kl"]}
                metrics.write({"step": 0, "loss": out["loss"], "ce": out["ce"], "kl": out["kl"]})
            if not math.isfinite(out["loss"]):
                raise PipelineError(f"step {step}: loss is {out['loss']}; stopped. The last good checkpoint is "
                                    f"{latest_checkpoint(run.out) or 'none'}; lower --lr or check the data")
            avg = out["loss"] if avg is None else 0.9 * avg + 0.1 * out["loss"]
            if avg > cfg.divergence_factor * best_avg:
                raise PipelineError(f"step {step}: loss {out['loss']:.3f} is more than {cfg.divergence_factor}x its "
                                    f"best running average {best_avg:.3f}; training diverged and stopped. The last "
                                    f"good checkpoint is {latest_checkpoint(run.out) or 'none'}; lower --lr")
            best_avg = min(best_avg, avg)
            grad_norm = optimizer_step(run)
            run.step = step
            dt = time.perf_counter() - t0
            stats.steps += 1
            stats.loss += out["loss"]
            stats.ce += out["ce"]
            stats.l2 += out["l2"]
            if out["kl"] is not None:
                stats.kl += out["kl"]
                stats.kl_steps += 1
            for k in ("tokens", "response_tokens", "examples", "rehearsal_examples"):
                setattr(stats, k, getattr(stats, k) + out[k])
            stats.seconds += dt
            run.history["tokens"] = run.history.get("tokens", 0) + out["tokens"]
            run.history["seconds"] = run.history.get("seconds", 0.0) + dt
            bar.update(1)
            bar.set_postfix_str(f"loss {out['loss']:.3f} ce {out['ce']:.3f}"
                                + (f" kl {out['kl']:.4f}" if out["kl"] is not None else "")
                                + f" {out['tokens'] / dt:.0f} tok/s", refresh=False)
            if log_now:
                metrics.write(_record(step, stats, run.scheduler.get_last_lr()[0], grad_norm))
                run.history["last"] = _record(step, stats, run.scheduler.get_last_lr()[0], grad_norm)
                stats = StepStats()
            crash_point("train_step")
            if step % cfg.save_every == 0 and step < cfg.max_steps:
                save_checkpoint(run)
    finally:
        bar.close()
        metrics.close()
    return {"seconds": time.perf_counter() - t_start}


def write_run_yaml(run: Run, extra: dict) -> None:
    doc = {"config": to_dict(run.cfg), "cache": {"path": str(run.cache.path), "fingerprint": run.cache.fingerprint,
                                                 "top_k": run.cache.top_k, "temperature": run.temperature,
                                                 "max_length": run.cache.manifest["max_length"],
                                                 "teacher": run.cache.manifest["teacher"]},
           "precision": run.precision, "device": str(run.device), "package_version": __version__, **extra}
    atomic_write_text(run.out / "run.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def train(cfg: TrainConfig, log=print) -> dict:
    """Run `pipeline train` end to end; returns the summary also written into run.yaml."""
    run = setup(cfg, log)
    ckpt = latest_checkpoint(run.out) if cfg.resume else None
    if ckpt is not None:
        load_checkpoint(run, ckpt)
        log(f"resuming from {ckpt} (step {run.step})")
    elif cfg.resume:
        log(f"no checkpoint in {run.out / CHECKPOINTS}; starting from step 0")
    write_run_yaml(run, {"status": "running"})
    fit(run, log)
    save_adapter(run.model, run.out / "adapter")
    fsync_dir(run.out)
    h = run.history
    summary = {
        "adapter": str(run.out / "adapter"),
        "steps": run.step,
        "step0_kl": h.get("step0", {}).get("kl"),
        "step0_ce": h.get("step0", {}).get("ce"),
        "final": h.get("last"),
        "train_seconds": round(h.get("seconds", 0.0), 2),
        "seconds_per_step": round(h.get("seconds", 0.0) / max(run.step, 1), 3),
        "tokens_per_s": round(h.get("tokens", 0) / max(h.get("seconds", 1e-9), 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(run.device), 1),
    }
    write_run_yaml(run, {"status": "finished", "summary": summary})
    return summary

