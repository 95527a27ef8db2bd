"""pipeline/inputs.py: the user's input files. Every format (JSON, Parquet, CSV, a save_to_disk directory) reads as
its JSONL twin; --columns maps other column names; a bad line or an unreadable file is one line naming it, or
skipped and counted with --skip-bad-lines; the chat template leaves a cut answer without an end of turn.

Every format is written here from the same rows, with the `datasets` library a user would use, so "the same
rows" is what a user gets when converting a JSONL file.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import CacheConfig, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.inputs import input_sha256, read_examples, read_jsonl
from pipeline.model_source import load_tokenizer
from tests.helpers import (
    GENERAL_ROWS,
    TASK_ONLY,
    TASK_ROWS,
    assert_one_line_error,
    invoke,
    write_jsonl,
)

FORMATS = ("json", "parquet", "csv", "saved")

# All three line forms, explicit and derived ids, Japanese text. (A table column holds one type: the ids are strings.)
ROWS = [{**r, "id": f"t{i}"} for i, r in enumerate(TASK_ROWS[:2])] + [{**GENERAL_ROWS[2], "id": "m7"},
                                                                       GENERAL_ROWS[0], GENERAL_ROWS[3]]

FLAT_ROWS = [r for r in ROWS if "messages" not in r]  # CSV has no lists: no `messages` form


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()


def write_as(fmt: str, path: Path, rows: list[dict]) -> Path:
    """Write `rows` the way a user of `datasets` would: one column per key, absent keys as nulls."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns = {k: [r.get(k) for r in rows] for k in keys}
    ds = datasets.Dataset.from_dict(columns)
    target = path.with_suffix("" if fmt == "saved" else f".{fmt}")
    {"json": ds.to_json, "parquet": ds.to_parquet, "csv": lambda p: ds.to_csv(p, index=False),
     "saved": ds.save_to_disk}[fmt](str(target))
    return target


