"""A sweep killed mid-run continues on rerun: finished runs are kept, the interrupted one resumes from its
checkpoint, and the result equals an uninterrupted sweep."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors.torch import load_file

from tests.helpers import invoke
from tests.reliability.util import crash_env, run_until_killed, tmp_files

RUNS = ["kd_lambda=0", "kd_lambda=1"]


def sweep_args(model: Path, cache: Path, out: Path, config: Path) -> list[str]:
    return ["sweep", "--config", config, "--model", model, "--cache", cache, "--out", out, "--lambdas", "0,1",
            "--max-steps", "6", "--batch-size", "2", "--save-every", "2", "--log-every", "2", "--lr", "1e-3",
            "--warmup-steps", "1", "--eval-limit", "2"]


def test_sweep_killed_mid_run_resumes(tiny_model_dir, reference_cache, home, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("# test\nevaluate:\n  max_new_tokens: 4\n")
    full = tmp_path / "full"
    result = invoke(sweep_args(tiny_model_dir, reference_cache, full, config))
    assert result.exit_code == 0, result.output

    out = tmp_path / "killed"
    args = sweep_args(tiny_model_dir, reference_cache, out, config)
    # train_step counts over the whole process: the 9th step is step 3 of the second run (6 steps each),
    # after its checkpoint at step 2; the second kill lands while the resumed run writes its step-4 checkpoint.
    run_until_killed(args, ["train_step:9", "checkpoint_tmp_written:1"], home)
    first = out / RUNS[0]
    assert (first / "eval.json").is_file()
    kept = (first / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert not (out / RUNS[1] / "eval.json").exists()

    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], env=crash_env(None, home),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{RUNS[0]} (finished earlier, kept)" in done.stdout + done.stderr
    assert "resuming from" in done.stdout + done.stderr
    assert (first / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == kept
    for run in RUNS:
        a = load_file(full / run / "adapter" / "adapter_model.safetensors")
        b = load_file(out / run / "adapter" / "adapter_model.safetensors")
        assert all((a[k] == b[k]).all() for k in a), run
        assert yaml.safe_load((out / run / "run.yaml").read_text())["status"] == "finished"
    rows = json.loads((out / "rows.json").read_text())
    assert [r["name"] for r in rows] == ["base", *RUNS]
    assert (out / "report.md").is_file() and (out / "tradeoff.png").is_file()
    assert tmp_files(out) == []
