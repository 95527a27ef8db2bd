"""evaluate, sweep, make-rehearsal, generate and merge on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from pipeline.cache.read import open_cache
from pipeline.cache.write import build_cache
from pipeline.cli import main
from pipeline.config import CacheConfig, EvalConfig, RehearsalConfig, SweepConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.evaluate import answer_text, evaluate, same_answer, split_prompt
from pipeline.inputs import read_jsonl
from pipeline.rehearsal import make_rehearsal
from pipeline.sweep import plan_runs, sweep
from pipeline.train import train
from tests.conftest import GENERAL_ROWS, TASK_ROWS, write_jsonl

QUIET = {"log": lambda *_: None}


# Held-out general prompts: none of them is a rehearsal training prompt (GENERAL_ROWS), as evaluate requires.
GENERAL_EVAL_ROWS = [
    {"id": "g0", "instruction": "What is the capital of Italy?", "output": "Rome is the capital of Italy."},
    {"id": "g1", "instruction": "Write a short poem about the fox.", "output": "The quick brown fox jumps."},
    {"id": "g2", "messages": [{"role": "user", "content": "患者の治療を要約してください。"},
                              {"role": "assistant", "content": "患者は高血圧の治療中です。"}]},
    {"id": "g3", "input": "def sub(a, b):", "output": "    return a - b"},
]


def build_eval_cache(d: Path, model_dir: Path, general_eval: list[dict]) -> Path:
    rows = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    task = write_jsonl(d / "task.jsonl", rows)
    task_eval = write_jsonl(d / "task_eval.jsonl", [{**r, "id": f"e{i}"} for i, r in enumerate(rows[:4])])
    general = write_jsonl(d / "general.jsonl", GENERAL_ROWS)
    out = d / "cache"
    build_cache(CacheConfig(model=str(model_dir), out=str(out), task_train=str(task), task_eval=str(task_eval),
                            rehearsal_train=str(general),
                            rehearsal_eval=str(write_jsonl(d / "general_eval.jsonl", general_eval)), top_k=8,
                            max_length=256), **QUIET)
    return out


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory, tiny_model_dir) -> Path:
    return build_eval_cache(tmp_path_factory.mktemp("eval-cache"), tiny_model_dir, GENERAL_EVAL_ROWS)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_dir, eval_cache) -> Path:
    """A few plain-SFT steps at a high learning rate: an adapter that clearly moved the model."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(out), max_steps=10, batch_size=4,
                      lr=1e-2, warmup_steps=1, kd_lambda=0.0), **QUIET)
    return out / "adapter"


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


def test_sweep_reuses_cache_resumes_and_reports(tiny_model_dir, eval_cache, tmp_path, monkeypatch):
    import pipeline.cache.write
    import pipeline.sweep
    import pipeline.teacher

    def no_teacher(*a, **kw):
        raise AssertionError("the sweep must not run the teacher")

    monkeypatch.setattr(pipeline.cache.write, "teacher_topk", no_teacher)
    monkeypatch.setattr(pipeline.teacher, "teacher_topk", no_teacher)
    monkeypatch.setattr(pipeline.cache.write, "build_cache", no_teacher)
    manifest_before = (eval_cache / "manifest.json").read_bytes()
    cfg = SweepConfig(model=str(tiny_model_dir), cache=str(eval_cache), out=str(tmp_path / "s"), lambdas=[0.0, 1.0],
                      runs=[{"name": "plain-qlora", "kd_lambda": 0, "rehearsal_ratio": 0}])
    fixed = {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 2}
    eval_cfg = EvalConfig(model=str(tiny_model_dir), cache=str(eval_cache), max_new_tokens=16)
    rows = sweep(cfg, fixed, eval_cfg, command="test", **QUIET)
    assert [r["name"] for r in rows] == ["base", "kd_lambda=0", "kd_lambda=1", "plain-qlora"]
    assert (eval_cache / "manifest.json").read_bytes() == manifest_before
    report = (tmp_path / "s" / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and "run |" not in line]
    assert [line.split("|")[1].strip() for line in table] == ["base", "kd_lambda=0", "kd_lambda=1", "plain-qlora"]
    assert (tmp_path / "s" / "tradeoff.png").stat().st_size > 1000
    assert rows[3]["rehearsal_ratio"] == 0.0 and rows[1]["kd_lambda"] == 0.0
    # The recommendation names a trained run, and its adapter is handed over ready for generate.
    rec = json.loads((tmp_path / "s" / "recommendation.json").read_text())
    assert rec["name"] in ("kd_lambda=0", "kd_lambda=1", "plain-qlora") and report.split("\n\n")[1].startswith(
        f"**Recommended: `{rec['name']}`**")
    recommended = tmp_path / "s" / "recommended" / "adapter"
    assert recommended.resolve() == (tmp_path / "s" / rec["name"] / "adapter").resolve()
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "--adapter", str(recommended),
                                       "--prompt", "Hello", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output

    # Interrupted sweep: one run lost its evaluation, another its whole directory. The rest is kept.
    (tmp_path / "s" / "kd_lambda=1" / "eval.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "s" / "plain-qlora")
    trained = []
    real_train = pipeline.sweep.train
    monkeypatch.setattr(pipeline.sweep, "train",
                        lambda c, **kw: trained.append(Path(c.out).name) or real_train(c, **kw))
    rows2 = sweep(cfg, fixed, eval_cfg, command="test", **QUIET)
    assert trained == ["plain-qlora"]
    assert rows2[1]["eval"] == rows[1]["eval"]

    # The same sweep directory with other fixed settings is refused, naming the field and both values.
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError) as refused:
        sweep(cfg, {**fixed, "lr": 1e-3}, eval_cfg, command="test", **QUIET)
    assert str(refused.value) == (f"{tmp_path / 's' / 'kd_lambda=0'}: trained with other settings: lr was 0.003, now "
                                  "0.001; use another sweep --out or delete that run")

    # ... but settings that only change what a run reports (curves, logging, checkpoints) keep every run, and so
    # does the same cache under another path (a symlink here: moved, or relative against absolute).
    trained.clear()
    (tmp_path / "link").symlink_to(eval_cache)
    again = sweep(dataclasses.replace(cfg, cache=str(tmp_path / "link")),
                  {**fixed, "log_every": 1, "eval_every": 3, "eval_limit": 1, "save_every": 2}, eval_cfg,
                  command="test", **QUIET)
    assert trained == [] and [r["eval"] for r in again] == [r["eval"] for r in rows2]
    # A cache with other content under the same path is refused (the run records the fingerprint it trained on).
    run_yaml = tmp_path / "s" / "kd_lambda=1" / "run.yaml"
    doc = yaml.safe_load(run_yaml.read_text())
    doc["cache"]["fingerprint"] = "0" * 64
    run_yaml.write_text(yaml.safe_dump(doc))
    with pytest.raises(PipelineError, match=r"kd_lambda=1: trained with another cache \(its shards differ from "):
        sweep(cfg, fixed, eval_cfg, command="test", **QUIET)


