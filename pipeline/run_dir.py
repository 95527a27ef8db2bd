"""Output directories, and run.yaml: the record of what a train run was asked to do and what it did.

    create_dir(path, what)          make the directory (one-line error if it cannot be), clear a killed run's
                                    temporary files
    prepare_run_dir(out, ...)       train's OUT: refuse a non-empty one unless resuming or overwriting
    read_run_yaml(run_dir)          the recorded run, None if there is none; an unreadable one is an error
    run_to_resume(out, made)        the recorded run --resume checks against; a run directory without one refused
    refuse_other_settings(...)      refuse to continue or keep a recorded run trained with other settings
    write_run_yaml(run_dir, doc)    atomically

train (--resume) and sweep (keeping a finished run) check a recorded run the same way: settings that only change
what a run reports or where things are may differ (config.run_differences); the cache's content may not.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import run_differences
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write_text, remove_tmp_files

RUN_YAML = "run.yaml"


def create_dir(path: Path, what: str) -> Path:
    """mkdir -p `path` and remove the temporary files a killed write left in it; `what` names it in the error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a read-only file system, or a path under a regular file
        raise PipelineError(f"{path}: cannot create the {what}: {e.strerror or e}") from e
    remove_tmp_files(path)
    return path


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool, subdirs: tuple[str, ...] = ()) -> Path:
    """A train run's output directory, empty unless resuming (overwrite: emptied first); `subdirs` created in it."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise PipelineError(f"{out}: not empty; pass --resume to continue the run in it or --overwrite to "
                                "start afresh")
    create_dir(out, "run directory")
    for name in subdirs:
        create_dir(out / name, "run directory")
    return out


def read_run_yaml(run_dir: Path) -> dict | None:
    """The parsed run.yaml of `run_dir`, or None when it has none.

    Raises:
        PipelineError: for a run.yaml that cannot be read or is not a mapping.
    """
    path = run_dir / RUN_YAML
    if not path.exists():
        return None
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: unreadable ({' '.join(str(e).split())[:200]}); delete {run_dir} to redo "
                            "this run") from e
    if not isinstance(doc, dict):
        raise PipelineError(f"{path}: not a run record (expected a mapping); delete {run_dir} to redo this run")
    return doc


def run_to_resume(out: Path, made: tuple[str, ...] = ()) -> dict | None:
    """The run.yaml that `train --resume` checks its settings against, or None when there is nothing to resume: no
    directory, or one holding only the empty sub-directories `made` that prepare_run_dir creates (a run stopped
    before it recorded itself leaves just those, and --resume may be passed from the very first run).

    Raises:
        PipelineError: the directory holds anything else but no run.yaml (a checkpoint could then be resumed with
            other settings, unchecked), or its run.yaml cannot be read (read_run_yaml).
    """
    recorded = read_run_yaml(out)
    if recorded is not None or not out.is_dir():
        return recorded
    if any(p.name not in made or not p.is_dir() or any(p.iterdir()) for p in out.iterdir()):
        raise PipelineError(f"{out / RUN_YAML}: missing, so --resume cannot check the settings this run started "
                            "with; pass --overwrite to start afresh, or use another --out")
    return None


def refuse_other_settings(run_dir: Path, recorded: dict, want: Any, cache_fingerprint: str | None, *,
                          doing: str, fix: str) -> None:
    """Raise if the recorded run trained with other settings than `want` or from a cache with other content.

    Args:
        doing: what is being done with the run, as the message says it ("--resume", "kept").
        fix: the way out, as the message ends.
    """
    diffs, other_cache = run_differences(recorded, want, cache_fingerprint)
    if diffs:
        key, was, now = diffs[0]
        raise PipelineError(f"{run_dir}: {doing} with other settings: {key} was {was!r}, now {now!r}; {fix}")
    if other_cache:
        raise PipelineError(f"{run_dir}: {doing} with another cache (its shards differ from the ones this run "
                            f"started with); {fix}")


def write_run_yaml(run_dir: Path, doc: dict) -> None:
    atomic_write_text(run_dir / RUN_YAML, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
