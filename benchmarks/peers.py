"""Side by side with TRL: one training step of this project and of TRL + PEFT QLoRA, on the same batches, in one run.

    python benchmarks/peers.py --quick --json peers.json   # tiny model built here, seconds (tests/test_peers.py)
    python benchmarks/peers.py --json peers.json           # the built-in model on the demo notes, minutes

Needs TRL: pip install 'lwf-pipeline[peers]'.

Four paths, every one a QLoRA student (the same 4-bit NF4 base with double quantisation, LoRA r / alpha / dropout
on all linear layers, non-reentrant gradient checkpointing or none), fed the same token ids step by step:

    trl_sft        TRL SFTTrainer, peft_config=LoraConfig(...), completion_only_loss=True: plain SFT
    trl_distill    TRL GKDTrainer (trl.experimental.gkd) with lmbda=0 (the dataset's completions, never generated
                   ones), beta=0 (the generalised JSD is then the forward KL(teacher || student)), seq_kd=False,
                   temperature 1, teacher = a second copy of the frozen base in the same 4 bit; its loss is the KL
                   alone, over the full vocabulary, on every completion token: the closest TRL setting to this
                   project's loss. (TRL 1.16's stable trl.DistillationTrainer has no lmbda: it trains only on
                   completions the student generates itself, on-policy distillation, another method.)
    cached_kd      this project's step (train.forward_backward + optimizer_step): CE + 1.0 * KL against the cached
                   top-k targets (k+1 buckets), the KL on every response token (kd_on all, as GKD)
    online_kd      the same step with the targets recomputed at every step by the base with the adapter switched
                   off (--online-teacher)

Each path is set up as its own tool sets it up: TRL builds its PEFT model itself from a base loaded the way a TRL user
loads one (from_pretrained with the same BitsAndBytesConfig), and casts the LoRA weights to bf16 as it does for any
quantised model; this project loads through models.load_model / attach_lora. Each TRL step is what Trainer's inner
loop does for one optimiser step (training_step, clip, optimizer and scheduler step, zero_grad), driven here so that
the batches are ours and the paths can take turns; TRL's dataloader, logging and callbacks are not timed.

Figures (keys of --json):
  step_<path>_s                   median seconds of one optimiser step after the warm-up, the four paths taking turns
                                  step by step (a shared, noisy machine drifts alike for all of them)
  tokens_per_s_<path>             non-pad tokens of a step / step_<path>_s
  peak_memory_<path>_mib          peak memory of the path's training steps, each path in its own fresh process:
                                  on CUDA torch.cuda.max_memory_allocated, on CPU the process's peak resident set
                                  (VmHWM reset after loading; weights, activations, optimiser state, allocator slack)
  cached_kd_vs_trl_sft            step_cached_kd_s / step_trl_sft_s: distillation at the price of SFT        <= 1.05
  cached_kd_vs_trl_distill        step_cached_kd_s / step_trl_distill_s: the teacher's forward is not paid    < 1
  online_kd_vs_trl_distill        step_online_kd_s / step_trl_distill_s: both pay a teacher forward per step
  memory_cached_kd_vs_trl_sft     peak_memory_cached_kd_mib / peak_memory_trl_sft_mib
  memory_cached_kd_vs_trl_distill peak_memory_cached_kd_mib / peak_memory_trl_distill_mib

A ratio is only reported when its two sides saw the same tokens at every timed step (the same ids, attention and
loss positions, compared by count and digest); otherwise the benchmark exits non-zero with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer is in trl.experimental: known, said above

from pipeline.batches import TrainBatch
from pipeline.cache.write import build_cache
from pipeline.config import NONE, CacheConfig, TrainConfig
from pipeline.device import resolve_runtime, weights_dtype
from pipeline.metrics import peak_memory_mb, reset_peak_memory
from pipeline.model_source import quiet_transformers, resolve_model
from pipeline.models import quantization_settings
from pipeline.train import Run, forward_backward, micro_batches, optimizer_step, setup

PATHS = ("trl_sft", "trl_distill", "cached_kd", "online_kd")
TRL_PATHS = ("trl_sft", "trl_distill")
# ratio key: (numerator path, denominator path, comparison, target or None)
STEP_RATIOS = {
    "cached_kd_vs_trl_sft": ("cached_kd", "trl_sft", "<=", 1.05),
    "cached_kd_vs_trl_distill": ("cached_kd", "trl_distill", "<", 1.0),
    "online_kd_vs_trl_distill": ("online_kd", "trl_distill", "", None),
}
MEMORY_RATIOS = {
    "memory_cached_kd_vs_trl_sft": ("cached_kd", "trl_sft"),
    "memory_cached_kd_vs_trl_distill": ("cached_kd", "trl_distill"),
}
KD_LAMBDA = 1.0  # the weight of the KL in this project's step (its default); GKD's loss is the KL alone
QUIET = {"log": lambda *_: None}


class NotSameTokens(Exception):
    """Two paths that a ratio compares did not see the same tokens."""


# ----------------------------------------------------------------------------------------------------------------
# the batches: built once from this project's cache, given to every path
# ----------------------------------------------------------------------------------------------------------------

def make_cache(work: Path, quick: bool, n_examples: int, top_k: int, batch_size: int) -> str:
    """Cache the teacher's top-k for the first n demo notes; returns the --model the paths load."""
    if quick:
        from pipeline.tiny import build_tiny_model_dir

        model = str(build_tiny_model_dir(work / "tiny-model"))
    else:
        model = "smollm2-135m-instruct"
    lines = (REPO / "data/demo/task_train.jsonl").read_text().splitlines()[:n_examples]
    task = work / "task.jsonl"
    task.write_text("\n".join(lines) + "\n")
    build_cache(CacheConfig(model=model, task_train=str(task), rehearsal_train=NONE, rehearsal_eval=NONE,
                            eval_fraction=0, out=str(work / "cache"), top_k=top_k, batch_size=batch_size), **QUIET)
    return model


