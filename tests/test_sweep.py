"""`pipeline sweep` (pipeline/sweep.py): the run plan, every run checked before any work, the cache reused and an
interrupted sweep resumed, eval_every and epochs passed to the runs, the outputs (recommendation.json,
OUT/recommended/, the curves) on made-up rows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cache.read import open_cache
from pipeline.cache.write import build_cache
from pipeline.cli import main
from pipeline.config import (
    CacheConfig,
    EvalConfig,
    SweepConfig,
)
from pipeline.errors import ConfigError
from pipeline.report import plot_curves, plot_tradeoff
from pipeline.sweep import budget_curve, eval_curve, metric_lines, plan_runs, sweep, write_outputs
from tests.helpers import (
    DEMO_ROWS,
    QUIET,
    assert_one_line_error,
    invoke,
)


def test_plan_runs_grid_and_errors():
    runs = plan_runs(SweepConfig(cache="c", out="o", lambdas=[0.0, 0.5], grid=["lora_r=4,8"]))
    assert [r.name for r in runs] == ["kd_lambda=0,lora_r=4", "kd_lambda=0,lora_r=8", "kd_lambda=0.5,lora_r=4",
                                      "kd_lambda=0.5,lora_r=8"]
    assert runs[1].overrides == {"kd_lambda": 0.0, "lora_r": 8}
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="not a train setting"):
        plan_runs(SweepConfig(cache="c", out="o", grid=["lora_rank=4"]))
    with pytest.raises(ConfigError, match="expected int"):
        plan_runs(SweepConfig(cache="c", out="o", grid=["lora_r=four"]))


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
                            task_train=str(corpus["task_train"]), task_eval=str(corpus["task_eval"]),
                            rehearsal_train="none"), **QUIET)
    return out


def test_sweep_reuses_cache_resumes_and_reports(tiny_model_dir, eval_cache, tmp_path, monkeypatch):
    import pipeline.cache.write
    import pipeline.sweep
    import pipeline.teacher

    def no_teacher(*a, **kw):
        raise AssertionError("the sweep must not run the teacher")

    monkeypatch.setattr(pipeline.cache.write, "teacher_topk", no_teacher)
    monkeypatch.setattr(pipeline.teacher, "teacher_topk", no_teacher)
    monkeypatch.setattr(pipeline.cache.write, "build_cache", no_teacher)
    manifest_before = (eval_cache / "manifest.json").read_bytes()
    cfg = SweepConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(tmp_path / "s"), lambdas=[0.0, 1.0],
                      runs=[{"name": "plain-qlora", "kd_lambda": 0, "rehearsal_ratio": 0}])
    fixed = {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 2}
    eval_cfg = EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache), max_new_tokens=16)
    rows = sweep(cfg, fixed, eval_cfg, command="test", **QUIET)
    assert [r["name"] for r in rows] == ["base", "kd_lambda=0", "kd_lambda=1", "plain-qlora"]
    assert (eval_cache / "manifest.json").read_bytes() == manifest_before
    report = (tmp_path / "s" / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and "run |" not in line]
    assert [line.split("|")[1].strip() for line in table] == ["base", "kd_lambda=0", "kd_lambda=1", "plain-qlora"]
    assert (tmp_path / "s" / "tradeoff.png").stat().st_size > 1000
    assert rows[3]["rehearsal_ratio"] == 0.0 and rows[1]["kd_lambda"] == 0.0
    # The recommendation names a trained run, and its adapter is handed over ready for generate.
    rec = json.loads((tmp_path / "s" / "recommendation.json").read_text())
    assert rec["name"] in ("kd_lambda=0", "kd_lambda=1", "plain-qlora") and report.split("\n\n")[1].startswith(
        f"**Recommended: `{rec['name']}`**")
    recommended = tmp_path / "s" / "recommended" / "adapter"
    assert recommended.resolve() == (tmp_path / "s" / rec["name"] / "adapter").resolve()
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "--adapter", str(recommended),
                                       "--prompt", "Hello", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output

    # Interrupted sweep: one run lost its evaluation, another its whole directory. The rest is kept.
    (tmp_path / "s" / "kd_lambda=1" / "eval.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "s" / "plain-qlora")
    trained = []
    real_train = pipeline.sweep.train
    monkeypatch.setattr(pipeline.sweep, "train",
                        lambda c, **kw: trained.append(Path(c.out).name) or real_train(c, **kw))
    rows2 = sweep(cfg, fixed, eval_cfg, command="test", **QUIET)
    assert trained == ["plain-qlora"]
    assert rows2[1]["eval"] == rows[1]["eval"]

    # The same sweep directory with other fixed settings is refused, naming the field and both values.
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError) as refused:
        sweep(cfg, {**fixed, "lr": 1e-3}, eval_cfg, command="test", **QUIET)
    # Every kept run is checked before any work, and each refusal names its run.
    assert str(refused.value).startswith(f"run kd_lambda=0: {tmp_path / 's' / 'kd_lambda=0'}: trained with other "
                                         "settings: lr was 0.003, now 0.001; use another sweep --out or delete that "
                                         "run")

    # ... but settings that only change what a run reports (curves, logging, checkpoints) keep every run, and so
    # does the same cache under another path (a symlink here: moved, or relative against absolute).
    trained.clear()
    (tmp_path / "link").symlink_to(eval_cache)
    again = sweep(dataclasses.replace(cfg, cache=str(tmp_path / "link")),
                  {**fixed, "log_every": 1, "eval_every": 3, "eval_limit": 1, "save_every": 2}, eval_cfg,
                  command="test", **QUIET)
    assert trained == [] and [r["eval"] for r in again] == [r["eval"] for r in rows2]
    # A cache with other content under the same path is refused (the run records the fingerprint it trained on).
    run_yaml = tmp_path / "s" / "kd_lambda=1" / "run.yaml"
    doc = yaml.safe_load(run_yaml.read_text())
    doc["cache"]["fingerprint"] = "0" * 64
    run_yaml.write_text(yaml.safe_dump(doc))
    with pytest.raises(PipelineError, match=r"kd_lambda=1: trained with another cache \(its shards differ from "):
        sweep(cfg, fixed, eval_cfg, command="test", **QUIET)


def test_sweep_sets_eval_every_unless_given(tiny_model_dir, tiny_cache, tmp_path, monkeypatch):
    import pipeline.sweep
    from pipeline.config import EvalConfig, SweepConfig

    class Stop(Exception):
        pass

    seen = []

    def fake_train(cfg, **kw):
        seen.append(cfg.eval_every)
        raise Stop

    monkeypatch.setattr(pipeline.sweep, "evaluate", lambda *a, **kw: {})
    monkeypatch.setattr(pipeline.sweep, "train", fake_train)
    eval_cfg = EvalConfig(model=str(tiny_model_dir), cache=str(tiny_cache))
    for fixed, grid, want in (({"max_steps": 20}, [], 2), ({"max_steps": 7}, [], 1),
                              ({"max_steps": 20, "eval_every": 5}, [], 5), ({"max_steps": 20}, ["eval_every=0"], 0)):
        cfg = SweepConfig(model=str(tiny_model_dir), cache=str(tiny_cache), out=str(tmp_path / f"s{len(seen)}"),
                          lambdas=[0.5], grid=grid)
        with pytest.raises(Stop):
            pipeline.sweep.sweep(cfg, fixed, eval_cfg, command="test", **QUIET)
        assert seen[-1] == want, (fixed, grid)


def test_sweep_grid_over_epochs(epochs_cache, tmp_path, monkeypatch):
    import pipeline.sweep

    seen = []

    def fake_train(cfg, **_):
        seen.append(cfg)
        raise KeyboardInterrupt  # stop the sweep before evaluating

    monkeypatch.setattr(pipeline.sweep, "evaluate", lambda cfg, **_: {})
    monkeypatch.setattr(pipeline.sweep, "train", fake_train)
    model = open_cache(epochs_cache).manifest["teacher"]["model"]
    cfg = SweepConfig(model=model, cache=str(epochs_cache), out=str(tmp_path / "sw"), grid=["epochs=1,2"])
    with pytest.raises(KeyboardInterrupt):  # a fixed max_steps (a config file's) gives way to the run's epochs
        pipeline.sweep.sweep(cfg, {"max_steps": 40, "batch_size": 4}, EvalConfig(cache=str(epochs_cache)),
                             command="test", **QUIET)
    assert (seen[0].epochs, seen[0].max_steps, seen[0].batch_size) == (1.0, None, 4)
    assert seen[0].eval_every == 0  # the cache holds no held-out rows: no curves to score, and no refusal for it

    # On the command line: --epochs over the config file's train.max_steps.
    got = {}
    monkeypatch.setattr(pipeline.sweep, "sweep", lambda cfg, fixed, *a, **k: got.update(fixed) or [])
    monkeypatch.setattr("pipeline.report.report_table", lambda rows: "")
    conf = tmp_path / "c.yaml"
    conf.write_text("train: {max_steps: 40, lr: 0.001}\n")
    result = CliRunner().invoke(main, ["sweep", "--config", str(conf), "--cache", str(epochs_cache), "--out",
                                       str(tmp_path / "sw2"), "--lambdas", "0", "--epochs", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert got == {"epochs": "2", "lr": 0.001}


def adapters(out: Path, names: list[str]) -> None:
    for name in names:
        (out / name / "adapter").mkdir(parents=True)
        (out / name / "adapter" / "adapter_config.json").write_text(json.dumps({"run": name}))


def test_outputs_name_the_same_run_and_hand_over_its_adapter(tmp_path, monkeypatch):
    import pipeline.sweep

    adapters(tmp_path, [r["name"] for r in DEMO_ROWS[1:]])
    ringed = []
    monkeypatch.setattr(pipeline.sweep, "plot_tradeoff",
                        lambda out, rows, rec: ringed.append(plot_tradeoff(out, rows, rec)) or ringed[-1])
    rec = write_outputs(tmp_path, DEMO_ROWS, 0.1, command="test", log=lambda *_: None)
    doc = json.loads((tmp_path / "recommendation.json").read_text())
    assert [doc["name"]] == ringed == [rec.name] == ["kd_lambda=1,kd_on=rehearsal"]
    assert (doc["rule"], doc["tolerance"], doc["figures"]["forgetting_kl"]) == ("task_score", 0.1, 0.0132)
    link = tmp_path / "recommended" / "adapter"
    assert link.is_symlink() and link.resolve() == (tmp_path / doc["name"] / "adapter").resolve()
    assert json.loads((link / "adapter_config.json").read_text()) == {"run": doc["name"]}
    assert doc["name"] in (tmp_path / "recommended" / "README.md").read_text()
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000 and not (tmp_path / "curves.png").exists()

    # A rerun that picks another run replaces the link.
    write_outputs(tmp_path, DEMO_ROWS, 0.02, command="test", log=lambda *_: None)
    assert json.loads((link / "adapter_config.json").read_text()) == {"run": "plain-qlora"}
    assert json.loads((tmp_path / "recommendation.json").read_text())["name"] == "plain-qlora" == ringed[-1]

    # Nothing to recommend (no trained run scored): no stale pick from the earlier sweep is left behind.
    assert write_outputs(tmp_path, DEMO_ROWS[:1], 0.02, command="test", log=lambda *_: None) is None
    assert not (tmp_path / "recommended").exists() and not (tmp_path / "recommendation.json").exists()


def test_a_copy_where_links_cannot_be_made(tmp_path, monkeypatch):
    adapters(tmp_path, [r["name"] for r in DEMO_ROWS[1:]])

    def no_links(*a, **kw):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(Path, "symlink_to", no_links)
    rec = write_outputs(tmp_path, DEMO_ROWS, 0.1, command="test", log=lambda *_: None)
    adapter = tmp_path / "recommended" / "adapter"
    assert not adapter.is_symlink() and json.loads((adapter / "adapter_config.json").read_text()) == {"run": rec.name}
    assert "copy" in (tmp_path / "recommended" / "README.md").read_text()


def test_curves_from_eval_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([
        json.dumps({"step": 0, "loss": 1.0, "kl": 0.0}),
        json.dumps({"step": 0, "eval": True, "task_ce": 1.5, "kl_topk": 0.0}),
        json.dumps({"step": 4, "loss": 0.8, "kl": 0.01, "lambda": 0.5}),
        json.dumps({"step": 4, "eval": True, "task_ce": 0.9, "kl_topk": 0.02}),
        '{"step": 8, "eval": tr']) + "\n")  # a torn last line
    curve = eval_curve(metric_lines(metrics))
    assert curve == [{"step": 0, "task_ce": 1.5, "kl_topk": 0.0}, {"step": 4, "task_ce": 0.9, "kl_topk": 0.02}]
    assert eval_curve(metric_lines(tmp_path / "missing.jsonl")) == []
    assert plot_curves(tmp_path, DEMO_ROWS) is None and not (tmp_path / "curves.png").exists()
    rows = [DEMO_ROWS[0], {**DEMO_ROWS[1], "curve": curve}, DEMO_ROWS[2]]
    assert plot_curves(tmp_path, rows) == tmp_path / "curves.png" and (tmp_path / "curves.png").stat().st_size > 1000


def test_budget_runs_add_the_multiplier_and_the_constraint_to_the_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([
        json.dumps({"step": 0, "loss": 1.0, "kl": 0.0}),  # the step-0 line: no multiplier yet
        json.dumps({"step": 1, "loss": 1.0, "kl": 0.02, "lambda": 0.0, "constraint": 0.02}),
        json.dumps({"step": 2, "eval": True, "task_ce": 0.9, "kl_topk": 0.02}),
        json.dumps({"step": 2, "loss": 0.9, "kl": 0.01, "lambda": 0.2, "constraint": None}),  # no rehearsal row
        '{"step": 3, "lambda": 0.']) + "\n")
    pts = budget_curve(metric_lines(metrics))
    assert pts == [{"step": 1, "lambda": 0.0, "constraint": 0.02}, {"step": 2, "lambda": 0.2, "constraint": None}]
    assert budget_curve(metric_lines(tmp_path / "missing.jsonl")) == []
    plain = plot_curves(tmp_path, [DEMO_ROWS[0], {**DEMO_ROWS[1], "curve": eval_curve(metric_lines(metrics))}])
    height = plt_height(plain)
    rows = [DEMO_ROWS[0], {**DEMO_ROWS[1], "curve": eval_curve(metric_lines(metrics)), "max_forgetting": 0.01,
                      "budget_curve": pts}]
    assert plot_curves(tmp_path, rows) == plain
    assert plt_height(plain) > 1.5 * height  # a second row of panels: lambda and the constraint


def plt_height(png) -> int:
    import matplotlib.image

    return matplotlib.image.imread(png).shape[0]


def test_a_failing_run_is_recorded_and_the_others_reported_and_recommended(tiny_model_dir, eval_cache, tmp_path,
                                                                           monkeypatch):
    """[failed run note] The lr 10 run diverges (its loss made NaN from step 3: the tiny model's loss cannot grow
    4-fold, being near log V from the start); the lr 1e-3 run is still trained, reported and recommended, the sweep
    exits non-zero naming the failed run, and a rerun keeps it failed unless given --retry-failed."""
    import pipeline.sweep
    import pipeline.train

    real = pipeline.train.forward_backward

    def nan_at_high_lr(run, batches, **kw):
        out = real(run, batches, **kw)
        return dataclasses.replace(out, loss=float("nan")) if run.cfg.lr > 1 and run.state.step >= 2 else out

    monkeypatch.setattr(pipeline.train, "forward_backward", nan_at_high_lr)
    config = tmp_path / "sweep.yaml"
    config.write_text("# test\nevaluate:\n  max_new_tokens: 4\n")
    out = tmp_path / "s"
    args = ["sweep", "--config", config, "--model", tiny_model_dir, "--cache", eval_cache, "--out", out,
            "--grid", "lr=0.001,10", "--max-steps", "6", "--batch-size", "4", "--warmup-steps", "0",
            "--log-every", "1", "--eval-limit", "2"]
    result = invoke(args)
    assert_one_line_error(result, "error: 1 of 2 runs failed: lr=10 (train: step 3: loss is nan; stopped. ",
                          "--retry-failed", str(out / "report.md"))
    error = json.loads((out / "lr=10" / "failed.json").read_text())
    assert error["stage"] == "train" and error["error"].startswith("step ") and "stopped" in error["error"]
    rows = json.loads((out / "rows.json").read_text())
    assert [(r["name"], r.get("failed")) for r in rows] == [
        ("base", None), ("lr=0.001", None), ("lr=10", {"stage": "train", "error": error["error"]})]
    assert rows[2]["eval"] is None and rows[1]["eval"]["task"]["examples"] == 2
    rec = json.loads((out / "recommendation.json").read_text())
    assert (rec["name"], rec["failed"]) == ("lr=0.001", ["lr=10"])
    assert (out / "recommended" / "adapter").resolve() == (out / "lr=0.001" / "adapter").resolve()
    report = (out / "report.md").read_text()
    assert f"* `lr=10` (train): {error['error']}" in report and "| lr=10 |" in report
    assert "| lr=0.001 |" in report.split("**Failed runs**")[1]  # the other run is in the table
    assert "| lr=0.001 |" in result.stdout  # ... and on the screen

    # A rerun trains nothing: the good run is kept, the failed one stays failed.
    trained = []
    monkeypatch.setattr(pipeline.sweep, "train", lambda cfg, **kw: trained.append(Path(cfg.out).name))
    assert_one_line_error(invoke(args), "error: 1 of 2 runs failed: lr=10 (train: step ")
    assert trained == [] and json.loads((out / "rows.json").read_text())[2]["failed"]["error"] == error["error"]
    # --retry-failed trains it again (here: a train that raises a RuntimeError, recorded the same way).
    monkeypatch.setattr(pipeline.sweep, "train",
                        lambda cfg, **kw: trained.append(Path(cfg.out).name) or exec("raise RuntimeError('boom')"))
    assert_one_line_error(invoke([*args, "--retry-failed"]), "error: 1 of 2 runs failed: lr=10 (train: boom)")
    assert trained == ["lr=10"]
    retried = json.loads((out / "lr=10" / "failed.json").read_text())
    assert (retried["error"], retried["type"]) == ("boom", "RuntimeError") and "Traceback" in retried["traceback"]


def test_the_base_row_is_scored_again_for_another_cache_or_model(tiny_model_dir, eval_cache, tmp_path, monkeypatch):
    """The saved base evaluation is kept only when the evaluate settings, the cache's content and the model all
    match (every run fails here, at once: only the base is scored)."""
    import pipeline.sweep
    from pipeline.sweep import RunsFailed

    scored = []
    real_evaluate = pipeline.sweep.evaluate
    monkeypatch.setattr(pipeline.sweep, "evaluate", lambda cfg, **kw: scored.append(cfg.adapter) or real_evaluate(
        cfg, **kw))
    monkeypatch.setattr(pipeline.sweep, "train", lambda cfg, **kw: exec("raise RuntimeError('no training here')"))
    cfg = SweepConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(tmp_path / "s"), lambdas=[0.0])
    eval_cfg = EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache), task_score="none", limit=2)

    def base_scored() -> bool:
        scored.clear()
        with pytest.raises(RunsFailed, match="1 of 1 runs failed: kd_lambda=0 \\(train: no training here\\)"):
            sweep(cfg, {"max_steps": 2}, eval_cfg, command="test", **QUIET)
        return scored == [None]

    base = tmp_path / "s" / "base" / "eval.json"
    assert base_scored()
    report = json.loads(base.read_text())
    assert report["cache_fingerprint"] == open_cache(eval_cache).fingerprint and len(report["model_fingerprint"]) == 64
    assert not base_scored()  # the same settings, cache and model: kept
    for key in ("cache_fingerprint", "model_fingerprint"):  # as if made from another cache, or by another model
        base.write_text(json.dumps({**report, key: "0" * 64}))
        assert base_scored(), key
        assert json.loads(base.read_text())[key] == report[key]


def test_a_run_with_a_nan_figure_is_recorded_failed_not_picked(tiny_model_dir, eval_cache, tmp_path, monkeypatch):
    import pipeline.sweep
    from pipeline.sweep import RunsFailed

    def fake_evaluate(cfg, **_):
        kl = float("nan") if "kd_lambda=1" in (cfg.adapter or "") else 0.1
        return {"task": {"score_name": "exact_match", "score": 0.5, "examples": 4, "ce": 0.5},
                "forgetting": {"kl": kl}}

    monkeypatch.setattr(pipeline.sweep, "evaluate", fake_evaluate)
    monkeypatch.setattr(pipeline.sweep, "train", lambda cfg, **kw: None)
    out = tmp_path / "s"
    cfg = SweepConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(out), lambdas=[1.0, 0.0])
    with pytest.raises(RunsFailed, match=r"1 of 2 runs failed: kd_lambda=1 \(evaluate: forgetting KL is nan in "):
        sweep(cfg, {"max_steps": 2}, EvalConfig(cache=str(eval_cache)), command="test", **QUIET)
    assert json.loads((out / "recommendation.json").read_text())["name"] == "kd_lambda=0"
    assert json.loads((out / "kd_lambda=1" / "failed.json").read_text())["stage"] == "evaluate"


def test_a_full_disk_stops_the_sweep_instead_of_failing_the_run(tiny_model_dir, eval_cache, tmp_path, monkeypatch):
    """[failed run note] A failure of the machine, not of the run's settings, is not recorded against the run."""
    import pipeline.sweep
    from pipeline.errors import PipelineError

    def full_disk(cfg, **_):
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise PipelineError(f"{cfg.out}/metrics.jsonl: cannot write: No space left on device") from e

    monkeypatch.setattr(pipeline.sweep, "evaluate", lambda cfg, **_: {})
    monkeypatch.setattr(pipeline.sweep, "train", full_disk)
    out = tmp_path / "s"
    cfg = SweepConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(out), lambdas=[0.0, 1.0])
    with pytest.raises(PipelineError, match=r"metrics\.jsonl: cannot write") as stopped:
        sweep(cfg, {"max_steps": 2}, EvalConfig(cache=str(eval_cache)), command="test", **QUIET)
    assert type(stopped.value) is PipelineError and not list(out.glob("*/failed.json"))
