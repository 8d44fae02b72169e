"""What the first-token bias costs when a checkpoint is exported to a stock format, on the packaged SmolLM2-135M.

Stock model classes (what transformers without optimum-bc, vLLM or TGI run) have one bias per output channel; the
extra ``sink_bias`` of the first token positions (``bc_sink_tokens``, default 1) cannot be expressed there, so an
export drops it. For each method x setting this one run measures held-out perplexity of:

* BC off;
* default BC (``bc_sink_tokens=1``), as optimum-bc runs it;
* the same quantized model with its ``sink_bias`` removed: what a compressed-tensors / GPTQ export of it computes;
* the same model with each ``sink_bias`` folded into the channel bias with weight ``1 / seq_len`` (the all-token
  mean of the calibration windows: ``b + sum_i s_i * 1 / seq_len``), which a stock class can hold;
* BC with ``bc_sink_tokens=0`` (one per-channel bias over all tokens): the export-friendly setting, exported losslessly.

    python benchmarks/sink_export.py --num-samples 16 --seq-len 512 --eval-samples 16
"""

import argparse
import copy
import json

import torch
from packaged_eval import packaged_model, quantize_packaged
from transformers.utils import logging as hf_logging

from optimum_bc.calibration.calibrator import set_progress_bars


SETTINGS: dict[str, dict] = {
    "4-bit g128": {"bits": 4, "group_size": 128},
    "3-bit g128": {"bits": 3, "group_size": 128},
}
COLUMNS = (
    "BC off",
    "BC default (sink 1)",
    "BC default, sink dropped",
    "BC default, sink folded",
    "BC sink 0 (export-friendly)",
)


def drop_sink_bias(model: torch.nn.Module, fold_weight: float = 0.0) -> int:
    """Remove every packed layer's ``sink_bias``, first adding ``fold_weight`` x its sum over positions to the channel
    bias (0: plain drop); returns how many were removed."""
    count = 0
    for module in model.modules():
        sink = getattr(module, "sink_bias", None)
        if sink is not None:
            module.bias.data += (fold_weight * sink.float().sum(0)).to(module.bias.dtype)
            module.sink_bias = None
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows (16)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration / evaluation window (512)")
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out evaluation windows (16)")
    parser.add_argument("--methods", default="rtn,gptq", help="comma-separated methods (rtn,gptq)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: leave cores to others)")
    parser.add_argument("--json", default="benchmarks/sink_export.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_progress_bars(False)
    hf_logging.disable_progress_bar()

    tokenizer, load, perplexity = packaged_model(args.seq_len, args.eval_samples)
    fp32 = perplexity(load())
    print(f"fp32: {fp32:.2f}", flush=True)
    results: dict[str, dict[str, float]] = {}
    for setting, keywords in SETTINGS.items():
        for method in args.methods.split(","):
            row: dict[str, float] = {}
            common = (load, tokenizer, args.num_samples, args.seq_len)
            model, _, _ = quantize_packaged(*common, method=method, bias_compensation=False, **keywords)
            row[COLUMNS[0]] = perplexity(model)
            model, _, _ = quantize_packaged(*common, method=method, bc_sink_tokens=1, **keywords)
            row[COLUMNS[1]] = perplexity(model)
            folded = copy.deepcopy(model)
            removed = drop_sink_bias(model)
            row[COLUMNS[2]] = perplexity(model)
            drop_sink_bias(folded, fold_weight=1 / args.seq_len)
            row[COLUMNS[3]] = perplexity(folded)
            del folded
            model, _, _ = quantize_packaged(*common, method=method, bc_sink_tokens=0, **keywords)
            row[COLUMNS[4]] = perplexity(model)
            del model
            results[f"{method} {setting}"] = row
            print(f"{method} {setting} ({removed} sink biases dropped): {row}", flush=True)

    lines = [
        f"Measured by `benchmarks/sink_export.py` on SmolLM2-135M (packaged GGUF Q4_1 dequantized to fp32), "
        f"calibration {args.num_samples} x {args.seq_len} wiki-vital tokens (seed 0), perplexity on "
        f"{args.eval_samples} x {args.seq_len} held-out wiki-vital tokens. fp32 perplexity: {fp32:.2f}.",
        "",
        "| method, setting | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in COLUMNS) + " |")
    print("\n".join(lines))
    with open(args.json, "w") as f:
        json.dump({"fp32": fp32, "rows": results, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
