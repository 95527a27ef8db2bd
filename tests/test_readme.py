"""The README's quickstart, run verbatim: every command of its first code block, in a directory laid out like a
clone (run_all.sh, pyproject.toml, .venv, data/quickstart), on the tiny model through $PIPELINE_MODEL."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    """The lines of the bash block under the README's '## Quickstart' heading (comments and blank lines dropped)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quickstart.*?$(.*?)^## ", readme, flags=re.M | re.S)
    assert section, "README.md has no '## Quickstart' section"
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), flags=re.M | re.S)
    assert block, "the quickstart section has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_quickstart_is_short_and_uses_the_shipped_csv():
    commands = quickstart_commands()
    assert 3 <= len(commands) <= 6
    assert any(c.startswith("pipeline run ") and "data/quickstart/notes.csv" in c for c in commands)
    assert (REPO / "data/quickstart/notes.csv").is_file()


@pytest.mark.slow
def test_the_quickstart_runs_verbatim(tiny_model_dir, tmp_path):
    venv = Path(sys.prefix)
    stamp = venv / ".pipeline-setup"
    want = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    if not stamp.is_file() or stamp.read_text().strip() != want:
        pytest.skip(f"{venv} was not set up by ./run_all.sh for this pyproject.toml: its setup line would reinstall")
    clone = tmp_path / "clone"
    (clone / "data").mkdir(parents=True)
    for name in ("run_all.sh", "pyproject.toml"):
        (clone / name).symlink_to(REPO / name)
    (clone / ".venv").symlink_to(venv)
    (clone / "data" / "quickstart").symlink_to(REPO / "data" / "quickstart")
    script = "set -euo pipefail\n" + "\n".join(quickstart_commands()) + "\n"
    env = {**os.environ, "PIPELINE_MODEL": str(tiny_model_dir)}
    env.pop("VENV", None)
    proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    out = clone / "runs" / "quickstart"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report in proc.stdout  # `cat` showed it
    assert "| base |" in report and "| train |" in report
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "cache" / "generated" / "rehearsal_train.jsonl").is_file()  # made from the shipped prompts
