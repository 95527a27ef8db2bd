"""The user's input files: read them (JSONL, JSON, Parquet, CSV, a `datasets` directory), check every row, and
tokenise each example with the model's chat template.

Accepted row forms (docs/design.md, "Input data")::

    {"input": "...", "output": "..."}
    {"instruction": "...", "input": "... (optional)", "output": "..."}
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

The last assistant turn is the response (the only tokens with loss); everything before it is the prompt.
Prompt files (make-rehearsal, generate) are the same forms without the answer.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import itertools
import json
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.fileio import read_json, sha256_file

ROLES = ("task", "rehearsal")
SPLITS = ("train", "eval")
CHAT_ROLES = ("system", "user", "assistant")



@dataclass
class Example:
    """One parsed line. `messages` ends with the assistant response unless it is a prompt."""

    id: str
    messages: list[dict[str, str]]
    source: str  # "file:line", for messages that point at the input
    role: str = "task"
    split: str = "train"
    raw: dict | None = None  # the parsed JSON object, kept for writing answers back (make-rehearsal)


@dataclass
class ReadStats:
    lines: int = 0
    examples: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" of skipped bad lines


@dataclass
class Tokenized:
    """An example as token ids: prompt + response, `loss_mask` true on the response tokens."""

    id: str
    role: str
    split: str
    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool


class BadLine(ValueError):
    """A malformed input line; the message is the reason, without the location."""


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages (a user wrote JSON, not Python)."""
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _brief(value: object, limit: int = 60) -> str:
    """repr() of a value from the input, cut short: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _text(obj: dict, key: str, *, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise BadLine(f"missing {key!r}")
        return None
    if not isinstance(value, str):
        raise BadLine(f"{key!r} must be a string, got {_json_type(value)}")
    return value


def parse_line(obj: object, *, with_response: bool) -> list[dict[str, str]]:
    """Turn one JSON value into chat messages; raise BadLine with the reason if it is malformed.

    Args:
        with_response: True for training data (must end in a non-empty assistant turn), False for prompt
            files (must end in a user turn; an `output` or final assistant turn is not allowed).
    """
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object, got {_json_type(obj)}")
    if "truncated" in obj and not isinstance(obj["truncated"], bool):
        raise BadLine(f"'truncated' must be true or false, got {_json_type(obj['truncated'])}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BadLine("'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise BadLine(f"messages[{i}] must be an object with 'role' and 'content'")
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise BadLine(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {_brief(role)}")
            if not isinstance(content, str):
                raise BadLine(f"messages[{i}].content must be a string, got {_json_type(content)}")
            out.append({"role": role, "content": content})
        last = out[-1]["role"]
        if with_response:
            if last != "assistant":
                raise BadLine("no assistant turn at the end of 'messages' (the response to learn)")
            if not out[-1]["content"].strip():
                raise BadLine("empty assistant response")
            if not any(m["role"] == "user" for m in out[:-1]):
                raise BadLine("'messages' has no user turn before the assistant response")
        elif last != "user":
            raise BadLine("a prompt's 'messages' must end with a user turn")
        return out
    instruction = _text(obj, "instruction", required=False)
    inp = _text(obj, "input", required=instruction is None)
    if instruction is None and inp is None:
        raise BadLine("expected 'messages', 'instruction' or 'input'")
    prompt = "\n\n".join(s for s in (instruction, inp) if s and s.strip())
    if not prompt.strip():
        raise BadLine("empty prompt")
    msgs = [{"role": "user", "content": prompt}]
    if with_response:
        output = _text(obj, "output", required=True)
        if not output.strip():
            raise BadLine("empty 'output'")
        msgs.append({"role": "assistant", "content": output})
    elif "output" in obj:
        raise BadLine("a prompt file line must not have 'output'")
    return msgs


def read_jsonl(path: str | Path, *, role: str = "task", split: str = "train", with_response: bool = True,
               skip_bad_lines: bool = False, columns: Mapping[str, str] | None = None
               ) -> tuple[list[Example], ReadStats]:
    """Read and validate a JSONL file, line by line.

    Raises:
        PipelineError: "file:line: reason" for the first bad line, unless skip_bad_lines (then they are
            counted in ReadStats.skipped); also for a missing/unreadable file or one with no examples.
    """
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{path}: is a directory, expected a JSONL file")
    return _validate(path, *_jsonl_records(path), unit="line", role=role, split=split, with_response=with_response,
                     skip_bad_lines=skip_bad_lines, columns=columns)


# Suffixes read through `datasets` (streamed); any other file is JSON Lines. A directory is a save_to_disk one.
TABLE_SUFFIXES = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
FORMAT_NAMES = {"json": "JSON", "parquet": "Parquet", "csv": "CSV", "saved": "a datasets save_to_disk directory"}


def input_format(path: Path) -> str:
    """"jsonl", "json", "parquet", "csv" or "saved" (a `datasets.save_to_disk` directory), from the suffix or the
    directory's contents. Raises PipelineError for a missing path or a directory that holds no saved dataset."""
    if path.is_dir():
        if (path / "state.json").is_file():
            return "saved"
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            raise PipelineError(f"{path}: a saved DatasetDict with splits {', '.join(splits) or '(none)'}; pass one "
                                f"split's directory, e.g. {path / (splits[0] if splits else 'train')}")
        raise PipelineError(f"{path}: is a directory, expected a JSONL file (or a JSON, Parquet or CSV file, or a "
                            "directory written by datasets' save_to_disk: this one has no state.json)")
    if not path.exists():
        raise PipelineError(f"{path}: file not found")
    return TABLE_SUFFIXES.get(path.suffix.lower(), "jsonl")


