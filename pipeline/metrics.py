"""OUT/metrics.jsonl: one JSON line per logged training step, the sums they are averaged from, and the run's
peak memory.

A line holds step, loss, ce, kl, l2, lr, grad_norm, tokens_per_s and the realised rehearsal_ratio, each the mean
over the steps since the previous line; kl is the mean over the steps that measured a KL, and null when none did
(no KL token: plain QLoRA, or no rehearsal row under kd_on rehearsal). The line with step 0 is the student before
any update (KL ~0).

With `train --eval-every N`, every N steps and at the end an eval line follows the step's line (eval_record):
{"step", "eval": true, "task_ce", "kl_topk", "task_rows", "general_rows"}, scored on the cache's held-out rows.

With `--report-to tensorboard` MetricsLog writes the same numbers as TensorBoard scalars under OUT/tb/.
"""

from __future__ import annotations

import contextlib
import json
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write_text

TENSORBOARD_DIR = "tb"


def require_tensorboard() -> type:
    """torch's SummaryWriter, or a one-line PipelineError saying how to install TensorBoard (--report-to)."""
    try:
        # torch.utils.tensorboard imports tensorboard; importing it here too sees it missing even when torch's
        # module was imported earlier in this process.
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PipelineError("--report-to tensorboard: the tensorboard package is not installed; pip install "
                            "'lwf-pipeline[tensorboard]'") from None
    return SummaryWriter


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

    def add(self, out, seconds: float) -> None:
        """Add one step's result (train.StepResult) and its wall time."""
        self.steps += 1
        self.loss += out.loss
        self.ce += out.ce
        self.l2 += out.l2
        if out.kl is not None:
            self.kl += out.kl
            self.kl_steps += 1
        for k in ("tokens", "response_tokens", "examples", "rehearsal_examples"):
            setattr(self, k, getattr(self, k) + getattr(out, k))
        self.seconds += seconds


class MetricsLog:
    """OUT/metrics.jsonl, one JSON line per logged step; on resume, lines past the checkpoint are dropped.

    With tensorboard=True every line also goes to OUT/tb/: each numeric field but the step as a scalar tagged
    train/<field>, or eval/<field> for an eval line ("eval": true). [tensorboard resume note] Each run writes
    a new event file whose first event is a purge at resume_step + 1 (SummaryWriter's purge_step): TensorBoard
    drops the events an interrupted run wrote past the checkpoint, so it shows each step once, with the
    resumed run's numbers, as metrics.jsonl does, even if the resumed run is stopped before logging again.
    """

    def __init__(self, path: Path, resume_step: int, *, tensorboard: bool = False):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self.tb = None
        if tensorboard:
            self.tb = require_tensorboard()(log_dir=str(path.parent / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk; a torn last line is dropped on --resume (see __init__)
            raise PipelineError(f"{self.path}: cannot write: {e.strerror or e}; the checkpoints before it are kept: "
                                "free space and rerun with --resume") from e
        if self.tb is not None:
            kind = "eval" if record.get("eval") else "train"
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{kind}/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        # After a failed write the unwritten line is still buffered and close() tries it again; the file is closed
        # either way, and the error has been reported by write().
        with contextlib.suppress(OSError):
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def record(step: int, stats: StepStats, lr: float, grad_norm: float | None) -> dict:
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


def eval_record(step: int, task: dict | None, general: dict | None, task_rows: int, general_rows: int) -> dict:
    """The eval line of a step: evaluate.score_rows results on the held-out task and general (rehearsal) rows.

    task_ce is the mean per-token CE on the task rows; kl_topk the mean per-token KL(base || student) over the
    cached k+1 buckets on the general rows (a lower bound of the full-vocabulary KL that evaluate reports).
    A part without held-out rows gives None.
    """
    return {"step": step, "eval": True,
            "task_ce": None if task is None else round(task["ce"], 6),
            "kl_topk": None if general is None else round(general["kl"], 8),
            "task_rows": task_rows, "general_rows": general_rows}


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