def train_config(model: str, work: Path, name: str, batch_size: int, checkpointing: bool) -> TrainConfig:
    """This project's settings for a path: KL on every response token (as GKD), no rehearsal rows in the data."""
    return TrainConfig(model=model, cache=str(work / "cache"), out=str(work / f"train-{name}"), overwrite=True,
                       kd_lambda=KD_LAMBDA, kd_on="all", rehearsal_ratio=0.0, batch_size=batch_size, max_steps=1000,
                       gradient_checkpointing=checkpointing)


def step_batches(run: Run, steps: int) -> list[TrainBatch]:
    """The batches of steps 1..steps as this project's training would draw them (one micro-batch per step)."""
    out = []
    for step in range(1, steps + 1):
        (batch,) = micro_batches(run, step)
        out.append(batch)
    return out


@dataclass(frozen=True)
class Seen:
    """What one path was fed at one step: non-pad tokens, loss tokens, and a digest of ids and both masks."""

    tokens: int
    loss_tokens: int
    digest: str


def seen_of(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> Seen:
    """(B, T) ids and masks -> Seen. loss_mask[b, t]: input_ids[b, t] is a token the loss predicts."""
    att = attention_mask.bool()
    h = hashlib.sha256()
    for t in (input_ids.masked_fill(~att, -1), att, loss_mask.bool() & att):
        h.update(t.to(torch.int64).cpu().numpy().tobytes())
        h.update(str(tuple(t.shape)).encode())
    return Seen(int(att.sum()), int((loss_mask.bool() & att).sum()), h.hexdigest()[:16])


def check_same_tokens(seen: dict[str, list[Seen]], a: str, b: str) -> None:
    """Raise NotSameTokens unless paths a and b were fed the same tokens at every step."""
    if len(seen[a]) != len(seen[b]):
        raise NotSameTokens(f"{a} ran {len(seen[a])} steps, {b} {len(seen[b])}")
    for step, (x, y) in enumerate(zip(seen[a], seen[b], strict=True), start=1):
        if x != y:
            raise NotSameTokens(f"step {step}: {a} saw {x.tokens} tokens ({x.loss_tokens} in the loss, {x.digest}), "
                                f"{b} {y.tokens} ({y.loss_tokens}, {y.digest})")


# ----------------------------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------------------------

def require_trl():
    try:
        import trl
    except ImportError:
        sys.exit("benchmarks/peers.py needs TRL: pip install 'lwf-pipeline[peers]'")
    return trl


def load_trl_base(model_dir: Path, device: torch.device, precision: str):
    """The 4-bit base as a TRL user loads it: from_pretrained with the BitsAndBytesConfig this project uses (NF4,
    double quantisation, the same compute dtype) and the same dtype for the unquantised weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = quantization_settings(precision)
    bnb = BitsAndBytesConfig(**{**q, "bnb_4bit_compute_dtype": getattr(torch, q["bnb_4bit_compute_dtype"])})
    return AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, dtype=weights_dtype(precision, device), attn_implementation="sdpa",
        device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"})


def trl_rows(batches: list[TrainBatch]) -> list[dict]:
    """Every row of every step's batch, unpadded, as a pre-tokenised TRL dataset row (input_ids, completion_mask)."""
    rows = []
    for b in batches:
        for ids, att, mask in zip(b.input_ids, b.attention_mask, b.loss_mask, strict=True):
            n = int(att.sum())
            rows.append({"input_ids": ids[:n].tolist(), "completion_mask": mask[:n].int().tolist()})
    return rows


@dataclass
class TrlPath:
    """A TRL trainer driven one optimiser step at a time, as Trainer._inner_training_loop does for one step."""

    trainer: object
    model: torch.nn.Module = field(init=False)

    def __post_init__(self) -> None:
        t = self.trainer
        if t.args.gradient_checkpointing:  # what Trainer.train() does before its loop
            t.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=t.args.gradient_checkpointing_kwargs)
        self.model, _ = t._prepare_for_training(t.args.max_steps, None, None)  # accelerate, optimiser, scheduler
        t.current_gradient_accumulation_steps = 1

    def step(self, inputs: dict) -> float:
        t = self.trainer
        num_items = t._get_num_items_in_batch([inputs], t.args.device)
        loss = t.training_step(self.model, dict(inputs), num_items)
        if t.args.max_grad_norm > 0:
            t._clip_grad_norm(self.model)
        t.optimizer.step()
        t.lr_scheduler.step()
        self.model.zero_grad()
        t.state.global_step += 1
        return float(loss)


