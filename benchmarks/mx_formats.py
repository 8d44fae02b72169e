"""Sanity-check the OCP MX weight formats on the packaged SmolLM2-135M, offline, next to the 4-bit integer grid.

Rows: {int 4-bit g128, mxfp4, mxint4} x {RTN, GPTQ} x {BC off, BC on (per channel, sequential target)}. Prints
perplexity on held-out wiki-vital text, quantization seconds and the bytes of the packed Linear buffers, all measured
in this one run, and writes them as JSON.

    OMP_NUM_THREADS=1 python benchmarks/mx_formats.py --num-samples 8 --seq-len 512 --eval-windows 4
"""

import argparse
import json
from dataclasses import asdict, dataclass

import torch
from packaged_eval import packaged_model, quantize_packaged

from optimum_bc import QuantLinear
from optimum_bc.calibration.calibrator import set_progress_bars
from optimum_bc.layers.mxlinear import MXLinear


# name -> BCQuantizationConfig keyword arguments fixing the grid
FORMATS = {
    "int4 g128": {"bits": 4, "group_size": 128},
    "mxfp4": {"format": "mxfp4"},
    "mxint4": {"format": "mxint4"},
}


@dataclass
class Row:
    format: str
    method: str
    bc: bool
    perplexity: float
    seconds: float
    linear_bytes: int


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the packed weight buffers of every quantized Linear (codes, scales, zero points, group index)."""
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear | MXLinear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--json", default="benchmarks/mx_formats.json")
    args = parser.parse_args()
    set_progress_bars(False)

    tokenizer, load, perplexity = packaged_model(args.seq_len, args.eval_windows)

    fp = load()
    rows = [Row("fp32", "-", False, perplexity(fp), 0.0, 0)]
    print(f"fp32: {rows[0].perplexity:.2f}", flush=True)
    del fp
    for name in args.formats.split(","):
        for method in args.methods.split(","):
            for bc in (False, True):
                model, _, seconds = quantize_packaged(
                    load,
                    tokenizer,
                    args.num_samples,
                    args.seq_len,
                    **FORMATS[name],
                    method=method,
                    bias_compensation=bc,
                )
                rows.append(Row(name, method, bc, perplexity(model), seconds, linear_bytes(model)))
                print(f"{name} {method}{'+BC' if bc else ''}: {rows[-1].perplexity:.2f} ({seconds:.0f} s)", flush=True)
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "rows": [asdict(r) for r in rows]}, f, indent=1)
                del model
    print(format_table(rows))


def format_table(rows: list[Row]) -> str:
    """Markdown table; the BC rows show their change against the same format and method without BC."""
    base = {(r.format, r.method): r.perplexity for r in rows if not r.bc}
    lines = [
        "| format | method | perplexity | BC vs. no BC | quantize s | packed Linear MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = f"{100 * (r.perplexity / base[(r.format, r.method)] - 1):+.1f} %" if r.bc else ""
        method = r.method.upper() + ("+BC" if r.bc else "")
        lines.append(
            f"| {r.format} | {method} | {r.perplexity:.2f} | {delta} | {r.seconds:.0f} | {r.linear_bytes / 1e6:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
