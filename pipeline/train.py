"""Stage two, `pipeline train`: a LoRA adapter trained against the cached teacher, top to bottom.

    setup   verify the cache against the model, load the 4-bit base + LoRA, optimiser, schedule, streams
    fit     for each optimiser step: draw the mixed examples, forward/backward each micro-batch with the
            loss normalised by the step's token counts, clip, step; log, checkpoint, stop on divergence
    finish  save OUT/adapter, OUT/run.yaml

Loss per step (DESIGN.md section 5), means over the response tokens of the WHOLE step:
    CE + kd_lambda * T^2 * KL  (+ l2 * sum ||LoRA||^2)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline import __version__, distributed
from pipeline.config import TrainConfig, to_dict
from pipeline.data import draw_step
from pipeline.errors import PipelineError
from pipeline.faults import crash_point
from pipeline.fileio import TMP_MARK, atomic_write_text, fsync_dir, remove_tmp_files, replace_dir
from pipeline.losses import l2_penalty, response_losses, topk_logprobs
from pipeline.models import (
    attach_lora,
    base_of,
    check_attn,
    footprint,
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
from pipeline.reader import (
    Cache,
    CachedRow,
    MemoryRows,
    RowStream,
    TrainBatch,
    collate_rows,
    describe,
    open_cache,
)

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
    cache: Cache | MemoryRows  # MemoryRows: --online-teacher, no cache
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
    ddp: torch.nn.Module | None = None  # the DistributedDataParallel decoder under torchrun (see wrap_ddp)
    top_k: int = 0
    online: bool = False  # --online-teacher: targets computed at every step (online_targets)
    teacher: object | None = None  # a separate teacher model for online targets (benchmarks); None: adapter off


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
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CHECKPOINTS).mkdir(exist_ok=True)
    except OSError as e:  # e.g. a read-only file system, or a path under a regular file
        raise PipelineError(f"{out}: cannot create the run directory: {e.strerror or e}") from e
    remove_tmp_files(out)  # adapter/, run.yaml, metrics.jsonl of a killed run
    remove_tmp_files(out / CHECKPOINTS)
    return out


PATH_SETTINGS = ("out", "cache", "task_train", "rehearsal_train")  # where things are, not what they are


def check_resume_settings(cfg: TrainConfig, out: Path, cache_fingerprint: str | None) -> None:
    """A resumed run must continue with the settings it started with (else the result is neither run).

    Paths may differ (a run directory or cache that was moved); the cache's content must not.
    """
    run_yaml = out / "run.yaml"
    if not cfg.resume or not run_yaml.exists():
        return
    try:
        doc = yaml.safe_load(run_yaml.read_text()) or {}
    except yaml.YAMLError:
        return
    have, want = doc.get("config", {}), to_dict(cfg)
    for key in sorted(set(have) | set(want)):
        if key not in ("resume", "overwrite", *PATH_SETTINGS) and have.get(key) != want.get(key):
            raise PipelineError(f"{out}: --resume with other settings: {key} was {have.get(key)!r}, now "
                                f"{want.get(key)!r}; resume with the same settings or use --overwrite")
    was = (doc.get("cache") or {}).get("fingerprint")
    if cache_fingerprint and was and was != cache_fingerprint:
        raise PipelineError(f"{out}: --resume with another cache (its shards differ from the ones this run "
                            "started with); resume with the same cache or use --overwrite")


def cache_default(name: str):
    """cache-teacher's default for a setting: what --online-teacher uses when the flag is not given."""
    from dataclasses import fields

    from pipeline.config import CacheConfig

    return next(f.default for f in fields(CacheConfig) if f.name == name)


def online_rows(cfg: TrainConfig, tokenizer, log=print) -> MemoryRows:
    """--online-teacher: the training JSONL read and tokenised exactly as cache-teacher would, kept in memory."""
    from pipeline.cache import prepare
    from pipeline.config import CacheConfig

    ccfg = CacheConfig(model=cfg.model, task_train=cfg.task_train, rehearsal_train=cfg.rehearsal_train, out="-",
                       max_length=cfg.max_length or cache_default("max_length"), skip_bad_lines=cfg.skip_bad_lines)
    examples, _, _ = prepare(ccfg, tokenizer, log)
    empty_ids, empty_lps = np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
    return MemoryRows([CachedRow(e.id, e.role, e.split, np.asarray(e.input_ids, np.int64),
                                 np.asarray(e.loss_mask, bool), empty_ids, empty_lps) for e in examples])


