"""Configs: every YAML in configs/ loads for every command; precedence; all problems reported at once, among them
the exclusive and dependent settings (--epochs or --max-steps, --online-teacher, lora_dropout below 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import (
    BUILTIN_MODEL,
    SECTIONS,
    CacheConfig,
    TrainConfig,
    load_config,
    read_config_file,
)
from pipeline.errors import ConfigError
from tests.helpers import TASK_ONLY

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    data, problems = read_config_file(path)
    assert problems == []
    assert path.read_text().startswith("#"), "each config opens with a comment giving the command that uses it"
    for section, cls in SECTIONS.items():
        # Required settings (paths) come from flags in real use; supply dummies so only the file is judged.
        flags = {f: "x" for f in ("out", "cache", "adapter", "prompts")}
        if cls is CacheConfig:
            flags["task_train"] = "x"
        if section == "generate":
            flags["prompt"] = ["hi"]
        cfg = load_config(cls, str(path), flags)
        for key, value in (data.get(section) or {}).items():
            if key in flags:
                continue
            assert getattr(cfg, key) == value or getattr(cfg, key) == [value], (section, key)


def test_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# test\nseed: 7\ntrain:\n  kd_lambda: 1.0\n  lora_r: 4\n")
    cfg = load_config(TrainConfig, str(f), {"cache": "c", "out": "o", "lora_r": 16})
    assert (cfg.seed, cfg.kd_lambda, cfg.lora_r, cfg.lr) == (7, 1.0, 16, 1e-3)


def test_all_problems_reported_together(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sede: 1\ntrain:\n  kd_lambda: -1\n  kl: sideways\n  lora_r: 0\nsweep: [1]\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, str(f), {"rehearsal_ratio": 1.5})
    text = "\n".join(e.value.problems)
    for expected in ("sede: unknown setting (did you mean seed?)", "kd_lambda: must be >= 0", "kl: 'sideways' is not",
                     "lora_r: must be > 0", "rehearsal_ratio: must be <= 1", "sweep: expected a mapping",
                     "cache: required (--cache)", "out: required (--out)"):
        assert expected in text, expected


@pytest.mark.parametrize("content", ["a: [", "- 1\n- 2\n", "\x00\xff"])
def test_unparsable_config_is_one_line(tmp_path, content):
    f = tmp_path / "c.yaml"
    f.write_bytes(content.encode("latin-1"))
    result = CliRunner().invoke(main, ["train", "--config", str(f), "--cache", "c", "--out", "o"])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "Traceback" not in result.output


def test_missing_file_and_config_problems_reported_together(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["cache-teacher", *TASK_ONLY, "--model", str(tiny_model_dir),
                                       "--task-train", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "nope.jsonl: file not found" in result.output

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("cache_teacher:\n  top_kk: 3\n  max_length: -1\n  temperature: hot\ntrain:\n  kd_lambda: x\n")
    result = CliRunner().invoke(main, ["cache-teacher", "--config", str(cfg)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert any("top_kk: unknown setting (did you mean top_k?)" in line for line in lines)
    assert any("train.kd_lambda: expected float" in line for line in lines)
    assert any("cache_teacher.temperature: expected float" in line for line in lines)
    assert any("max_length: must be >= 8" in line for line in lines)
    assert any("out: required" in line for line in lines)
    assert any("no input" in line for line in lines)


def test_epochs_or_max_steps_exactly_one(tmp_path):
    assert load_config(TrainConfig, None, {"cache": "c", "out": "o"}).max_steps is None  # the default length
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


def test_cli_refuses_epochs_with_max_steps(tmp_path):
    result = CliRunner().invoke(main, ["train", "--cache", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--epochs", "2", "--max-steps", "10", "--lr", "-1"])
    assert result.exit_code == 2
    assert "--epochs and --max-steps exclude each other" in result.output and "lr: must be > 0" in result.output


def test_online_teacher_flags_checked():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="give --task-train"):
        load_config(TrainConfig, None, {"out": "o", "online_teacher": True})
    with pytest.raises(ConfigError, match="drop --cache"):
        load_config(TrainConfig, None, {"out": "o", "online_teacher": True, "cache": "c", "task_train": "t"})
    with pytest.raises(ConfigError, match="--eval-every scores the cache's held-out rows"):
        load_config(TrainConfig, None, {"out": "o", "online_teacher": True, "task_train": "t", "eval_every": 5})


def test_lora_dropout_must_be_below_1_listed_with_the_other_problems():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "lora_dropout": "1", "lora_r": "0"})
    assert "lora_dropout: must be < 1 (1 drops every input of the adapter), got 1.0" in e.value.problems
    assert "lora_r: must be > 0, got 0" in e.value.problems
    with pytest.raises(ConfigError, match=r"lora_dropout: must be >= 0, got -0.1"):
        load_config(TrainConfig, None, {"cache": "c", "out": "o", "lora_dropout": "-0.1"})
    assert load_config(TrainConfig, None, {"cache": "c", "out": "o", "lora_dropout": "0.99"}).lora_dropout == 0.99

    result = CliRunner().invoke(main, ["train", "--model", "/no/such/model", "--cache", "c", "--out", "o",
                                       "--lora-dropout", "1.5", "--max-steps", "0"])
    assert result.exit_code == 2  # reported before any model is looked for
    assert result.stderr.splitlines() == ["error: max_steps: must be > 0, got 0",
                                          "error: lora_dropout: must be < 1 (1 drops every input of the adapter), "
                                          "got 1.5"]


def test_pipeline_model_sets_the_default_model_only(tmp_path, monkeypatch):
    """$PIPELINE_MODEL replaces the built-in default; a config file or a flag still wins over it."""
    assert load_config(TrainConfig, None, {"cache": "c", "out": "o"}).model == BUILTIN_MODEL
    monkeypatch.setenv("PIPELINE_MODEL", "/models/tiny")
    assert load_config(TrainConfig, None, {"cache": "c", "out": "o"}).model == "/models/tiny"
    assert load_config(TrainConfig, None, {"cache": "c", "out": "o", "model": "/models/flag"}).model == "/models/flag"
    config = tmp_path / "c.yaml"
    config.write_text("model: /models/file\n")
    assert load_config(TrainConfig, str(config), {"cache": "c", "out": "o"}).model == "/models/file"
