"""Training checkpoints: what `train --resume` needs to continue exactly where a run stopped, saved as data.

    OUT/checkpoints/step-000020/     written to a temporary name, then renamed (fileio.atomic_dir)
      tensors.pt    the LoRA weights, AdamW's moments and every rank's torch RNG state: tensors in plain
                    containers, loaded with torch.load(weights_only=True), which builds tensors and nothing else
      state.json    the step, the data streams' positions, the LR schedule, Python's and NumPy's RNG states
                    as integers, and the loop's running sums (TrainState)

[data-only checkpoint note] A checkpoint directory may sit on a shared file system (README, torchrun), so
loading one must never run code: nothing here is unpickled beyond what weights_only allows, and a directory
without state.json is refused, whatever else it holds.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.errors import PipelineError
from pipeline.faults import crash_point
from pipeline.fileio import TMP_MARK, atomic_dir
from pipeline.metrics import StepStats

CHECKPOINTS = "checkpoints"
TENSORS = "tensors.pt"
STATE = "state.json"
FORMAT_VERSION = 2


@dataclass
class TrainState:
    """Everything of a run that is not a tensor and must survive a restart for the resumed run to log and stop
    exactly as the uninterrupted one would."""

    step: int = 0  # optimiser steps done
    tokens: int = 0  # non-pad tokens processed so far
    seconds: float = 0.0  # time spent in training steps so far
    step0: dict | None = None  # {"ce", "kl"} of the untouched student: the KL to the teacher at step 0
    last: dict | None = None  # the last metrics record written
    window: StepStats = field(default_factory=StepStats)  # sums since the last metrics line
    best_avg: float = math.inf  # lowest running average of the loss (divergence check)
    avg: float | None = None  # running average of the loss
    examples: int = 0  # examples drawn so far, over all processes
    rehearsal_examples: int = 0  # of which rehearsal examples: the realised rehearsal ratio of the run
    eval_seconds: float = 0.0  # time spent scoring held-out rows (--eval-every), not in `seconds`
    kd_lambda: float | None = None  # --max-forgetting: the multiplier for the next step (None: not started)
    kl_avg: float | None = None  # --max-forgetting: running average of the rehearsal tokens' KL per step

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{**d, "window": StepStats(**d.get("window", {}))})


def rng_state() -> tuple[dict, dict]:
    """This process's random state as (JSON-able integers, tensors)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(keys), gauss],
             "numpy": [name, np_keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    version, keys, gauss = plain["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    # .cpu(): RNG states must be CPU byte tensors whatever map_location the tensors were loaded with.
    torch.set_rng_state(tensors["torch"].cpu())
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in tensors["cuda"]])


def save_checkpoint(out: Path, state: TrainState, model, optimizer, scheduler, streams: dict, keep: int) -> Path | None:
    """OUT/checkpoints/step-NNNNNN/ (atomic); keeps the newest `keep`. Returns its path (None on ranks > 0).

    [per-rank state note] Under torchrun every rank takes part (returns None on all but rank 0, which writes).
    The adapter, optimiser, schedule and data streams are the same on every rank (the same update, the same
    draws; see train.micro_batches), so rank 0's copy resumes them all. Only the random state differs per rank
    (LoRA dropout masks), so each rank's is gathered and saved: a resumed run is the uninterrupted one exactly.
    """
    from peft import get_peft_model_state_dict

    rngs = distributed.gather_objects(rng_state())
    if rngs is None:
        return None
    ckpt_dir = out / CHECKPOINTS
    final = ckpt_dir / f"step-{state.step:06d}"
    tensors = {"adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
               "rng": [t for _, t in rngs]}
    doc = {"format_version": FORMAT_VERSION, "world_size": len(rngs), "state": asdict(state),
           "scheduler": scheduler.state_dict(), "rng": [p for p, _ in rngs],
           "streams": {name: s.state_dict() if s is not None else None for name, s in streams.items()}}
    try:
        with atomic_dir(final) as tmp:
            torch.save(tensors, tmp / TENSORS)
            (tmp / STATE).write_text(json.dumps(doc) + "\n", encoding="utf-8")
            crash_point("checkpoint_tmp_written")
    except (PipelineError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = str(e).split(": cannot write: ")[-1] if isinstance(e, PipelineError) else " ".join(str(e).split())
        raise PipelineError(f"{final}: cannot write checkpoint ({reason[:200]}); is the disk full? The checkpoints "
                            "before it are kept: free space and rerun with --resume") from e
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        if TMP_MARK not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint directory in OUT/checkpoints. Checkpoints are renamed into place whole, so one without
    state.json is not ours: it is picked all the same, for load_checkpoint to refuse rather than skip silently."""
    done = [p for p in (out / CHECKPOINTS).glob("step-*") if TMP_MARK not in p.name and p.is_dir()]
    return max(done, default=None, key=lambda p: p.name)


def load_checkpoint(path: Path, model, optimizer, scheduler, streams: dict, device: torch.device) -> TrainState:
    """Restore a checkpoint written by save_checkpoint into the given objects; returns the run's TrainState.

    Raises:
        PipelineError: (one line) for a directory without state.json, a checkpoint that does not load, or one
            written by another number of processes.
    """
    from peft import set_peft_model_state_dict

    if not (path / STATE).is_file():
        raise PipelineError(f"{path}: not a checkpoint (no {STATE}); delete it to resume from the one before, or "
                            "start afresh with --overwrite")
    try:
        doc = json.loads((path / STATE).read_text(encoding="utf-8"))
        tensors = torch.load(path / TENSORS, map_location=device, weights_only=True)
        state = TrainState.from_dict(doc["state"])
    except Exception as e:  # a checkpoint that does not load is reported, never half-used
        bad = path / TENSORS if not isinstance(e, (ValueError, KeyError, TypeError)) else path / STATE
        reason = " ".join(str(e).split())[:200]
        raise PipelineError(f"{bad}: unreadable checkpoint ({reason}); delete {path} to resume from the one "
                            "before") from e
    saved_world, world = doc.get("world_size", 1), distributed.world_size()
    if saved_world != world:
        raise PipelineError(f"{path}: written by a run on {saved_world} process(es), now {world}; resume with "
                            f"{saved_world}: a step draws batch_size * grad_accum examples per process, and each "
                            "process has its own random state")
    set_peft_model_state_dict(model, tensors["adapter"])
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(doc["scheduler"])
    for name, stream in streams.items():
        if stream is not None and doc["streams"].get(name):
            stream.load_state_dict(doc["streams"][name])
    rank = distributed.rank()
    set_rng_state(doc["rng"][rank], tensors["rng"][rank])
    return state
