"""Bias compensation, default (``bc_target="auto"``) against BC off and every manual variant, on the packaged model.

One protocol for every cell: the packaged SmolLM2-135M in fp32, calibration ``--num-samples`` x ``--seq-len`` tokens
drawn (``--seed``, default 0) from the wiki-vital calibration split, perplexity on the first ``--eval-samples`` x ``--seq-len``
tokens of the disjoint wiki-vital evaluation split. A cell is (method, format); its columns are the BC variants.
Every finished cell is written to the JSON at once and skipped when the script runs again (so the grid can be filled
in pieces, e.g. ``--methods rtn --formats mxfp4``). Prints the markdown table of everything in the JSON.

    OMP_NUM_THREADS=1 nice python benchmarks/bc_auto.py --methods rtn,gptq --formats "3-bit g128,mxfp4"
"""

import argparse
import time

import torch
from packaged_eval import load_results, packaged_model, quantize_packaged, save_results
from transformers.utils import logging as hf_logging

from optimum_bc.algorithms import get_algorithm
from optimum_bc.calibration import set_progress_bars
from optimum_bc.formats import is_mx


FORMATS: dict[str, dict] = {
    "4-bit g128": {"bits": 4, "group_size": 128},
    "3-bit g128": {"bits": 3, "group_size": 128},
    "3-bit per channel": {"bits": 3, "group_size": -1},
    "2-bit g64": {"bits": 2, "group_size": 64},
    "mxfp4": {"format": "mxfp4"},
    "mxint4": {"format": "mxint4"},
}
METHODS = ("rtn", "gptq", "comq", "erq")
# Column -> BCQuantizationConfig keywords. "auto" is the default; the others are the manual (expert) variants.
VARIANTS: dict[str, dict] = {
    "off": {"bias_compensation": False},
    "auto": {"bc_target": "auto"},
    "seq sink1": {"bc_target": "sequential", "bc_sink_tokens": 1},
    "seq sink0": {"bc_target": "sequential", "bc_sink_tokens": 0},
    "float sink1": {"bc_target": "float", "bc_sink_tokens": 1},
    "float sink0": {"bc_target": "float", "bc_sink_tokens": 0},
}
MANUAL = ("seq sink1", "seq sink0", "float sink1", "float sink0")


def format_table(results: dict) -> str:
    """Perplexity per (method, format) and variant; the last column says whether auto meets the acceptance rule."""
    cells = results["cells"]
    p = results.get("protocol", {})
    lines = [
        f"Measured by `benchmarks/bc_auto.py` on SmolLM2-135M (packaged GGUF Q4_1 dequantized to fp32), calibration "
        f"{p.get('num_samples')} x {p.get('seq_len')} wiki-vital tokens (seed {p.get('seed', 0)}), perplexity on {p.get('eval_samples')}"
        f" x {p.get('seq_len')} held-out wiki-vital tokens. fp32 perplexity: {results.get('fp32', float('nan')):.2f}.",
        "",
        "| method | format | " + " | ".join(VARIANTS) + " | auto <= off | auto within 2 % of best manual |",
        "|---|---|" + "---|" * (len(VARIANTS) + 2),
    ]
    for key, row in cells.items():
        method, fmt = key.split(" | ")
        ppl = row["ppl"]
        values = [f"{ppl[v]:.2f}" if v in ppl else "-" for v in VARIANTS]
        ok_off = ok_best = "-"
        if "auto" in ppl and "off" in ppl:
            ok_off = "yes" if ppl["auto"] <= ppl["off"] else "**no**"
        manual = [ppl[v] for v in MANUAL if v in ppl]
        if "auto" in ppl and len(manual) == len(MANUAL):
            ok_best = "yes" if ppl["auto"] <= 1.02 * min(manual) else "**no**"
        lines.append(f"| {method} | {fmt} | " + " | ".join(values) + f" | {ok_off} | {ok_best} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows (16)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration / evaluation window (512)")
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out evaluation windows (16)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, from {list(FORMATS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn (0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: leave cores to others)")
    parser.add_argument("--json", default="benchmarks/bc_auto.json")
    parser.add_argument("--table", action="store_true", help="only print the table of the JSON")
    args = parser.parse_args()
    results = load_results(args.json)
    if args.table:
        print(format_table(results))
        return
    formats, variants = args.formats.split(","), args.variants.split(",")
    for name, known in (("formats", (formats, FORMATS)), ("variants", (variants, VARIANTS))):
        unknown = [v for v in known[0] if v not in known[1]]
        if unknown:
            parser.error(f"unknown {name} {unknown}; known: {list(known[1])}")
    protocol = {"num_samples": args.num_samples, "seq_len": args.seq_len, "eval_samples": args.eval_samples}
    if args.seed:  # another draw of calibration windows is another protocol (seed 0's JSONs name none)
        protocol["seed"] = args.seed
    if results.get("protocol", protocol) != protocol:
        parser.error(f"{args.json} holds cells of another protocol {results['protocol']}; use another --json")
    results["protocol"] = protocol
    torch.set_num_threads(args.threads)
    set_progress_bars(False)
    hf_logging.disable_progress_bar()

    tokenizer, load, perplexity = packaged_model(args.seq_len, args.eval_samples)
    if "fp32" not in results:
        results["fp32"] = perplexity(load())
        save_results(args.json, results)
    print(f"fp32: {results['fp32']:.2f}", flush=True)
    for fmt in formats:
        for method in args.methods.split(","):
            if not get_algorithm(method).supports_mx and is_mx(FORMATS[fmt].get("format", "int")):
                continue
            key = f"{method} | {fmt}"
            row = results["cells"].setdefault(key, {"ppl": {}, "seconds": {}, "choices": {}})
            for variant in variants:
                if variant in row["ppl"]:
                    continue
                start = time.perf_counter()
                model, report, seconds = quantize_packaged(
                    load,
                    tokenizer,
                    args.num_samples,
                    args.seq_len,
                    method=method,
                    seed=args.seed,
                    **FORMATS[fmt],
                    **VARIANTS[variant],
                )
                row["ppl"][variant] = perplexity(model)
                row["seconds"][variant] = seconds
                choices = [block.bc_choice for block in report.blocks if block.bc_choice]
                if choices:  # the mode each block chose, in block order, and the seconds choosing took
                    row["choices"][variant] = choices
                    row.setdefault("choice_seconds", {})[variant] = sum(b.bc_choice_seconds for b in report.blocks)
                    # Per block, the score of every candidate (auto's race: each live stream's error after the block)
                    row.setdefault("scores", {})[variant] = [block.bc_scores for block in report.blocks]
                    if report.bc_summary:
                        row.setdefault("summary", {})[variant] = report.bc_summary
                save_results(args.json, results)
                print(
                    f"{key} {variant}: {row['ppl'][variant]:.2f} (quantize {seconds:.0f} s, cell "
                    f"{time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
                del model
    print(format_table(results))


if __name__ == "__main__":
    main()
