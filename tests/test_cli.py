"""pipeline/cli.py: --help lists every flag with its default; the single-process commands refuse to run under
torchrun."""

from __future__ import annotations

from dataclasses import MISSING, fields

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import CacheConfig, TrainConfig
from tests.helpers import (
    error_lines,
    torchrun,
)

# command: (its settings, flag -> the end of its help written out by hand, flags that have no default)
HELP = {
    "cache-teacher": (CacheConfig, {"--top-k": "[default: 32]", "--logprob-dtype": "[default: float16]",
                                    "--skip-bad-lines": "[default: off]"}, ["--out", "--task-train", "--task-eval"]),
    "train": (TrainConfig, {"--kd-lambda": "[default: 1.0]", "--kd-on": "[default: rehearsal]",
                            "--rehearsal-ratio": "[default: 0.3]", "--lr": "[default: 0.001]",
                            "--gradient-checkpointing": "[default: on]"},
              ["--out", "--cache", "--max-forgetting", "--max-steps", "--epochs"]),
}


def option_lines(command: str) -> dict[str, str]:
    """`pipeline COMMAND --help` on a terminal wide enough that click wraps no help text: each option's first flag ->
    its entry on one line (flags, metavar, help text, default; click puts the text under a long flag)."""
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=1000, max_content_width=1000)
    assert result.exit_code == 0, result.output
    entries: list[str] = []
    for line in result.output.split("Options:\n")[1].splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        else:
            entries[-1] += " " + line.strip()
    return {entry.split()[0]: entry for entry in entries}


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_lists_flags_with_defaults(command):
    """Every flag shows the default its settings dataclass gives it, and a flag without a default shows none."""
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "--config" in result.output and "--model" in result.output and "Example" in result.output
    cls, by_hand, without = HELP[command]
    options = option_lines(command)
    for flag, default in by_hand.items():
        assert options[flag].endswith(default), options[flag]
    for flag in without:
        assert "[default:" not in options[flag], options[flag]
    shown = 0
    for f in fields(cls):
        default = f.default_factory() if f.default is MISSING else f.default
        line = options["--" + f.name.replace("_", "-")]
        if default is None or default == {}:
            assert "[default:" not in line, line
        else:
            shown += 1
            text = ("on" if default else "off") if isinstance(default, bool) else default
            assert line.endswith(f"[default: {text}]"), line
    assert shown >= 10


def test_task_tolerance_is_a_flag_with_the_rule_in_its_help():
    result = CliRunner().invoke(main, ["sweep", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--task-tolerance" in text and "least forgetting" in text
    assert "Default (auto): each run's own, the sampling error of its score's difference from the best's" in text
    result = CliRunner().invoke(main, ["sweep", "--cache", "c", "--out", "o", "--lambdas", "0", "--task-tolerance",
                                       "-1"])
    assert result.exit_code == 2 and "task_tolerance" in result.output


SINGLE_PROCESS = {
    "evaluate": ["--cache", "{tmp}/cache", "--out", "{tmp}/out.json"],
    "sweep": ["--cache", "{tmp}/cache", "--out", "{tmp}/out", "--lambdas", "0,1"],
    "generate": ["--prompt", "hi", "--out", "{tmp}/out.jsonl"],
    "make-rehearsal": ["--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/out.jsonl"],
    "merge": ["--adapter", "{tmp}/adapter", "--out", "{tmp}/out"],
}


@pytest.mark.parametrize("command", sorted(SINGLE_PROCESS))
def test_single_process_commands_refuse_to_run_under_torchrun(command, tiny_model_dir, tmp_path):
    """With WORLD_SIZE > 1 (as torchrun sets it) rank 0 prints one line, every rank exits 2, nothing is written."""
    args = [command, "--model", str(tiny_model_dir), *(a.format(tmp=tmp_path) for a in SINGLE_PROCESS[command])]
    for rank in ("0", "1"):
        result = CliRunner().invoke(main, args, env={"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank})
        assert result.exit_code == 2, result.output
        if rank == "0":
            assert result.stderr.splitlines() == [f"error: {command} runs in one process; run it without torchrun "
                                                  "(only cache-teacher and train use several)"]
        else:
            assert result.output == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_generate_under_real_torchrun_is_refused_once(tiny_model_dir, tmp_path, torchrun_env):
    job = torchrun(["generate", "--model", tiny_model_dir, "--prompt", "hi", "--out", tmp_path / "a.jsonl"],
                   torchrun_env, timeout=120)
    assert job.returncode != 0
    assert error_lines(job.stderr) == ["error: generate runs in one process; run it without torchrun (only "
                                       "cache-teacher and train use several)"], job.stderr[-3000:]
    assert not (tmp_path / "a.jsonl").exists()
