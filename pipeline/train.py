"""Stage two, `pipeline train`: a LoRA adapter trained against the cached teacher, top to bottom.

    setup             check the inputs against the cache and the model, prepare OUT, load the 4-bit base + LoRA,
                      optimiser, schedule, data streams
    fit               for each optimiser step: draw the mixed examples, forward_backward each micro-batch with the
                      loss normalised by the step's token counts, clip, step; log, score the held-out rows
                      (--eval-every), checkpoint, stop on divergence
    train             setup, resume from a checkpoint, fit, then save OUT/adapter and OUT/run.yaml

Loss per step (docs/design.md, "The loss"), means over the response tokens of the WHOLE step:
    CE + kd_lambda * T^2 * KL  (+ l2 * sum ||LoRA||^2)
With --max-forgetting, kd_lambda is a Lagrange multiplier updated after every step (budget.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline import __version__, distributed
from pipeline.adapters import save_adapter
from pipeline.batches import TrainBatch, collate_rows
from pipeline.budget import dual_ascent, next_kd_lambda
from pipeline.cache.read import Cache, MemoryRows, describe, open_cache
from pipeline.cache.schema import CachedRow
from pipeline.checkpoint import CHECKPOINTS, TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.config import DEFAULT_TASK_ROWS, NONE, CacheConfig, TrainConfig, to_dict
from pipeline.device import resolve_runtime
from pipeline.errors import PipelineError
from pipeline.evaluate import eval_rows, score_rows
from pipeline.faults import crash_point
from pipeline.fileio import fsync_dir
from pipeline.forward import OutputHead, head_losses, output_head, response_positions, student_losses
from pipeline.losses import l2_penalty
from pipeline.memory import footprint
from pipeline.metrics import (
    MetricsLog,
    StepStats,
    eval_record,
    peak_memory_mb,
    record,
    require_tensorboard,
    reset_peak_memory,
)
from pipeline.mixing import RowStream, draw_step, rehearsal_total
from pipeline.model_source import ModelSource, open_model_source
from pipeline.models import attach_lora, base_of, eval_mode, load_model
from pipeline.run_dir import prepare_run_dir, refuse_other_settings, run_to_resume, write_run_yaml
from pipeline.teacher import as_stored, teacher_topk

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class RunLength:
    """How long a run trains: the steps it makes and the epochs they are, whichever of the two was given
    (run.yaml's `resolved` block)."""

    max_steps: int
    epochs: float | None  # passes over the task training rows; None without task rows
    task_rows: int
    task_rows_per_step: float


@dataclass
class Run:
    """Everything `fit` needs, built by `setup`."""

    cfg: TrainConfig  # as asked (run.yaml records it; --resume compares against it)
    length: RunLength  # the run's length, --epochs resolved into steps
    out: Path
    rows: Cache | MemoryRows  # MemoryRows: --online-teacher, no cache
    model: torch.nn.Module  # the PEFT model: 4-bit base + LoRA
    head: OutputHead
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    task: RowStream
    rehearsal: RowStream | None
    device: torch.device
    precision: str
    top_k: int
    temperature: float
    state: TrainState = field(default_factory=TrainState)
    ddp: torch.nn.Module | None = None  # the DistributedDataParallel decoder under torchrun (see wrap_ddp)
    teacher: torch.nn.Module | None = None  # a separate teacher for online targets (benchmarks); None: adapter off
    eval_task: list[CachedRow] = field(default_factory=list)  # --eval-every: held-out task rows (rank 0 only)
    eval_general: list[CachedRow] = field(default_factory=list)  # --eval-every: held-out rehearsal rows (rank 0)
    last_eval: dict | None = None  # the last eval line written
    online: bool = False  # --online-teacher: targets computed at every step (online_targets), no cache


# ----------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------

def setup(cfg: TrainConfig, log=print) -> Run:
    """Check everything, then load the model: a list of steps, each a function below.

    Under torchrun each step runs on every rank and a user error stops all of them alike (distributed.agree); the
    shards' checksums are read once per machine, the output directory prepared by rank 0 only.
    """
    if cfg.report_to == "tensorboard":  # before anything slow; rank 0 alone writes the events
        distributed.agree(lambda: require_tensorboard() if distributed.is_main() else None)
    cache = None if cfg.online_teacher else distributed.agree(
        lambda: open_cache(cfg.cache, verify=distributed.local_rank() == 0))
    source = open_model_source(cfg.model)
    _ = source.fingerprint  # all ranks here together: local rank 0 hashes the weights, the others wait for it
    rows, length, device, precision = distributed.agree(lambda: check_inputs(cfg, cache, source, log))
    out = distributed.agree(lambda: prepare_out(cfg, cache))
    note_cache_differences(cache, precision, cfg.attn, log)
    model, ddp = load_student(cfg, source, device, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, params, length.max_steps)
    n_reh = rows.count("rehearsal", "train")
    task = RowStream(rows, "task", "train", cfg.seed)
    rehearsal = RowStream(rows, "rehearsal", "train", cfg.seed) if n_reh else None
    top_k, temperature = teacher_settings(cfg, cache)
    run = Run(cfg, length, out, rows, model, output_head(model), source.tokenizer, optimizer, scheduler, task,
              rehearsal, device, precision, top_k, temperature, ddp=ddp, online=cache is None)
    if cfg.eval_every and distributed.is_main():
        run.eval_task = eval_rows(cache, "task", cfg.eval_limit)
        run.eval_general = eval_rows(cache, "rehearsal", cfg.eval_limit)
    describe_run(run, log)
    return run


def describe_run(run: Run, log=print) -> None:
    """The lines train prints before its first step: the targets, the model, the batch, the length, the curves."""
    cfg, length = run.cfg, run.length
    n_reh = run.rows.count("rehearsal", "train")
    if run.online:
        log(f"online teacher: top_k {run.top_k}, T {run.temperature} (task {run.rows.count('task', 'train')}, "
            f"rehearsal {n_reh} training rows)")
    else:
        log(f"cache {describe(run.rows)}")
    n_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    log(f"model {cfg.model}: {n_params:,} trainable LoRA parameters, {run.precision}, {run.device}")
    log(footprint(run.model).describe())
    if run.ddp is not None:
        log(f"distributed: {distributed.world_size()} processes, {cfg.batch_size * cfg.grad_accum} examples each "
            f"per step, {global_batch(cfg)} per step in all")
    if length.epochs is not None:
        log(f"{length.max_steps} steps: {length.epochs:g} epochs of {length.task_rows} task rows, "
            f"{length.task_rows_per_step:g} a step")
    if cfg.eval_every and distributed.is_main():
        log(f"held-out scoring every {cfg.eval_every} steps: {len(run.eval_task)} task, {len(run.eval_general)} "
            "general rows")


def check_inputs(cfg: TrainConfig, cache: Cache | None, source: ModelSource, log=print
                 ) -> tuple[Cache | MemoryRows, RunLength, torch.device, str]:
    """Every check of the training rows against the settings, before any model is loaded.

    Returns:
        (the rows to train on, the run's length, device, precision).
    """
    if cache is None:
        rows = online_rows(cfg, source.tokenizer, log)
    else:
        cache.check_compatible(model_fingerprint=source.fingerprint, tokenizer_fingerprint=source.tokenizer_fingerprint,
                               max_length=cfg.max_length, top_k=cfg.top_k, temperature=cfg.temperature)
        rows = cache
    n_task, n_reh = rows.count("task", "train"), rows.count("rehearsal", "train")
    length = run_length(cfg, n_task)
    if cfg.max_forgetting is not None and n_reh == 0:
        raise PipelineError(f"{rows.path}: --max-forgetting is measured on rehearsal examples, and there are no "
                            "rehearsal training rows; give --rehearsal-train (to cache-teacher, or here with "
                            "--online-teacher) or drop --max-forgetting")
    if cfg.rehearsal_ratio > 0 and n_reh == 0:
        # With the KL on rehearsal examples (the default), no rehearsal leaves no KL term: plain QLoRA.
        no_rehearsal = ("--rehearsal-ratio 0 --kd-lambda 0 (plain QLoRA)"
                        if cfg.kd_on == "rehearsal" and cfg.kd_lambda > 0 else "--rehearsal-ratio 0")
        raise PipelineError(f"{rows.path}: rehearsal_ratio is {cfg.rehearsal_ratio} but there are no "
                            "rehearsal training rows; give --rehearsal-train (to cache-teacher, or here with "
                            f"--online-teacher) or pass {no_rehearsal}")
    if cfg.rehearsal_ratio < 1 and n_task == 0:
        raise PipelineError(f"{rows.path}: no task training rows (--task-train)")
    if cfg.eval_every and not (rows.count("task", "eval") or rows.count("rehearsal", "eval")):
        raise PipelineError(f"{rows.path}: --eval-every scores held-out rows, and the cache has none; cache "
                            "--task-eval and/or --rehearsal-eval data, or pass --eval-every 0")
    n = global_batch(cfg)
    if cfg.rehearsal_ratio > 0 and rehearsal_total(cfg.rehearsal_ratio, n, length.max_steps) == 0:
        raise PipelineError(f"rehearsal_ratio {cfg.rehearsal_ratio} of {n} examples per step over "
                            f"{length.max_steps} steps rounds to no rehearsal example at all; raise --rehearsal-ratio, "
                            "the batch or --max-steps, or pass --rehearsal-ratio 0")
    device, precision = resolve_runtime(cfg.device, cfg.precision, cfg.attn)
    return rows, length, device, precision


def prepare_out(cfg: TrainConfig, cache: Cache | None) -> Path:
    """OUT made ready by rank 0 (emptied with --overwrite), and on --resume the recorded run checked against cfg."""
    out = Path(cfg.out)
    if not distributed.is_main():
        return out
    prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite, subdirs=(CHECKPOINTS,))
    recorded = run_to_resume(out, made=(CHECKPOINTS,)) if cfg.resume else None
    if recorded is not None:
        refuse_other_settings(out, recorded, cfg, cache.fingerprint if cache is not None else None,
                              doing="--resume", fix="resume with the same settings or use --overwrite")
    return out


