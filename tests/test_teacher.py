"""pipeline/teacher.py: the targets --online-teacher computes at every step equal the cached ones."""

from __future__ import annotations

import json

import torch

from pipeline.cache.read import open_cache
from pipeline.cache.write import build_cache
from pipeline.config import CacheConfig, TrainConfig
from pipeline.train import setup
from tests.helpers import (
    GENERAL_ROWS,
    QUIET,
    TASK_ROWS,
    write_jsonl,
)


def test_online_teacher_targets_equal_the_cache(tiny_model_dir, tmp_path):
    from pipeline.batches import collate_rows
    from pipeline.train import online_targets

    task = write_jsonl(tmp_path / "t.jsonl", TASK_ROWS)
    general = write_jsonl(tmp_path / "g.jsonl", GENERAL_ROWS)
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "c"), task_train=str(task),
                            rehearsal_train=str(general), top_k=8, max_length=256, precision="fp32", eval_fraction=0),
                **QUIET)
    run = setup(TrainConfig(model=str(tiny_model_dir), out=str(tmp_path / "o"), online_teacher=True, top_k=8,
                            max_length=256, task_train=str(task), rehearsal_train=str(general), precision="fp32",
                            max_steps=3, batch_size=4, warmup_steps=1, kd_on="all"), **QUIET)
    cached = {r.example_id: r for part in ("task", "rehearsal") for r in open_cache(tmp_path / "c").iter_rows(
        part, "train")}
    rows = [r for g in range(len(run.rows.row_groups("task", "train")))
            for r in run.rows.read_group("task/train", g)]
    batch = collate_rows(rows, run.tokenizer.pad_token_id)
    ids, lps = online_targets(run, batch)
    want = collate_rows([cached[r.example_id] for r in rows], run.tokenizer.pad_token_id)
    assert torch.equal(ids, want.teacher_ids)
    torch.testing.assert_close(lps, want.teacher_logprobs, atol=2e-3, rtol=0)

    from pipeline.train import fit

    fit(run, **QUIET)
    metrics = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and metrics[0]["kl"] < 1e-5  # the teacher is the student with the adapter off
    assert metrics[-1]["step"] == 3 and metrics[-1]["kl"] > 0
