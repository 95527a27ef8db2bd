"""pipeline/budget.py and `train --max-forgetting`: the multiplier's update by hand, the constraint it is fed, its
bit-exact resumption, and a budget without rehearsal refused."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.train import forward_backward, micro_batches, optimizer_step, setup, train
from tests.helpers import (
    QUIET,
    TASK_ROWS,
    cfg_for,
    write_jsonl,
)


def test_dual_ascent_follows_the_hand_computed_sequence():
    """[forgetting budget note] with BUDGET_STEP 0.2, BUDGET_EMA 0.8, EPS 0.01, lambda from 0.5."""
    from pipeline.budget import BUDGET_EMA, BUDGET_STEP, dual_ascent

    assert (BUDGET_STEP, BUDGET_EMA) == (0.2, 0.8)
    # kl:   0.0 -> avg 0;      lambda 0.5 + 0.2 * (0 - 0.01) / 0.01      = 0.3
    # None: nothing measured (a step without rehearsal tokens): unchanged
    # 0.02 -> avg 0.004;       0.3  + 0.2 * (0.004  - 0.01) / 0.01       = 0.18
    # 0.03 -> avg 0.0092;      0.18 + 0.2 * (0.0092 - 0.01) / 0.01       = 0.164
    # 0.05 -> avg 0.01736;     0.164 + 0.2 * 0.736                        = 0.3112
    # 0.0  -> avg 0.013888;    0.3112 + 0.2 * 0.3888                      = 0.38896
    want = [(0.3, 0.0), (0.3, 0.0), (0.18, 0.004), (0.164, 0.0092), (0.3112, 0.01736), (0.38896, 0.013888)]
    lam, avg = 0.5, None
    for kl, (want_lam, want_avg) in zip([0.0, None, 0.02, 0.03, 0.05, 0.0], want, strict=True):
        lam, avg = dual_ascent(lam, avg, kl, 0.01)
        assert (lam, avg) == (pytest.approx(want_lam, abs=1e-12), pytest.approx(want_avg, abs=1e-12))
    assert dual_ascent(0.1, 0.0, 0.0, 0.01) == (0.0, 0.0)  # never below 0


def test_budget_constraint_is_the_forward_kl_on_rehearsal_tokens(tiny_model_dir, tiny_cache, tmp_path):
    """kd_on: rehearsal reuses the KD term; kd_on: all measures it apart, without grad: the same number."""
    import dataclasses

    run = setup(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", max_forgetting=0.01, lora_dropout=0.0,
                        precision="fp32", batch_size=8, lr=1e-2), **QUIET)
    for step in (1, 2):  # two updates, so that the KL is not ~0
        forward_backward(run, micro_batches(run, step), measure_kl=True)
        optimizer_step(run)
    batches = micro_batches(run, 3)
    got = {}
    for kd_on in ("all", "rehearsal"):  # the same parameters, the same batches
        run.cfg = dataclasses.replace(run.cfg, kd_on=kd_on)
        got[kd_on] = forward_backward(run, batches, measure_kl=True)
        run.optimizer.zero_grad(set_to_none=True)
    assert got["rehearsal"].kl_rehearsal == got["rehearsal"].kl > 1e-5
    assert got["all"].kl_rehearsal == pytest.approx(got["rehearsal"].kl_rehearsal, rel=1e-5)
    assert got["all"].kl_rehearsal != pytest.approx(got["all"].kl, rel=1e-2)  # not the all-token KL


def test_budget_multiplier_resumes_bit_exactly(tiny_model_dir, tiny_cache, tmp_path):
    """A run resumed from its step-3 checkpoint ends with the uninterrupted run's lambda, to the bit."""
    import shutil

    settings = {"max_steps": 6, "save_every": 3, "log_every": 1, "max_forgetting": 1e-4, "kd_lambda": 0.5,
                "lr": 3e-3}
    full = train(cfg_for(tiny_model_dir, tiny_cache, tmp_path / "full", **settings), **QUIET)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000003", resumed_dir / "checkpoints" / "step-000003")
    shutil.copy(tmp_path / "full" / "run.yaml", resumed_dir / "run.yaml")
    resumed = train(cfg_for(tiny_model_dir, tiny_cache, resumed_dir, resume=True, **settings), **QUIET)

    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lambdas = [m["lambda"] for m in lines if "lambda" in m]
    assert len(lambdas) == 6 and lambdas[0] == 0.5 and len(set(lambdas)) > 2  # it moved
    assert all(m["constraint"] > 0 for m in lines[1:])
    assert full["max_forgetting"] == 1e-4 and full["final_lambda"] != lambdas[-1]  # updated after the last step
    assert (resumed["final_lambda"], resumed["final_constraint"]) == (full["final_lambda"], full["final_constraint"])
    tail = [json.loads(x) for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["lambda"] for m in tail] == lambdas[3:]  # steps 4-6, each with the uninterrupted run's multiplier
    summary = yaml.safe_load((tmp_path / "full" / "run.yaml").read_text())["summary"]
    assert summary["final_lambda"] == full["final_lambda"]


def test_budget_without_rehearsal_is_refused_and_sweeps(tiny_model_dir, tmp_path):
    from pipeline.config import SweepConfig, load_config
    from pipeline.errors import ConfigError
    from pipeline.sweep import plan_runs

    with pytest.raises(ConfigError, match=r"max_forgetting: the budget is measured on the rehearsal examples .* "
                                          r"rehearsal_ratio is 0") as e:
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "max_forgetting": 0.01, "rehearsal_ratio": 0})
    assert len(e.value.problems) == 1
    task = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(task), top_k=4,
                            max_length=256, eval_fraction=0, rehearsal_train="none"), **QUIET)
    with pytest.raises(PipelineError, match="--max-forgetting is measured on rehearsal examples, and there are no"):
        setup(cfg_for(tiny_model_dir, tmp_path / "c", tmp_path / "o", max_forgetting=0.01), **QUIET)

    runs = plan_runs(SweepConfig(cache="c", out="o", grid=["max_forgetting=0.013,0.0065"]))
    assert [(r.name, r.overrides) for r in runs] == [("max_forgetting=0.013", {"max_forgetting": 0.013}),
                                                     ("max_forgetting=0.0065", {"max_forgetting": 0.0065})]
