"""`pipeline inspect CACHE [--example ID] [--json]` (pipeline/cache/inspection.py) on a tiny cache, checked against
its shards."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cache.schema import MANIFEST
from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig
from pipeline.model_source import load_tokenizer
from tests.helpers import (
    GENERAL_ROWS,
    TASK_ROWS,
    assert_one_line_error,
    invoke,
    write_jsonl,
)

EXAMPLE = "gen.jsonl:3"  # the Japanese `messages` example: byte-level tokens that are parts of characters


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inspect")
    inputs = {"task_train": write_jsonl(d / "task_train.jsonl", TASK_ROWS[:4]),
              "task_eval": write_jsonl(d / "task_eval.jsonl", TASK_ROWS[4:]),
              "rehearsal_train": write_jsonl(d / "gen.jsonl", GENERAL_ROWS)}
    out = d / "cache"
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), top_k=8, max_length=256, precision="fp32",
                            **{k: str(v) for k, v in inputs.items()}), log=lambda *_: None)
    return out


def cached_row(cache: Path, example_id: str) -> dict:
    """The example read straight from the Parquet shards, as any other tool would."""
    for shard in json.loads((cache / MANIFEST).read_text())["shards"]:
        for row in pq.read_table(cache / shard["file"]).to_pylist():
            if row["example_id"] == example_id:
                return row
    raise KeyError(example_id)


def test_overview_text(cache):
    manifest = json.loads((cache / MANIFEST).read_text())
    result = invoke(["inspect", cache])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"teacher    {manifest['teacher']['model']}" in out
    assert f"weights {manifest['teacher']['fingerprint'][:12]}, tokenizer {manifest['tokenizer'][:12]}" in out
    assert "settings   top_k 8, max_length 256, temperature 1.0" in out
    for shard in manifest["shards"]:  # one shard per part here
        part = f"{shard['role']}/{shard['split']}"
        per_token = shard["bytes"] / shard["response_tokens"]
        assert re.search(rf"^  {part} +{shard['rows']} +{shard['tokens']} +{shard['response_tokens']} +"
                         rf"{per_token:.1f} +1$", out, re.M), (part, out)
    t = manifest["totals"]
    assert f"{t['bytes_per_response_token']} bytes per response token" in out
    assert f"padding    {t['padding_waste']:.1%} of the teacher's batch positions" in out
    assert f"sha256 {manifest['inputs'][0]['sha256'][:12]}, 4 examples" in out


def test_overview_json(cache):
    manifest = json.loads((cache / MANIFEST).read_text())
    result = invoke(["inspect", cache, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"cache"}
    c = report["cache"]
    assert c["teacher"] == manifest["teacher"] and c["tokenizer"] == manifest["tokenizer"]
    assert c["totals"] == manifest["totals"] and c["inputs"] == manifest["inputs"]
    assert {k: v["rows"] for k, v in c["parts"].items()} == manifest["totals"]["examples_by_part"]
    assert sum(p["tokens"] for p in c["parts"].values()) == manifest["totals"]["tokens"]
    assert sum(p["bytes"] for p in c["parts"].values()) == manifest["totals"]["bytes"]


def test_example_json_matches_the_shard(cache, tiny_model_dir):
    result = invoke(["inspect", cache, "--example", EXAMPLE, "--json"])  # --model: the manifest's
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)["example"]
    row = cached_row(cache, EXAMPLE)
    tokenizer = load_tokenizer(tiny_model_dir)
    ids, mask = row["input_ids"], row["loss_mask"]
    positions = [t for t, m in enumerate(mask) if m]
    assert (view["example_id"], view["role"], view["split"]) == (EXAMPLE, "rehearsal", "train")
    assert (view["tokens"], view["prompt_tokens"], view["response_tokens"]) == (len(ids), positions[0], len(positions))
    assert view["prompt"] == tokenizer.decode(ids[:positions[0]])
    assert view["prompt"].endswith("<|im_start|>assistant\n") and "医療文書" in view["prompt"]
    assert view["response"] == tokenizer.decode(ids[positions[0]:]) == "患者は高血圧の治療中です。<|im_end|>\n"
    assert [p["position"] for p in view["positions"]] == positions
    for j, (p, t) in enumerate(zip(view["positions"], positions, strict=True)):
        top_ids, lps = row["target_token_ids"][j], np.array(row["target_logprobs"][j], dtype=np.float64)
        assert p["target"]["id"] == ids[t] and p["target"]["text"] == tokenizer.decode([ids[t]])
        rank = top_ids.index(ids[t]) + 1 if ids[t] in top_ids else None
        assert p["target"]["rank"] == rank
        assert p["target"]["p"] == (pytest.approx(np.exp(lps[rank - 1])) if rank else None)
        assert [x["id"] for x in p["top"]] == top_ids[:5]
        assert [x["text"] for x in p["top"]] == [tokenizer.decode([i]) for i in top_ids[:5]]
        assert [x["p"] for x in p["top"]] == pytest.approx(np.exp(lps[:5]).tolist())
        assert p["residual"] == pytest.approx(1 - np.exp(lps).sum())  # all k cached tokens, not the 5 shown
        assert 0 < p["residual"] < 1
    # Tokens that are only part of a character (U+FFFD alone) carry their bytes: together they spell the response.
    targets = [p["target"] for p in view["positions"]]
    assert any("bytes" in t for t in targets) and all(("bytes" in t) == ("\ufffd" in t["text"]) for t in targets)
    spelled = b"".join(bytes.fromhex(t["bytes"]) if "bytes" in t else t["text"].encode() for t in targets)
    assert spelled.decode() == view["response"]


def test_example_text(cache):
    result = invoke(["inspect", cache, "--example", EXAMPLE])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"example    {EXAMPLE}  (rehearsal/train;" in result.stdout
    assert "  | 医療文書を日本語で要約してください。<|im_end|>" in lines
    assert "  | 患者は高血圧の治療中です。<|im_end|>" in lines
    header = next(i for i, line in enumerate(lines) if "teacher's top 5 (p)" in line)
    table = lines[header + 1:]
    view = json.loads(invoke(["inspect", cache, "--example", EXAMPLE, "--json"]).stdout)["example"]
    assert len(table) == view["response_tokens"]
    first = view["positions"][0]
    cells = table[0].split()
    assert cells[0] == str(first["position"]) and cells[4] == f"{first['residual']:.3f}"
    assert table[-1].split()[1] == '"\\n"'  # the template's last newline, quoted and escaped
    assert any(re.search(r" <[0-9a-f]{2}( [0-9a-f]{2})*> ", line) for line in table)  # parts of a character: bytes


def test_unknown_example_is_one_line_error(cache):
    result = invoke(["inspect", cache, "--example", "no-such-id"])
    assert_one_line_error(result, f"error: {cache}: no example 'no-such-id' (ids look like ")


def test_model_that_is_gone_or_another_tokenizer(cache, tiny_model_dir, tmp_path):
    moved = tmp_path / "cache"
    shutil.copytree(cache, moved)
    manifest = json.loads((moved / MANIFEST).read_text())
    manifest["teacher"]["model"] = str(tmp_path / "gone")
    (moved / MANIFEST).write_text(json.dumps(manifest))
    assert invoke(["inspect", moved]).exit_code == 0  # the overview needs no model
    assert_one_line_error(invoke(["inspect", moved, "--example", EXAMPLE]), "gone: no such model directory",
                          "pass --model to decode the tokens with another copy of it")
    assert invoke(["inspect", moved, "--example", EXAMPLE, "--model", tiny_model_dir]).exit_code == 0

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    template = other / "chat_template.jinja"
    template.write_text("{{ 'Chat log\\n' }}" + template.read_text())
    assert_one_line_error(invoke(["inspect", cache, "--example", EXAMPLE, "--model", other]),
                          f"the tokenizer of {other} is not the one that made the cache")


def test_example_view_by_hand(tiny_model_dir):
    """Hand-made targets: the token that stands at a position is the teacher's 1st, then its 3rd, then not in the
    top-k; the residual is 1 minus the mass of all k cached tokens."""
    from pipeline.cache.inspection import example_view
    from pipeline.cache.schema import CachedRow

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer("The sea is wide", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4
    a, b, c = ids[-3:]
    others = [i for i in range(10, 20) if i not in ids]
    top = np.array([[a, *others[:5]], [others[0], others[1], b, *others[2:5]], others[:6]])  # (3 positions, k=6)
    p = np.array([[0.5, 0.2, 0.1, 0.05, 0.05, 0.05], [0.4, 0.3, 0.2, 0.04, 0.03, 0.01], [0.6] + [0.05] * 5])
    row = CachedRow("x", "task", "eval", np.array(ids), np.array([False] * (len(ids) - 3) + [True] * 3), top,
                    np.log(p).astype(np.float16))
    view = example_view(row, tokenizer)
    ranks = [(q["target"]["id"], q["target"]["rank"]) for q in view["positions"]]
    assert ranks == [(a, 1), (b, 3), (c, None)]
    assert [q["target"]["p"] for q in view["positions"][:2]] == pytest.approx([0.5, 0.2], rel=1e-3)
    assert view["positions"][2]["target"]["p"] is None
    assert [q["residual"] for q in view["positions"]] == pytest.approx([0.05, 0.02, 0.15], abs=1e-3)
    assert [len(q["top"]) for q in view["positions"]] == [5, 5, 5]
    assert view["prompt"] + view["response"] == tokenizer.decode(ids)
