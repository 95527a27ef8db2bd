"""Both stages under torchrun: 2 CPU processes (gloo) on the tiny model, against 1 process.

Every torchrun job here is a real `python -m torch.distributed.run --standalone --nproc-per-node 2` subprocess
(a free port is picked by torchrun itself). Rank 1 alone can be given extra shell code before it starts, to
make it die (a crash point) or fail (another argument) while rank 0 carries on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cache.schema import MANIFEST
from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig, TrainConfig
from pipeline.distributed import threads_per_rank
from pipeline.train import train
from tests.helpers import GENERAL_ROWS, TASK_ROWS, cache_rows, manifest_without_time, torchrun, write_jsonl

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")]

CACHE_SETTINGS = {"top_k": 8, "max_length": 256, "shard_size": 4, "batch_size": 3, "precision": "fp32"}
# The first-update check: no dropout (its masks differ between 1 and 2 processes), fp32, the L2 term on.
TRAIN_SETTINGS = {"max_steps": 3, "lr": 1e-3, "warmup_steps": 0, "log_every": 1, "save_every": 1,
                  "keep_checkpoints": 5, "lora_dropout": 0.0, "precision": "fp32", "l2": 0.01}


def flags(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist-data")
    task = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    counting = [{"instruction": f"Count to {n}.", "output": " ".join(map(str, range(1, n + 1)))} for n in range(2, 8)]
    return {"task_train": write_jsonl(d / "task.jsonl", task),  # 12 + 10 + 2 examples: 7 shards of <= 4
            "rehearsal_train": write_jsonl(d / "general.jsonl", GENERAL_ROWS + counting),
            "task_eval": write_jsonl(d / "task_eval.jsonl", TASK_ROWS[:2])}


@pytest.fixture(scope="module")
def cache_1(tmp_path_factory, tiny_model_dir, data, torchrun_env) -> Path:
    """The cache of one process, computed with as many threads as each of the 2 ranks uses (same arithmetic)."""
    out = tmp_path_factory.mktemp("cache-1") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_rank_of(2))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PIPELINE_HOME", torchrun_env["PIPELINE_HOME"])
            build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), **{k: str(v) for k, v in data.items()},
                                    **CACHE_SETTINGS), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out


def threads_per_rank_of(local_world: int) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_WORLD_SIZE", str(local_world))
        return threads_per_rank()


def test_two_rank_cache_resumed_after_sigkill_equals_one_rank_cache(tmp_path, tiny_model_dir, data, cache_1,
                                                                   torchrun_env):
    """Rank 1 computes shards 1, 3, 5 and is SIGKILLed after writing the first (torchrun then stops rank 0, maybe
    mid-shard); rerun on 2 ranks, each keeps its finished shards and computes the rest; rank 0 writes one manifest."""
    out = tmp_path / "cache"
    inputs = [arg for key, path in data.items() for arg in (f"--{key.replace('_', '-')}", path)]
    args = ["cache-teacher", "--model", tiny_model_dir, *inputs, *flags(CACHE_SETTINGS), "--out", out]
    crashed = torchrun(args, torchrun_env, rank1="export PIPELINE_CRASH_AT=shard_written:1")
    assert crashed.returncode != 0 and "SIGKILL" in crashed.stderr, crashed.stderr[-3000:]
    assert (out / "shard-00001.parquet").is_file() and not (out / MANIFEST).exists()

    job = torchrun(args, torchrun_env)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("cache: ") == 1  # rank 0 alone prints the summary, of both ranks' work
    computed, kept = map(int, re.search(r"examples +24 \((\d+) computed now, (\d+) kept", job.stdout).groups())
    assert computed + kept == 24 and kept >= 4, job.stdout

    # The same rows, example by example, and the same shard files byte for byte: each rank computes its shards with
    # the batches and the thread count of one process, so the README's "identical" holds to the last bit.
    got, want = cache_rows(out), cache_rows(cache_1)
    assert sorted(got) == sorted(want)
    for ex_id, row in want.items():
        assert got[ex_id] == row, ex_id
    # One manifest over all shards, planned as one process plans them (rank r computed shards r, r+2, ...), with
    # every shard's size and sha256.
    m_got, m_want = manifest_without_time(out), manifest_without_time(cache_1)
    assert [s["file"] for s in m_got["shards"]] == [f"shard-{i:05d}.parquet" for i in range(7)]
    assert m_got == m_want
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, *(f"shard-{i:05d}.parquet" for i in range(7))]


def metric_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


def test_two_ranks_make_the_update_of_one_rank_with_the_global_batch(tmp_path, tiny_model_dir, cache_1, torchrun_env):
    """2 processes x batch 2 x accum 2 == 1 process x batch 8: the same examples per step (rehearsal 2 of 8), the
    same token-normalised loss, hence the same gradients, updates and logged values."""
    one = tmp_path / "one"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_HOME", torchrun_env["PIPELINE_HOME"])
        train(TrainConfig(model=str(tiny_model_dir), cache=str(cache_1), out=str(one), batch_size=8,
                          **TRAIN_SETTINGS), log=lambda *_: None)
    two = tmp_path / "two"
    job = torchrun(["train", "--model", tiny_model_dir, "--cache", cache_1, "--out", two, "--batch-size", "2",
                    "--grad-accum", "2", *flags(TRAIN_SETTINGS)], torchrun_env)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count('"adapter":') == 1  # rank 0 alone prints the summary
    run_yaml = yaml.safe_load((two / "run.yaml").read_text())
    assert (run_yaml["status"], run_yaml["world_size"], run_yaml["global_batch"]) == ("finished", 2, 8)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000001", "step-000002"]

    # Logged values are over both ranks: the same numbers as one process (rehearsal ratio 2/8 included).
    got, want = metric_lines(two), metric_lines(one)
    assert [m.keys() for m in got] == [m.keys() for m in want]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-7), (g, w)
    assert want[1]["rehearsal_ratio"] == 0.25

    # The gradients: Adam's first moment after step 1 is 0.1 x the (clipped) gradient of step 1 (LoRA B, and A
    # through the L2 term), after step 2 it holds step 2's too (LoRA A through the data). Then the parameters.
    for step in (1, 2):
        a, b = (torch.load(run / "checkpoints" / f"step-{step:06d}" / "tensors.pt", weights_only=True)
                for run in (one, two))
        assert len(b["rng"]) == 2 and len(a["rng"]) == 1  # every rank's random state
        for key, state in a["optimizer"]["state"].items():
            m_one, m_two = state["exp_avg"], b["optimizer"]["state"][key]["exp_avg"]
            assert m_one.abs().sum() > 0
            torch.testing.assert_close(m_two, m_one, rtol=1e-4, atol=1e-4 * m_one.abs().max().item())
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (one, two))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)  # lr 1e-3: 1% of a step


def test_two_rank_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny_model_dir, cache_1, torchrun_env):
    """Rank 1 is SIGKILLed after step 5 (torchrun then stops rank 0); `--resume` on 2 ranks continues from the
    checkpoint of step 4 and ends with the adapter of the uninterrupted run, bit for bit. With LoRA dropout on,
    that needs each rank's own random state back (saved per rank in the checkpoint)."""
    args = ["train", "--model", tiny_model_dir, "--cache", cache_1, "--max-steps", "6", "--batch-size", "2",
            "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "2", "--save-every", "2", "--lora-dropout", "0.1",
            "--precision", "fp32", "--resume"]
    ref = tmp_path / "ref"
    job = torchrun([*args, "--out", ref], torchrun_env)
    assert job.returncode == 0, job.stderr[-3000:]

    out = tmp_path / "resumed"
    crashed = torchrun([*args, "--out", out], torchrun_env, rank1="export PIPELINE_CRASH_AT=train_step:5")
    assert crashed.returncode != 0
    assert "exitcode  : -9" in crashed.stderr  # rank 1 died by SIGKILL, and the job with it
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if ".tmp-" not in p.name) == \
        ["step-000002", "step-000004"]
    assert not (out / "adapter").exists()

    resumed = torchrun([*args, "--out", out], torchrun_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step-000004'} (step 4)" in resumed.stderr
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (ref, out))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert metric_lines(out) == metric_lines(ref)


def test_user_error_on_one_rank_stops_every_rank_with_one_message(tmp_path, tiny_model_dir, cache_1, torchrun_env):
    """Rank 1 alone is given a cache that does not exist: both ranks stop at once (none waits for the other),
    the error is printed once, naming the rank, and nothing is written."""
    out = tmp_path / "run"
    job = torchrun(["train", "--model", tiny_model_dir, "--cache", cache_1, "--out", out], torchrun_env,
                   rank1='set -- "$@" --cache /no/such/cache', timeout=120)
    assert job.returncode != 0
    errors = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: [rank 1] /no/such/cache: no such cache directory (run pipeline cache-teacher --out "
                      "/no/such/cache)"], job.stderr[-3000:]
    assert not out.exists()
