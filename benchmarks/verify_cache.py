"""Recompute a cache's teacher log-probs independently, with plain transformers + bitsandbytes, and compare.

Nothing of pipeline's numeric path is used for the reference: the model is loaded with
`AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double quant))`
(bitsandbytes' own defaults, including its CPU kernel choice), run one example at a time without padding,
and the full-vocabulary `log_softmax` of `.logits` is taken in fp32.

    python benchmarks/verify_cache.py runs/demo/cache --rows 60

Prints the share of positions whose top-1 id agrees, and the largest and mean differences of the top-5
log-probs and the share of them within 0.05.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache.read import open_cache
from pipeline.device import bf16_supported
from pipeline.model_source import quiet_transformers, resolve_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path)
    p.add_argument("--rows", type=int, default=60, help="rows to recompute, spread over the cache's parts")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--kernel", choices=("packed", "default"), default="packed",
                   help="CPU only. packed: the model in eval mode, where bitsandbytes repacks the 4-bit weights for "
                        "its AVX512-BF16 inference kernel; default: the model in train mode (no dropout in these "
                        "models), where bitsandbytes keeps its dequantise-and-matmul kernel, the one training uses")
    args = p.parse_args()
    quiet_transformers()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cache = open_cache(args.cache)
    model_name = cache.manifest["teacher"]["model"]
    compute = torch.bfloat16 if cache.manifest["precision"] == "bf16" and bf16_supported(torch.device("cpu")) \
        else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(model_name), dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute))
    model.train(args.kernel == "default")
    parts = [(r, s) for r in ("task", "rehearsal") for s in ("train", "eval") if cache.count(r, s)]
    per_part = max(args.rows // len(parts), 1)
    top1 = total = 0
    max_err = 0.0
    errs = []
    for role, split in parts:
        rows = list(cache.iter_rows(role, split))
        for i in np.linspace(0, len(rows) - 1, min(per_part, len(rows))).astype(int):
            row = rows[i]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor(row.input_ids[None])).logits[0].float()
            logp = torch.log_softmax(logits / cache.temperature, dim=-1)
            positions = np.flatnonzero(row.loss_mask) - 1
            ref_vals, ref_ids = logp[positions].topk(5, dim=-1)
            top1 += int((ref_ids[:, 0].numpy() == row.target_ids[:, 0]).sum())
            total += len(positions)
            diff = (ref_vals - torch.from_numpy(row.target_logprobs[:, :5].astype(np.float32))).abs()
            max_err = max(max_err, float(diff.max()))
            errs.append(diff.flatten())
    figures = {"rows": int(sum(1 for _ in errs)), "positions": total, "top1_agreement": top1 / total,
               "top5_logprob_max_abs_diff": max_err,
               "top5_logprob_mean_abs_diff": float(torch.cat(errs).mean()),
               "top5_logprob_share_within_0.05": float((torch.cat(errs) <= 0.05).float().mean()), "model": model_name,
               "compute_dtype": str(compute), "kernel": args.kernel}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
