"""Configs: every YAML in configs/ loads for every command; precedence; all problems reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import SECTIONS, CacheConfig, TrainConfig, load_config, read_config_file
from pipeline.errors import ConfigError

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
    assert (cfg.seed, cfg.kd_lambda, cfg.lora_r, cfg.lr) == (7, 1.0, 16, 2e-4)


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


@pytest.mark.parametrize("command", ["cache-teacher", "train"])
def test_help_lists_flags_with_defaults(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "--config" in result.output and "--model" in result.output and "Example" in result.output
