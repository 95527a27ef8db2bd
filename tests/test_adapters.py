"""pipeline/adapters.py: a saved adapter reloads with plain peft and gives the trained model's logits."""

from __future__ import annotations

import torch

from pipeline.adapters import save_adapter
from pipeline.train import forward_backward, micro_batches, optimizer_step, setup
from tests.helpers import (
    QUIET,
    cfg_for,
)


def test_adapter_reloads_with_peft_and_gives_same_logits(tiny_model_dir, tiny_cache, tmp_path):
    from peft import PeftModel

    from pipeline.models import load_model

    cfg = cfg_for(tiny_model_dir, tiny_cache, tmp_path / "r", max_steps=3)
    run = setup(cfg, **QUIET)
    for step in (1, 2, 3):
        forward_backward(run, micro_batches(run, step), measure_kl=False)
        optimizer_step(run)
    save_adapter(run.model, run.out / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 200, 11]])
    run.model.eval()
    with torch.no_grad():
        want = run.model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.device("cpu"), run.precision),
                                             run.out / "adapter")
        reloaded.eval()
        got = reloaded(input_ids=ids).logits
        base = load_model(tiny_model_dir, torch.device("cpu"), run.precision)(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert (want - base).abs().max() > 1e-4  # the adapter changed something
