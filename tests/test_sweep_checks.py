"""A sweep checks every run before any work: all problems together, nothing trained or scored first."""

from __future__ import annotations

import pytest

from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig, EvalConfig, SweepConfig
from pipeline.errors import ConfigError
from pipeline.sweep import sweep

QUIET = {"log": lambda *_: None}


@pytest.fixture
def small_cache(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), top_k=4, max_length=128,
                            **{k: str(v) for k, v in corpus.items()}), **QUIET)
    return out


def test_every_run_is_checked_before_the_base_is_scored(tiny_model_dir, small_cache, tmp_path, monkeypatch):
    import pipeline.sweep

    work = []
    monkeypatch.setattr(pipeline.sweep, "evaluate", lambda *a, **k: work.append("evaluate"))
    monkeypatch.setattr(pipeline.sweep, "train", lambda *a, **k: work.append("train"))
    cfg = SweepConfig(model=str(tiny_model_dir), cache=str(small_cache), out=str(tmp_path / "s"), lambdas=[0.0, 1.0],
                      grid=["rehearsal_ratio=0,0.3", "max_steps=0,2"])
    with pytest.raises(ConfigError) as refused:
        sweep(cfg, {}, EvalConfig(cache=str(small_cache)), command="test", **QUIET)
    problems = refused.value.problems
    # max_steps 0 is refused in each of the 4 runs that have it; kd_lambda 1 without rehearsal in both of its own.
    assert sum("max_steps: must be > 0" in p for p in problems) == 4
    assert [p.split(":")[0] for p in problems if "kd_on: rehearsal" in p] == [
        "run kd_lambda=1,rehearsal_ratio=0,max_steps=0", "run kd_lambda=1,rehearsal_ratio=0,max_steps=2"]
    assert all(p.startswith("run kd_lambda=") for p in problems)
    assert work == [] and not (tmp_path / "s").exists()


def test_a_run_the_cache_cannot_serve_is_refused_up_front(tiny_model_dir, tiny_model_dir_cache_without_rehearsal,
                                                          tmp_path, monkeypatch):
    import pipeline.sweep

    work = []
    monkeypatch.setattr(pipeline.sweep, "evaluate", lambda *a, **k: work.append("evaluate"))
    cache = tiny_model_dir_cache_without_rehearsal
    cfg = SweepConfig(model=str(tiny_model_dir), cache=str(cache), out=str(tmp_path / "s"), lambdas=[0.0],
                      grid=["rehearsal_ratio=0,0.3"])
    with pytest.raises(ConfigError) as refused:
        sweep(cfg, {"max_steps": 2}, EvalConfig(cache=str(cache)), command="test", **QUIET)
    (problem,) = refused.value.problems
    assert problem.startswith("run kd_lambda=0,rehearsal_ratio=0.3: ")
    assert "there are no rehearsal training rows" in problem
    assert work == []


@pytest.fixture
def tiny_model_dir_cache_without_rehearsal(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "task-only-cache"
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), top_k=4, max_length=128,
                            task_train=str(corpus["task_train"]), task_eval=str(corpus["task_eval"])), **QUIET)
    return out