def trl_args(kind: str, cfg: TrainConfig, work: Path, device: torch.device, precision: str, steps: int):
    """SFTConfig / GKDConfig with this project's optimiser, schedule, batch and checkpointing settings."""
    from trl import SFTConfig
    from trl.experimental.gkd import GKDConfig

    common = dict(output_dir=str(work / f"trl-{kind}"), per_device_train_batch_size=cfg.batch_size,
                  gradient_accumulation_steps=1, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
                  lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
                  max_steps=steps, gradient_checkpointing=cfg.gradient_checkpointing,
                  gradient_checkpointing_kwargs={"use_reentrant": False},
                  # bf16 autocast where this project autocasts (CUDA); on CPU neither does (device.autocast).
                  bf16=device.type == "cuda" and precision == "bf16",
                  fp16=device.type == "cuda" and precision == "fp16",
                  use_cpu=device.type == "cpu", report_to="none", logging_strategy="no", save_strategy="no",
                  seed=cfg.seed, max_length=None, completion_only_loss=True, dataloader_num_workers=0)
    if kind == "trl_sft":
        return SFTConfig(**common)
    # lmbda 0: the dataset's completions (no on-policy generation); beta 0: forward KL; the same LoRA dropout.
    return GKDConfig(**common, lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, disable_dropout=False)