def setup(cfg: TrainConfig, log=print) -> Run:
    # Under torchrun each step below runs on every rank and a user error stops all of them alike
    # (distributed.agree); the shards' checksums are read once per machine, the output directory by rank 0 only.
    cache = None if cfg.online_teacher else distributed.agree(
        lambda: open_cache(cfg.cache, verify=distributed.local_rank() == 0))
    # A GGUF model is converted and the weights are hashed once per machine; the other ranks find the result.
    model_dir = distributed.main_first(lambda: resolve_model(cfg.model))
    fingerprint = distributed.main_first(lambda: model_fingerprint(model_dir))

    def check_inputs() -> tuple[object, object, int, torch.device, str]:
        tokenizer = load_tokenizer(model_dir)
        rows = cache
        if rows is None:
            rows = online_rows(cfg, tokenizer, log)
        else:
            rows.check_compatible(model_fingerprint=fingerprint,
                                  tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                  max_length=cfg.max_length, top_k=cfg.top_k, temperature=cfg.temperature)
        n_task, n_reh = rows.count("task", "train"), rows.count("rehearsal", "train")
        if cfg.rehearsal_ratio > 0 and n_reh == 0:
            raise PipelineError(f"{rows.path}: rehearsal_ratio is {cfg.rehearsal_ratio} but there are no "
                                "rehearsal training rows; give --rehearsal-train (to cache-teacher, or here with "
                                "--online-teacher) or pass --rehearsal-ratio 0")
        if cfg.rehearsal_ratio < 1 and n_task == 0:
            raise PipelineError(f"{rows.path}: no task training rows (--task-train)")
        device = distributed.place(resolve_device(cfg.device))
        check_attn(cfg.attn, device)
        return tokenizer, rows, n_reh, device, resolve_precision(cfg.precision, device)

    tokenizer, rows, n_reh, device, precision = distributed.agree(check_inputs)

    def make_out_dir() -> Path:
        if not distributed.is_main():
            return Path(cfg.out)
        out = prepare_out_dir(cfg)
        check_resume_settings(cfg, out, cache.fingerprint if cache is not None else None)
        return out

    out = distributed.agree(make_out_dir)
    if cache is not None and precision != cache.manifest.get("precision"):
        log(f"note: the cache was computed in {cache.manifest.get('precision')}, training runs in {precision}; "
            "the step-0 KL will not be ~0")
    if cache is not None and cache.manifest.get("attn", "sdpa") != cfg.attn:
        log(f"note: the cache was computed with --attn {cache.manifest.get('attn', 'sdpa')}, training runs with "
            f"{cfg.attn}; the step-0 KL may not be ~0")

    torch.manual_seed(cfg.seed)  # LoRA init
    model = load_model(model_dir, device, precision, attn=cfg.attn)
    model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules, gradient_checkpointing=cfg.gradient_checkpointing)
    model.train()
    ddp = None
    if distributed.world_size() > 1:
        # Rank 0 keeps the single-process random stream; the others draw their own LoRA dropout masks.
        if distributed.rank() > 0:
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, distributed.rank()]).generate_state(1)[0]))
        ddp = wrap_ddp(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps)
    task = RowStream(rows, "task", "train", cfg.seed)
    rehearsal = RowStream(rows, "rehearsal", "train", cfg.seed) if n_reh else None
    if cache is not None:
        log(f"cache {describe(cache)}")
        top_k, temperature = cache.top_k, cache.temperature
    else:
        top_k = cfg.top_k or cache_default("top_k")
        temperature = cfg.temperature or cache_default("temperature")
        log(f"online teacher: top_k {top_k}, T {temperature} (task {rows.count('task', 'train')}, rehearsal "
            f"{n_reh} training rows)")
    log(f"model {cfg.model}: {sum(p.numel() for p in params):,} trainable LoRA parameters, {precision}, {device}")
    log(footprint(model).describe())
    if ddp is not None:
        log(f"distributed: {distributed.world_size()} processes, {cfg.batch_size * cfg.grad_accum} examples each "
            f"per step, {global_batch(cfg)} per step in all")
    return Run(cfg, out, rows, model, output_head(model), tokenizer, optimizer, scheduler, task, rehearsal, device,
               precision, temperature, ddp=ddp, top_k=top_k, online=cache is None)


