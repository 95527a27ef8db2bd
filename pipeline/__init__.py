"""pipeline: fine-tune an instruction LLM on a new task without forgetting.

QLoRA on a frozen 4-bit base, Learning-without-Forgetting distillation against a cached teacher, and
rehearsal of general data. See README.md and DESIGN.md for the contract.
"""

__version__ = "0.2.0"