def trl_path(kind: str, cfg: TrainConfig, work: Path, batches: list[TrainBatch], device: torch.device,
             precision: str) -> tuple[TrlPath, list[dict]]:
    """A TRL trainer for `kind` and each step's inputs, collated by TRL's collator from the same rows.

    SFTTrainer prepares the pre-tokenised rows itself (labels = input_ids, -100 outside the completion_mask:
    completion-only loss). GKDTrainer skips that preparation and takes rows as given, so it gets them labelled the
    same way (labelled_rows); check_same_tokens then confirms that both saw what this project saw.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipeline.model_source import load_tokenizer

    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, bias="none", task_type="CAUSAL_LM")
    args = trl_args(kind, cfg, work, device, precision, len(batches))
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)  # LoRA init
    student = load_trl_base(model_dir, device, precision)
    with quiet_trl():
        if kind == "trl_sft":
            trainer = SFTTrainer(model=student, args=args, train_dataset=Dataset.from_list(trl_rows(batches)),
                                 processing_class=tokenizer, peft_config=lora, data_collator=collator)
        else:
            trainer = GKDTrainer(model=student, teacher_model=load_trl_base(model_dir, device, precision), args=args,
                                 train_dataset=Dataset.from_list(labelled_rows(batches)), processing_class=tokenizer,
                                 peft_config=lora, data_collator=collator)
    rows, b = trainer.train_dataset, cfg.batch_size
    inputs = [collator([rows[i] for i in range(s * b, (s + 1) * b)]) for s in range(len(batches))]
    return TrlPath(trainer), inputs


def labelled_rows(batches: list[TrainBatch]) -> list[dict]:
    """trl_rows with SFTTrainer's labels (the token where completion_mask is 1, else -100), for GKDTrainer."""
    return [{"input_ids": r["input_ids"],
             "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"], strict=True)]}
            for r in trl_rows(batches)]


