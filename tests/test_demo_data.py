"""The demo tasks' generators: deterministic, no held-out text seen in training, conventions as documented."""

from __future__ import annotations

import collections
import datetime
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


GENERATORS = [("make_demo", "demo"), ("make_dates", "dates"), ("make_tickets", "tickets")]


@pytest.mark.parametrize("name, folder", GENERATORS)
def test_generators_reproduce_the_shipped_files(name, folder):
    module = _load(name)
    train, evals = module.generate(0)
    for rows, part in ((train, "task_train"), (evals, "task_eval")):
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]  # private bookkeeping
        shipped = [json.loads(line) for line in (DATA / folder / f"{part}.jsonl").read_text("utf-8").splitlines()]
        assert rows == shipped
    assert not {r["input"] for r in train} & {r["input"] for r in evals}


@pytest.mark.parametrize("name, folder", GENERATORS)
def test_the_scripts_write_byte_identical_files(name, folder, tmp_path):
    subprocess.run([sys.executable, str(DATA / f"{name}.py"), "--out-dir", str(tmp_path)], check=True,
                   capture_output=True)
    for part in ("task_train", "task_eval"):
        assert (tmp_path / f"{part}.jsonl").read_bytes() == (DATA / folder / f"{part}.jsonl").read_bytes()


# Hand-written: how each style writes Tuesday 5 March 2024 (Reiwa 6), per the conventions in make_dates.py.
MARCH_5_2024 = {
    "US slashes": {"03/05/2024", "3/5/2024"},
    "European dots": {"05.03.2024", "5.3.2024"},
    "European dashes": {"5-3-2024"},
    "ISO already": {"2024-03-05"},
    "year first slashes": {"2024/3/5", "2024/03/05"},
    "the nth of month": {"the 5th of March 2024"},
    "令和": {"令和6年3月5日"},
    "年月日": {"2024年3月5日", "2024年3月5日（火）"},
}


@pytest.mark.parametrize("style", sorted(MARCH_5_2024))
def test_date_styles_follow_the_documented_conventions(style):
    dates = _load("make_dates")
    render = {**dates.EN_STYLES, **{f"ja {k}" if k in dates.EN_STYLES else k: v for k, v in dates.JA_STYLES.items()}}
    r = random.Random(0)
    seen = {render[style](r, datetime.date(2024, 3, 5)) for _ in range(50)}
    assert seen == MARCH_5_2024[style]


def test_every_answer_is_an_iso_date_and_reiwa_years_are_right():
    dates = _load("make_dates")
    train, evals = dates.generate(0)
    for row in train + evals:
        day = datetime.date.fromisoformat(row["output"])
        if "令和" in row["input"]:
            assert f"令和{day.year - 2018}年{day.month}月{day.day}日" in row["input"]


def test_ticket_rows_are_balanced_labels_named_in_the_instruction():
    tickets = _load("make_tickets")
    parts = {part: [json.loads(line) for line in (DATA / "tickets" / f"task_{part}.jsonl").read_text("utf-8")
                    .splitlines()] for part in ("train", "eval")}
    assert {part: len(rows) for part, rows in parts.items()} == {"train": 1200, "eval": 240}
    assert len(tickets.LABELS) == 8
    for part, rows in parts.items():
        ids = [row["id"] for row in rows]
        assert ids == [f"ticket-{part}-{i:05d}" for i in range(len(rows))]
        for row in rows:
            assert set(row) == {"id", "instruction", "input", "output"}
            assert row["instruction"] == tickets.INSTRUCTION
            assert row["output"] in tickets.LABELS  # exactly the label, nothing around it
            assert tickets.MIN_WORDS <= len(row["input"].split()) <= tickets.MAX_WORDS
        per_label = len(rows) // len(tickets.LABELS)
        assert collections.Counter(row["output"] for row in rows) == dict.fromkeys(tickets.LABELS, per_label)
        for start in range(0, len(rows), 8):  # any head of the file is balanced too
            assert sorted(row["output"] for row in rows[start:start + 8]) == sorted(tickets.LABELS)
    assert not {row["input"] for row in parts["train"]} & {row["input"] for row in parts["eval"]}
    for label in tickets.LABELS:
        assert label in tickets.INSTRUCTION


def test_ticket_paraphrases_pick_one_alternative_each():
    tickets = _load("make_tickets")
    seen = {tickets.pick_alternatives(random.Random(i), "[a|b] x[ y|]") for i in range(50)}
    assert seen == {"a x y", "a x", "b x y", "b x"}
