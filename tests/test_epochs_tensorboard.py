"""train --epochs (an alternative to --max-steps) and --report-to tensorboard, on the tiny model."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cache.write import build_cache
from pipeline.cli import main
from pipeline.config import DEFAULT_MAX_STEPS, CacheConfig, EvalConfig, SweepConfig, TrainConfig, load_config
from pipeline.errors import ConfigError
from pipeline.train import micro_batches, setup, steps_for_epochs, train
from tests.conftest import GENERAL_ROWS, TASK_ROWS, write_jsonl

QUIET = {"log": lambda *_: None}
N_TASK = len(TASK_ROWS)  # 6 task training rows in the cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model_dir) -> Path:
    d = tmp_path_factory.mktemp("epochs-cache")
    task = write_jsonl(d / "task.jsonl", TASK_ROWS)
    general = write_jsonl(d / "general.jsonl", GENERAL_ROWS)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(d / "cache"), task_train=str(task),
                            rehearsal_train=str(general), top_k=8, max_length=256), **QUIET)
    return d / "cache"


def train_cfg(model_dir: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    base = {"model": str(model_dir), "cache": str(cache), "out": str(out), "batch_size": 4, "lr": 1e-3,
            "warmup_steps": 1, "log_every": 2, "save_every": 2}
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------
# --epochs
# ---------------------------------------------------------------------------------------------------------------

def test_epochs_or_max_steps_exactly_one(tmp_path):
    assert load_config(TrainConfig, None, {"cache": "c", "out": "o"}).max_steps == DEFAULT_MAX_STEPS
    cfg = load_config(TrainConfig, None, {"cache": "c", "out": "o", "epochs": "1.5"})
    assert (cfg.epochs, cfg.max_steps) == (1.5, None)
    with pytest.raises(ConfigError) as e:  # both, listed with the other problems
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "epochs": "2", "max_steps": "10", "lr": "-1"})
    assert any("--epochs and --max-steps exclude each other" in p for p in e.value.problems)
    assert any(p.startswith("lr:") for p in e.value.problems)
    with pytest.raises(ConfigError, match="rehearsal_ratio 1"):
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "epochs": "1", "rehearsal_ratio": "1"})
    # A flag replaces the config file's alternative (precedence), both in one place are refused.
    conf = tmp_path / "c.yaml"
    conf.write_text("train: {max_steps: 40, cache: c, out: o}\n")
    cfg = load_config(TrainConfig, str(conf), {"epochs": "2"})
    assert (cfg.epochs, cfg.max_steps) == (2.0, None)
    assert load_config(TrainConfig, str(conf), {}).max_steps == 40
    conf.write_text("train: {max_steps: 40, epochs: 2, cache: c, out: o}\n")
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(TrainConfig, str(conf), {})


def test_steps_for_epochs_rounds_only_real_fractions():
    def steps(epochs, rows, batch, ratio):
        return steps_for_epochs(TrainConfig(out="o", cache="c", epochs=epochs, batch_size=batch,
                                            rehearsal_ratio=ratio), rows)

    assert steps(1, 21, 1, 0.3) == 30  # 21 / 0.7 is 30.000000000000004 in floating point
    assert steps(1.5, 7, 1, 0.3) == 15
    assert steps(1, 22, 1, 0.3) == 32  # 31.43 steps: the last one completes the pass
    assert steps(0.01, 6, 8, 0.3) == 1


def test_cli_refuses_epochs_with_max_steps(tmp_path):
    result = CliRunner().invoke(main, ["train", "--cache", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--epochs", "2", "--max-steps", "10", "--lr", "-1"])
    assert result.exit_code == 2
    assert "--epochs and --max-steps exclude each other" in result.output and "lr: must be > 0" in result.output


def test_epochs_give_the_steps_of_that_many_passes(tiny_model_dir, cache, tmp_path):
    # 4 examples a step, 30% rehearsal: 2.8 task rows a step on average; 2 epochs of 6 rows = ceil(12 / 2.8) = 5.
    run = setup(train_cfg(tiny_model_dir, cache, tmp_path / "s", epochs=2), **QUIET)
    assert run.cfg.max_steps is None and run.length.max_steps == 5  # the config as asked; the length resolved
    assert run.scheduler.lr_lambdas[0](5) == 0.0 < run.scheduler.lr_lambdas[0](4)  # the schedule ends at step 5

    # 25% of 4: exactly 3 task rows every step; 2.2 epochs of 6 rows are 13.2 rows, which the fifth step completes.
    run = setup(train_cfg(tiny_model_dir, cache, tmp_path / "q", epochs=2.2, rehearsal_ratio=0.25), **QUIET)
    assert run.length.max_steps == 5
    task_rows = [sum(b.input_ids.shape[0] - b.n_rehearsal_examples for b in micro_batches(run, s))
                 for s in range(1, 6)]
    assert sum(task_rows[:4]) < 2.2 * N_TASK <= sum(task_rows)


def test_epochs_run_records_both_and_resumes(tiny_model_dir, cache, tmp_path):
    cfg = train_cfg(tiny_model_dir, cache, tmp_path / "r", epochs=2)
    summary = train(cfg, **QUIET)
    assert summary["steps"] == 5
    doc = yaml.safe_load((tmp_path / "r" / "run.yaml").read_text())
    assert doc["config"]["epochs"] == 2 and doc["config"]["max_steps"] is None  # as given
    assert doc["resolved"] == {"max_steps": 5, "epochs": 2, "task_rows": N_TASK, "task_rows_per_step": 2.8}
    # --resume with the same flags is the same run (its config is compared as given, not as resolved).
    assert train(TrainConfig(**{**cfg.__dict__, "resume": True}), **QUIET)["steps"] == 5

    train(train_cfg(tiny_model_dir, cache, tmp_path / "m", max_steps=3), **QUIET)
    resolved = yaml.safe_load((tmp_path / "m" / "run.yaml").read_text())["resolved"]
    assert resolved == {"max_steps": 3, "epochs": 1.4, "task_rows": N_TASK, "task_rows_per_step": 2.8}


def test_sweep_grid_over_epochs(cache, tmp_path, monkeypatch):
    import pipeline.sweep

    seen = []

    def fake_train(cfg, **_):
        seen.append(cfg)
        raise KeyboardInterrupt  # stop the sweep before evaluating

    monkeypatch.setattr(pipeline.sweep, "evaluate", lambda cfg, **_: {})
    monkeypatch.setattr(pipeline.sweep, "train", fake_train)
    cfg = SweepConfig(cache=str(cache), out=str(tmp_path / "sw"), grid=["epochs=1,2"])
    with pytest.raises(KeyboardInterrupt):  # a fixed max_steps (a config file's) gives way to the run's epochs
        pipeline.sweep.sweep(cfg, {"max_steps": 40, "batch_size": 4}, EvalConfig(cache=str(cache)), command="test",
                             **QUIET)
    assert (seen[0].epochs, seen[0].max_steps, seen[0].batch_size) == (1.0, None, 4)

    # On the command line: --epochs over the config file's train.max_steps.
    got = {}
    monkeypatch.setattr(pipeline.sweep, "sweep", lambda cfg, fixed, *a, **k: got.update(fixed) or [])
    monkeypatch.setattr("pipeline.report.report_table", lambda rows: "")
    conf = tmp_path / "c.yaml"
    conf.write_text("train: {max_steps: 40, lr: 0.001}\n")
    result = CliRunner().invoke(main, ["sweep", "--config", str(conf), "--cache", str(cache), "--out",
                                       str(tmp_path / "sw2"), "--lambdas", "0", "--epochs", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert got == {"epochs": "2", "lr": 0.001}


# ---------------------------------------------------------------------------------------------------------------
# --report-to tensorboard
# ---------------------------------------------------------------------------------------------------------------

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


def test_tensorboard_scalars_equal_metrics_jsonl_and_resume(tiny_model_dir, cache, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "r"
    cfg = train_cfg(tiny_model_dir, cache, out, max_steps=5, report_to="tensorboard", log_every=2, save_every=2)
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


def test_tensorboard_missing_is_one_line_before_any_model_loads(tiny_model_dir, cache, tmp_path, monkeypatch):
    import sys

    import pipeline.train

    with contextlib.suppress(ImportError):
        import torch.utils.tensorboard  # noqa: F401 - already imported, as in a process that used it before
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    monkeypatch.setattr(pipeline.train, "open_model_source", lambda *_: pytest.fail("model loaded"))
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model_dir), "--cache", str(cache), "--out",
                                       str(tmp_path / "o"), "--report-to", "tensorboard"])
    assert result.exit_code == 1
    assert result.output.splitlines() == ["error: --report-to tensorboard: the tensorboard package is not installed; "
                                          "pip install 'lwf-pipeline[tensorboard]'"]
    assert not (tmp_path / "o").exists()


def test_resume_may_switch_tensorboard_on(tmp_path):
    from pipeline.config import to_dict
    from pipeline.errors import PipelineError
    from pipeline.run_dir import read_run_yaml, refuse_other_settings

    started = TrainConfig(cache="c", out=str(tmp_path), max_steps=4)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"config": to_dict(started)}))
    recorded = read_run_yaml(tmp_path)
    refuse_other_settings(tmp_path, recorded, TrainConfig(**{**started.__dict__, "resume": True,
                                                             "report_to": "tensorboard"}),
                          None, doing="--resume", fix="")  # how a run reports is not what it trains
    with pytest.raises(PipelineError, match="--resume with other settings: lr"):
        refuse_other_settings(tmp_path, recorded, TrainConfig(**{**started.__dict__, "resume": True, "lr": 1e-3}),
                              None, doing="--resume", fix="")
