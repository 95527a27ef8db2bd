"""SIGKILL cache-teacher at many moments, rerun the same command, get the uninterrupted cache.

Each scenario is a list of crash points (pipeline/faults.py), one real process per point, each dying by
SIGKILL at its point; the same command then runs to the end. The scenarios run concurrently in
background processes (each is mostly interpreter start-up), the checks and the final reruns in this process.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.cache.schema import MANIFEST
from pipeline.fileio import TMP_MARK
from tests.helpers import assert_one_line_error, invoke
from tests.reliability.util import assert_same_cache, run_until_killed, tmp_files

# name: (crash points of the consecutive killed runs, complete shards left after the kills, a temp file left?)
SCENARIOS: dict[str, tuple[list[str], int, bool]] = {
    "after the first model load": (["model_loaded:1"], 0, False),
    "between two batches of the first shard": (["teacher_batch:1"], 0, False),
    "while shard 1 is written, before its rename": (["before_rename:shard-00001.parquet"], 1, True),
    "after 1 shard": (["shard_written:1"], 1, False),
    "after 4 shards": (["shard_written:4"], 4, False),
    "after the last shard, before the manifest": (["shard_written:7"], 7, False),
    "while the manifest is written, before its rename": (["before_rename:manifest.json"], 7, True),
    # The rerun dies too: mid-shard after keeping 3 shards and finishing 1 more.
    "twice: after 3 shards, then mid-shard on the rerun": (["shard_written:3", "teacher_batch:3"], 4, False),
}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, cache_cmd, home) -> dict[str, tuple[Path, Future]]:
    """Start every scenario's killed runs in the background; each test waits for its own."""
    root = tmp_path_factory.mktemp("crashed-caches")
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {}
        for i, (name, (points, _, _)) in enumerate(SCENARIOS.items()):
            out = root / f"s{i}"
            started[name] = (out, pool.submit(run_until_killed, [*cache_cmd, "--out", out], points, home))
        yield started


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_cache_teacher_killed_then_rerun_equals_uninterrupted(scenario, crashed, cache_cmd, reference_cache,
                                                               tiny_model_dir, tmp_path):
    out, future = crashed[scenario]
    future.result()  # every run died by SIGKILL at its point
    _, n_complete, tmp_left = SCENARIOS[scenario]

    # What the crash left: no manifest, the finished shards, and a temp file only if it died mid-write.
    assert out.is_dir() and not (out / MANIFEST).exists()
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == [f"shard-{i:05d}.parquet" for i in range(n_complete)]
    assert bool(tmp_files(out)) == tmp_left, tmp_files(out)

    # An unfinished cache is refused by train, with the way out.
    refused = invoke(["train", "--model", tiny_model_dir, "--cache", out, "--out", tmp_path / "run"])
    assert_one_line_error(refused, f"{out / MANIFEST}: missing",
                          "rerun the same cache-teacher command" if n_complete else "not a cache directory")

    # The same command again: finished shards are kept, the rest computed, the result is the uninterrupted cache.
    rerun = invoke([*cache_cmd, "--out", out])
    assert rerun.exit_code == 0, rerun.output
    kept = 2 * n_complete
    assert f"examples          14 ({14 - kept} computed now, {kept} kept from an earlier run)" in rerun.output
    assert_same_cache(out, reference_cache)
    assert not any(TMP_MARK in p.name for p in out.iterdir())
