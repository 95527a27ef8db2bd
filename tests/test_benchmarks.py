"""benchmarks/run.py --quick runs in CI-sized time and writes every figure the issue names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ["cache_vs_forward", "kd_vs_sft_step", "online_vs_cached_step", "sweep4_cached_vs_online", "bytes_per_token",
        "logprob_max_abs_err", "read_vs_train", "padding_waste", "peak_rss_cached_vs_online_separate"]


def test_quick_benchmark_writes_all_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(figures[key], float) and figures[key] > 0, key
        assert key in proc.stdout  # the printed table
    assert figures["logprob_max_abs_err"] < 0.01 and figures["kl_fp32_vs_stored_per_token"] < 1e-4
    assert figures["machine"]["torch"] and figures["examples"] > 0
