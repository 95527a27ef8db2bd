"""`pipeline make-rehearsal`: the base model answers general prompts, and the answers become rehearsal data.

For a user who has no general instruction data: cache-teacher then trains the adapter to keep answering such
prompts as the base did. It samples at temperature 1 with no top-k or top-p truncation by default: cross-entropy
on the base model's own samples preserves its distribution in expectation, while greedy answers sharpen it
(docs/design.md, "Rehearsal data").
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RehearsalConfig
from pipeline.errors import PipelineError
from pipeline.faults import crash_point
from pipeline.fileio import atomic_write_text
from pipeline.generate import generate_all
from pipeline.inputs import Example, read_examples, render_prompt_ids
from pipeline.model_source import open_model_source
from pipeline.models import load_for_inference


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