def test_plan_runs_grid_and_errors():
    runs = plan_runs(SweepConfig(cache="c", out="o", lambdas=[0.0, 0.5], grid=["lora_r=4,8"]))
    assert [r.name for r in runs] == ["kd_lambda=0,lora_r=4", "kd_lambda=0,lora_r=8", "kd_lambda=0.5,lora_r=4",
                                      "kd_lambda=0.5,lora_r=8"]
    assert runs[1].overrides == {"kd_lambda": 0.0, "lora_r": 8}
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="not a train setting"):
        plan_runs(SweepConfig(cache="c", out="o", grid=["lora_rank=4"]))
    with pytest.raises(ConfigError, match="expected int"):
        plan_runs(SweepConfig(cache="c", out="o", grid=["lora_r=four"]))


def test_make_rehearsal_output_is_valid_input_and_resumes(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": f"p{i}", "instruction": q} for i, q in enumerate(["What is the capital of France?", "Write a poem.",
                                                                  "def add(a, b):", "医療文書を要約してください。",
                                                                  "Say hi.", "Count to three."])] + [
        {"id": "m1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}])
    full = tmp_path / "full.jsonl"
    summary = make_rehearsal(RehearsalConfig(model=str(tiny_model_dir), prompts=str(prompts), out=str(full),
                                             max_new_tokens=12, batch_size=2), **QUIET)
    assert summary.answered_now + summary.empty == 7
    examples, _ = read_jsonl(full, role="rehearsal")  # valid training input
    assert {e.id for e in examples} <= {f"p{i}" for i in range(6)} | {"m1"}
    by_id = {json.loads(line)["id"]: json.loads(line) for line in full.read_text().splitlines()}
    if "m1" in by_id:
        assert by_id["m1"]["messages"][-1]["role"] == "assistant"

    # Killed after the first batch, then rerun: same answers as the uninterrupted run, none twice.
    out = tmp_path / "resumed.jsonl"
    cmd = [sys.executable, "-m", "pipeline", "make-rehearsal", "--model", str(tiny_model_dir), "--prompts",
           str(prompts), "--out", str(out), "--max-new-tokens", "12", "--batch-size", "2"]
    died = subprocess.run(cmd, env={**os.environ, "PIPELINE_CRASH_AT": "rehearsal_batch_written:1"},
                          capture_output=True, text=True)
    assert died.returncode == -9
    with open(out.with_name(out.name + ".partial"), "a") as f:  # answered batches go there until the end
        f.write('{"id": "p9", "instruc')  # a torn line, as a crash mid-write would leave
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["id"] for r in resumed}) == len(resumed)
    assert {r["id"]: r for r in resumed} == by_id
    assert out.read_bytes() == full.read_bytes()  # in the prompts' order, as the uninterrupted run wrote it


def test_generate_cli(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "--prompt", "Hello",
                                       "--prompt", "What is the capital of France?", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["prompt"] for r in lines] == ["Hello", "What is the capital of France?"]
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "no prompt" in result.output


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
