"""A tiny Llama-style model and byte-level BPE tokenizer, built from a config, never downloaded.

Used by the tests and by `benchmarks/run.py --quick`: 2 layers, hidden size 64, a 384-token vocabulary
trained here with `tokenizers`, and a ChatML chat template. It loads in 4 bit on CPU and backpropagates
through LoRA in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Extract the medication, dose and frequency from the note.",
    "Patient started on metformin 500 mg twice daily; BP 132/84.",
    '{"medication": "metformin", "dose": "500 mg", "frequency": "twice daily"}',
    "医療文書を日本語で要約してください。患者は高血圧の治療中です。",
    "What is the capital of France? Paris is the capital of France.",
    "Write a short poem about the sea. The sea is wide and blue.",
    "def add(a, b):\n    return a + b",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with hidden size 64 and its tokenizer, saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so the distributions are far from uniform (top-k and KL then mean something).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
