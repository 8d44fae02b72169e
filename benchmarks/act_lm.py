"""Weight + activation quantization of a causal LM (W8A8, W4A8, W4A4), with and without the attention MatMuls
(``act_attention``), beside the float model, on the packaged SmolLM2-135M.

One protocol for every cell: the packaged SmolLM2-135M in fp32, calibration ``--num-samples`` x ``--seq-len``
tokens drawn (seed 0) from the wiki-vital calibration split, perplexity on the first ``--eval-samples`` x
``--seq-len`` tokens of the disjoint wiki-vital evaluation split. Weights: 8-bit per channel, or 4-bit in groups of
128 (the packaged weights sit on a 4-bit grid in blocks of 32, so 4-bit g128 is the least flattering setting);
activations: static per-tensor scales fitted by MSE search (``act_scale="mse"``), asymmetric. A cell is (scheme,
method, BC); its columns: activations on the Linears' inputs only, and with ``act_attention=True``. W8A8 runs the
int8 x int8 path at evaluation; every other cell is simulated (fake-quantized activations). Every finished value is
written to the JSON at once and skipped when the script runs again (the grid can be filled in pieces). Prints the
markdown table of everything in the JSON.

    OMP_NUM_THREADS=1 nice python benchmarks/act_lm.py --schemes W8A8,W4A8,W4A4 --methods rtn,gptq --bc off,default
"""

import argparse
import json
import time

import torch
from packaged_eval import load_results, packaged_model, quantize_packaged, save_results
from transformers.utils import logging as hf_logging

from optimum_bc.calibration import set_progress_bars


SCHEMES: dict[str, dict] = {
    "W8A8": {"bits": 8, "group_size": -1, "act_bits": 8},
    "W4A8": {"bits": 4, "group_size": 128, "act_bits": 8},
    "W4A4": {"bits": 4, "group_size": 128, "act_bits": 4},
}
BC: dict[str, dict] = {"off": {"bias_compensation": False}, "default": {}}
COLUMNS: dict[str, dict] = {"linears": {}, "+attention": {"act_attention": True}}


def table(results: dict) -> str:
    """The markdown table: one row per (scheme, method, BC), perplexity per column, fp32 on top."""
    lines = ["| scheme | method | BC | " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---|" * len(COLUMNS)]
    if "fp32" in results:
        lines.append(f"| fp32 | - | - | {results['fp32']:.2f} |" + " |" * (len(COLUMNS) - 1))
    for key, cell in results["cells"].items():
        values = [f"{cell[c]['ppl']:.2f}" if c in cell else "-" for c in COLUMNS]
        lines.append(f"| {key.replace(' / ', ' | ')} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="W8A8,W4A8,W4A4")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--bc", default="off,default")
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/act_lm.json")
    args = parser.parse_args()
    set_progress_bars(False)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer, load, perplexity = packaged_model(args.seq_len, args.eval_samples)
    results = load_results(args.out)
    results["protocol"] = {
        "model": "packaged SmolLM2-135M fp32",
        "calibration": f"{args.num_samples} x {args.seq_len} wiki-vital",
        "evaluation": f"{args.eval_samples} x {args.seq_len} wiki-vital (held out)",
        "activations": "static per tensor, act_scale=mse, asymmetric",
        "threads": torch.get_num_threads(),
    }
    if "fp32" not in results:
        results["fp32"] = perplexity(load())
        save_results(args.out, results)
    print(f"fp32 perplexity {results['fp32']:.3f}", flush=True)
    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            for bc in args.bc.split(","):
                key = f"{scheme} / {method} / {bc}"
                cell = results["cells"].setdefault(key, {})
                for column in args.columns.split(","):
                    if column in cell:
                        continue
                    settings = SCHEMES[scheme] | BC[bc] | COLUMNS[column] | {"method": method}
                    model, report, seconds = quantize_packaged(
                        load, tokenizer, args.num_samples, args.seq_len, **settings
                    )
                    start = time.perf_counter()
                    cell[column] = {"ppl": perplexity(model), "quantize_s": round(seconds, 1)}
                    cell[column]["eval_s"] = round(time.perf_counter() - start, 1)
                    save_results(args.out, results)
                    print(key, column, json.dumps(cell[column]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
