"""`pipeline merge` (pipeline/merge.py): the merged full-precision model computes base + adapter."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.train import train
from tests.helpers import (
    QUIET,
)


def test_merge_matches_base_plus_adapter(tiny_model_dir, eval_cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(TrainConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(tmp_path / "r"), max_steps=4,
                      batch_size=4, lr=3e-3, warmup_steps=1), **QUIET)
    result = CliRunner().invoke(main, ["merge", "--model", str(tiny_model_dir), "--adapter",
                                       str(tmp_path / "r/adapter"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 200, 11]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        unmerged = PeftModel.from_pretrained(base, tmp_path / "r/adapter").eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert (merged - plain).abs().max() > 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").exists()