def global_batch(cfg: TrainConfig) -> int:
    """Examples per optimiser step over all processes: batch_size * grad_accum * world_size."""
    return cfg.batch_size * cfg.grad_accum * distributed.world_size()


def wrap_ddp(model, device: torch.device) -> torch.nn.Module:
    """Wrap the decoder body (where every LoRA parameter lives) in DistributedDataParallel.

    [ddp wrapping note] The output head runs outside the body, in losses.py, and is frozen, so the body is
    all DDP needs to see. Every LoRA parameter is used in every forward, so find_unused_parameters stays
    off; gradient checkpointing is non-reentrant (models.attach_lora), which DDP supports without
    static_graph. The frozen 4-bit base and the buffers are loaded from the same files on every rank and
    never change: DDP is told to ignore them, so it neither broadcasts the whole base model at start nor
    the buffers before every forward; only the LoRA parameters are broadcast from rank 0 at start.
    """
    from torch.nn.parallel import DistributedDataParallel

    body = base_of(model).get_decoder()
    frozen = [n for n, p in body.named_parameters() if not p.requires_grad] + [n for n, _ in body.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(body, frozen)
    return DistributedDataParallel(body, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False)


# ----------------------------------------------------------------------------------------------------------------
# one optimiser step
# ----------------------------------------------------------------------------------------------------------------

def micro_batches(run: Run, step: int) -> list[TrainBatch]:
    """This process's micro-batches of cfg.batch_size of the step's mixed examples (DESIGN.md section 6).

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


@torch.no_grad()
def online_targets(run: Run, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """--online-teacher: the teacher's top-k ids and log-probs for one micro-batch, computed now.

    [online teacher note] The teacher is the student's own 4-bit base with the adapter switched off: one
    extra forward pass per micro-batch, no second copy of the weights. Top-k and the stored precision are
    those of cache-teacher (log-probs rounded to float16), so the loss is the same as with a cache.
    """
    model = run.teacher if run.teacher is not None else run.model
    switch_off = run.model.disable_adapter() if run.teacher is None else contextlib.nullcontext()
    with switch_off:
        hidden = forward_hidden(model, batch.input_ids, batch.attention_mask, run.precision)
    rows, cols = response_positions(batch.loss_mask)
    ids, lps = topk_logprobs(hidden[rows, cols], run.head.weight, run.top_k, bias=run.head.bias,
                             temperature=run.temperature, chunk_size=run.cfg.loss_chunk_size,
                             logit_softcap=run.head.softcap)
    return ids, lps.half().float()


def kd_mask_of(batch: TrainBatch, kd_on: str) -> torch.Tensor | None:
    return batch.is_rehearsal if kd_on == "rehearsal" else None


def loss_step(run: Run, batches: list[TrainBatch], *, measure_kl: bool) -> dict:
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

    Args:
        measure_kl: compute the KL for logging even when kd_lambda is 0 (no gradient flows through it then).

    Returns:
        The step's loss terms and counts over all ranks (the same on every rank).
    """
    cfg, head = run.cfg, run.head
    kd = cfg.kd_lambda > 0
    n_tokens, n_kd = (int(n) for n in distributed.all_reduce_sum([
        sum(b.n_tokens for b in batches),
        sum(b.n_tokens if cfg.kd_on == "all" else int(b.is_rehearsal.sum()) for b in batches)]))
    world = distributed.world_size()
    ce_sum = kl_sum = 0.0
    kd_weight = cfg.kd_lambda * run.temperature**2
    for i, batch in enumerate(batches):
        batch = batch.to(run.device)
        if run.online and (kd or measure_kl):
            batch.teacher_ids, batch.teacher_logprobs = online_targets(run, batch)
        last = i == len(batches) - 1
        with contextlib.nullcontext() if run.ddp is None or last else run.ddp.no_sync():
            hidden = forward_hidden(run.model, batch.input_ids, batch.attention_mask, run.precision,
                                    body=run.ddp)  # (B, T, H)
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
            (loss * world).backward()  # [ddp gradient sum note]; * 1 is exact in one process
        ce_sum += sums.ce.item()
        if kd:
            kl_sum += sums.kl.item()
        elif measure_kl:  # lambda = 0: the KL is only watched, never part of the loss
            with torch.no_grad():
                kl_sum += response_losses(h.detach(), head.weight, labels, **common, **teacher).kl.item()
    ce_sum, kl_sum, n_all, n_examples, n_rehearsal = distributed.all_reduce_sum([
        ce_sum, kl_sum, sum(int(b.attention_mask.sum()) for b in batches), sum(b.input_ids.shape[0] for b in batches),
        sum(b.n_rehearsal_examples for b in batches)])
    ce = ce_sum / max(n_tokens, 1)
    kl = kl_sum / max(n_kd, 1) if (kd or measure_kl) else None
    l2 = 0.0
    if cfg.l2 > 0:
        penalty = cfg.l2 * l2_penalty(p for p in run.model.parameters() if p.requires_grad)
        penalty.backward()
        l2 = penalty.item()
    loss = ce + (kd_weight * kl if kd and kl is not None else 0.0) + l2
    return {"loss": loss, "ce": ce, "kl": kl, "l2": l2, "response_tokens": n_tokens, "tokens": int(n_all),
            "examples": int(n_examples), "rehearsal_examples": int(n_rehearsal)}


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
    # .cpu(): the checkpoint is loaded with map_location=device, and RNG states must be CPU byte tensors.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_adapter(model, path: Path) -> None:
    """save_pretrained into a temporary directory, then rename: OUT/adapter is always complete."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    crash_point("adapter_tmp_written")
    replace_dir(tmp, path)


def save_checkpoint(run: Run) -> Path | None:
    """OUT/checkpoints/step-NNNNNN/: adapter, optimiser, schedule, RNG and data-stream state; atomic.

    [per-rank state note] Under torchrun every rank takes part (returns None on all but rank 0, which writes).
    The adapter, optimiser, schedule and data streams are the same on every rank (the same update, the same
    draws; see micro_batches), so rank 0's copy resumes them all. Only the random state differs per rank (LoRA
    dropout masks), so each rank's is gathered and saved: a resumed run is the uninterrupted one exactly.
    """
    from peft import get_peft_model_state_dict

    rngs = distributed.gather_objects(rng_state())
    if rngs is None:
        return None
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
        "rng": rngs[0],
        "world_size": len(rngs),
        "rng_other_ranks": rngs[1:],
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
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        raise PipelineError(f"{final}: cannot write checkpoint ({reason}); is the disk full? The checkpoints "
                            "before it are kept: free space and rerun with --resume") from e
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
    saved_world, world = state.get("world_size", 1), distributed.world_size()
    if saved_world != world:
        raise PipelineError(f"{path}: written by a run on {saved_world} process(es), now {world}; resume with "
                            f"{saved_world}: a step draws batch_size * grad_accum examples per process, and each "
                            "process has its own random state")
    set_peft_model_state_dict(run.model, state["adapter"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.task.load_state_dict(state["streams"]["task"])
    if run.rehearsal and state["streams"]["rehearsal"]:
        run.rehearsal.load_state_dict(state["streams"]["rehearsal"])
    rank = distributed.rank()
    set_rng_state(state["rng"] if rank == 0 else state["rng_other_ranks"][rank - 1])
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


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring peak memory from now, so that it is the training loop's, not loading's (which reads a
    full-precision checkpoint and quantises it) nor that of an earlier run in the same process (a sweep)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: writing 5 resets the high-water mark VmHWM to the current size
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since reset_peak_memory: CUDA memory allocated by torch, or the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, never reset


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------

def fit(run: Run, log=print) -> dict:
    from tqdm.auto import tqdm

    cfg = run.cfg
    # Without a checkpoint (step 0) nothing is kept: the step-0 line is written again below. Under torchrun rank 0
    # alone writes; the logged values are over all ranks (loss_step).
    main = distributed.is_main()
    metrics = MetricsLog(run.out / "metrics.jsonl", run.step if run.step else -1) if main else None
    # A resumed run continues the sums of the unlogged steps and the loss averages from its checkpoint, so its
    # metrics lines and divergence check are those of an uninterrupted run.
    loop = run.history.get("loop", {})
    stats, best_avg, avg = StepStats(**loop.get("stats", {})), loop.get("best_avg", math.inf), loop.get("avg")
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    t_start = time.perf_counter()
    reset_peak_memory(run.device)
    try:
        while run.step < cfg.max_steps:
            t0 = time.perf_counter()
            step = run.step + 1
            log_now = step % cfg.log_every == 0 or step == cfg.max_steps or step == 1
            out = loss_step(run, micro_batches(run, step), measure_kl=log_now)
            if step == 1 and "step0" not in run.history:
                # The student has not been updated yet: this is the KL to the teacher at step 0 (expect ~0).
                run.history["step0"] = {"ce": out["ce"], "kl": out["kl"]}
                if metrics:
                    metrics.write({"step": 0, "loss": out["loss"], "ce": out["ce"], "kl": out["kl"]})
            # The loss is the same on every rank, so every rank stops here alike (rank 0 prints).
            if not math.isfinite(out["loss"]):
                raise distributed.quiet_elsewhere(PipelineError(
                    f"step {step}: loss is {out['loss']}; stopped. The last good checkpoint is "
                    f"{latest_checkpoint(run.out) or 'none'}; lower --lr or check the data"))
            avg = out["loss"] if avg is None else 0.9 * avg + 0.1 * out["loss"]
            if avg > cfg.divergence_factor * best_avg:
                raise distributed.quiet_elsewhere(PipelineError(
                    f"step {step}: loss {out['loss']:.3f} is more than {cfg.divergence_factor}x its best running "
                    f"average {best_avg:.3f}; training diverged and stopped. The last good checkpoint is "
                    f"{latest_checkpoint(run.out) or 'none'}; lower --lr"))
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
                if metrics:
                    metrics.write(_record(step, stats, run.scheduler.get_last_lr()[0], grad_norm))
                run.history["last"] = _record(step, stats, run.scheduler.get_last_lr()[0], grad_norm)
                stats = StepStats()
            crash_point("train_step")
            if step % cfg.save_every == 0 and step < cfg.max_steps:
                run.history["loop"] = {"stats": asdict(stats), "best_avg": best_avg, "avg": avg}
                save_checkpoint(run)
    finally:
        bar.close()
        if metrics:
            metrics.close()
    return {"seconds": time.perf_counter() - t_start}


def write_run_yaml(run: Run, extra: dict) -> None:
    if run.online:
        teacher = {"online_teacher": True, "top_k": run.top_k, "temperature": run.temperature}
    else:
        teacher = {"path": str(run.cache.path), "fingerprint": run.cache.fingerprint, "top_k": run.top_k,
                   "temperature": run.temperature, "max_length": run.cache.manifest["max_length"],
                   "teacher": run.cache.manifest["teacher"]}
    doc = {"config": to_dict(run.cfg), "cache": teacher,
           "precision": run.precision, "device": str(run.device), "world_size": distributed.world_size(),
           "global_batch": global_batch(run.cfg), "package_version": __version__, **extra}
    atomic_write_text(run.out / "run.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


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
        distributed.agree(lambda: load_checkpoint(run, ckpt))
        log(f"resuming from {ckpt} (step {run.step})")
    elif cfg.resume:
        log(f"no checkpoint in {run.out / CHECKPOINTS}; starting from step 0")
    if main:
        write_run_yaml(run, {"status": "running"})
    fit(run, log)
    if not main:
        return {}
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

