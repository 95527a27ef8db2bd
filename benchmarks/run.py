"""Does the offline teacher pay, and are both stages fast? Every figure is a ratio of two things timed in
this one run, side by side, on the same batches (the machines are shared and noisy; absolute times are
printed too but only the ratios are compared with the targets).

    python benchmarks/run.py --quick --json out.json      # tiny model built here, seconds
    python benchmarks/run.py --json bench.json            # the built-in model on the demo task, minutes
    python benchmarks/run.py --only loss-memory --json m.json   # the loss-memory figure alone, a few minutes

Figures (keys of --json):
  cache_vs_forward          cache-teacher throughput (response tokens/s: forward + top-k + Parquet) over a
                            plain transformers forward (model(...).logits) on the same batches      >= 0.90
  kd_vs_sft_step            train step time with cached KD (lambda 0.5) over SFT only (lambda 0)    <= 1.05
  online_vs_cached_step     online-teacher step time over cached-KD step time, same batches         >= 1.25
  sweep4_cached_vs_online   a 4-lambda sweep of one epoch each: cache build + 4 cached trainings over
                            4 online trainings (model loads included, from the timed parts)        <= 0.80
  bytes_per_token           cache bytes on disk per response token at k=32                          <= 96
  logprob_max_abs_err       stored log-probs against the fp32 values they were rounded from         <= 1e-3
  read_vs_train             rows/s the cache reader delivers (collated) over rows/s training uses   >= 20
  padding_waste             share of padded positions in cache-teacher batches                      <= 0.10
  peak_rss_cached_vs_online_separate
                            peak RSS of cached-KD training over online KD with a separate
                            full-precision teacher in memory (each in its own process)
  loss_memory_vs_dense      peak memory of the KD loss (CE + k+1-bucket KL, forward + backward through
                            losses.response_losses) for 8,192 response tokens, H = 4096, V = 128,256, a
                            random bf16 head, over dense logits for the same tokens (each side in its own
                            process; --quick: V = 8,192, H = 64)                                    <= 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the table's output (read when tqdm is imported)

from pipeline.batches import collate, collate_rows, length_batches
from pipeline.cache.read import open_cache
from pipeline.cache.write import build_cache, planned_inputs, read_inputs
from pipeline.config import CacheConfig, TrainConfig
from pipeline.device import resolve_device, resolve_precision
from pipeline.forward import output_head
from pipeline.losses import response_losses
from pipeline.metrics import peak_memory_mb, reset_peak_memory
from pipeline.mixing import RowStream
from pipeline.model_source import load_tokenizer, quiet_transformers, resolve_model
from pipeline.models import load_model
from pipeline.teacher import teacher_topk
from pipeline.train import forward_backward, micro_batches, optimizer_step, setup

TARGETS = {  # key: (comparison, bound)
    "cache_vs_forward": (">=", 0.90),
    "kd_vs_sft_step": ("<=", 1.05),
    "online_vs_cached_step": (">=", 1.25),
    "sweep4_cached_vs_online": ("<=", 0.80),
    "bytes_per_token": ("<=", 96),
    "logprob_max_abs_err": ("<=", 1e-3),
    "read_vs_train": (">=", 20),
    "padding_waste": ("<=", 0.10),
    "loss_memory_vs_dense": ("<=", 0.25),
}
QUIET = {"log": lambda *_: None}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_data(work: Path, quick: bool, n_examples: int) -> tuple[str, Path, Path]:
    """(model, task JSONL, rehearsal JSONL) for the run."""
    if quick:
        from pipeline.tiny import build_tiny_model_dir

        model = str(build_tiny_model_dir(work / "tiny-model"))
    else:
        model = "smollm2-135m-instruct"
    rows = [json.loads(line) for line in (REPO / "data/demo/task_train.jsonl").read_text().splitlines()]
    task = work / "task.jsonl"
    task.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:n_examples]))
    # Rehearsal rows: the demo's general answers if ./run_all.sh made them, else a few templates.
    general_file = REPO / "runs/demo/rehearsal_train.jsonl"
    general = [json.loads(x) for x in general_file.read_text().splitlines()] if general_file.exists() else [
        json.loads(x) for x in (REPO / "data/templates/instruction_input_output.jsonl").read_text().splitlines()]
    n_general = max(n_examples * 3 // 7, 1)
    general = [{**general[i % len(general)], "id": f"g{i}"} for i in range(n_general)]
    rehearsal = work / "rehearsal.jsonl"
    rehearsal.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in general))
    return model, task, rehearsal


def bucket_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL between two top-k + residual distributions over the same ids: what the rounding of the stored
    log-probs changes in the targets the student is fitted to. (N, k) each -> (N,)."""
    p, q = p_logprobs.double().exp(), q_logprobs.double().exp()
    pr, qr = (1 - p.sum(-1)).clamp_min(0), (1 - q.sum(-1)).clamp_min(1e-12)
    return (p * (p_logprobs.double() - q_logprobs.double())).sum(-1) + torch.xlogy(pr, pr) - pr * qr.log()


