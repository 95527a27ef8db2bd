"""The architectures people fine-tune, one by one, through the CLI: tiny random models built from transformers' own
config classes (nothing downloaded), each taken through cache-teacher (4 bit), train, --resume, evaluate and merge.

Per family (README "Architectures"): the head path the losses use gives the model's own log-probabilities; the
student reproduces the cache at step 0; a resumed run ends bit-exactly where an uninterrupted one does; the base
forgets nothing and the adapter's forgetting equals a computation from the model's own forward; the merged model's
logits equal the adapter's; `all-linear` adapts the projections counted below. What does not work is refused in
one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline import forward
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.forward import forward_hidden, output_head
from pipeline.losses import head_logits
from pipeline.models import load_model
from pipeline.tiny import build_tokenizer
from tests.helpers import GENERAL_ROWS, TASK_ROWS, write_jsonl

CPU = torch.device("cpu")
DENSE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# What `all-linear` adapts in one decoder layer. MoE (transformers 5 keeps the experts as stacked 3-D parameters):
# peft adapts each expert's gate_up_proj and down_proj (`experts`, and `experts.base_layer` for the inner one) and
# the router (`gate`), besides attention.
MOE = {"q_proj", "k_proj", "v_proj", "o_proj", "experts", "experts.base_layer", "gate"}

# family: (config class, its own settings beyond the shared tiny ones, LoRA targets per layer)
FAMILIES: dict[str, tuple[str, dict, set[str]]] = {
    "llama": ("LlamaConfig", {}, DENSE),
    # Qwen2's q/k/v have a bias; its vocabulary is padded beyond the tokenizer, here past 65,536 (int32 cache ids).
    "qwen2": ("Qwen2Config", {"vocab_size": 70_000, "tie_word_embeddings": True}, DENSE),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, DENSE),  # q/k norm
    "mistral": ("MistralConfig", {"sliding_window": 8}, DENSE),
    # A cap of 2 on logits of about +-2 bites (Gemma 2's own 30 would be inert on a tiny random model).
    "gemma2": ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 2.0, "sliding_window": 8}, DENSE),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8}, DENSE),
    "phi3": ("Phi3Config", {}, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),  # fused projections
    "granite": ("GraniteConfig", {"logits_scaling": 8.0}, DENSE),  # logits / 8
    "cohere": ("CohereConfig", {"logit_scale": 0.0625}, DENSE),  # logits * 0.0625, tied
    "olmo2": ("Olmo2Config", {}, DENSE),
    "smollm3": ("SmolLM3Config", {}, DENSE),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32}, MOE),
}
ATTN = {"gemma2": "eager"}  # transformers refuses sdpa for Gemma 2 (test_gemma2_with_sdpa_is_refused_in_one_line)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def build_family(path: Path, family: str, tokenizer, **overrides) -> Path:
    """A 2-layer, hidden-64 random model of `family` and the tiny tokenizer, saved as a Hugging Face directory."""
    import transformers

    config_class, own, _ = FAMILIES.get(family, (None, {}, None))
    config_class = overrides.pop("config_class", config_class)
    settings = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
                **own, **overrides}
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # As pipeline/tiny.py: a larger-than-default init, so the distributions are far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def cli_error(*args) -> str:
    """The one `error:` line the command stopped with, the last on stderr; no traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("arch-data")
    return {
        "task_train": write_jsonl(d / "task_train.jsonl", TASK_ROWS[:4]),
        "task_eval": write_jsonl(d / "task_eval.jsonl", TASK_ROWS[4:]),
        "rehearsal_train": write_jsonl(d / "gen_train.jsonl", GENERAL_ROWS[:3]),
        "rehearsal_eval": write_jsonl(d / "gen_eval.jsonl", [
            {"id": "g0", "instruction": "What is the capital of Italy?", "output": "Rome is the capital of Italy."},
            {"id": "g1", "input": "def sub(a, b):", "output": "    return a - b"}]),
    }


def own_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log_softmax of the model's own forward, fp64: (T, V) for one row."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)


def head_path_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """The same through what the losses use: forward_hidden, then output_head applied by losses.head_logits."""
    head = output_head(model)
    with torch.no_grad():
        hidden = forward_hidden(model, ids, torch.ones_like(ids), "fp32")[0]
        return torch.log_softmax(head_logits(hidden.double(), head.weight.double(), bias=head.bias,
                                             logit_softcap=head.softcap, logit_scale=head.scale), dim=-1)


IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 200, 11, 250, 64]])


@pytest.mark.parametrize("family", FAMILIES)
def test_head_path_gives_the_models_own_logprobs(family, tokenizer, tmp_path):
    """Unquantised fp32 model: the losses' head path and the model's own forward agree to float rounding, for the
    transforms each family applies (Granite's scaling, Cohere's scale, Gemma 2's softcap, tied heads, biases)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_family(tmp_path / family, family, tokenizer),
                                                 dtype=torch.float32, attn_implementation=ATTN.get(family, "sdpa"))
    model.eval()
    own, ours = own_logprobs(model, IDS), head_path_logprobs(model, IDS)
    assert (own - ours).abs().max() < 1e-5
    # The transform matters on these models: without it the log-probs would be far off.
    head = output_head(model)
    if head.scale is not None or head.softcap is not None:
        with torch.no_grad():
            hidden = forward_hidden(model, IDS, torch.ones_like(IDS), "fp32")[0].double()
            plain = torch.log_softmax(head_logits(hidden, head.weight.double()), dim=-1)
        assert (own - plain).abs().max() > 0.05


@pytest.mark.parametrize("family,scale", [("granite", 1 / 8.0), ("cohere", 0.0625)])
def test_granite_and_cohere_scales_are_read_and_a_missing_one_is_refused(family, scale, tokenizer, tmp_path,
                                                                         monkeypatch):
    model_dir = build_family(tmp_path / family, family, tokenizer)
    model = load_model(model_dir, CPU, "fp32")  # 4 bit; load-time check passes
    assert output_head(model).scale == scale
    monkeypatch.delitem(forward.LOGIT_SCALE, family)  # a pipeline that forgot the family's scale
    with pytest.raises(PipelineError, match=rf"^model type {family}: its own forward's log-probs differ") as e:
        output_head(load_model(model_dir, CPU, "fp32"))
    assert "\n" not in str(e.value)


def test_an_unhandled_head_is_refused_in_one_line(tokenizer, tmp_path, data):
    """Dory's lm_head multiplies each token's logit by its own learned scale: not one of the handled forms. The
    load-time check against the model's own forward refuses it (trained: scales away from 1), naming the type."""
    from transformers import AutoModelForCausalLM

    model_dir = build_family(tmp_path / "dory", "dory", tokenizer, config_class="DoryConfig")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.logit_scale.uniform_(0.0, 0.05)  # scale * factor (1 / 0.0177): 0 to 2.8 per token
    model.save_pretrained(model_dir)
    out = cli_error("cache-teacher", "--model", model_dir, "--task-train", data["task_train"], "--rehearsal-train",
                    data["rehearsal_train"], "--out", tmp_path / "cache")
    assert "model type dory: its own forward's log-probs differ" in out and "not one of the handled forms" in out


def test_gemma2_with_sdpa_is_refused_in_one_line(tokenizer, tmp_path, data):
    model_dir = build_family(tmp_path / "gemma2", "gemma2", tokenizer)
    out = cli_error("cache-teacher", "--model", model_dir, "--task-train", data["task_train"], "--out",
                    tmp_path / "cache", "--rehearsal-train", data["rehearsal_train"], "--attn", "sdpa")
    assert out.startswith("error: --attn sdpa: Gemma2ForCausalLM does not support") and "--attn eager" in out


def naive_forgetting_kl(model_dir: Path, adapter: Path, cache: Path, precision: str, attn: str) -> float:
    """Mean full-vocabulary KL(base || tuned) on the held-out general rows from the models' OWN forwards (the 4-bit
    base and a separately loaded base + adapter), each row alone, fp64."""
    from peft import PeftModel

    from pipeline.cache.read import open_cache

    base = load_model(model_dir, CPU, precision, attn=attn)
    tuned = PeftModel.from_pretrained(load_model(model_dir, CPU, precision, attn=attn), adapter).eval()
    kls = []
    for row in open_cache(cache).iter_rows("rehearsal", "eval"):
        ids = torch.as_tensor(row.input_ids)[None]
        at = torch.as_tensor(row.loss_mask).nonzero()[:, 0] - 1
        log_p, log_q = own_logprobs(base, ids)[at], own_logprobs(tuned, ids)[at]
        kls += F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).tolist()
    return sum(kls) / len(kls)


