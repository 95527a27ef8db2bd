"""Named crash points for fault-injection tests (tests/reliability): never active unless asked for.

`PIPELINE_CRASH_AT=shard_written:2` makes the process SIGKILL itself the 2nd time it passes the point
`shard_written` - a real, unclean death at a precise moment, so tests can prove that a rerun resumes.
Without a count it dies the 1st time: `PIPELINE_CRASH_AT=before_rename:manifest.json`.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_passed: Counter[str] = Counter()


def crash_point(name: str) -> None:
    want = os.environ.get("PIPELINE_CRASH_AT")
    if not want:
        return
    _passed[name] += 1
    # The count follows the last colon, and is optional: names may hold colons (`before_rename:manifest.json`).
    point, sep, nth = want.rpartition(":")
    if not sep or not nth.isdigit():
        point, nth = want, "1"
    if point == name and _passed[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