def bench_cache(model: str, task: Path, rehearsal: Path, work: Path, top_k: int, batch_size: int) -> dict:
    """cache-teacher against a plain transformers forward over the same length-sorted batches. The plain forward
    is timed before and after the cache build and averaged, so that a machine slowing down or speeding up during
    the run (shared, noisy) does not favour either side."""
    cfg = CacheConfig(model=model, task_train=str(task), rehearsal_train=str(rehearsal), rehearsal_eval="none",
                      eval_fraction=0, out=str(work / "cache"), top_k=top_k, max_length=512, batch_size=batch_size)
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    examples, _, _ = read_inputs(cfg, planned_inputs(cfg, work / "cache"), tokenizer, **QUIET)
    teacher = load_model(model_dir, device, precision)
    head = output_head(teacher)
    batches = []
    for role in ("task", "rehearsal"):
        idx = [i for i, e in enumerate(examples) if e.role == role]
        batches += [collate([examples[idx[j]] for j in b], tokenizer.pad_token_id).to(device)
                    for b in length_batches([len(examples[i].input_ids) for i in idx], batch_size)]

    @torch.inference_mode()
    def plain_forward() -> None:
        for b in batches:  # what a straightforward teacher pass computes: full logits at every position
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                teacher(input_ids=b.input_ids, attention_mask=b.attention_mask)

    before = timed(plain_forward)
    summary = build_cache(cfg, **QUIET)
    plain_forward_s = (before + timed(plain_forward)) / 2

    # Rounding error of the stored log-probs: recompute the first batches in fp32 in the cache's own batches.
    cache = open_cache(work / "cache")
    err = rel = kl_sum = 0.0
    n_tok = 0
    rows = list(cache.iter_rows("task", "train"))[:batch_size * 2]
    for start in range(0, len(rows), batch_size):
        b = collate_rows(rows[start:start + batch_size], tokenizer.pad_token_id).to(device)
        _, lps = teacher_topk(teacher, head, b.input_ids, b.attention_mask, b.loss_mask, top_k=top_k,
                              temperature=1.0, precision=precision)
        diff = (lps - b.teacher_logprobs).abs()
        err = max(err, float(diff.max()))
        rel = max(rel, float((diff / lps.abs().clamp_min(1e-6)).max()))
        kl_sum += float(bucket_kl(lps, b.teacher_logprobs).sum())
        n_tok += lps.shape[0]
    fp32 = build_cache(CacheConfig(**{**cfg.__dict__, "out": str(work / "cache-fp32"), "logprob_dtype": "float32"}),
                       **QUIET)
    return {
        "cache_build_s": summary.seconds,
        "cache_teacher_loop_s": summary.teacher_seconds,
        "plain_forward_s": plain_forward_s,
        "cache_response_tokens": summary.response_tokens,
        "cache_tokens_per_s": summary.response_tokens / summary.teacher_seconds,
        "plain_forward_tokens_per_s": summary.response_tokens / plain_forward_s,
        "cache_vs_forward": plain_forward_s / summary.teacher_seconds,
        "bytes_per_token": summary.bytes_per_token,
        "logprob_max_abs_err": err,
        "logprob_max_rel_err": rel,
        "kl_fp32_vs_stored_per_token": kl_sum / max(n_tok, 1),
        "bytes_per_token_fp32_storage": fp32.bytes_per_token,
        "padding_waste": summary.padding_waste,
        "examples": summary.examples,
        "precision": precision,
        "device": str(device),
    }