def lora_targets(adapter: Path) -> set[str]:
    """The adapted modules of layer 0, by their name inside the layer (`self_attn.q_proj` -> `q_proj`)."""
    keys = load_file(adapter / "adapter_model.safetensors")
    names = {k.split(".layers.0.")[1].rsplit(".lora_", 1)[0] for k in keys if ".layers.0." in k and ".lora_A" in k}
    return {n.split(".", 1)[1] for n in names}  # drop self_attn. / mlp.


# fp32: the bitsandbytes CPU kernel takes 8 ms of CPU a tiny bf16 matmul against 1.5 in fp32 (the bf16 path, the
# same for every family, is what tests/test_train.py runs); fp16 once, for GPUs without bf16 ([fp16 note]).
# The default suite takes the scaled heads and the MoE through the CLI (about 10 s of CPU each, 20 s wall on two busy
# cores); the other families, the int32 ids (qwen2, 78 s there) and fp16 are marked slow (.ci/run runs them).
FAST = {"granite", "cohere", "qwen3_moe"}
MATRIX = [pytest.param(f, "fp32", marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES]
MATRIX.append(pytest.param("llama", "fp16", marks=pytest.mark.slow))


@pytest.mark.parametrize("family,precision", MATRIX)
def test_architecture_through_the_cli(family, precision, tokenizer, tmp_path, data):
    model_dir = build_family(tmp_path / "model", family, tokenizer)
    attn = ATTN.get(family, "sdpa")
    common = ["--model", model_dir, "--precision", precision, "--attn", attn]
    cache = tmp_path / "cache"
    cli("cache-teacher", *common, "--task-train", data["task_train"], "--task-eval", data["task_eval"],
        "--rehearsal-train", data["rehearsal_train"], "--rehearsal-eval", data["rehearsal_eval"], "--out", cache,
        "--top-k", 8, "--max-length", 128)
    manifest = json.loads((cache / "manifest.json").read_text())
    vocab = FAMILIES[family][1].get("vocab_size", len(tokenizer))
    assert manifest["storage"]["token_ids"] == ("int32" if vocab > 65_536 else "uint16")
    resolved = manifest["precision"]

    # train: 3 steps, a checkpoint at 2; then a copy of that checkpoint resumed to 3 steps.
    train = ["train", *common, "--cache", cache, "--max-steps", 3, "--batch-size", 4, "--lr", "1e-2",
             "--warmup-steps", 1, "--log-every", 1, "--save-every", 2]
    if FAMILIES[family][2] == MOE:  # peft adapts the experts only without dropout
        assert "pass --lora-dropout 0" in cli_error(*train, "--out", tmp_path / "refused")
        train += ["--lora-dropout", 0]
    summary = json.loads(cli(*train, "--out", tmp_path / "full"))
    assert summary["step0_kl"] < 1e-4  # the student (LoRA B = 0) reproduces the cache through the same head path
    adapter = tmp_path / "full" / "adapter"
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    shutil.copy(tmp_path / "full" / "run.yaml", resumed / "run.yaml")
    cli(*train, "--out", resumed, "--resume")
    a = load_file(adapter / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lora_targets(adapter) == FAMILIES[family][2]

    # evaluate: the base forgets nothing; the adapter's forgetting is the one its own forward gives.
    base = json.loads(cli("evaluate", *common, "--cache", cache, "--task-score", "none"))["forgetting"]
    assert base["kl"] == 0.0 and base["top1_agreement"] == 1.0 and base["kl_topk"] < 1e-3
    tuned = json.loads(cli("evaluate", *common, "--cache", cache, "--adapter", adapter, "--task-score", "none"))
    naive = naive_forgetting_kl(model_dir, adapter, cache, resolved, attn)
    assert naive > 1e-5 and tuned["forgetting"]["kl"] == pytest.approx(naive, rel=1e-3, abs=1e-6)

    # merge: the merged model's logits are the adapter's.
    if precision == "fp16":
        return  # merge does not depend on the training precision
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cli("merge", "--model", model_dir, "--adapter", adapter, "--out", tmp_path / "merged")
    load = {"attn_implementation": attn}
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", **load)(input_ids=IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **load)
        unmerged = PeftModel.from_pretrained(plain, adapter).eval()(input_ids=IDS).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
