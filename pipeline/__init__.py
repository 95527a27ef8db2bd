"""pipeline: fine-tune an instruction LLM on a new task without forgetting.

QLoRA on a frozen 4-bit base, Learning-without-Forgetting distillation against a cached teacher, and
rehearsal of general data. README.md says how to use it, docs/design.md how it works.
"""

__version__ = "0.2.0"
