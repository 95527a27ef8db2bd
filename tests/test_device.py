"""pipeline/device.py: the dtype of the unquantised weights on each device, and an attention implementation that
cannot run refused in one line."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.device import weights_dtype
from tests.helpers import TASK_ONLY

CPU = torch.device("cpu")


def test_weights_dtype_is_the_compute_dtype_on_cuda_and_fp32_on_cpu():
    cuda = torch.device("cuda")  # (a device object only: no GPU needed)
    assert weights_dtype("bf16", cuda) == torch.bfloat16 and weights_dtype("fp32", cuda) == torch.float32
    assert weights_dtype("bf16", CPU) == weights_dtype("fp32", CPU) == torch.float32  # [fp32 weights on cpu note]


def test_flash_attention_without_the_package_is_one_line(tiny_model_dir, corpus, tmp_path):
    # flash-attn is not installed where the tests run; where it is, CPU is refused instead (also in one line).
    result = CliRunner().invoke(main, ["cache-teacher", *TASK_ONLY, "--model", str(tiny_model_dir), "--task-train",
                                       str(corpus["task_train"]), "--out", str(tmp_path / "c"), "--attn",
                                       "flash_attention_2", "--device", "cpu"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: --attn flash_attention_2: ") and "--attn sdpa" in result.output
    assert not (tmp_path / "c").exists()  # refused before anything was written
