"""This project's KD term against TRL's, and benchmarks/peers.py --quick end to end. Skipped without TRL.

The loss, stated for both sides (top-k = the vocabulary, so this project's residual bucket is empty and both sides
see the teacher's full distribution):

* this project (train.forward_backward): kd_lambda * T^2 * (1/N) * sum_t KL_t, KL_t = sum_v p_v (log p_v - log q_v)
  with p = softmax(teacher logits / T), q = softmax(student logits / T), N = the step's response tokens (kd_on all):
  per token, not per sequence; the T^2 is applied, the KL is forward (teacher || student).
* TRL (GKDTrainer.generalized_jsd_loss with beta = 0, what GKDTrainer.compute_loss calls): F.kl_div(log q, log p,
  log_target=True) summed over the vocabulary and over the positions whose shifted label is not -100, divided by
  their number ("batchmean" over tokens, or by num_items_in_batch, the same count in one process): per token, the
  same forward KL at T, no T^2 (and GKDTrainer.compute_loss never passes its temperature: its loss is at T = 1).

So project / (kd_lambda * T^2) == TRL, in value and in the LoRA gradients.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl", reason="TRL is not installed (pip install 'lwf-pipeline[peers]'): no peer to compare with")
from trl.experimental.gkd import GKDTrainer

from pipeline.batches import collate
from pipeline.forward import output_head, student_losses
from pipeline.inputs import read_jsonl, tokenize_example
from pipeline.model_source import load_tokenizer
from pipeline.models import attach_lora, load_model
from pipeline.teacher import teacher_topk

REPO = Path(__file__).resolve().parents[1]
KD_LAMBDA = 0.5


def load_peers():
    spec = importlib.util.spec_from_file_location("peers", REPO / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def student_and_batch(tiny_model_dir):
    """The tiny 4-bit model with a LoRA adapter moved away from zero (so student != teacher), and 3 demo notes
    tokenised as cache-teacher tokenises them."""
    tokenizer = load_tokenizer(tiny_model_dir)
    examples, _ = read_jsonl(REPO / "data/demo/task_train.jsonl")
    batch = collate([tokenize_example(tokenizer, ex, 512) for ex in examples[:3]], tokenizer.pad_token_id)
    model = load_model(tiny_model_dir, torch.device("cpu"), "fp32")
    model = attach_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear", gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, batch


def lora_grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def project_kd(model, batch, temperature: float) -> torch.Tensor:
    """The KD term of one step as train.forward_backward computes it: kd_lambda * T^2 * KL sum / N_kd (kd_on all), with
    the teacher's log-probs over the whole vocabulary (top-k = V)."""
    head = output_head(model)
    vocab = head.weight.shape[0]
    with torch.no_grad():
        ids, lps = teacher_topk(model, head, batch.input_ids, batch.attention_mask, batch.loss_mask, top_k=vocab,
                                temperature=temperature, precision="fp32", adapter_off=True)
    # teacher_topk runs in inference mode; clone() gives tensors autograd may save (as train.online_targets does).
    sums, _, _ = student_losses(model, head, batch, "fp32", teacher_ids=ids.clone(), teacher_logprobs=lps.clone(),
                                temperature=temperature, kl="forward")
    return KD_LAMBDA * temperature**2 * sums.kl / sums.n_kd_tokens


def trl_kd(model, batch, temperature: float, num_items: bool) -> torch.Tensor:
    """GKDTrainer's loss on the same tokens: its compute_loss's shift and masking, the teacher the frozen base."""
    student = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    with torch.no_grad(), model.disable_adapter():
        teacher = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.input_ids.masked_fill(~batch.loss_mask, -100)
    n = int((labels[:, 1:] != -100).sum()) if num_items else None
    return GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:], beta=0.0,
                                           temperature=temperature, num_items_in_batch=n)


@pytest.mark.parametrize(("temperature", "num_items"), [(1.0, False), (2.0, False), (1.0, True)])
def test_kd_term_equals_trl_forward_kl(student_and_batch, temperature, num_items):
    model, batch = student_and_batch
    ours = project_kd(model, batch, temperature)
    ours.backward()
    ours_grads = lora_grads(model)
    theirs = trl_kd(model, batch, temperature, num_items)
    theirs.backward()
    theirs_grads = lora_grads(model)

    scale = KD_LAMBDA * temperature**2  # the project's weight and T^2; TRL's loss has neither
    assert theirs.item() > 1e-3  # the student really differs from the teacher
    torch.testing.assert_close(ours.detach() / scale, theirs.detach().to(ours.dtype), rtol=1e-5, atol=1e-7)
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) > 0
    for name, g in ours_grads.items():
        torch.testing.assert_close(g / scale, theirs_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_same_tokens_check_refuses_a_difference():
    peers = load_peers()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    att = (ids != 0).long()
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    a = peers.seen_of(ids, att, mask)
    assert (a.tokens, a.loss_tokens) == (5, 3)
    assert peers.seen_of(ids.masked_fill(att == 0, 3), att, mask) == a  # padding ids do not count
    peers.check_same_tokens({"x": [a, a], "y": [a, a]}, "x", "y")
    for other in (peers.seen_of(ids.clone().index_fill_(1, torch.tensor([2]), 11), att, mask),  # one id
                  peers.seen_of(ids, att, mask & torch.tensor([[True, True, False, True]] * 2))):  # one loss token
        with pytest.raises(peers.NotSameTokens, match="step 2"):
            peers.check_same_tokens({"x": [a, a], "y": [a, other]}, "x", "y")
    with pytest.raises(peers.NotSameTokens, match="ran"):
        peers.check_same_tokens({"x": [a, a], "y": [a]}, "x", "y")


def test_quick_peers_benchmark(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f = json.loads(out.read_text())
    for key in ("cached_kd_vs_trl_sft", "cached_kd_vs_trl_distill", "online_kd_vs_trl_distill",
                "memory_cached_kd_vs_trl_sft", "memory_cached_kd_vs_trl_distill"):
        assert isinstance(f[key], float) and f[key] > 0, key
        assert key in proc.stdout
    for path in ("trl_sft", "trl_distill", "cached_kd", "online_kd"):
        assert f[f"step_{path}_s"] > 0 and f[f"tokens_per_s_{path}"] > 0 and f[f"peak_memory_{path}_mib"] > 0
        assert len(f[f"step_{path}_all_s"]) == f["timed_steps"]
        assert f[f"about_{path}"]["gradient_checkpointing"] is True
    # The same adapter everywhere, and the same tokens: at step 1 (LoRA B = 0, student = base) TRL's SFT loss is this
    # project's CE (its loss less a KL of ~0), and GKD's KL is ~0.
    assert len({f[f"about_{p}"]["trainable_params"] for p in ("trl_sft", "trl_distill", "cached_kd")}) == 1
    assert f["losses_trl_sft"][0] == pytest.approx(f["losses_cached_kd"][0], rel=1e-4)
    assert f["losses_trl_distill"][0] < 1e-3
