"""pipeline/metrics.py: the TensorBoard copy of metrics.jsonl (the same scalars, also after --resume), a missing
tensorboard package refused in one line, and the peak memory measured from its reset."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.train import train
from tests.helpers import (
    QUIET,
    cfg_for,
)


def tb_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under OUT/tb/ as TensorBoard itself reads it (purges applied): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {tag: events for tag, events in scalars.items() if events}  # a tag whose events were all purged: none


def jsonl_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """The same view of OUT/metrics.jsonl: every numeric field of every line, tagged by the kind of line."""
    want: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        kind = "eval" if rec.get("eval") else "train"
        for k, v in rec.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                want.setdefault(f"{kind}/{k}", []).append((rec["step"], v))
    return want


def assert_same_scalars(out: Path) -> None:
    got, want = tb_scalars(out), jsonl_scalars(out)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6, abs=1e-12), tag


def test_tensorboard_scalars_equal_metrics_jsonl_and_resume(tiny_model_dir, epochs_cache, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "r"
    cfg = cfg_for(tiny_model_dir, epochs_cache, out, max_steps=5, report_to="tensorboard", log_every=2, save_every=2)
    train(cfg, **QUIET)
    assert {"train/loss", "train/ce", "train/kl", "train/lr", "train/rehearsal_ratio"} <= set(tb_scalars(out))
    assert [s for s, _ in tb_scalars(out)["train/loss"]] == [0, 1, 2, 4, 5]
    assert_same_scalars(out)
    # Resumed from the step-4 checkpoint: step 5 is logged again, once; TensorBoard shows what metrics.jsonl has.
    train(TrainConfig(**{**cfg.__dict__, "resume": True}), **QUIET)
    assert len(list((out / "tb").iterdir())) == 2
    assert_same_scalars(out)


def test_tensorboard_eval_lines_and_stale_events(tmp_path):
    pytest.importorskip("tensorboard")
    from pipeline.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, -1, tensorboard=True)
    for step in (0, 2, 4, 6):
        log.write({"step": step, "loss": 1.0 / (step + 1), "kl": None, "grad_norm": 3.25, "tokens_per_s": 1e4})
    log.write({"step": 6, "eval": True, "task_ce": 0.75, "kl_topk": None, "task_rows": 3})
    log.close()
    assert_same_scalars(tmp_path)
    assert tb_scalars(tmp_path)["eval/task_ce"] == [(6, 0.75)] and "eval/eval" not in tb_scalars(tmp_path)
    # Resumed from step 2 and stopped before logging again: steps 4 and 6 are gone from both.
    MetricsLog(path, 2, tensorboard=True).close()
    assert [s for s, _ in tb_scalars(tmp_path)["train/loss"]] == [0, 2]
    assert_same_scalars(tmp_path)


def test_tensorboard_missing_is_one_line_before_any_model_loads(tiny_model_dir, epochs_cache, tmp_path, monkeypatch):
    import sys

    import pipeline.train

    with contextlib.suppress(ImportError):
        import torch.utils.tensorboard  # noqa: F401 - already imported, as in a process that used it before
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    monkeypatch.setattr(pipeline.train, "open_model_source", lambda *_: pytest.fail("model loaded"))
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model_dir), "--cache", str(epochs_cache), "--out",
                                       str(tmp_path / "o"), "--report-to", "tensorboard"])
    assert result.exit_code == 1
    assert result.output.splitlines() == ["error: --report-to tensorboard: the tensorboard package is not installed; "
                                          "pip install 'lwf-pipeline[tensorboard]'"]
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_is_measured_from_the_reset():
    """The reported peak is the training loop's, not that of loading or of an earlier run in the process."""
    from pipeline.metrics import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    before = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < before - 300