def note_cache_differences(cache: Cache | None, precision: str, attn: str, log=print) -> None:
    """Say when the cache was computed in another precision or attention kernel: the step-0 KL will not be ~0."""
    if cache is None:
        return
    if precision != cache.manifest.get("precision"):
        log(f"note: the cache was computed in {cache.manifest.get('precision')}, training runs in {precision}; "
            "the step-0 KL will not be ~0")
    if cache.manifest.get("attn", "sdpa") != attn:
        log(f"note: the cache was computed with --attn {cache.manifest.get('attn', 'sdpa')}, training runs with "
            f"{attn}; the step-0 KL may not be ~0")


def load_student(cfg: TrainConfig, source: ModelSource, device: torch.device, precision: str
                 ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The 4-bit base with a fresh LoRA adapter, in train mode; under torchrun also its DDP-wrapped decoder."""
    torch.manual_seed(cfg.seed)  # LoRA init
    model = load_model(source.path, device, precision, attn=cfg.attn)
    model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules, gradient_checkpointing=cfg.gradient_checkpointing)
    model.train()
    if distributed.world_size() == 1:
        return model, None
    # Rank 0 keeps the single-process random stream; the others draw their own LoRA dropout masks.
    if distributed.rank() > 0:
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, distributed.rank()]).generate_state(1)[0]))
    return model, distributed.wrap_ddp(base_of(model).get_decoder(), device)


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], max_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the LoRA parameters, with linear warm-up then cosine decay over the run."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, max_steps), max_steps)


def cache_default(name: str):
    """cache-teacher's default for a setting: what --online-teacher uses when the flag is not given."""
    return next(f.default for f in dataclasses.fields(CacheConfig) if f.name == name)


def teacher_settings(cfg: TrainConfig, cache: Cache | None) -> tuple[int, float]:
    """(top_k, temperature) of the targets: the cache's, or for --online-teacher the flags' or cache-teacher's
    defaults."""
    if cache is not None:
        return cache.top_k, cache.temperature
    return cfg.top_k or cache_default("top_k"), cfg.temperature or cache_default("temperature")


def online_rows(cfg: TrainConfig, tokenizer, log=print) -> MemoryRows:
    """--online-teacher: the training data read and tokenised exactly as cache-teacher would, kept in memory."""
    from pipeline.cache.write import planned_inputs, read_inputs

    ccfg = CacheConfig(model=cfg.model, task_train=cfg.task_train, rehearsal_train=cfg.rehearsal_train or NONE,
                       rehearsal_eval=NONE, eval_fraction=0, out="-", skip_bad_lines=cfg.skip_bad_lines,
                       max_length=cfg.max_length or cache_default("max_length"), columns=cfg.columns)
    examples, _, _ = read_inputs(ccfg, planned_inputs(ccfg, Path("-")), tokenizer, log)
    empty_ids, empty_lps = np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
    return MemoryRows([CachedRow(e.id, e.role, e.split, np.asarray(e.input_ids, np.int64),
                                 np.asarray(e.loss_mask, bool), empty_ids, empty_lps) for e in examples])


def global_batch(cfg: TrainConfig) -> int:
    """Examples per optimiser step over all processes: batch_size * grad_accum * world_size."""
    return cfg.batch_size * cfg.grad_accum * distributed.world_size()


def task_rows_per_step(cfg: TrainConfig) -> float:
    """Task rows an optimiser step draws on average: the global batch less its rehearsal share (docs/design.md,
    "Rehearsal mixing": step s draws round(r*n*s) - round(r*n*(s-1)) rehearsal rows, r*n on average)."""
    return global_batch(cfg) * (1 - cfg.rehearsal_ratio)


def run_length(cfg: TrainConfig, task_rows: int) -> RunLength:
    """The steps the run makes and the epochs they are, from whichever of --max-steps and --epochs was given (neither:
    the steps that draw DEFAULT_TASK_ROWS task rows)."""
    per_step = task_rows_per_step(cfg)
    steps, epochs = cfg.max_steps, cfg.epochs
    if steps is None and epochs is None:  # [default length note] in config.py
        steps = max(1, math.ceil(round(DEFAULT_TASK_ROWS / per_step, 9)))
        epochs = round(steps * per_step / task_rows, 4) if task_rows else None
    elif steps is None:
        steps = steps_for_epochs(cfg, task_rows)
    elif task_rows:
        epochs = round(steps * per_step / task_rows, 4)
    return RunLength(max_steps=steps, epochs=epochs, task_rows=task_rows, task_rows_per_step=round(per_step, 4))


def steps_for_epochs(cfg: TrainConfig, task_rows: int) -> int:
    """--epochs as optimiser steps: ceil(epochs * task rows / task rows per step), at least 1. (Rounded to 9
    decimals first: 1 epoch of 21 rows at 0.7 task rows a step is 30 steps, not 31 from 30.000000000000004.)"""
    return max(1, math.ceil(round(cfg.epochs * task_rows / task_rows_per_step(cfg), 9)))


# ----------------------------------------------------------------------------------------------------------------
# one optimiser step
# ----------------------------------------------------------------------------------------------------------------

def micro_batches(run: Run, step: int) -> list[TrainBatch]:
    """This process's micro-batches of cfg.batch_size of the step's mixed examples (docs/design.md, "Rehearsal
    mixing").

    [global step note] Under torchrun every rank draws the whole step, global_batch(cfg) examples, from its
    own copy of the same seeded streams (so the stream state is the same on every rank and one checkpoint
    resumes them all), then keeps its contiguous slice. The rehearsal ratio therefore holds per step over
    all ranks, and N processes with batch B/N compute the update of one process with batch B.
    """
    cfg = run.cfg
    n = cfg.batch_size * cfg.grad_accum
    rows = draw_step(run.task, run.rehearsal, global_batch(cfg), cfg.rehearsal_ratio, cfg.seed, step)
    rows = rows[distributed.rank() * n:(distributed.rank() + 1) * n]
    pad = run.tokenizer.pad_token_id
    return [collate_rows(rows[i:i + cfg.batch_size], pad) for i in range(0, n, cfg.batch_size)]


def online_targets(run: Run, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """--online-teacher: the teacher's top-k ids and log-probs for one micro-batch, computed now.

    [online teacher note] The teacher is the student's own 4-bit base with the adapter switched off: one
    extra forward pass per micro-batch, no second copy of the weights. Top-k and the stored precision are
    those of cache-teacher (log-probs rounded to float16), so the loss is the same as with a cache.
    """
    separate = run.teacher is not None
    ids, lps = teacher_topk(run.teacher if separate else run.model, run.head, batch.input_ids, batch.attention_mask,
                            batch.loss_mask, top_k=run.top_k, temperature=run.temperature, precision=run.precision,
                            chunk_size=run.cfg.loss_chunk_size, adapter_off=not separate)
    # Outside inference mode: clone() and as_stored give ordinary tensors that autograd may save for backward.
    return ids.clone(), as_stored(lps, "float16")


def kd_mask_of(batch: TrainBatch, kd_on: str) -> torch.Tensor | None:
    """Which response tokens get the KL term: those of rehearsal examples (kd_on rehearsal), or all (None)."""
    return batch.is_rehearsal if kd_on == "rehearsal" else None


@dataclass(frozen=True)
class StepResult:
    """One optimiser step's loss terms and counts, over all ranks (the same on every rank)."""

    loss: float  # what was minimised: ce + kd_lambda * T^2 * kl + l2
    ce: float  # per response token
    kl: float | None  # per KL token (raw, at T); None when not measured this step, or the step has no KL tokens
    l2: float
    response_tokens: int
    tokens: int  # all non-pad tokens
    examples: int
    rehearsal_examples: int
    kl_rehearsal: float | None  # --max-forgetting: the forward KL per rehearsal token (the constraint)


def kd_lambda_of(run: Run) -> float:
    """The KL weight of the next step: cfg.kd_lambda, or with --max-forgetting the multiplier (which starts there)."""
    return next_kd_lambda(run.cfg.kd_lambda, run.state.kd_lambda, run.cfg.max_forgetting)


def forward_backward(run: Run, batches: list[TrainBatch], *, measure_kl: bool) -> StepResult:
    """Forward + backward over all micro-batches of one step, gradients normalised by the step's tokens.

    [token-normalised accumulation note] Each micro-batch contributes sum_CE / N_step (and
    sum_KL / N_kd_step), where N counts the response tokens of the whole step, so batch 8 x accum 1 and
    batch 2 x accum 4 produce the same gradient. Dividing each micro-batch by its own count would weight
    tokens of short micro-batches more. Under torchrun N counts the step's tokens on all ranks.

    [ddp gradient sum note] DDP averages the ranks' gradients (it divides their sum by world_size). Each rank
    therefore back-propagates world_size * (its share of the step's sums) / (the step's GLOBAL counts,
    all-reduced before the first backward): the average is then the gradient of the whole step's loss, the
    same as one process with all of the step's examples. Gradients are all-reduced once per step, in the
    backward of the last micro-batch (no_sync before it). The L2 penalty is back-propagated on every rank
    outside DDP (no all-reduce): each rank adds the same gradient, once.

    With --max-forgetting the KL weight is the multiplier in run.state (kd_lambda_of) and the step also measures
    the constraint: the forward KL per rehearsal token (`kl_rehearsal`). With kd_on: rehearsal and kl: forward
    that is the KD term itself; otherwise it is computed again, without grad, on the rehearsal tokens alone.

    Args:
        measure_kl: compute the KL for logging even when kd_lambda is 0 (no gradient flows through it then).
    """
    cfg, head = run.cfg, run.head
    budget = cfg.max_forgetting is not None
    lam = kd_lambda_of(run)
    kd = lam > 0 or budget  # with a budget the KD term stays in the graph while the multiplier is 0
    reuse = cfg.kd_on == "rehearsal" and cfg.kl == "forward"  # the KD term is then the constraint's KL
    n_tokens, n_kd, n_reh_tokens = (int(n) for n in distributed.all_reduce_sum([
        sum(b.n_tokens for b in batches),
        sum(b.n_tokens if cfg.kd_on == "all" else int(b.is_rehearsal.sum()) for b in batches),
        sum(int(b.is_rehearsal.sum()) for b in batches)]))
    world = distributed.world_size()
    # The step's sums stay on the device until the step ends: one host sync per step (the .tolist() below),
    # not one per micro-batch, so a GPU is never stalled between micro-batches to print a number.
    zero = torch.zeros((), dtype=torch.float64, device=run.device)
    ce_sum = kl_sum = kl_reh_sum = zero
    kd_weight = lam * run.temperature**2
    for i, host in enumerate(batches):
        # Positions and masks are read from the host copy (the collator's), so that selecting the response tokens
        # (a nonzero) and counting the rehearsal ones never waits for the device.
        batch = host.to(run.device)
        reh = host.is_rehearsal  # (N,) bool on the host
        if run.online and (kd or measure_kl):
            batch.teacher_ids, batch.teacher_logprobs = online_targets(run, batch)
        last = i == len(batches) - 1
        teacher = {"teacher_ids": batch.teacher_ids, "teacher_logprobs": batch.teacher_logprobs,
                   "kd_mask": kd_mask_of(host, cfg.kd_on), "temperature": run.temperature, "kl": cfg.kl}
        with contextlib.nullcontext() if run.ddp is None or last else run.ddp.no_sync():
            positions = tuple(t.to(run.device) for t in response_positions(host.loss_mask))
            sums, h, labels = student_losses(run.model, head, batch, run.precision, chunk_size=cfg.loss_chunk_size,
                                             body=run.ddp, positions=positions, **(teacher if kd else {}))
            loss = sums.ce / n_tokens
            if kd and n_kd:
                loss = loss + kd_weight * sums.kl / n_kd
            (loss * world).backward()  # [ddp gradient sum note]; * 1 is exact in one process
        ce_sum = ce_sum + sums.ce.detach()
        if kd:
            kl_sum = kl_sum + sums.kl.detach()
        elif measure_kl:  # lambda = 0: the KL is only watched, never part of the loss
            with torch.no_grad():
                kl_sum = kl_sum + head_losses(head, h.detach(), labels, chunk_size=cfg.loss_chunk_size, **teacher).kl
        if budget and reuse:
            kl_reh_sum = kl_reh_sum + sums.kl.detach()
        elif budget and reh.any():  # the constraint, watched: forward KL on rehearsal tokens only
            m = reh.nonzero().squeeze(1).to(run.device)
            with torch.no_grad():
                watched = head_losses(head, h.detach()[m], labels[m], chunk_size=cfg.loss_chunk_size,
                                      teacher_ids=batch.teacher_ids[m], teacher_logprobs=batch.teacher_logprobs[m],
                                      temperature=run.temperature, kl="forward")
                kl_reh_sum = kl_reh_sum + watched.kl
    ce_sum, kl_sum, kl_reh_sum = torch.stack([ce_sum, kl_sum, kl_reh_sum]).tolist()  # the step's one sync
    ce_sum, kl_sum, kl_reh_sum, n_all, n_examples, n_rehearsal = distributed.all_reduce_sum([
        ce_sum, kl_sum, kl_reh_sum, sum(int(b.attention_mask.sum()) for b in batches),
        sum(b.input_ids.shape[0] for b in batches), sum(b.n_rehearsal_examples for b in batches)])
    ce = ce_sum / max(n_tokens, 1)
    # A step whose KL tokens are none (kd_on rehearsal and no rehearsal row drawn, or no rehearsal at all) measured
    # no KL: None (null in metrics.jsonl), never a 0 that reads as "no drift" and pulls the window's average down.
    kl = kl_sum / n_kd if (kd or measure_kl) and n_kd else None
    l2 = 0.0
    if cfg.l2 > 0:
        penalty = cfg.l2 * l2_penalty(p for p in run.model.parameters() if p.requires_grad)
        penalty.backward()
        l2 = penalty.item()
    loss = ce + (kd_weight * kl if kd and kl is not None else 0.0) + l2
    return StepResult(loss=loss, ce=ce, kl=kl, l2=l2, response_tokens=n_tokens, tokens=int(n_all),
                      examples=int(n_examples), rehearsal_examples=int(n_rehearsal),
                      kl_rehearsal=kl_reh_sum / n_reh_tokens if budget and n_reh_tokens else None)


def optimizer_step(run: Run) -> float:
    params = [p for p in run.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else math.inf)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(norm)


def held_out_eval(run: Run, step: int) -> dict:
    """The eval line of `step` (--eval-every): task CE and cached forgetting KL on the held-out rows, no generation.

    [training eval note] The model is scored in eval mode (no LoRA dropout) under no grad, with evaluate's own
    scoring function, then put back in train mode. The torch random state is saved before and restored after,
    so an eval leaves the training's random stream (dropout masks) exactly where it was: a run with --eval-every
    updates the adapter bit for bit as one without, and --resume stays exact. Rank 0 alone scores; the other
    ranks wait for it at the next step's first all-reduce.
    """
    common = {"pad_id": run.tokenizer.pad_token_id, "batch_size": run.cfg.batch_size, "device": run.device,
              "precision": run.precision, "temperature": run.temperature}
    cuda = run.device.type == "cuda"
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
    try:
        with eval_mode(run.model):
            task = score_rows(run.model, run.eval_task, with_kl=False, desc="eval task", **common) \
                if run.eval_task else None
            general = score_rows(run.model, run.eval_general, with_kl=True, desc="eval general", **common) \
                if run.eval_general else None
    finally:
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state_all(rng[1])
    return eval_record(step, task, general, len(run.eval_task), len(run.eval_general))


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------

def fit(run: Run, log=print) -> dict:
    from tqdm.auto import tqdm

    cfg, s, steps = run.cfg, run.state, run.length.max_steps
    # Without a checkpoint (step 0) nothing is kept: the step-0 line is written again below. Under torchrun rank 0
    # alone writes; the logged values are over all ranks (forward_backward).
    main = distributed.is_main()
    metrics = MetricsLog(run.out / "metrics.jsonl", s.step if s.step else -1,
                         tensorboard=cfg.report_to == "tensorboard") if main else None
    # A resumed run continues the sums of the unlogged steps and the loss averages from its checkpoint
    # (TrainState), so its metrics lines and divergence check are those of an uninterrupted run.
    bar = tqdm(total=steps, initial=s.step, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    t_start = time.perf_counter()
    reset_peak_memory(run.device)
    try:
        while s.step < steps:
            t0 = time.perf_counter()
            step = s.step + 1
            log_now = step % cfg.log_every == 0 or step == steps or step == 1
            out = forward_backward(run, micro_batches(run, step), measure_kl=log_now)
            if step == 1 and s.step0 is None:
                # The student has not been updated yet: this is the KL to the teacher at step 0 (expect ~0).
                s.step0 = {"ce": out.ce, "kl": out.kl}
                if metrics:
                    metrics.write({"step": 0, "loss": out.loss, "ce": out.ce, "kl": out.kl})
            # The loss is the same on every rank, so every rank stops here alike (rank 0 prints).
            if not math.isfinite(out.loss):
                raise distributed.quiet_elsewhere(PipelineError(
                    f"step {step}: loss is {out.loss}; stopped. The last good checkpoint is "
                    f"{latest_checkpoint(run.out) or 'none'}; lower --lr or check the data"))
            # [budget divergence note] With --max-forgetting the multiplier may grow many-fold on purpose, and the
            # loss with it: the divergence check then watches the loss without the KL term (CE + L2).
            watched = out.loss if cfg.max_forgetting is None else out.ce + out.l2
            s.avg = watched if s.avg is None else 0.9 * s.avg + 0.1 * watched
            if s.avg > cfg.divergence_factor * s.best_avg:
                raise distributed.quiet_elsewhere(PipelineError(
                    f"step {step}: loss {watched:.3f} is more than {cfg.divergence_factor}x its best running "
                    f"average {s.best_avg:.3f}; training diverged and stopped. The last good checkpoint is "
                    f"{latest_checkpoint(run.out) or 'none'}; lower --lr"))
            s.best_avg = min(s.best_avg, s.avg)
            grad_norm = optimizer_step(run)
            lam = kd_lambda_of(run)  # the weight this step trained with
            if cfg.max_forgetting is not None:
                s.kd_lambda, s.kl_avg = dual_ascent(lam, s.kl_avg, out.kl_rehearsal, cfg.max_forgetting)
            s.step = step
            dt = time.perf_counter() - t0
            s.window.add(out, dt)
            s.tokens += out.tokens
            s.examples += out.examples
            s.rehearsal_examples += out.rehearsal_examples
            s.seconds += dt
            bar.update(1)
            bar.set_postfix_str(f"loss {out.loss:.3f} ce {out.ce:.3f}"
                                + (f" kl {out.kl:.4f}" if out.kl is not None else "")
                                + f" {out.tokens / dt:.0f} tok/s", refresh=False)
            if log_now:
                s.last = record(step, s.window, run.scheduler.get_last_lr()[0], grad_norm)
                if cfg.max_forgetting is not None:  # this step's multiplier, and the running KL it led to
                    s.last.update({"lambda": lam, "constraint": s.kl_avg})
                if metrics:
                    metrics.write(s.last)
                s.window = StepStats()
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == steps) and main:
                t_eval = time.perf_counter()
                run.last_eval = held_out_eval(run, step)  # after the step's own line: the curve at `step`
                s.eval_seconds += time.perf_counter() - t_eval
                metrics.write(run.last_eval)
            crash_point("train_step")
            if step % cfg.save_every == 0 and step < steps:
                save_checkpoint(run.out, s, run.model, run.optimizer, run.scheduler, streams_of(run),
                                cfg.keep_checkpoints)
    finally:
        bar.close()
        if metrics:
            metrics.close()
    return {"seconds": time.perf_counter() - t_start}


def streams_of(run: Run) -> dict[str, RowStream | None]:
    """The data streams whose positions a checkpoint keeps."""
    return {"task": run.task, "rehearsal": run.rehearsal}


def record_run(run: Run, extra: dict) -> None:
    """Write OUT/run.yaml: the config as asked, the run's length, the targets it trained against, and `extra`."""
    if run.online:
        teacher = {"online_teacher": True, "top_k": run.top_k, "temperature": run.temperature}
    else:
        teacher = {"path": str(run.rows.path), "fingerprint": run.rows.fingerprint, "top_k": run.top_k,
                   "temperature": run.temperature, "max_length": run.rows.manifest["max_length"],
                   "teacher": run.rows.manifest["teacher"]}
    doc = {"config": to_dict(run.cfg), "resolved": dataclasses.asdict(run.length), "cache": teacher,
           "precision": run.precision, "device": str(run.device), "world_size": distributed.world_size(),
           "global_batch": global_batch(run.cfg), "package_version": __version__, **extra}
    write_run_yaml(run.out, doc)


def train(cfg: TrainConfig, log=print) -> dict:
    """Run `pipeline train` end to end; returns the summary also written into run.yaml.

    Under torchrun (see distributed.py) every rank runs this; rank 0 alone logs and writes OUT.
    """
    main = distributed.is_main()
    log = log if main else lambda *_: None
    run = setup(cfg, log)
    # Rank 0 picks the checkpoint, so every rank resumes from the same one.
    ckpt = distributed.broadcast_object(latest_checkpoint(run.out) if cfg.resume and main else None)
    if ckpt is not None:
        run.state = distributed.agree(lambda: load_checkpoint(ckpt, run.model, run.optimizer, run.scheduler,
                                                              streams_of(run), run.device))
        log(f"resuming from {ckpt} (step {run.state.step})")
    elif cfg.resume:
        log(f"no checkpoint in {run.out / CHECKPOINTS}; starting from step 0")
    if main:
        record_run(run, {"status": "running"})
    fit(run, log)
    if not main:
        return {}
    save_adapter(run.model, run.out / "adapter")
    fsync_dir(run.out)
    s = run.state
    summary = {
        "adapter": str(run.out / "adapter"),
        "steps": s.step,
        "step0_kl": (s.step0 or {}).get("kl"),
        "step0_ce": (s.step0 or {}).get("ce"),
        "final": s.last,
        "final_eval": run.last_eval,  # the held-out scores at the last step (--eval-every), else None
        "eval_seconds": round(s.eval_seconds, 2),  # scoring the held-out rows, not in train_seconds
        **({"max_forgetting": cfg.max_forgetting, "final_lambda": s.kd_lambda, "final_constraint": s.kl_avg}
           if cfg.max_forgetting is not None else {}),
        "rehearsal_ratio": round(s.rehearsal_examples / max(s.examples, 1), 6),  # realised over the whole run
        "rehearsal_examples": s.rehearsal_examples,
        "examples": s.examples,
        "train_seconds": round(s.seconds, 2),
        "seconds_per_step": round(s.seconds / max(s.step, 1), 3),
        "tokens_per_s": round(s.tokens / max(s.seconds, 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(run.device), 1),
    }
    record_run(run, {"status": "finished", "summary": summary})
    return summary