def read_examples(path: str | Path, *, role: str = "task", split: str = "train", with_response: bool = True,
                  skip_bad_lines: bool = False, columns: Mapping[str, str] | None = None
                  ) -> tuple[list[Example], ReadStats]:
    """Read and validate an input in any accepted format (`input_format`): every row goes through the checks of a
    JSONL line. Locations are "file:line" for JSONL and "file:row N" (from 1) for the other formats.

    Args:
        columns: documented field -> the file's column, e.g. {"instruction": "question", "output": "answer"}.

    Raises:
        PipelineError: as read_jsonl; also for a file the `datasets` library cannot read, and for a column named in
            `columns` that the file (its first row) does not have.
    """
    path = Path(path)
    fmt = input_format(path)
    if fmt == "jsonl":
        return read_jsonl(path, role=role, split=split, with_response=with_response, skip_bad_lines=skip_bad_lines,
                          columns=columns)
    rows = _dataset_rows(path, fmt)
    first = next(rows, None)
    records = ((n, row) for n, row in enumerate(itertools.chain([] if first is None else [first], rows), start=1))
    return _validate(path, first is None, records, unit="row", role=role, split=split, with_response=with_response,
                     skip_bad_lines=skip_bad_lines, columns=columns, table=True)


def input_sha256(path: str | Path) -> str:
    """sha256 of an input, for the cache manifest: the file's bytes, or for a save_to_disk directory the files
    that make it up.

    [saved dataset fingerprint note] Those are state.json, dataset_info.json and the Arrow files state.json lists,
    hashed by name and content in that order. Other files are left out on purpose: `map()` on a dataset loaded
    from the directory writes its cache-*.arrow files there, and they change nothing that is read.
    """
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    state = read_json(path / "state.json", "saved dataset state")
    names = ["state.json", "dataset_info.json", *(f["filename"] for f in state.get("_data_files", []))]
    h = hashlib.sha256()
    for name in names:
        if (path / name).is_file():
            h.update(name.encode() + b"\0" + bytes.fromhex(sha256_file(path / name)))
    return h.hexdigest()


