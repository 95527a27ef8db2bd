"""pipeline/run_dir.py: an output directory with other content is refused, and so is a --resume with other
settings or another cache (each in one line, leaving the run as it was); how a run reports may change."""

from __future__ import annotations

import shutil

import pytest
import yaml

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.train import setup
from tests.helpers import (
    QUIET,
    assert_one_line_error,
    cfg_for,
    invoke,
    short_train_cmd,
    snapshot,
)


def test_refuses_non_empty_out(tiny_model_dir, tiny_cache, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(PipelineError, match="not empty; pass --resume"):
        setup(cfg_for(tiny_model_dir, tiny_cache, out), **QUIET)


def test_resume_with_other_settings_is_refused(tiny_model_dir, cache_and_other, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    for flags, what in ((["--lr", "2e-3"], "lr was 0.001, now 0.002"),
                        (["--kd-lambda", "0.5"], "kd_lambda was 1.0, now 0.5"),
                        (["--lora-r", "4", "--lr", "2e-3"], "lora_r was 8, now 4")):  # the first difference, by name
        resumed = invoke(short_train_cmd(tiny_model_dir, cache_and_other["cache"], out, "--resume", *flags))
        assert_one_line_error(resumed,
                              f"error: {out}: --resume with other settings: {what}; resume with the same settings or "
                              "use --overwrite")
        assert snapshot(out) == before


def test_resume_with_another_cache_is_refused_but_a_moved_one_is_not(tiny_model_dir, cache_and_other, finished_run,
                                                                     tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    assert_one_line_error(invoke(short_train_cmd(tiny_model_dir, cache_and_other["other"], out, "--resume")),
                          f"error: {out}: --resume with another cache (its shards differ from the ones this run "
                          "started with)")
    assert snapshot(out) == before

    moved = tmp_path / "moved-cache"  # the same content at another path: where things are is not what they are
    shutil.copytree(cache_and_other["cache"], moved)
    result = invoke(short_train_cmd(tiny_model_dir, moved, out, "--resume"))
    assert result.exit_code == 0 and "(step 2)" in result.output, result.output


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
        refuse_other_settings(tmp_path, recorded, TrainConfig(**{**started.__dict__, "resume": True, "lr": 5e-4}),
                              None, doing="--resume", fix="")


def test_resume_without_a_readable_run_yaml_is_refused(tiny_model_dir, cache_and_other, finished_run, tmp_path):
    """Without run.yaml --resume cannot check the settings the run started with: refused, the run left as it was."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "run.yaml").unlink()
    before = snapshot(out)
    resumed = invoke(short_train_cmd(tiny_model_dir, cache_and_other["cache"], out, "--resume", "--lr", "2e-3"))
    assert_one_line_error(resumed, f"error: {out / 'run.yaml'}: missing, so --resume cannot check the settings",
                          "--overwrite")
    assert snapshot(out) == before
    (out / "run.yaml").write_text("config: [unclosed\n")
    assert_one_line_error(invoke(short_train_cmd(tiny_model_dir, cache_and_other["cache"], out, "--resume")),
                          f"error: {out / 'run.yaml'}: unreadable")

    # Nothing recorded and nothing to resume (a run stopped before it recorded itself leaves an empty checkpoints/):
    # --resume starts at step 0, as it does on a new directory.
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    started = invoke(short_train_cmd(tiny_model_dir, cache_and_other["cache"], fresh, "--resume"))
    assert started.exit_code == 0 and "no checkpoint in" in started.output, started.output
