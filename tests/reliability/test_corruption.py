"""A damaged cache, or one made with other settings, is refused by `pipeline train`
with one line naming the file (or the field and both values), before anything is written; the way out the
message gives then works.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cache.schema import MANIFEST
from pipeline.model_source import load_tokenizer, model_fingerprint, tokenizer_fingerprint
from pipeline.tiny import build_tiny_model_dir
from tests.helpers import assert_one_line_error, invoke
from tests.reliability.util import assert_same_cache

# A fault damages a copy of the reference cache and returns (the file the error must name, what else the error
# says, how to repair: "rerun" the same cache-teacher command, or "remove" the named file).
Fault = Callable[[Path], tuple[Path, list[str], str]]


def flipped_bytes(cache: Path):
    shard = cache / "shard-00002.parquet"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard, ["checksum differs from the manifest", "rerun cache-teacher"], "rerun"


def truncated_shard(cache: Path):
    shard = cache / "shard-00003.parquet"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    return shard, [f"size {size // 2} differs from the manifest's {size}", "rerun cache-teacher"], "rerun"


def modified_but_readable_shard(cache: Path):
    """Other values in a shard that still decodes, with its metadata intact: only the checksum can tell."""
    shard = cache / "shard-00001.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[0]["target_logprobs"][0][0] -= 1.0
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    return shard, ["differs from the manifest", "rerun cache-teacher"], "rerun"


def missing_shard(cache: Path):
    shard = cache / "shard-00004.parquet"
    shard.unlink()
    return shard, ["shard listed in the manifest is missing", "rerun cache-teacher"], "rerun"


def unparsable_manifest(cache: Path):
    manifest = cache / MANIFEST
    manifest.write_text(manifest.read_text()[:200])  # cut mid-way, as by a writer that did not rename
    return manifest, ["cache manifest is not valid JSON", "rerun the same cache-teacher command"], "rerun"


def binary_manifest(cache: Path):
    manifest = cache / MANIFEST
    manifest.write_bytes(b"\xff\xfe\x00\x01 not json")
    return manifest, ["cache manifest is not valid JSON", "rerun the same cache-teacher command"], "rerun"


def manifest_not_an_object(cache: Path):
    manifest = cache / MANIFEST
    manifest.write_text("[1, 2, 3]\n")
    return manifest, ["not a cache manifest", "rerun the same cache-teacher command"], "rerun"


def manifest_shard_entry_without_checksum(cache: Path):
    manifest = cache / MANIFEST
    doc = json.loads(manifest.read_text())
    del doc["shards"][1]["sha256"]
    manifest.write_text(json.dumps(doc))
    return manifest, ["not a cache manifest (each shard needs", "sha256"], "rerun"


def missing_manifest(cache: Path):
    manifest = cache / MANIFEST
    manifest.unlink()
    return manifest, ["missing (an unfinished cache: rerun the same cache-teacher command"], "rerun"


def unlisted_shard(cache: Path):
    extra = cache / "shard-00007.parquet"
    shutil.copy(cache / "shard-00000.parquet", extra)
    return extra, ["shard not listed in the manifest", "remove it"], "remove"


CORRUPTIONS: list[Fault] = [flipped_bytes, truncated_shard, modified_but_readable_shard, missing_shard,
                            unparsable_manifest, binary_manifest, manifest_not_an_object,
                            manifest_shard_entry_without_checksum, missing_manifest, unlisted_shard]


@pytest.mark.parametrize("fault", CORRUPTIONS, ids=lambda f: f.__name__)
def test_damaged_cache_refused_by_train_then_repaired(fault, reference_cache, cache_cmd, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    named, needles, repair = fault(cache)
    run = tmp_path / "run"
    refused = invoke(["train", "--model", tiny_model_dir, "--cache", cache, "--out", run])
    assert_one_line_error(refused, f"error: {named}: ", *needles)
    assert not run.exists()  # refused before the run directory was made

    if repair == "rerun":
        rerun = invoke([*cache_cmd, "--out", cache])
        assert rerun.exit_code == 0, rerun.output
    else:
        named.unlink()
    assert_same_cache(cache, reference_cache)


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("other-models")
    # Same tokenizer and template, other weights.
    weights = build_tiny_model_dir(root / "other-weights", seed=1)
    # Same weights, another chat template: another tokenizer fingerprint (the ids of every example change).
    template = root / "other-template"
    shutil.copytree(tiny_model_dir, template)
    jinja = template / "chat_template.jinja"
    jinja.write_text("{{ 'Chat log\\n' }}" + jinja.read_text())
    return {"weights": weights, "template": template}


def test_cache_from_another_model_or_tokenizer_refused(reference_cache, other_models, tmp_path):
    manifest = json.loads((reference_cache / MANIFEST).read_text())
    cases = {
        "weights": ("teacher.fingerprint", manifest["teacher"]["fingerprint"],
                    model_fingerprint(other_models["weights"])),
        "template": ("tokenizer", manifest["tokenizer"],
                     tokenizer_fingerprint(load_tokenizer(other_models["template"]))),
    }
    for name, (field, have, want) in cases.items():
        assert have != want
        refused = invoke(["train", "--model", other_models[name], "--cache", reference_cache, "--out", tmp_path / name])
        assert_one_line_error(refused, f"{reference_cache}: {field} differs: cache has {have[:12]}…, asked for "
                                       f"{want[:12]}…")


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-length", "128", "max_length differs: cache has 96, asked for 128"),
    ("--top-k", "8", "top_k differs: cache has 4, asked for 8"),
    ("--temperature", "2", "temperature differs: cache has 1.0, asked for 2.0"),
])
def test_cache_with_other_settings_refused_by_train(flag, value, message, reference_cache, tiny_model_dir, tmp_path):
    refused = invoke(["train", "--model", tiny_model_dir, "--cache", reference_cache, "--out", tmp_path / "run",
                      flag, value])
    assert_one_line_error(refused, f"{reference_cache}: {message}", "omit the flag")


@pytest.mark.parametrize(("args", "message"), [
    (["--top-k", "8"], "top_k: cache has 4, asked for 8"),
    (["--temperature", "2"], "temperature: cache has 1.0, asked for 2.0"),
    (["--max-length", "128"], "max_length: cache has 96, asked for 128"),
])
def test_cache_teacher_rerun_with_other_settings_refused(args, message, reference_cache, cache_cmd, tmp_path):
    """Resuming into a cache made with other settings would mix two caches: refused, the cache left as it was."""
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    refused = invoke([*cache_cmd, *args, "--out", cache])
    assert_one_line_error(refused, f"{cache}: holds a cache made with other settings ({message}")
    assert_same_cache(cache, reference_cache)
