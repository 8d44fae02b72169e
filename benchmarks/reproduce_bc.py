"""Reproduce the structure of the BC paper's table (arXiv 2404.01892) on the packaged SmolLM2-135M, offline.

Rows: fp32, RTN, RTN+BC, GPTQ, GPTQ+BC (BC target "float" and "sequential"), for 4-bit g128, 3-bit g128 and 3-bit
per-channel. Prints perplexity on held-out wiki-vital text, quantization seconds, model bytes and the number of extra
BC parameters, all measured in this one run; writes the table as JSON and optionally into README.md.

    python benchmarks/reproduce_bc.py --num-samples 32 --seq-len 512 --eval-windows 20 --readme docs/results.md
"""

import argparse
import json
import re
from dataclasses import asdict, dataclass

import torch
from packaged_eval import packaged_model, quantize_packaged

from optimum_bc import MXLinear, QuantLinear


GRIDS = {"4-bit g128": (4, 128), "3-bit g128": (3, 128), "3-bit per-channel": (3, -1)}
# name -> (method, bias_compensation, bc_target, bc_granularity, bc_sink_tokens)
SETTINGS = {
    "RTN": ("rtn", False, "float", "channel", 0),
    "RTN+BC (float)": ("rtn", True, "float", "channel", 0),
    "RTN+BC (sequential; all tokens)": ("rtn", True, "sequential", "channel", 0),
    "RTN+BC (sequential; sink 1)": ("rtn", True, "sequential", "channel", 1),
    "RTN+BC (position)": ("rtn", True, "float", "position", 0),
    "GPTQ": ("gptq", False, "float", "channel", 0),
    "GPTQ+BC (float)": ("gptq", True, "float", "channel", 0),
    "GPTQ+BC (sequential; all tokens)": ("gptq", True, "sequential", "channel", 0),
    "GPTQ+BC (sequential; sink 1)": ("gptq", True, "sequential", "channel", 1),
    "GPTQ+BC (position)": ("gptq", True, "float", "position", 0),
}
PAPER_OPT_125M = (
    "| OPT-125M WikiText2 (paper, for reference) | FP16 27.66 | RTN 4-bit 37.28 | GPTQ 4-bit 31.22 | GPTQ+BC 4-bit 29.90 "
    "| GPTQ 3-bit 54.68 | GPTQ+BC 3-bit 45.19 (-17 %) |"
)
START, END = "<!-- reproduce_bc:start -->", "<!-- reproduce_bc:end -->"


@dataclass
class Row:
    grid: str
    setting: str
    perplexity: float
    seconds: float
    model_bytes: int
    bc_params: int


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict (tied tensors counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def bc_parameters(model: torch.nn.Module) -> int:
    """Parameters added by BC: a bias per output channel (LLaMA Linears have none) plus the sink rows, or the
    position table."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear | MXLinear):
            total += m.position_bias.numel() if m.position_bias is not None else m.out_features
            total += m.sink_bias.numel() if m.sink_bias is not None else 0
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--grids", default=",".join(GRIDS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--json", default="benchmarks/reproduce_bc.json")
    parser.add_argument(
        "--readme", help="write the table into this Markdown file (docs/results.md) between the reproduce_bc markers"
    )
    args = parser.parse_args()

    tokenizer, load, perplexity = packaged_model(args.seq_len, args.eval_windows)

    fp = load()
    rows = [Row("-", "fp32", perplexity(fp), 0.0, model_bytes(fp), 0)]
    print(f"fp32: {rows[0].perplexity:.2f}", flush=True)
    del fp
    for grid in args.grids.split(","):
        bits, group_size = GRIDS[grid]
        for name in args.settings.split(","):
            method, bc, target, granularity, sink = SETTINGS[name]
            model, report, seconds = quantize_packaged(
                load,
                tokenizer,
                args.num_samples,
                args.seq_len,
                bits=bits,
                group_size=group_size,
                method=method,
                bias_compensation=bc,
                bc_target=target,
                bc_granularity=granularity,
                bc_sink_tokens=sink,
            )
            extra = bc_parameters(model) if bc else 0
            rows.append(Row(grid, name, perplexity(model), seconds, model_bytes(model), extra))
            print(
                f"{grid} {name}: {rows[-1].perplexity:.2f} ({seconds:.0f} s, {len(report.layers)} layers)", flush=True
            )

    table = format_table(rows, args)
    print(table)
    with open(args.json, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    if args.readme:
        text = open(args.readme).read()
        block = f"{START}\n{table}\n{END}"
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        open(args.readme, "w").write(text)


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    """Markdown table with the relative change of each BC row against its base method."""
    base = {(r.grid, r.setting): r.perplexity for r in rows}
    lines = [
        f"Measured by `benchmarks/reproduce_bc.py` on SmolLM2-135M (packaged GGUF Q4_1 dequantized to fp32), "
        f"calibration {args.num_samples} x {args.seq_len} tokens of wiki-vital (seed 0), perplexity on "
        f"{args.eval_windows} x {args.seq_len} held-out wiki-vital tokens, 2 CPU cores.",
        "",
        "| grid | setting | perplexity | vs. no BC | quantize s | model MB | extra BC params |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base.get((r.grid, r.setting.split("+")[0]))
        delta = f"{100 * (r.perplexity / ref - 1):+.1f} %" if "+BC" in r.setting and ref else ""
        lines.append(
            f"| {r.grid} | {r.setting} | {r.perplexity:.2f} | {delta} | {r.seconds:.0f} | "
            f"{r.model_bytes / 1e6:.1f} | {r.bc_params} |"
        )
    lines += ["", PAPER_OPT_125M]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
