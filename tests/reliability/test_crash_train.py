"""SIGKILL train mid-run and while it writes a checkpoint or the adapter; `--resume` gives the
adapter of an uninterrupted run, bit for bit, and never loads a half-written checkpoint.

8 steps, a checkpoint every 3 (steps 3 and 6; none at the last step, which writes the adapter instead).
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.fileio import TMP_MARK
from tests.helpers import assert_one_line_error, invoke
from tests.reliability.util import assert_same_run, run_until_killed, train_cmd

# name: (crash points of the consecutive killed runs, complete checkpoints they leave, the one --resume loads,
#        whether a half-written checkpoint is left)
SCENARIOS: dict[str, tuple[list[str], list[int], int | None, bool]] = {
    "mid-run, before the first checkpoint": (["train_step:2"], [], None, False),
    "mid-run, after the checkpoint of step 6": (["train_step:7"], [3, 6], 6, False),
    "while the checkpoint of step 6 is written": (["checkpoint_tmp_written:2"], [3], 3, True),
    "while the final adapter is written": (["adapter_tmp_written:1"], [3, 6], 6, False),
    "twice: step 5, then the resumed run while it writes its checkpoint": (
        ["train_step:5", "checkpoint_tmp_written:1"], [3], 3, True),
}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, tiny_model_dir, reference_cache, home) -> dict[str, tuple[Path, Future]]:
    root = tmp_path_factory.mktemp("crashed-runs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {}
        for i, (name, (points, *_)) in enumerate(SCENARIOS.items()):
            out = root / f"s{i}"
            started[name] = (out, pool.submit(run_until_killed, train_cmd(tiny_model_dir, reference_cache, out),
                                              points, home))
        yield started


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_train_killed_then_resumed_equals_uninterrupted(scenario, crashed, reference_run, tiny_model_dir,
                                                         reference_cache):
    out, future = crashed[scenario]
    future.result()  # every run died by SIGKILL at its point
    _, complete, resume_from, half_written = SCENARIOS[scenario]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if TMP_MARK not in p.name) == [f"step-{s:06d}" for s in complete]
    assert not (out / "adapter").exists()

    half = [p for p in ckpts.iterdir() if TMP_MARK in p.name]
    if half_written:
        # The half-written checkpoint (newer than the last complete one) is there; make sure that loading it
        # could not go unnoticed: cut its state in half.
        (tmp,) = half
        state = tmp / "tensors.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:
        assert half == []

    resumed = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    assert resumed.exit_code == 0, resumed.output
    if resume_from is None:
        assert "no checkpoint in" in resumed.output
    else:
        assert f"resuming from {ckpts / f'step-{resume_from:06d}'} (step {resume_from})" in resumed.output
    assert_same_run(out, reference_run)


def test_corrupt_last_checkpoint_refused_then_previous_one_used(reference_run, tiny_model_dir, reference_cache,
                                                                 tmp_path):
    """A complete-looking checkpoint whose state does not load is refused with the way out, never half-used."""
    out = tmp_path / "run"
    assert invoke(train_cmd(tiny_model_dir, reference_cache, out)).exit_code == 0
    shutil.rmtree(out / "adapter")
    state = out / "checkpoints" / "step-000006" / "tensors.pt"
    state.write_bytes(state.read_bytes()[:1000])  # e.g. a disk that lost the end of the file
    refused = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    assert_one_line_error(refused, f"{state}: unreadable checkpoint", f"delete {state.parent} to resume")
    assert not (out / "adapter").exists()

    shutil.rmtree(state.parent)  # what the message says to do
    resumed = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from {state.parent.with_name('step-000003')} (step 3)" in resumed.output
    assert_same_run(out, reference_run)


class _Exploit:
    """Unpickling this calls Path.touch(marker): what a hostile checkpoint on a shared file system could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted_pickle(path: Path, marker: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"step": 6, "history": _Exploit(marker)}))
    pickle.loads(path.read_bytes())  # the file really is an exploit: plain unpickling runs it
    assert marker.exists()
    marker.unlink()


def test_checkpoint_without_state_json_is_refused_unopened(reference_run, tiny_model_dir, reference_cache, tmp_path):
    """A checkpoint directory without state.json (here: a crafted pickle in its place) is refused with the way out,
    and nothing in it is unpickled."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    assert invoke(train_cmd(tiny_model_dir, reference_cache, out)).exit_code == 0
    shutil.rmtree(out / "adapter")
    last = out / "checkpoints" / "step-000006"
    shutil.rmtree(last)
    last.mkdir()
    _crafted_pickle(last / "state.pt", marker)
    refused = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    assert_one_line_error(refused, f"{last}: not a checkpoint (no state.json)", "start afresh with --overwrite")
    assert not marker.exists() and not (out / "adapter").exists()


def test_crafted_tensor_file_is_refused_unexecuted(reference_run, tiny_model_dir, reference_cache, tmp_path):
    """tensors.pt is loaded with weights_only=True: a pickle that would run code is refused with one line."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    assert invoke(train_cmd(tiny_model_dir, reference_cache, out)).exit_code == 0
    shutil.rmtree(out / "adapter")
    tensors = out / "checkpoints" / "step-000006" / "tensors.pt"
    _crafted_pickle(tensors, marker)
    refused = invoke(train_cmd(tiny_model_dir, reference_cache, out))
    assert_one_line_error(refused, f"{tensors}: unreadable checkpoint", f"delete {tensors.parent} to resume")
    assert not marker.exists()