def _jsonl_records(path: Path) -> tuple[bool, Iterator[tuple[int, object]]]:
    """(whether the file is empty, (line number, parsed JSON value or the BadLine it raised) per line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read: {e.strerror}") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line

    def records() -> Iterator[tuple[int, object]]:
        for lineno, raw in enumerate(lines, start=1):
            try:
                obj = _parse_json_line(raw, first=lineno == 1)
            except BadLine as e:
                obj = e
            yield lineno, obj

    return not data.strip(), records()


def _parse_json_line(raw: bytes, *, first: bool) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"invalid UTF-8 at byte {e.start}") from None
    if first:
        text = text.removeprefix("\ufeff")  # a byte-order mark, as some editors write
    if not text.strip():
        raise BadLine("blank line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BadLine("not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise BadLine(f"not valid JSON ({' '.join(str(e).split())[:100]})") from None
    if "\\ud" in text.lower():  # only a \u escape can make an unpaired surrogate: the bytes were UTF-8
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadLine(f"not valid Unicode (unpaired surrogate \\u{ord(e.object[e.start]):04x})") from None
    return obj


def _dataset_rows(path: Path, fmt: str, batch_size: int = 1024) -> Iterator[dict]:
    """The rows of a JSON, Parquet or CSV file or a save_to_disk directory, one dict at a time.

    Files are streamed (`load_dataset(..., streaming=True)`: read a block at a time, nothing copied; its lock
    files go to a temporary directory, not the user's datasets cache) and a saved directory is memory-mapped
    (`load_from_disk`), so a large input never sits in memory as Python objects; only a JSON file holding one
    array is parsed whole (the `json` loader's way). CSV cells are read as text, an empty cell as missing: "42" is
    an answer, not the number 42.
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # what it logs on a bad file, the error below says
    what = FORMAT_NAMES[fmt] if fmt == "saved" else f"a {FORMAT_NAMES[fmt]} file"

    def failed(e: Exception) -> PipelineError:
        return PipelineError(f"{path}: cannot read as {what}: {' '.join(str(e).split())[:200] or type(e).__name__}")

    with tempfile.TemporaryDirectory(prefix="pipeline-datasets-") as scratch:
        try:
            if fmt == "saved":
                ds = datasets.load_from_disk(str(path))
            else:
                kwargs = {}
                if fmt == "csv":
                    header = _csv_header(path)
                    if header is None:
                        return
                    kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                              "keep_default_na": False, "na_values": [""]}
                # data_files are glob patterns: escaped, a name like "qa[1].csv" is that file and no other
                ds = datasets.load_dataset(fmt, data_files=glob.escape(str(path.resolve())), split="train",
                                           streaming=True, cache_dir=scratch, **kwargs)
            batches = iter(ds.iter(batch_size=batch_size))
        except Exception as e:  # whatever the library raises for a file it cannot read
            raise failed(e) from e
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:
                raise failed(e) from e
            names = list(batch)
            for values in zip(*(batch[n] for n in names), strict=True):
                yield dict(zip(names, values, strict=True))


def _csv_header(path: Path) -> list[str] | None:
    """The column names on the first record of a CSV file; None for an empty file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"{path}: cannot read as a CSV file: {e}") from None


def _plain(value: object) -> object:
    """A value read from a table as JSON would hold it: a null is an absent field (also inside a struct: Arrow gives
    every row every column), dates become ISO text, anything else unknown to JSON its str()."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _rename(obj: dict, columns: Mapping[str, str]) -> dict:
    """Apply a --columns mapping (documented field -> the file's column): the mapped columns take the documented
    names, replacing any column that had such a name; other columns stay."""
    sources = set(columns.values())
    out = {k: v for k, v in obj.items() if k not in sources and k not in columns}
    out.update({field_name: obj[source] for field_name, source in columns.items() if source in obj})
    return out


def _validate(path: Path, empty: bool, records: Iterable[tuple[int, object]], *, unit: str, role: str, split: str,
              with_response: bool, skip_bad_lines: bool, columns: Mapping[str, str] | None,
              table: bool = False) -> tuple[list[Example], ReadStats]:
    """Turn (line or row number, parsed value or BadLine) records into Examples, with the checks every format shares.

    Args:
        unit: "line" (JSONL: locations "file:7") or "row" (tables: "file:row 7").
        table: the values come from a table: nulls are absent fields, and the first row's keys are its columns.
    """
    stats = ReadStats()
    examples: list[Example] = []
    seen: dict[str, int] = {}
    checked_columns = not columns
    for n, obj in records:
        stats.lines += 1
        where = f"{path}:{n}" if unit == "line" else f"{path}:row {n}"
        try:
            if isinstance(obj, BadLine):
                raise obj
            if columns and isinstance(obj, dict):
                if not checked_columns:
                    _check_columns(path, obj, columns, unit)
                    checked_columns = True
                obj = _rename(obj, columns)
            if table:
                obj = _plain(obj)
            messages = parse_line(obj, with_response=with_response)
            ex_id = obj.get("id")
            if ex_id is None:
                ex_id = f"{path.name}:{n}"
            elif isinstance(ex_id, bool) or not isinstance(ex_id, str | int):
                raise BadLine(f"'id' must be a string or an integer, got {_json_type(ex_id)}")
            ex_id = str(ex_id)
            if ex_id in seen:
                raise BadLine(f"duplicate id {_brief(ex_id)} (first {'on' if unit == 'line' else 'in'} {unit} "
                              f"{seen[ex_id]})")
        except BadLine as e:
            if not skip_bad_lines:
                raise PipelineError(f"{where}: {e} (use --skip-bad-lines to skip such lines)") from None
            stats.skipped.append(f"{where}: {e}")
            continue
        seen[ex_id] = n
        examples.append(Example(ex_id, messages, where, role, split, raw=obj))
    stats.examples = len(examples)
    if not examples:
        raise PipelineError(f"{path}: no examples" + (" (file is empty)" if empty else
                                                      f" ({len(stats.skipped)} bad {unit}s skipped)"))
    return examples, stats


def _check_columns(path: Path, first: dict, columns: Mapping[str, str], unit: str) -> None:
    """A --columns mapping must name columns the file has (judged on its first row: a table's rows all have the
    same columns, and a JSONL file given a mapping is one of foreign but uniform lines)."""
    for field_name, source in columns.items():
        if source not in first:
            have = ", ".join(map(str, first)) or "none"
            have = have if len(have) <= 200 else have[:200] + "..."
            raise PipelineError(f"{path}: --columns {field_name}={source}: no column {source!r} (the first {unit} has: "
                                f"{have})")


def render_prompt_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the chat-template prompt, ending with the assistant header (generation prompt)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_WHITESPACE = re.compile(r"\s")


@functools.lru_cache(maxsize=8)
def _longest_token(tokenizer) -> int:
    """Characters in the longest vocabulary entry: no token covers more characters of a text."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def cut_long_text(tokenizer, messages: list[dict[str, str]], max_length: int) -> list[dict[str, str]] | None:
    """[long text note] Tokenising a 10 MB line takes ~15 s, and all but max_length tokens are then cut.

    A text of more than L * max_length characters has more than max_length tokens (L = longest token + 1,
    81 + 1 for SmolLM2), so before tokenising: a prompt that long is too long (None: skipped, as it would be
    after tokenising), and a response that long is cut at the first whitespace after that many characters,
    a boundary no token crosses, so the ids kept are the same. Texts shorter than that are never touched.
    """
    limit = (_longest_token(tokenizer) + 1) * max_length
    if sum(len(m["content"]) for m in messages[:-1]) > limit:
        return None
    response = messages[-1]["content"]
    if len(response) <= limit:
        return messages
    space = _WHITESPACE.search(response, limit)
    return [*messages[:-1], {**messages[-1], "content": response[:space.start() if space else limit]}]


def tokenize_example(tokenizer, ex: Example, max_length: int) -> Tokenized | None:
    """Prompt + response ids with the loss mask on the response; None if truncation cut the whole response.

    The prompt is rendered with the generation prompt and tokenised on its own, then the rest of the
    rendered conversation (the response and the template's end-of-turn tokens) is tokenised and appended:
    the model sees at training time exactly the prompt ids it will generate from.
    """
    messages = cut_long_text(tokenizer, ex.messages, max_length)
    if messages is None:
        return None
    prompt_ids = render_prompt_ids(tokenizer, messages[:-1])
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise PipelineError(f"{ex.source}: the chat template renders the prompt differently inside the full "
                            "conversation; cannot locate the response")
    response_text = full_text[len(prompt_text):]
    if (ex.raw or {}).get("truncated") is True:
        # [cut answer note] The answer was cut at a length limit (make-rehearsal marks such answers): it is a
        # prefix of what the model would say, so learn the prefix but not the end-of-turn the template adds
        # after it - that would teach the model to stop mid-sentence.
        content = messages[-1]["content"].strip()
        end = response_text.find(content)
        if content and end >= 0:
            response_text = response_text[:end + len(content)]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + response_ids
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    n_prompt = len(prompt_ids)
    if n_prompt >= len(ids) or n_prompt == 0:
        return None
    mask = [False] * n_prompt + [True] * (len(ids) - n_prompt)
    return Tokenized(ex.id, ex.role, ex.split, ids, mask, truncated)

