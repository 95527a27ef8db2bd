"""`pipeline generate` (pipeline/generate.py): the command, its answers in the prompts' order, and the samplers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from tests.helpers import (
    GENERATE_ARGS,
    PROMPTS,
    ids_in,
    write_jsonl,
)


def test_generate_cli(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "--prompt", "Hello",
                                       "--prompt", "What is the capital of France?", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["prompt"] for r in lines] == ["Hello", "What is the capital of France?"]
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "no prompt" in result.output


def test_generate_out_in_prompt_order(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "--prompt", "First, from the flag.",
                                       "--prompts", str(prompts), "--out", str(out), *GENERATE_ARGS])
    assert result.exit_code == 0, result.output
    assert ids_in(out) == ["prompt-1", *(p["id"] for p in PROMPTS)]


@pytest.mark.parametrize("kind", ["inverse_cdf", "multinomial"])
def test_samplers_draw_from_the_softmax(kind):
    from pipeline.generate import InverseCdfSampler, MultinomialSampler

    sampler = {"inverse_cdf": InverseCdfSampler, "multinomial": MultinomialSampler}[kind]
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, -30.0])
    for temperature in (1.0, 0.5):
        out = sampler(temperature)(None, logits.repeat(40000, 1))
        assert torch.isfinite(out).sum(-1).eq(1).all()  # exactly one finite score per row: greedy picks it
        freq = torch.bincount(out.argmax(-1), minlength=5).float() / 40000
        torch.testing.assert_close(freq, torch.softmax(logits / temperature, -1), atol=0.01, rtol=0)


def test_sampler_choice_by_device(monkeypatch):
    """Inverse-CDF on CPU ([sampling note]); torch.multinomial on CUDA. generate_batch asks sampler_for."""
    from pipeline import generate
    from pipeline.generate import InverseCdfSampler, MultinomialSampler, sampler_for

    assert type(sampler_for(torch.device("cpu"), 1.0)) is InverseCdfSampler
    assert type(sampler_for(torch.device("cuda"), 0.7)) is MultinomialSampler  # (building it needs no GPU)
    assert sampler_for(torch.device("cuda"), 0.7).temperature == 0.7

    asked: list[str] = []
    monkeypatch.setattr(generate, "sampler_for", lambda device, t: asked.append(device.type) or InverseCdfSampler(t))

    class Model:  # the smallest thing generate_batch can decode with
        generation_config = type("GenerationConfig", (), {"eos_token_id": 2})()

        def generate(self, input_ids, logits_processor, **_):
            assert len(logits_processor) == 1
            return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), 2)], dim=1)

    tokenizer = type("Tokenizer", (), {"pad_token_id": 0, "eos_token_id": 2})()
    out = generate.generate_batch(Model(), tokenizer, [[5, 6], [7]], max_new_tokens=1, temperature=1.0,
                                  device=torch.device("cpu"), precision="fp32")
    assert out == [[], []] and asked == ["cpu"]
