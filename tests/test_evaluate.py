"""`pipeline evaluate` (pipeline/evaluate.py) on the tiny model: the forgetting figures against a naive two-model
computation, exact match, and held-out general rows that were trained on refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.read import open_cache
from pipeline.config import EvalConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.evaluate import answer_text, evaluate, same_answer, split_prompt
from pipeline.train import train
from tests.helpers import (
    GENERAL_EVAL_ROWS,
    GENERAL_ROWS,
    QUIET,
    TASK_ROWS,
    build_eval_cache,
)


def naive_forgetting(model_dir: Path, adapter: Path, cache: Path, precision: str) -> dict:
    """The forgetting figures written the obvious way: the 4-bit base and base + adapter loaded SEPARATELY (plain
    peft.PeftModel), each held-out general row run alone (no padding), full (T, V) log_softmax in float64,
    F.kl_div at the response positions."""
    from peft import PeftModel

    from pipeline.models import load_model

    cpu = torch.device("cpu")
    base = load_model(model_dir, cpu, precision)
    tuned = PeftModel.from_pretrained(load_model(model_dir, cpu, precision), adapter).eval()
    kls, agree, ce, base_ce = [], 0, 0.0, 0.0
    for row in open_cache(cache).iter_rows("rehearsal", "eval"):
        ids = torch.as_tensor(row.input_ids)[None]
        with torch.no_grad():
            log_p = F.log_softmax(base(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
            log_q = F.log_softmax(tuned(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
        targets = torch.as_tensor(row.loss_mask).nonzero()[:, 0]  # response tokens, predicted one position earlier
        at, labels = targets - 1, ids[0, targets]
        kls += F.kl_div(log_q[at], log_p[at], log_target=True, reduction="none").sum(-1).tolist()
        agree += int((log_p[at].argmax(-1) == log_q[at].argmax(-1)).sum())
        ce -= log_q[at, labels].sum().item()
        base_ce -= log_p[at, labels].sum().item()
    n = len(kls)
    return {"kl": sum(kls) / n, "agree": agree, "ce": ce / n, "base_ce": base_ce / n, "tokens": n}


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_dir, eval_cache) -> Path:
    """A few plain-SFT steps at a high learning rate: an adapter that clearly moved the model."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(out), max_steps=10, batch_size=4,
                      lr=1e-2, warmup_steps=1, kd_lambda=0.0), **QUIET)
    return out / "adapter"


def test_forgetting_kl_and_agreement_equal_a_naive_two_model_computation(tiny_model_dir, eval_cache, trained_adapter,
                                                                         tmp_path):
    out = tmp_path / "eval.json"
    tuned = evaluate(EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache), adapter=str(trained_adapter),
                                out=str(out), task_score="none", batch_size=3), **QUIET)
    f = tuned["forgetting"]
    naive = naive_forgetting(tiny_model_dir, trained_adapter, eval_cache, tuned["settings"]["precision"])
    assert f["tokens"] == naive["tokens"] and f["examples"] == len(GENERAL_EVAL_ROWS)
    assert naive["kl"] > 0.05  # the adapter clearly moved the model, so matching it means something
    assert abs(f["kl"] - naive["kl"]) < 1e-5
    assert 0 < naive["agree"] < naive["tokens"]  # some positions agree and some do not
    assert f["top1_agreement"] == naive["agree"] / naive["tokens"]
    assert f["ce"] == pytest.approx(naive["ce"], abs=1e-5) and f["base_ce"] == pytest.approx(naive["base_ce"], abs=1e-5)
    # The cached k+1-bucket figure is a lower bound of the full-vocabulary one (the cache is at T = 1 here).
    assert 0 < f["kl_topk"] <= f["kl"]
    assert json.loads(out.read_text())["forgetting"] == f
    assert set(f) == {"examples", "kl", "top1_agreement", "kl_topk", "ce", "base_ce", "tokens"}


def test_base_model_forgets_nothing_by_definition(tiny_model_dir, eval_cache, trained_adapter):
    base = evaluate(EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache), max_new_tokens=24), **QUIET)
    f = base["forgetting"]
    assert f["kl"] == 0.0 and f["top1_agreement"] == 1.0  # by definition: the tuned model is the base
    assert f["kl_topk"] < 1e-3  # the cached teacher is this same 4-bit model
    naive = naive_forgetting(tiny_model_dir, trained_adapter, eval_cache, base["settings"]["precision"])
    assert f["ce"] == pytest.approx(naive["base_ce"], abs=1e-5) and f["base_ce"] == pytest.approx(naive["base_ce"],
                                                                                                  abs=1e-5)
    assert base["task"]["examples"] == 4 and 0.0 <= base["task"]["exact_match"] <= 1.0
    assert len(base["task"]["samples"]) == 4 and base["task"]["samples"][0]["reference"].startswith('{"medication"')

    tuned = evaluate(EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache), adapter=str(trained_adapter),
                                max_new_tokens=24), **QUIET)
    assert tuned["task"]["ce"] < base["task"]["ce"]  # it learned the task
    assert tuned["forgetting"]["base_ce"] == pytest.approx(f["ce"], rel=1e-5)