def time_steps(run, steps: int) -> float:
    """Seconds per optimiser step over `steps` steps after one warm-up step (not a logging step)."""
    forward_backward(run, micro_batches(run, 1), measure_kl=False)
    optimizer_step(run)
    t0 = time.perf_counter()
    for step in range(2, steps + 2):
        forward_backward(run, micro_batches(run, step), measure_kl=False)
        optimizer_step(run)
    return (time.perf_counter() - t0) / steps


def reader_rows_per_s(run, batch_size: int, n_batches: int = 50) -> float:
    """The reader alone: fresh streams over the same cache, collated batches as training gets them."""
    task_stream = RowStream(run.rows, "task", "train", seed=1)
    reh_stream = RowStream(run.rows, "rehearsal", "train", seed=1)
    pad = run.tokenizer.pad_token_id

    def read() -> None:
        for _ in range(n_batches):
            collate_rows(task_stream.take(batch_size - 2) + reh_stream.take(2), pad)

    return n_batches * batch_size / timed(read)


def time_interleaved(runs: dict, steps: int) -> dict[str, float]:
    """Median seconds per optimiser step of each run, the runs taking turns step by step (after one warm-up step
    each), so that drift in the machine's speed hits all of them alike and single slow steps do not count."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(1, steps + 2):
        for name, run in runs.items():
            t0 = time.perf_counter()
            forward_backward(run, micro_batches(run, step), measure_kl=False)
            optimizer_step(run)
            if step > 1:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_train(model: str, work: Path, steps: int, batch_size: int, checkpointing: bool) -> dict:
    """SFT, cached KD and online KD steps on the same batches: the online run is the cached run with its targets
    recomputed at every step by the base (adapter off), exactly what --online-teacher does."""
    base = {"model": model, "max_steps": 1000, "batch_size": batch_size, "overwrite": True,
            "gradient_checkpointing": checkpointing, "cache": str(work / "cache")}
    out: dict = {}
    runs = {}
    for name, lam, online in (("sft", 0.0, False), ("kd", 0.5, False), ("online", 0.5, True)):
        t0 = time.perf_counter()
        runs[name] = setup(TrainConfig(**base, kd_lambda=lam, out=str(work / f"train-{name}")), **QUIET)
        runs[name].online = online
        out[f"setup_{name}_s"] = time.perf_counter() - t0
    out.update({f"step_{name}_s": t for name, t in time_interleaved(runs, steps).items()})
    out["tokens_per_step"] = sum(int(b.attention_mask.sum()) for b in micro_batches(runs["kd"], 2))
    out["reader_rows_per_s"] = reader_rows_per_s(runs["kd"], batch_size)
    del runs
    out["kd_vs_sft_step"] = out["step_kd_s"] / out["step_sft_s"]
    out["online_vs_cached_step"] = out["step_online_s"] / out["step_kd_s"]
    out["train_rows_per_s"] = batch_size / out["step_kd_s"]
    out["read_vs_train"] = out["reader_rows_per_s"] / out["train_rows_per_s"]
    out["train_tokens_per_s"] = out["tokens_per_step"] / out["step_kd_s"]
    return out


def rss_probe(kind: str, model: str, work: Path, steps: int, batch_size: int, checkpointing: bool) -> None:
    """Child process: a few KD training steps, then print the peak RSS of the training phase (MiB)."""
    cfg = TrainConfig(model=model, cache=str(work / "cache"), out=str(work / f"rss-{kind}"), overwrite=True,
                      kd_lambda=0.5, batch_size=batch_size, max_steps=1000, gradient_checkpointing=checkpointing)
    run = setup(cfg, **QUIET)
    if kind == "online-separate":  # a full-precision teacher beside the 4-bit student, as without caching
        run.online = True
        run.teacher = load_model(resolve_model(model), run.device, run.precision, quantize=False)
    reset_peak_memory(run.device)  # loading peaks above training: measure the training phase
    time_steps(run, steps)
    peak = peak_memory_mb(run.device)
    print(json.dumps({"peak_rss_mib": peak}))


def peak_rss(kind: str, args, work: Path, model: str) -> float:
    cmd = [sys.executable, __file__, "--rss-probe", kind, "--work", str(work), "--model-name", model, "--steps", "2",
           "--batch-size", str(args.batch_size)]
    if args.no_gradient_checkpointing:
        cmd.append("--no-gradient-checkpointing")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"rss probe {kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]


# The loss-memory figure: a Llama-3-8B-sized output head (H = 4096, V = 128,256) over 8,192 response tokens; --quick
# keeps the tokens and the chunk (so the same share of the tokens is in flight) and shrinks the head.
LOSS_MEMORY_SIZES = {"full": {"tokens": 8192, "hidden": 4096, "vocab": 128256},
                     "quick": {"tokens": 8192, "hidden": 64, "vocab": 8192}}
LOSS_MEMORY_TOP_K = 32
LOSS_MEMORY_DTYPE = torch.bfloat16  # the head and hidden states a bf16 model hands the loss (see bench_loss_memory)


def rss_mib(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc/self/status, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def dense_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor,
                  teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """The same CE + 0.5 * forward KL (k+1 buckets) written the plain way, with dense logits for every token: one
    fp32 (N, V) log-softmax, kept for the backward. Lean on purpose (no fp32 copy of the bf16 logits, residual from
    the k log-probs), so that the ratio to it is not flattered."""
    logq = torch.log_softmax(hidden @ weight.T, dim=-1, dtype=torch.float32)  # (N, V) <- all tokens at once
    ce = -logq.gather(-1, labels[:, None]).sum()
    lq = logq.gather(-1, teacher_ids)  # (N, k)
    lp = teacher_logprobs.float()
    p = lp.exp()
    p_r = (1 - p.sum(-1)).clamp_min(0)
    q_r = (1 - lq.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (lp - lq)).sum() + (torch.xlogy(p_r, p_r) - p_r * q_r.log()).sum()
    return ce + 0.5 * kl


def loss_memory_probe(side: str, size: str) -> None:
    """Child process: one forward + backward of the KD loss (`chunked`: response_losses at the default chunk size;
    `dense`: dense_kd_loss), printing the peak resident memory it added above its inputs (MiB)."""
    dims = LOSS_MEMORY_SIZES[size]
    n, dim, vocab, k = dims["tokens"], dims["hidden"], dims["vocab"], LOSS_MEMORY_TOP_K
    chunk_size = TrainConfig.__dataclass_fields__["loss_chunk_size"].default
    torch.manual_seed(0)
    weight = torch.randn(vocab, dim, dtype=LOSS_MEMORY_DTYPE).mul_(3 / dim**0.5)  # (V, H), logits of a few units
    hidden = torch.randn(n, dim, dtype=LOSS_MEMORY_DTYPE).requires_grad_(True)  # (N, H)
    labels = torch.randint(0, vocab, (n,))
    # k distinct ids per token (an offset plus a stride) and a teacher putting 0.9 of its mass on them.
    teacher_ids = (torch.randint(0, vocab, (n, 1)) + torch.arange(k) * (vocab // k)) % vocab
    teacher_logprobs = (torch.log_softmax(torch.randn(n, k) * 2, dim=-1) + np.log(0.9)).half()

    def loss_of(rows: slice) -> torch.Tensor:
        args = (hidden[rows], weight, labels[rows])
        teacher = (teacher_ids[rows], teacher_logprobs[rows])
        if side == "dense":
            return dense_kd_loss(*args, *teacher)
        sums = response_losses(*args, teacher_ids=teacher[0], teacher_logprobs=teacher[1], chunk_size=chunk_size)
        return sums.ce + 0.5 * sums.kl

    loss_of(slice(0, 16)).backward()  # warm-up: kernels and thread pools are set up before the measurement
    hidden.grad = None
    inputs = rss_mib("VmRSS")
    reset_peak_memory(torch.device("cpu"))
    if rss_mib("VmHWM") > inputs + 64:
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): no honest peak on this system")
    t0 = time.perf_counter()
    loss_of(slice(0, n)).backward()
    print(json.dumps({"peak_mib": rss_mib("VmHWM") - inputs, "inputs_mib": inputs,
                      "seconds": time.perf_counter() - t0}))


def bench_loss_memory(quick: bool) -> dict:
    """Peak memory of the KD loss against dense logits, each side in a fresh process (the peak RSS is reset once
    the inputs exist, so it counts what the loss adds: logits, log-probs, their gradients, autograd's saved
    tensors).

    [loss memory dtype note] Both sides get a bf16 head and bf16 hidden states, as a bf16 model
    hands them over. This is also what the machine allows: dense fp32 inputs and logits would peak near 18 GB, on
    a 24 GB machine shared with others.
    """
    size = "quick" if quick else "full"
    out: dict = {}
    for side in ("chunked", "dense"):
        cmd = [sys.executable, __file__, "--loss-memory-probe", side, "--loss-memory-size", size]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"loss memory probe {side} failed:\n{proc.stderr[-2000:]}")
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    dims = LOSS_MEMORY_SIZES[size]
    return {
        "loss_memory_vs_dense": out["chunked"]["peak_mib"] / out["dense"]["peak_mib"],
        "loss_memory_peak_mib": out["chunked"]["peak_mib"],
        "dense_memory_peak_mib": out["dense"]["peak_mib"],
        "loss_memory_inputs_mib": out["chunked"]["inputs_mib"],
        "loss_memory_s": out["chunked"]["seconds"],
        "dense_memory_s": out["dense"]["seconds"],
        "loss_memory_shape": {**dims, "top_k": LOSS_MEMORY_TOP_K, "dtype": str(LOSS_MEMORY_DTYPE).split(".")[-1],
                              "chunk_size": TrainConfig.__dataclass_fields__["loss_chunk_size"].default},
    }


def machine() -> dict:
    import bitsandbytes
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, bound = TARGETS[key]
    ok = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g}  {'ok' if ok else 'MISSED'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny model built here (seconds) instead of SmolLM2")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    p.add_argument("--examples", type=int, help="task examples to cache (default 24 quick, 224 full)")
    p.add_argument("--steps", type=int, help="timed train steps per variant (default 3 quick, 8 full)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="time train steps without recomputation (as the demo config runs)")
    p.add_argument("--only", choices=["loss-memory"], help="measure this figure alone (loss-memory: a few minutes; "
                   "with --quick, seconds)")
    p.add_argument("--rss-probe", help=argparse.SUPPRESS)
    p.add_argument("--loss-memory-probe", choices=["chunked", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--loss-memory-size", choices=list(LOSS_MEMORY_SIZES), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-name", help=argparse.SUPPRESS)
    args = p.parse_args()
    quiet_transformers()
    if args.rss_probe:
        rss_probe(args.rss_probe, args.model_name, args.work, args.steps, args.batch_size,
                  not args.no_gradient_checkpointing)
        return
    if args.loss_memory_probe:
        loss_memory_probe(args.loss_memory_probe, args.loss_memory_size)
        return
    if args.only == "loss-memory":
        t_start = time.perf_counter()
        figures = bench_loss_memory(args.quick)
        figures.update({"machine": machine(), "wall_s": time.perf_counter() - t_start,
                        "date": time.strftime("%Y-%m-%d")})
        print_loss_memory(figures)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        return
    n_examples = args.examples or (24 if args.quick else 224)
    steps = args.steps or (3 if args.quick else 8)
    torch.manual_seed(0)
    np.random.seed(0)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        model, task, rehearsal = make_data(work, args.quick, n_examples)
        figures = bench_cache(model, task, rehearsal, work, args.top_k, args.batch_size)
        figures.update(bench_train(model, work, steps, args.batch_size, not args.no_gradient_checkpointing))
        # A sweep of 4 lambdas, one epoch each, from the timed parts: with the cache, one cache build and 4
        # cached trainings; without, 4 online trainings. Each training loads the model (setup) once.
        n_rows = figures["examples"]
        epoch_steps = max(n_rows // args.batch_size, 1)
        cached = figures["cache_build_s"] + 4 * (figures["setup_kd_s"] + epoch_steps * figures["step_kd_s"])
        online = 4 * (figures["setup_online_s"] + epoch_steps * figures["step_online_s"])
        figures.update({"sweep4_epoch_steps": epoch_steps, "sweep4_cached_s": cached, "sweep4_online_s": online,
                        "sweep4_cached_vs_online": cached / online})
        figures["peak_rss_cached_mib"] = peak_rss("cached", args, work, model)
        figures["peak_rss_online_separate_mib"] = peak_rss("online-separate", args, work, model)
        figures["peak_rss_cached_vs_online_separate"] = (figures["peak_rss_cached_mib"]
                                                        / figures["peak_rss_online_separate_mib"])
    figures.update(bench_loss_memory(args.quick))
    figures.update({"model": "tiny (built here)" if args.quick else model, "batch_size": args.batch_size,
                    "gradient_checkpointing": not args.no_gradient_checkpointing,
                    "top_k": args.top_k, "timed_steps": steps, "machine": machine(),
                    "wall_s": time.perf_counter() - t_start,
                    "date": time.strftime("%Y-%m-%d")})

    rows = [(k, figures[k]) for k in ("cache_vs_forward", "kd_vs_sft_step", "online_vs_cached_step",
                                       "sweep4_cached_vs_online", "bytes_per_token", "logprob_max_abs_err",
                                       "read_vs_train", "padding_waste", "peak_rss_cached_vs_online_separate",
                                       "loss_memory_vs_dense")]
    print(f"\nbenchmark: {figures['model']}, {figures['device']} ({figures['precision']}), "
          f"{figures['machine']['cores']} cores, torch {figures['machine']['torch']}, "
          f"bitsandbytes {figures['machine']['bitsandbytes']}, {figures['examples']} cached examples, gradient "
          f"checkpointing {'on' if figures['gradient_checkpointing'] else 'off'}")
    print(f"| {'figure':<36} | {'value':>10} | {'target':<14} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 16}|")
    for k, v in rows:
        print(f"| {k:<36} | {v:>10.4g} | {verdict(k, v):<14} |")
    print(f"float16 log-probs: max relative error {figures['logprob_max_rel_err']:.2g}, KL(fp32 targets || stored) "
          f"{figures['kl_fp32_vs_stored_per_token']:.2g} per token; float32 storage (--logprob-dtype float32): "
          f"{figures['bytes_per_token_fp32_storage']:.1f} bytes per token")
    print("\nraw: " + ", ".join(f"{k} {figures[k]:.3g}" for k in (
        "cache_teacher_loop_s", "plain_forward_s", "cache_tokens_per_s", "plain_forward_tokens_per_s",
        "step_sft_s", "step_kd_s", "step_online_s", "train_tokens_per_s", "reader_rows_per_s",
        "sweep4_cached_s", "sweep4_online_s", "peak_rss_cached_mib", "peak_rss_online_separate_mib", "wall_s")))
    print_loss_memory(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def print_loss_memory(figures: dict) -> None:
    shape, ratio = figures["loss_memory_shape"], figures["loss_memory_vs_dense"]
    print(f"\nloss memory, {shape['tokens']} tokens, H {shape['hidden']}, V {shape['vocab']}, k {shape['top_k']}, "
          f"{shape['dtype']} head, chunk {shape['chunk_size']}: peak {figures['loss_memory_peak_mib']:.0f} MiB "
          f"chunked ({figures['loss_memory_s']:.1f} s) against {figures['dense_memory_peak_mib']:.0f} MiB dense "
          f"({figures['dense_memory_s']:.1f} s), above {figures['loss_memory_inputs_mib']:.0f} MiB of inputs: "
          f"loss_memory_vs_dense {ratio:.3f} {verdict('loss_memory_vs_dense', ratio)}")


if __name__ == "__main__":
    main()
