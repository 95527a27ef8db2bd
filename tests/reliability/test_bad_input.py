"""A catalogue of malformed inputs, flags and configs. Each stops cache-teacher with one line
naming the file and line (exit 1) before any model is loaded, never a traceback; with --skip-bad-lines every
bad line is skipped and counted instead. Odd but valid inputs (a byte-order mark, CRLF, a 10 MB line, a prompt
longer than max_length) go through, quickly, and what was skipped is reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline import inputs as data
from pipeline.inputs import Example, tokenize_example
from pipeline.model_source import load_tokenizer
from tests.helpers import TASK_ONLY, assert_one_line_error, invoke

GOOD = {"id": "dup", "instruction": "Say hi.", "output": "Hi there."}


def msgs(*turns: tuple[str, object]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


# name: (the bad line, as bytes or text; what the error says after "t.jsonl:2: "). Each file is GOOD, then it.
BAD_LINES: dict[str, tuple[str | bytes, str]] = {
    "not JSON": ("not json", "not valid JSON (Expecting value at column 1)"),
    "JSON cut short": ('{"instruction": "hi", "output": "o', "not valid JSON (Unterminated string"),
    "trailing garbage": ('{"input": "a", "output": "b"} x', "not valid JSON (Extra data"),
    "JSON array": ("[1, 2]", "expected a JSON object, got array"),
    "JSON string": ('"hello"', "expected a JSON object, got string"),
    "JSON number": ("42", "expected a JSON object, got number"),
    "JSON null": ("null", "expected a JSON object, got null"),
    "missing output": ('{"instruction": "hi"}', "missing 'output'"),
    "empty output": ('{"instruction": "hi", "output": ""}', "empty 'output'"),
    "whitespace output": ('{"instruction": "hi", "output": " \\n\\t "}', "empty 'output'"),
    "output a number": ('{"instruction": "hi", "output": 42}', "'output' must be a string, got number"),
    "output NaN": ('{"instruction": "hi", "output": NaN}', "'output' must be a string, got number"),
    "output an object": ('{"input": "hi", "output": {"a": 1}}', "'output' must be a string, got object"),
    "instruction a list": ('{"instruction": ["a"], "output": "x"}', "'instruction' must be a string, got array"),
    "no prompt field": ('{"output": "x"}', "missing 'input'"),
    "empty prompt": ('{"instruction": " ", "input": "", "output": "x"}', "empty prompt"),
    "messages not a list": ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    "messages empty": ('{"messages": []}', "'messages' must be a non-empty list"),
    "message not an object": ('{"messages": ["hi"]}', "messages[0] must be an object with 'role' and 'content'"),
    "unknown role": (msgs(("user", "a"), ("robot", "b")),
                     "messages[1].role must be one of system, user, assistant, got 'robot'"),
    "role a 1 MB string": (msgs(("x" * 1_000_000, "a"), ("assistant", "b")),
                           "messages[0].role must be one of system, user, assistant, got 'xxxxxxxxxx"),
    "content not a string": (msgs(("user", 7), ("assistant", "b")), "messages[0].content must be a string, got number"),
    "no assistant turn": (msgs(("system", "s"), ("user", "a")), "no assistant turn at the end of 'messages'"),
    "empty assistant turn": (msgs(("user", "a"), ("assistant", "  ")), "empty assistant response"),
    "no user turn": (msgs(("system", "s"), ("assistant", "b")), "'messages' has no user turn"),
    "id a list": ('{"id": [1], "input": "a", "output": "b"}', "'id' must be a string or an integer, got array"),
    "id a boolean": ('{"id": true, "input": "a", "output": "b"}', "'id' must be a string or an integer, got boolean"),
    "duplicate id": ('{"id": "dup", "input": "again", "output": "b"}', "duplicate id 'dup' (first on line 1)"),
    "blank line": ("", "blank line"),
    "whitespace line": (" \t ", "blank line"),
    "invalid UTF-8": (b'{"input": "caf\xe9", "output": "b"}', "invalid UTF-8 at byte 14"),
    "nested 100000 deep": ("[" * 100_000, "not valid JSON (nested too deeply)"),
    "integer of 5000 digits": ('{"id": ' + "1" * 5000 + ', "input": "a", "output": "b"}',
                               "not valid JSON (Exceeds the limit (4300 digits)"),
    "unpaired surrogate": ('{"input": "a\\ud800b", "output": "c"}', "not valid Unicode (unpaired surrogate \\ud800)"),
}


def write_lines(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_is_one_line_error_with_file_and_line(case, tiny_model_dir, tmp_path):
    bad, reason = BAD_LINES[case]
    path = write_lines(tmp_path / "t.jsonl", json.dumps(GOOD), bad, json.dumps({**GOOD, "id": "last"}))
    result = invoke(["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, "--out",
                     tmp_path / "c"])
    assert_one_line_error(result, f"error: {path}:2: {reason}", "(use --skip-bad-lines to skip such lines)")
    assert not (tmp_path / "c").exists()  # stopped before anything was written


def test_skip_bad_lines_skips_and_counts_every_one(tiny_model_dir, tmp_path):
    bad_lines = [bad for bad, _ in BAD_LINES.values()]
    path = write_lines(tmp_path / "t.jsonl", json.dumps(GOOD), *bad_lines, json.dumps({**GOOD, "id": "last"}))
    out = tmp_path / "c"
    result = invoke(["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, "--out", out,
                     "--top-k", "2",
                     "--skip-bad-lines"])
    assert result.exit_code == 0, result.output
    n = len(bad_lines)
    assert f"skipped bad line {path}:2: not valid JSON" in result.output  # the first few, with file and line
    assert f"... and {n - 5} more bad lines in {path}" in result.output
    assert "examples          2 (2 computed now" in result.output
    assert f"skipped           0 (prompt fills max_length), {n} bad lines" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["skipped_bad_lines"] == n and manifest["inputs"][0]["skipped_bad_lines"] == n


@pytest.mark.parametrize(("case", "needle"), [
    ("empty file", "t.jsonl: no examples (file is empty)"),
    ("only blank lines", "t.jsonl:1: blank line"),
    ("missing file", "nope.jsonl: file not found"),
    ("a directory", "t.jsonl: is a directory, expected a JSONL file"),
    ("duplicate id across files", "t2.jsonl:1: duplicate id 'dup' (also at "),
    ("every line skipped", "t.jsonl: no examples (2 bad lines skipped)"),
    ("every prompt longer than max_length", "no examples left to cache: 1 skipped because the prompt fills "
                                            "max_length=32, 0 bad lines skipped"),
])
def test_bad_file_is_one_line_error(case, needle, tiny_model_dir, tmp_path):
    path = tmp_path / "t.jsonl"
    extra: list[str | Path] = []
    if case == "empty file":
        path.write_bytes(b"")
    elif case == "only blank lines":
        path.write_text("\n\n")
    elif case == "missing file":
        path = tmp_path / "nope.jsonl"
    elif case == "a directory":
        path.mkdir()
    elif case == "duplicate id across files":
        write_lines(path, json.dumps(GOOD))
        extra = ["--task-eval", write_lines(tmp_path / "t2.jsonl", json.dumps(GOOD))]
    elif case == "every line skipped":
        write_lines(path, "oops", "[]")
        extra = ["--skip-bad-lines"]
    else:
        write_lines(path, json.dumps({"instruction": "word " * 100, "output": "x"}))
        extra = ["--max-length", "32"]
    result = invoke(["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, *extra,
                     "--out", tmp_path / "c"])
    assert_one_line_error(result, needle)


def test_odd_but_valid_input_goes_through_quickly(tiny_model_dir, tmp_path):
    """A byte-order mark, CRLF line ends, unknown keys, no final newline; a prompt longer than max_length and a
    10 MB prompt (skipped and reported), a 10 MB response (cut to max_length): all in a few seconds.
    """
    ten_mb = "word " * 2_000_000
    lines = [
        "\ufeff" + json.dumps({"instruction": "hi", "output": "ok", "note": "unknown keys are ignored"}),
        json.dumps({"messages": [{"role": "user", "content": "医療文書を要約してください。"},
                                 {"role": "assistant", "content": "患者は高血圧です。"}]}, ensure_ascii=False),
        json.dumps({"instruction": "a long prompt " * 60, "output": "x"}),
        json.dumps({"instruction": ten_mb, "output": "x"}),
        json.dumps({"instruction": "Say it all.", "output": ten_mb}),
        json.dumps({"input": "last line, no newline", "output": "fine"}),
    ]
    path = tmp_path / "t.jsonl"
    path.write_bytes("\r\n".join(lines).encode("utf-8"))
    assert path.stat().st_size > 20e6
    start = time.perf_counter()
    result = invoke(["cache-teacher", *TASK_ONLY, "--model", tiny_model_dir, "--task-train", path, "--out",
                     tmp_path / "c",
                     "--max-length", "128", "--top-k", "2"])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert seconds < 10, f"{seconds:.1f} s (tokenising 10 MB whole takes ~15 s)"
    assert f"skipped 2 examples of {path} whose prompt fills max_length=128 (first: {path}:3, {path}:4)" \
        in result.output
    assert "examples          4 (4 computed now" in result.output
    assert "truncated         1 (response cut at max_length)" in result.output, result.output
    assert "skipped           2 (prompt fills max_length), 0 bad lines" in result.output


def test_cutting_long_text_before_tokenising_changes_no_ids(tiny_model_dir, monkeypatch):
    """[long text note] in data.py: the cut response gives exactly the ids of the whole one."""
    tokenizer = load_tokenizer(tiny_model_dir)
    words = ["the", "quick", "brown", "fox,", "metformin", "500", "mg;", "医療文書", '{"dose":', "1}\n"]
    long_text = " ".join(words[i % len(words)] for i in range(20_000))  # ~100k characters
    examples = [Example("a", [{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": long_text}],
                        "t:1"),
                Example("b", [{"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"}], "t:2")]
    max_length = 48
    assert len(long_text) > (data._longest_token(tokenizer) + 1) * max_length  # the cut applies
    cut = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    monkeypatch.setattr(data, "_longest_token", lambda _: 10**9)  # no cut: tokenise everything
    whole = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    assert cut[0] == whole[0] and cut[0].truncated and len(cut[0].input_ids) == max_length
    assert cut[1] is None and whole[1] is None


@pytest.mark.parametrize(("command", "args", "needles"), [
    ("cache-teacher", ["--top-k", "abc", "--max-length", "4", "--temperature", "-1", "--precision", "fp64",
                       "--batch-size", "0", "--shard-size", "1.5"],
     ["--top-k: expected int, got 'abc'", "max_length: must be >= 8, got 4", "temperature: must be > 0, got -1.0",
      "precision: 'fp64' is not one of auto, bf16, fp16, fp32", "batch_size: must be > 0, got 0",
      "--shard-size: expected int, got '1.5'", "out: required (--out)", "no input: give at least one of"]),
    ("train", ["--max-steps", "ten", "--lr", "-1", "--kl", "sideways", "--rehearsal-ratio", "2", "--resume",
               "--overwrite"],
     ["--max-steps: expected int, got 'ten'", "lr: must be > 0, got -1.0", "kl: 'sideways' is not one of",
      "rehearsal_ratio: must be <= 1, got 2.0", "--resume and --overwrite exclude each other",
      "cache: required (--cache)", "out: required (--out)"]),
])
def test_bad_flags_all_reported_at_once(command, args, needles):
    result = invoke([command, *args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    for needle in needles:
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert len(lines) == len(needles), lines


def test_config_and_flag_problems_reported_together(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("seed: x\ncache_teacher:\n  top_kk: 3\n  temperature: hot\n  out: [1]\ntrain:\n  lr: fast\n")
    result = invoke(["cache-teacher", "--config", config, "--max-length", "2", "--task-train", tmp_path / "t.jsonl"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    for needle in (f"{config}: seed: expected int, got 'x'", f"{config}: cache_teacher.top_kk: unknown setting (did "
                   "you mean top_k?)", f"{config}: cache_teacher.temperature: expected float, got 'hot'",
                   f"{config}: cache_teacher.out: expected str, got [1]", f"{config}: train.lr: expected float",
                   "max_length: must be >= 8, got 2"):
        assert any(needle in line for line in lines), (needle, lines)


@pytest.mark.parametrize(("case", "needle"), [
    ("missing", "c.yaml: config file not found"),
    ("not YAML", "c.yaml: not valid YAML"),
    ("a list", "c.yaml: expected a mapping of settings at the top level, got list"),
    ("invalid UTF-8", "c.yaml: not valid YAML"),
])
def test_unreadable_config_is_one_line(case, needle, tmp_path):
    config = tmp_path / "c.yaml"
    if case == "not YAML":
        config.write_text("cache_teacher: {top_k: [\n")
    elif case == "a list":
        config.write_text("- 1\n- 2\n")
    elif case == "invalid UTF-8":
        config.write_bytes(b"seed: \xff\xfe\n")
    result = invoke(["cache-teacher", "--config", config, "--task-train", "t.jsonl", "--out", tmp_path / "o"])
    assert_one_line_error(result, needle, exit_code=2)


def test_unknown_flag_or_directory_as_config_is_a_usage_error_not_a_traceback(tmp_path):
    """click's own checks (before any setting is read) print its usage line, then one `Error:` line."""
    (tmp_path / "c.yaml").mkdir()
    for args, needle in ((["--top-kk", "3"], "Error: No such option '--top-kk'. Did you mean '--top-k'?"),
                         (["--config", tmp_path / "c.yaml"], "c.yaml' is a directory")):
        result = invoke(["cache-teacher", *args])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert needle in result.stderr.strip().splitlines()[-1], result.stderr