def same_content(a: list, b: list, a_name: str, b_name: str) -> list:
    """Examples as comparable tuples: the derived ids carry the file name, the rest must be equal."""
    return [[(e.id.replace(name, "FILE"), e.messages, e.role, e.split, e.raw) for e in exs]
            for exs, name in ((a, a_name), (b, b_name))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_as_its_jsonl_twin(fmt, tmp_path):
    rows = FLAT_ROWS if fmt == "csv" else ROWS
    jsonl = write_jsonl(tmp_path / "data.jsonl", rows)
    other = write_as(fmt, tmp_path / "data", rows)
    got, stats = read_examples(other, role="rehearsal", split="eval")
    want, _ = read_jsonl(jsonl, role="rehearsal", split="eval")
    mine, theirs = same_content(got, want, other.name, jsonl.name)
    assert mine == theirs
    assert [e.source for e in got] == [f"{other}:row {i}" for i in range(1, len(rows) + 1)]
    assert (stats.lines, stats.examples, stats.skipped) == (len(rows), len(rows), [])
    # A JSONL file is still read by the JSONL parser, whatever the entry point.
    assert [e.source for e in read_examples(jsonl)[0]] == [f"{jsonl}:{i}" for i in range(1, len(rows) + 1)]


def test_csv_cells_are_text(tmp_path):
    """A number-like answer is an answer ("42"), and "NA" or "null" are words, not missing values."""
    path = tmp_path / "t.csv"
    path.write_text("instruction,output\nSix times seven?,42\nSay NA.,NA\nSay null.,null\n", encoding="utf-8")
    assert [e.messages[-1]["content"] for e in read_examples(path)[0]] == ["42", "NA", "null"]


def test_file_names_are_not_patterns(tmp_path):
    """`datasets` takes data_files as glob patterns; a user's file name is a name."""
    brackets = write_as("parquet", tmp_path / "qa[1]", FLAT_ROWS)
    assert len(read_examples(brackets)[0]) == len(FLAT_ROWS)
    star = write_as("csv", tmp_path / "qa*", FLAT_ROWS[:1])
    write_as("csv", tmp_path / "qa-more", FLAT_ROWS)  # what the pattern qa*.csv would also match
    assert len(read_examples(star)[0]) == 1


BAD_ROW = {"instruction": "Second row: a blank answer.", "output": "   "}


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_row_is_one_line_error_naming_file_and_row(fmt, tiny_model_dir, tmp_path):
    path = write_as(fmt, tmp_path / "t", [FLAT_ROWS[0], BAD_ROW, FLAT_ROWS[1]])
    result = invoke(["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, "--out",
                     tmp_path / "c"])
    assert_one_line_error(result, f"error: {path}:row 2: empty 'output' (use --skip-bad-lines to skip such lines)")
    assert not (tmp_path / "c").exists()

    result = invoke(["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, "--out",
                     tmp_path / "c",
                     "--top-k", "2", "--skip-bad-lines"])
    assert result.exit_code == 0, result.output
    assert f"skipped bad line {path}:row 2: empty 'output'" in result.output
    assert "examples          2 (2 computed now" in result.output and ", 1 bad lines" in result.output


UNREADABLE = {
    "json": ("t.json", b'[{"instruction": "a", "output": "b"},', "cannot read as a JSON file: "),
    "parquet": ("t.parquet", b"PAR1 not really parquet", "cannot read as a Parquet file: "),
    "csv": ("t.csv", b'instruction,output\n"never closed,x\n', "cannot read as a CSV file: "),
    "saved": ("t", None, "cannot read as a datasets save_to_disk directory: "),
    "plain directory": ("t", None, "is a directory, expected a JSONL file (or a JSON, Parquet or CSV file"),
    "DatasetDict": ("t", None, "a saved DatasetDict with splits eval, train; pass one split's directory"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_file_is_one_line_error_naming_it(case, tiny_model_dir, tmp_path):
    name, content, needle = UNREADABLE[case]
    path = tmp_path / name
    if case == "saved":  # a save_to_disk directory whose Arrow file was cut short
        write_as("saved", path, FLAT_ROWS)
        arrow = next(path.glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[:100])
    elif case == "plain directory":
        path.mkdir()
        (path / "notes.txt").write_text("x")
    elif case == "DatasetDict":
        ds = datasets.Dataset.from_list(FLAT_ROWS)
        datasets.DatasetDict({"train": ds, "eval": ds}).save_to_disk(str(path))
    else:
        path.write_bytes(content)
    result = invoke(["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, "--out",
                     tmp_path / "c"])
    assert_one_line_error(result, f"error: {path}: {needle}")


@pytest.mark.parametrize(("content", "message"), [
    ('{"instruction": "hi", "output": "ok"}\nnot json\n', r"t\.jsonl:2: not valid JSON"),
    ('{"instruction": "hi"}\n', r"t\.jsonl:1: missing 'output'"),
    ('[1, 2]\n', r"t\.jsonl:1: expected a JSON object"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"t\.jsonl:1: messages\[0\]\.role must be one of"),
])
def test_bad_lines_give_one_line_errors(tiny_model_dir, tmp_path, content, message):
    bad = tmp_path / "t.jsonl"
    bad.write_text(content)
    result = CliRunner().invoke(main, ["cache-teacher", *TASK_ONLY, "--model", str(tiny_model_dir), "--task-train",
                                       str(bad),
                                       "--out", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: ")
    import re

    assert re.search(message, result.output), result.output


def test_skip_bad_lines_counts(tiny_model_dir, tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ok"}\nnot json\n{"instruction": "x", "output": ""}\n')
    result = CliRunner().invoke(main, ["cache-teacher", *TASK_ONLY, "--model", str(tiny_model_dir), "--task-train",
                                       str(bad),
                                       "--out", str(tmp_path / "c"), "--skip-bad-lines", "--top-k", "4"])
    assert result.exit_code == 0, result.output
    assert "2 bad lines" in result.output


def test_columns_map_other_names_in_every_format(tmp_path):
    """`question`/`answer` (and a `qid` as the id): renamed onto the documented fields, the other columns kept."""
    theirs = [{"qid": f"q{i}", "question": r.get("instruction"), "context": r.get("input"), "answer": r["output"],
               "source": "web"} for i, r in enumerate(FLAT_ROWS)]
    mapping = {"instruction": "question", "input": "context", "output": "answer", "id": "qid"}
    want, _ = read_jsonl(write_jsonl(tmp_path / "plain.jsonl", [
        {k: v for k, v in {**r, "id": f"q{i}", "source": "web"}.items() if v is not None}
        for i, r in enumerate(FLAT_ROWS)]))
    for fmt in ("jsonl", *FORMATS):
        path = write_jsonl(tmp_path / "theirs.jsonl", [{k: v for k, v in r.items() if v is not None} for r in theirs]) \
            if fmt == "jsonl" else write_as(fmt, tmp_path / "theirs", theirs)
        got, _ = read_examples(path, columns=mapping)
        assert [(e.id, e.messages, e.raw) for e in got] == [(e.id, e.messages, e.raw) for e in want], fmt


def test_columns_from_flag_and_config_file(tiny_model_dir, tmp_path):
    path = write_as("parquet", tmp_path / "qa", [{"prompt": r.get("instruction", "x"), "completion": r["output"]}
                                                 for r in FLAT_ROWS])
    result = invoke(["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, "--out",
                     tmp_path / "c",
                     "--top-k", "2", "--columns", "input=prompt,output=completion"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    assert manifest["inputs"][0]["columns"] == {"input": "prompt", "output": "completion"}
    assert manifest["inputs"][0]["sha256"] == input_sha256(path) and manifest["inputs"][0]["examples"] == 4

    # The config file takes a mapping or a list; an unknown field or a bad item is a config problem.
    for body in ("{input: prompt, output: completion}", "[input=prompt, output=completion]"):
        (tmp_path / "c.yaml").write_text(f"cache_teacher:\n  columns: {body}\n")
        cfg = load_config(CacheConfig, str(tmp_path / "c.yaml"), {"task_train": str(path), "out": "o"})
        assert cfg.columns == {"input": "prompt", "output": "completion"}
    with pytest.raises(ConfigError) as e:
        load_config(CacheConfig, None, {"task_train": "x", "out": "o", "columns": "question=prompt,output"})
    assert e.value.problems == ["--columns: expected a mapping or KEY=VALUE,... items, got 'question=prompt,output'"]
    with pytest.raises(ConfigError) as e:
        load_config(CacheConfig, None, {"task_train": "x", "out": "o", "columns": "question=prompt,output="})
    assert e.value.problems == ["columns: 'question' is not a field the input reads (one of input, instruction, "
                                "output, messages, id)", "columns: output= names no column"]


@pytest.mark.parametrize("fmt", ["jsonl", *FORMATS])
def test_columns_naming_an_absent_column_is_one_line_error(fmt, tiny_model_dir, tmp_path):
    rows = [{"question": r.get("instruction", "x"), "answer": r["output"]} for r in FLAT_ROWS]
    path = write_jsonl(tmp_path / "t.jsonl", rows) if fmt == "jsonl" else write_as(fmt, tmp_path / "t", rows)
    result = invoke(["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, "--out",
                     tmp_path / "c",
                     "--columns", "instruction=question,output=response"])
    unit = "line" if fmt == "jsonl" else "row"
    assert_one_line_error(result, f"error: {path}: --columns output=response: no column 'response' (the first {unit} "
                                  "has: question, answer)")
    with pytest.raises(PipelineError, match="no column 'response'"):  # also with --skip-bad-lines: not a bad line
        read_examples(path, columns={"output": "response"}, skip_bad_lines=True)


def test_saved_dataset_fingerprint_covers_its_data_only(tmp_path):
    path = write_as("saved", tmp_path / "d", FLAT_ROWS)
    before = input_sha256(path)
    assert write_as("saved", tmp_path / "again", FLAT_ROWS) and input_sha256(tmp_path / "again") == before  # stable
    # map() on a dataset loaded from the directory leaves its cache files there; the data is unchanged.
    datasets.load_from_disk(str(path)).map(lambda r: {"n": 1})
    assert len(list(path.glob("cache-*.arrow"))) == 1 and input_sha256(path) == before
    arrow = path / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes() + b"\0")  # the data file alone changed (state.json has its own fingerprint)
    assert input_sha256(path) != before
    changed = [{**FLAT_ROWS[0], "output": "changed"}, *FLAT_ROWS[1:]]
    write_as("saved", tmp_path / "changed", changed)
    assert input_sha256(tmp_path / "changed") != before


def test_cache_rerun_with_changed_saved_dataset_refused(tiny_model_dir, tmp_path):
    path = write_as("saved", tmp_path / "d", FLAT_ROWS)
    args = ["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, "--out", tmp_path / "c",
            "--top-k", "2"]
    assert invoke(args).exit_code == 0
    datasets.Dataset.from_list([{**FLAT_ROWS[0], "output": "changed"}, *FLAT_ROWS[1:]]).save_to_disk(
        str(tmp_path / "d2"))
    import shutil

    shutil.rmtree(path)
    shutil.move(tmp_path / "d2", path)
    assert_one_line_error(invoke(args), "holds a cache made with other settings (inputs[0].sha256: cache has")


def test_cut_answers_learn_no_end_of_turn(tiny_model_dir, tmp_path):
    from pipeline.inputs import read_jsonl, tokenize_example

    data = write_jsonl(tmp_path / "r.jsonl", [
        {"id": "a", "instruction": "Write a poem.", "output": "The sea is wide"},
        {"id": "b", "instruction": "Write a poem.", "output": "The sea is wide", "truncated": True},
    ])
    tokenizer = load_tokenizer(tiny_model_dir)
    (whole, cut), _ = read_jsonl(data)
    a, b = tokenize_example(tokenizer, whole, 256), tokenize_example(tokenizer, cut, 256)
    assert tokenizer.decode(a.input_ids).endswith("The sea is wide<|im_end|>\n")
    assert tokenizer.decode(b.input_ids).endswith("The sea is wide")  # no end-of-turn to learn
    assert a.input_ids[:len(b.input_ids)] == b.input_ids and sum(b.loss_mask) == sum(a.loss_mask) - 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y", "truncated": "yes"}])
    with pytest.raises(PipelineError, match="'truncated' must be true or false"):
        read_jsonl(bad)
