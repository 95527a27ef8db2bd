"""`--model`: what it may name, resolved without any network: a directory, a Hugging Face id from the local cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.model_source import hub_cache_dir, resolve_model
from tests.helpers import TASK_ONLY


def fake_hub_cache(root: Path, repo_id: str, model_dir: Path, revision: str = "0123abcd" * 5) -> Path:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV/<files as links to blobs>}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir()
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


def test_hub_id_resolves_from_the_local_cache(tiny_model_dir, tmp_path, monkeypatch):
    snapshot = fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network, whatever the library would like to try
    assert resolve_model("tiny-org/tiny-llama") == snapshot
    # HF_HOME/hub when HF_HUB_CACHE is not set
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"


def test_hub_id_not_in_the_cache_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PipelineError) as refused:
        resolve_model("Qwen/Qwen2.5-1.5B-Instruct")
    message = str(refused.value)
    assert message.startswith("Qwen/Qwen2.5-1.5B-Instruct: not in the local Hugging Face cache")
    assert "hf download Qwen/Qwen2.5-1.5B-Instruct" in message and "--model DIR" in message
    assert "\n" not in message


def test_a_local_directory_wins_over_a_hub_id(tiny_model_dir, tmp_path, monkeypatch):
    """ORG/NAME that is also a directory here is that directory (the user's own files come first)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "org" / "name")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert resolve_model("org/name") == Path("org/name")


def test_the_cli_takes_a_hub_id(tiny_model_dir, tmp_path, monkeypatch, corpus):
    from click.testing import CliRunner

    from pipeline.cli import main

    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = CliRunner().invoke(main, ["cache-teacher", *TASK_ONLY, "--model", "tiny-org/tiny-llama", "--task-train",
                                       str(corpus["task_train"]), "--out", str(tmp_path / "cache"), "--top-k", "4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "manifest.json").is_file()
