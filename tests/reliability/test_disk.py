"""An unwritable or full disk stops cache-teacher and train with one line naming the file,
leaves no temporary file, keeps what was finished, and the same command completes once there is room.

The tests run as root, for whom a chmod-ed directory is writable, so unwritable places are made otherwise: a
path under a regular file (a real ENOTDIR from the kernel), an OSError with errno EROFS/ENOSPC raised where the
file system raises it (after writing part of the file, as a disk that fills up mid-file does), and, where the
test may mount one, a real tmpfs that is too small. (/dev/full is no help: pyarrow and torch.save write small
files to it without an error.)
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.schema import MANIFEST
from pipeline.fileio import TMP_MARK
from tests.helpers import assert_one_line_error, invoke, mounted_tmpfs
from tests.reliability.util import assert_same_cache, assert_same_run, tmp_files, train_cmd

ENOSPC = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")  # pyarrow's
EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))
# What torch.save raised on a real full tmpfs (its zip writer checks the position after each write).
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_cache_out_under_a_regular_file(cache_cmd, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "cache"
    assert_one_line_error(invoke([*cache_cmd, "--out", out]),
                          f"{out}: cannot create the cache directory: Not a directory")
    assert_one_line_error(invoke([*cache_cmd, "--out", blocker]), f"{blocker}: exists and is not a directory")


def test_cache_out_on_a_read_only_file_system(cache_cmd, tmp_path, monkeypatch):
    out = tmp_path / "ro" / "cache"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args, **kwargs) -> None:
        if self == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert_one_line_error(invoke([*cache_cmd, "--out", out]),
                          f"{out}: cannot create the cache directory: Read-only file system")


def failing_write_table(nth: int, error: OSError, *, partial: bool):
    """pq.write_table that raises `error` from its nth call on, after writing half a shard if `partial`."""
    real_write, calls = pq.write_table, []

    def write_table(table, where, **kwargs):
        calls.append(where)
        if len(calls) < nth:
            return real_write(table, where, **kwargs)
        if partial:
            real_write(table, where, **kwargs)
            where.truncate(where.tell() // 2)
        raise error

    return write_table


@pytest.mark.parametrize(("nth", "error", "partial", "kept"), [
    (1, ENOSPC, False, 0),  # not even the first shard fits
    (2, ENOSPC, True, 1),  # the disk fills up in the middle of the second shard
    (5, ENOSPC, True, 4),
    (3, EROFS, False, 2),  # the file system turns read-only (as after an I/O error)
], ids=["ENOSPC-shard-1", "ENOSPC-mid-shard-2", "ENOSPC-mid-shard-5", "EROFS-shard-3"])
def test_cache_write_fails_mid_run_then_rerun_completes(nth, error, partial, kept, cache_cmd, reference_cache,
                                                        tmp_path, monkeypatch):
    out = tmp_path / "cache"
    monkeypatch.setattr(pq, "write_table", failing_write_table(nth, error, partial=partial))
    failed = invoke([*cache_cmd, "--out", out])
    assert_one_line_error(failed, f"{out / f'shard-{nth - 1:05d}.parquet'}: cannot write: {error.strerror}")
    assert tmp_files(out) == [] and not (out / MANIFEST).exists()
    assert sorted(p.name for p in out.iterdir()) == [f"shard-{i:05d}.parquet" for i in range(kept)]

    monkeypatch.undo()  # room again: the same command keeps the finished shards and does the rest
    rerun = invoke([*cache_cmd, "--out", out])
    assert rerun.exit_code == 0, rerun.output
    assert f"({14 - 2 * kept} computed now, {2 * kept} kept from an earlier run)" in rerun.output
    assert_same_cache(out, reference_cache)


def test_cache_disk_full_while_writing_the_manifest(cache_cmd, reference_cache, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real_write_text = Path.write_text

    def write_text(self: Path, text: str, *args, **kwargs) -> int:
        if self.name.startswith(MANIFEST + TMP_MARK):
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert_one_line_error(invoke([*cache_cmd, "--out", out]), f"{out / MANIFEST}: cannot write: No space left")
    assert tmp_files(out) == [] and not (out / MANIFEST).exists()
    assert len(list(out.glob("shard-*.parquet"))) == 7

    monkeypatch.undo()
    rerun = invoke([*cache_cmd, "--out", out])
    assert rerun.exit_code == 0 and "(0 computed now, 14 kept from an earlier run)" in rerun.output, rerun.output
    assert_same_cache(out, reference_cache)


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    """A real 16 KiB file system (4 pages): room for about two shards. Needs root and CAP_SYS_ADMIN."""
    with mounted_tmpfs(tmp_path / "small", "16k") as mnt:
        yield mnt


def test_cache_on_a_really_full_disk_then_room_again(small_tmpfs, cache_cmd, reference_cache):
    out = small_tmpfs / "cache"
    failed = invoke([*cache_cmd, "--out", out])
    line = assert_one_line_error(failed, f"error: {out}/", ": cannot write: ", "No space left on device")
    kept = sorted(p.name for p in out.iterdir())
    assert tmp_files(out) == [] and MANIFEST not in kept and 0 < len(kept) < 7, (line, kept)

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_tmpfs)], check=True)  # space freed
    rerun = invoke([*cache_cmd, "--out", out])
    assert rerun.exit_code == 0, rerun.output
    assert f"{2 * len(kept)} kept from an earlier run" in rerun.output
    assert_same_cache(out, reference_cache)


def test_train_out_under_a_regular_file(tiny_model_dir, reference_cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "run"
    assert_one_line_error(invoke(train_cmd(tiny_model_dir, reference_cache, out)),
                          f"{out}: cannot create the run directory: Not a directory")


def test_train_disk_full_at_a_checkpoint_then_resume(tiny_model_dir, reference_cache, reference_run, tmp_path,
                                                     monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, where, *args, **kwargs):  # the 2nd checkpoint (step 6) meets a full disk half-way
        calls.append(where)
        real_save(obj, where, *args, **kwargs)
        if len(calls) == 2:
            os.truncate(where, os.path.getsize(where) // 2)
            raise TORCH_FULL

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    failed = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    step6 = out / "checkpoints" / "step-000006"
    assert_one_line_error(failed, f"{step6}: cannot write checkpoint ([enforce fail", "is the disk full?",
                          "rerun with --resume")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"] and tmp_files(out) == []
    assert not (out / "adapter").exists()

    monkeypatch.undo()
    resumed = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    assert resumed.exit_code == 0 and "(step 3)" in resumed.output, resumed.output
    assert_same_run(out, reference_run)
