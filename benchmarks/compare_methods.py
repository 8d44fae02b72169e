"""Compare the weight quantizers, each with and without bias compensation, on the packaged SmolLM2-135M, offline.

For every method (rtn, gptq, comq, erq) x BC (off, on) x setting (a dict of BCQuantizationConfig keywords, e.g.
4-bit g128), quantizes a fresh copy of the model and measures, in this one run, the perplexity on held-out wiki-vital
text and the quantization seconds. Prints a markdown table, writes JSON and optionally puts the table into README.md.

    python benchmarks/compare_methods.py --num-samples 32 --seq-len 512 --eval-samples 20 --readme docs/results.md
"""

import argparse
import json
import re
from dataclasses import asdict, dataclass

import torch
from packaged_eval import packaged_model, quantize_packaged
from reproduce_bc import model_bytes
from transformers.utils import logging as hf_logging

from optimum_bc.algorithms import get_algorithm
from optimum_bc.calibration.calibrator import set_progress_bars
from optimum_bc.formats.formats import is_mx


# Setting name -> BCQuantizationConfig keywords.
SETTINGS: dict[str, dict] = {
    "4-bit g128": {"bits": 4, "group_size": 128},
    "3-bit g128": {"bits": 3, "group_size": 128},
    "mxfp4": {"format": "mxfp4"},
    "mxint4": {"format": "mxint4"},
}
METHODS = ("rtn", "gptq", "comq", "erq")
START, END = "<!-- compare_methods:start -->", "<!-- compare_methods:end -->"


@dataclass
class Row:
    setting: str
    method: str
    bias_compensation: bool
    perplexity: float
    seconds: float
    model_bytes: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows (32)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration / evaluation window (512)")
    parser.add_argument("--eval-samples", type=int, default=20, help="held-out evaluation windows (20)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {list(SETTINGS)}")
    parser.add_argument("--bc", default="off,on", help="bias compensation: off, on or off,on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: leave cores to others)")
    parser.add_argument("--json", default="benchmarks/compare_methods.json")
    parser.add_argument(
        "--readme",
        help="write the table into this Markdown file (docs/results.md) between the compare_methods markers",
    )
    args = parser.parse_args()
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {list(SETTINGS)} (add new ones to SETTINGS)")
    bc_values = [{"off": False, "on": True}[v] for v in args.bc.split(",")]
    torch.set_num_threads(args.threads)
    set_progress_bars(False)
    hf_logging.disable_progress_bar()

    tokenizer, load, perplexity = packaged_model(args.seq_len, args.eval_samples)

    fp = load()
    rows = [Row("-", "fp32", False, perplexity(fp), 0.0, model_bytes(fp))]
    print(f"fp32: {rows[0].perplexity:.2f}", flush=True)
    del fp
    for setting in settings:
        for method in args.methods.split(","):
            for bc in bc_values:
                if not get_algorithm(method).supports_mx and is_mx(SETTINGS[setting].get("format", "int")):
                    print(f"{setting} {method}: n/a ({method} has no MX support)", flush=True)
                    continue
                model, _, seconds = quantize_packaged(
                    load,
                    tokenizer,
                    args.num_samples,
                    args.seq_len,
                    method=method,
                    bias_compensation=bc,
                    **SETTINGS[setting],
                )
                rows.append(Row(setting, method, bc, perplexity(model), seconds, model_bytes(model)))
                print(
                    f"{setting} {method} BC={'on' if bc else 'off'}: {rows[-1].perplexity:.2f} ({seconds:.0f} s)",
                    flush=True,
                )
                del model

    table = format_table(rows, settings, args)
    print(table)
    with open(args.json, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    if args.readme:
        text = open(args.readme).read()
        if START not in text or END not in text:
            raise SystemExit(f"{args.readme} has no {START} ... {END} markers; add them where the table goes")
        block = f"{START}\n{table}\n{END}"
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        open(args.readme, "w").write(text)


def format_table(rows: list[Row], settings: list[str], args: argparse.Namespace) -> str:
    """One line per (method, BC), two columns (perplexity, quantize seconds) per setting."""
    cells = {(r.setting, r.method, r.bias_compensation): r for r in rows}
    header = "| method | BC | " + " | ".join(f"{s} ppl | {s} s" for s in settings) + " |"
    lines = [
        f"Measured by `benchmarks/compare_methods.py` on SmolLM2-135M (packaged GGUF Q4_1 dequantized to fp32), "
        f"calibration {args.num_samples} x {args.seq_len} tokens of wiki-vital (seed 0), perplexity on "
        f"{args.eval_samples} x {args.seq_len} held-out wiki-vital tokens, {torch.get_num_threads()} CPU thread(s). "
        f"fp32 perplexity: {rows[0].perplexity:.2f}.",
        "",
        header,
        "|---|---|" + "---|---|" * len(settings),
    ]
    for method in dict.fromkeys(r.method for r in rows[1:]):
        for bc in dict.fromkeys(r.bias_compensation for r in rows[1:]):
            values = []
            for s in settings:
                r = cells.get((s, method, bc))
                values += [f"{r.perplexity:.2f}", f"{r.seconds:.0f}"] if r else ["n/a", ""]
            lines.append(f"| {method} | {'on' if bc else 'off'} | " + " | ".join(values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
