"""benchmarks/run.py --quick runs in CI-sized time and writes every figure of its table (KEYS), each above 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ["cache_vs_forward", "kd_vs_sft_step", "online_vs_cached_step", "sweep4_cached_vs_online", "bytes_per_token",
        "logprob_max_abs_err", "read_vs_train", "padding_waste", "peak_rss_cached_vs_online_separate",
        "loss_memory_vs_dense"]
MEMORY_PEAKS = ["loss_memory_peak_mib", "dense_memory_peak_mib"]  # in the JSON (and in words in the output)


def test_quick_benchmark_writes_all_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(figures[key], float) and figures[key] > 0, key
        assert key in proc.stdout  # the printed table
    for key in MEMORY_PEAKS:
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["logprob_max_abs_err"] < 0.01 and figures["kl_fp32_vs_stored_per_token"] < 1e-4
    assert figures["machine"]["torch"] and figures["examples"] > 0


def test_loss_memory_alone(tmp_path):
    """--only loss-memory measures that figure by itself; chunking keeps the loss's peak far below dense logits'."""
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--only", "loss-memory",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert "loss_memory_vs_dense" in proc.stdout and "cache_vs_forward" not in figures
    shape = figures["loss_memory_shape"]
    dense_block_mib = shape["tokens"] * shape["vocab"] * 4 / 2**20  # one fp32 (N, V) block: dense holds at least one
    assert figures["dense_memory_peak_mib"] >= dense_block_mib
    assert 0 < figures["loss_memory_peak_mib"] < 0.5 * figures["dense_memory_peak_mib"]