def test_same_answer_drops_special_tokens_and_trims_whitespace(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    ref = [*ids('{"dose": "500 mg"}'), end]
    assert answer_text(tok, ref) == '{"dose": "500 mg"}'
    assert same_answer(tok, ref, ref)
    assert same_answer(tok, [start, *ids(' \n{"dose": "500 mg"}\n '), end, end], ref)
    for altered in ('{"dose": "500mg"}', '{"dose": "500 mg"', '{"Dose": "500 mg"}', '{"dose": "250 mg"}', ""):
        assert not same_answer(tok, [*ids(altered), end], ref), altered


def test_exact_match_through_evaluate(tiny_model_dir, eval_cache, monkeypatch):
    """Generation replaced by the cached references (as new token ids, padded with whitespace and special tokens):
    1.0; the same with one character altered: 0.0."""
    from transformers import AutoTokenizer

    import pipeline.evaluate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = {tuple(p): answer_text(tok, r)
               for p, r in map(split_prompt, open_cache(eval_cache).iter_rows("task", "eval"))}
    assert len(answers) == 4 and all(a.startswith('{"medication"') for a in answers.values())

    def generate_with(edit):
        def fake(model, tokenizer, prompts, **_):
            return [[*tokenizer.encode(f" {edit(answers[tuple(p)])}\n", add_special_tokens=False), end]
                    for p in prompts]
        return fake

    cfg = EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache))
    monkeypatch.setattr(pipeline.evaluate, "generate_all", generate_with(lambda a: a))
    task = evaluate(cfg, **QUIET)["task"]
    assert task["exact_match"] == 1.0 and task["examples"] == 4
    assert all(s["prediction"] == s["reference"] for s in task["samples"])
    monkeypatch.setattr(pipeline.evaluate, "generate_all", generate_with(lambda a: a.replace(" mg", "mg")))
    assert evaluate(cfg, **QUIET)["task"]["exact_match"] == 0.0


def test_evaluate_refuses_general_rows_trained_on(tiny_model_dir, tmp_path):
    """A held-out general row whose prompt is a rehearsal training prompt (another id, another answer) is refused."""
    trained = {**GENERAL_ROWS[1], "id": "seen-poem", "output": "Another poem, never trained on."}
    cache = build_eval_cache(tmp_path, tiny_model_dir, [*GENERAL_EVAL_ROWS, trained])
    with pytest.raises(PipelineError) as e:
        evaluate(EvalConfig(model=str(tiny_model_dir), cache=str(cache), task_score="none"), **QUIET)
    message = str(e.value)
    assert "\n" not in message and str(cache) in message and "'seen-poem'" in message and "1 of 5" in message


def test_unreachable_references_by_hand():
    """Answer tokens are those before the first stop token (the end of turn, which answer_text drops); a reference
    with no stop token in a row max_length long was cut there."""
    import numpy as np

    from pipeline.cache.schema import CachedRow
    from pipeline.evaluate import unreachable_references

    eos = 99

    def row(prompt: list[int], ref: list[int]) -> CachedRow:
        ids = np.array(prompt + ref)
        mask = np.array([False] * len(prompt) + [True] * len(ref))
        return CachedRow("x", "task", "eval", ids, mask, np.zeros((len(ref), 2)), np.zeros((len(ref), 2)))

    rows = [row([1, 2], [5, 6, 7, eos, 10, 11]),  # 3 answer tokens, then the end of turn: whole, if max_length long
            row([1, 2, 3], [5, 6, 7, 8, 9]),  # no end of turn in a row of max_length 8: cut
            row([1], [5, 6, 7, 8])]  # no end of turn, but shorter than max_length: a prefix was never cut
    assert unreachable_references(rows, {eos}, max_new_tokens=3, max_length=8) == {
        "references_over_max_new_tokens": 2, "references_cut_by_max_length": 1}
    assert unreachable_references(rows, {eos}, max_new_tokens=5, max_length=9) == {
        "references_over_max_new_tokens": 0, "references_cut_by_max_length": 0}


def test_references_no_answer_can_match_are_counted_and_warned(tiny_model_dir, eval_cache, tmp_path, monkeypatch):
    import pipeline.evaluate

    monkeypatch.setattr(pipeline.evaluate, "generate_all", lambda model, tok, prompts, **_: [[1] for _ in prompts])
    said = []

    def task_of(cache: Path, max_new_tokens: int) -> dict:
        said.clear()
        cfg = EvalConfig(model=str(tiny_model_dir), cache=str(cache), max_new_tokens=max_new_tokens)
        return evaluate(cfg, log=said.append)["task"]

    task = task_of(eval_cache, 1000)
    assert (task["references_over_max_new_tokens"], task["references_cut_by_max_length"]) == (0, 0)
    assert not [line for line in said if line.startswith("warning")]
    task = task_of(eval_cache, 4)  # every reference is a JSON object of more than 4 tokens
    assert (task["references_over_max_new_tokens"], task["references_cut_by_max_length"]) == (4, 0)
    (warning,) = [line for line in said if line.startswith("warning")]
    assert "of 4 task references, 4 are longer than --max-new-tokens 4 and 0 were cut" in warning

    # A cache whose max_length leaves each held-out answer a few tokens: every reference is cut.
    rows = list(open_cache(eval_cache).iter_rows("task", "eval"))
    longest_prompt = max(len(split_prompt(r)[0]) for r in rows)
    from pipeline.cache.write import build_cache
    from pipeline.config import CacheConfig

    short = tmp_path / "short"
    files = {split: tmp_path / f"task_{split}.jsonl" for split in ("train", "eval")}
    for split, path in files.items():
        path.write_text("".join(json.dumps({**r, "id": f"{split}{i}"}) + "\n" for i, r in enumerate(TASK_ROWS[:4])))
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(short), task_train=str(files["train"]),
                            task_eval=str(files["eval"]), rehearsal_train="none", top_k=4,
                            max_length=longest_prompt + 3), **QUIET)
    task = task_of(short, 1000)
    assert task["examples"] == 4 and task["references_cut_by_max_length"] == 4
    assert task["references_over_max_new_tokens"] == 0
    (warning,) = [line for line in said if line.startswith("warning")]
    assert f"4 were cut at the cache's max_length {longest_prompt + 3}" in warning
