"""Crash-safe file writing: write to a temporary name in the same directory, fsync, rename.

A reader therefore sees either the old file or the complete new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.faults import crash_point

TMP_MARK = ".tmp-"


def tmp_path_for(path: Path) -> Path:
    """A temporary sibling of `path`, unique per process, recognisable by TMP_MARK for clean-up."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success fsync it and rename it onto `path`.

    On any exception the temporary file is removed and `path` is left untouched. Errors from a full or
    read-only disk become a PipelineError naming the file.
    """
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        crash_point(f"before_rename:{path.name}")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PipelineError(f"{path}: cannot write: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place, replacing any older one at `final_dir`."""
    if final_dir.exists():
        old = final_dir.with_name(f"{final_dir.name}{TMP_MARK}old-{os.getpid()}")
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on success fsync its files and move it onto `path`.

    The directory counterpart of `atomic_path`: a reader sees the old directory or the complete new one. On any
    exception the temporary directory is removed; errors from a full or read-only disk become a PipelineError
    naming `path`.
    """
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        replace_dir(tmp, path)
    except OSError as e:
        raise PipelineError(f"{path}: cannot write: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_tmp_files(directory: Path) -> int:
    """Delete leftovers of interrupted writes in `directory`; returns how many were removed."""
    n = 0
    for p in Path(directory).iterdir():
        if TMP_MARK in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path, what: str) -> Any:
    """Load a JSON file we wrote, turning a missing or unparsable file into a one-line error."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PipelineError(f"{path}: {what} not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: {what} is not valid JSON ({e})") from e