@contextlib.contextmanager
def quiet_trl():
    """TRL's and transformers' advice at construction (experimental API, deprecations) and the progress bar of
    SFTTrainer's dataset preparation off the benchmark's output."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.getLogger("trl").level
        logging.getLogger("trl").setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        try:
            yield
        finally:
            logging.getLogger("trl").setLevel(previous)
            if bars_were_on:
                datasets.enable_progress_bars()


def seen_of_trl(inputs: dict) -> Seen:
    return seen_of(inputs["input_ids"], inputs["attention_mask"], inputs["labels"] != -100)


def seen_of_batch(batch: TrainBatch) -> Seen:
    return seen_of(batch.input_ids, batch.attention_mask, batch.loss_mask)


# ----------------------------------------------------------------------------------------------------------------
# the paths, side by side
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Side:
    """One path: a step function over its inputs of each step (returns the loss it minimised), what it saw, and what
    it trains (for the JSON: a reader checks that the paths train the same adapter)."""

    step: object  # (step index) -> float
    seen: list[Seen]
    about: dict


def adapter_facts(model: torch.nn.Module, checkpointing: bool) -> dict:
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    return {"trainable_params": sum(p.numel() for p in lora), "lora_dtype": str(lora[0].dtype).split(".")[-1],
            "lora_layers": sum(1 for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n),
            "gradient_checkpointing": checkpointing}


def build_path(name: str, model: str, work: Path, batches: list[TrainBatch], checkpointing: bool) -> Side:
    cfg = train_config(model, work, name, batches[0].input_ids.shape[0], checkpointing)
    if name in TRL_PATHS:
        device, precision = resolve_runtime(cfg.device, cfg.precision, cfg.attn)
        path, inputs = trl_path(name, cfg, work, batches, device, precision)
        on = bool(getattr(path.model, "is_gradient_checkpointing", False))
        return Side(lambda i: path.step(inputs[i]), [seen_of_trl(x) for x in inputs],
                    {"trainer": type(path.trainer).__name__, **adapter_facts(path.model, on)})
    run = setup(cfg, **QUIET)
    run.online = name == "online_kd"

    def step(i: int) -> float:
        result = forward_backward(run, [batches[i]], measure_kl=False)
        optimizer_step(run)
        return result.loss

    on = bool(getattr(run.model, "is_gradient_checkpointing", False))
    return Side(step, [seen_of_batch(b) for b in batches],
                {"trainer": "pipeline.train", **adapter_facts(run.model, on)})


def time_interleaved(paths: dict[str, Side], steps: int, warmup: int
                     ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of each step of each path, the paths taking turns step by step, the first `warmup` steps dropped;
    and the loss of every step."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    losses: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(steps):
        for name, path in paths.items():
            t0 = time.perf_counter()
            losses[name].append(path.step(i))
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times, losses


def memory_probe(name: str, model: str, work: Path, checkpointing: bool, steps: int) -> None:
    """Child process: set up one path alone, reset the peak after loading, run `steps` steps, print the peak (MiB)."""
    quiet_transformers()
    batches = torch.load(work / "batches.pt", weights_only=False)[:steps]
    path = build_path(name, model, work, batches, checkpointing)
    device, _ = resolve_runtime("auto", "auto", "sdpa")
    reset_peak_memory(device)
    for i in range(len(batches)):
        path.step(i)
    print(json.dumps({"peak_mib": peak_memory_mb(device)}))


def peak_memories(model: str, work: Path, checkpointing: bool, steps: int, jobs: int) -> dict[str, float]:
    """peak memory of each path's training steps, each path in a fresh process (memory_probe), `jobs` at a time.
    Peaks are per process, so running probes side by side changes none of them (only the wall time)."""
    def start(name: str) -> subprocess.Popen:
        cmd = [sys.executable, __file__, "--memory-probe", name, "--work", str(work), "--model-name", model,
               "--probe-steps", str(steps)] + ([] if checkpointing else ["--no-gradient-checkpointing"])
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    out: dict[str, float] = {}
    for k in range(0, len(PATHS), jobs):
        procs = {name: start(name) for name in PATHS[k:k + jobs]}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe {name} failed:\n{stderr[-3000:]}")
            out[name] = json.loads(stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def machine() -> dict:
    import bitsandbytes
    import peft
    import transformers
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}


def bench(args) -> dict:
    n_examples = args.examples or (args.batch_size * (args.steps + args.warmup))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pipeline-peers-") as tmp:
        work = Path(tmp)
        model = make_cache(work, args.quick, n_examples, args.top_k, args.batch_size)
        checkpointing = not args.no_gradient_checkpointing
        cfg = train_config(model, work, "batches", args.batch_size, checkpointing)
        run = setup(cfg, **QUIET)
        batches = step_batches(run, args.warmup + args.steps)
        device, precision = run.device, run.precision
        del run
        torch.save(batches, work / "batches.pt")
        paths = {}
        setup_s = {}
        for name in PATHS:
            t0 = time.perf_counter()
            paths[name] = build_path(name, model, work, batches, checkpointing)
            setup_s[name] = time.perf_counter() - t0
        seen = {name: p.seen for name, p in paths.items()}
        for a, b in [(a, b) for a, b, *_ in STEP_RATIOS.values()] + list(MEMORY_RATIOS.values()):
            check_same_tokens(seen, a, b)  # before any time is spent
        about = {name: p.about for name, p in paths.items()}
        times, losses = time_interleaved(paths, args.warmup + args.steps, args.warmup)
        del paths
        # The tiny model's probes run side by side (seconds of imports each); the real model's one at a time.
        t0 = time.perf_counter()
        memory = peak_memories(model, work, checkpointing, min(2, len(batches)), len(PATHS) if args.quick else 1)
        memory_s = time.perf_counter() - t0
    timed = seen["cached_kd"][args.warmup:]
    tokens = float(np.mean([s.tokens for s in timed]))
    out: dict = {"model": "tiny (built here)" if args.quick else model, "device": str(device), "precision": precision,
                 "batch_size": args.batch_size, "top_k": args.top_k, "kd_lambda": KD_LAMBDA,
                 "gradient_checkpointing": checkpointing, "warmup_steps": args.warmup, "timed_steps": args.steps,
                 "tokens_per_step": tokens, "loss_tokens_per_step": float(np.mean([s.loss_tokens for s in timed])),
                 "digests": [s.digest for s in seen["cached_kd"]]}
    for name in PATHS:
        out[f"step_{name}_s"] = float(np.median(times[name]))
        out[f"step_{name}_all_s"] = times[name]
        out[f"tokens_per_s_{name}"] = tokens / out[f"step_{name}_s"]
        out[f"peak_memory_{name}_mib"] = memory[name]
        out[f"setup_{name}_s"] = setup_s[name]
        out[f"losses_{name}"] = losses[name]
        out[f"about_{name}"] = about[name]
    for key, (a, b, *_) in STEP_RATIOS.items():
        out[key] = out[f"step_{a}_s"] / out[f"step_{b}_s"]
    for key, (a, b) in MEMORY_RATIOS.items():
        out[key] = memory[a] / memory[b]
    out.update({"machine": machine(), "memory_probes_s": memory_s, "wall_s": time.perf_counter() - t_start,
                "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(["benchmarks/peers.py", *sys.argv[1:]])})
    return out


def verdict(key: str, value: float) -> str:
    op, bound = STEP_RATIOS.get(key, ("", None, "", None))[2:]
    if bound is None:
        return ""
    ok = value <= bound if op == "<=" else value < bound
    return f"{op} {bound:g}  {'ok' if ok else 'MISSED'}"


def print_table(f: dict) -> None:
    memory = "peak GPU memory allocated" if f["device"].startswith("cuda") else "peak RSS"
    print(f"\npeers: {f['model']}, {f['device']} ({f['precision']}), batch {f['batch_size']} "
          f"({f['tokens_per_step']:.0f} tokens, {f['loss_tokens_per_step']:.0f} in the loss, per step), gradient "
          f"checkpointing {'on' if f['gradient_checkpointing'] else 'off'}, median of {f['timed_steps']} steps after "
          f"{f['warmup_steps']} warm-up; torch {f['machine']['torch']}, trl {f['machine']['trl']}")
    print(f"| {'path':<12} | {'step s':>8} | {'tokens/s':>9} | {memory + ' MiB':>22} |")
    print(f"|{'-' * 14}|{'-' * 10}|{'-' * 11}|{'-' * 24}|")
    for name in PATHS:
        print(f"| {name:<12} | {f[f'step_{name}_s']:>8.3f} | {f[f'tokens_per_s_{name}']:>9.1f} | "
              f"{f[f'peak_memory_{name}_mib']:>22.0f} |")
    for key in [*STEP_RATIOS, *MEMORY_RATIOS]:
        print(f"{key:<32} {f[key]:.3f}  {verdict(key, f[key])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny model built here (seconds) instead of SmolLM2")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    p.add_argument("--steps", type=int, help="timed steps per path (default 2 quick, 10 full)")
    p.add_argument("--warmup", type=int, default=1, help="steps per path before timing (default 1)")
    p.add_argument("--batch-size", type=int, help="examples per step (default 4 quick, 8 full)")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--examples", type=int, help="demo notes to cache (default: batch x steps, each seen once)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="every path without recomputation")
    p.add_argument("--memory-probe", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-name", help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_probe not in ("cached_kd", "online_kd"):  # this project's probes run without TRL
        require_trl()
    quiet_transformers()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.model_name, args.work, not args.no_gradient_checkpointing,
                     args.probe_steps)
        return
    args.steps = args.steps or (2 if args.quick else 10)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    torch.manual_seed(0)
    try:
        figures = bench(args)
    except NotSameTokens as e:
        sys.exit(f"peers: refusing to report ratios: {e}")
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
