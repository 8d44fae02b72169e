"""W8A8 int8 x int8 (``torch._int_mm``) against float32 for ViT-B-sized Linears at batch 32 (32 x 197 tokens).

Times one forward of: the float ``nn.Linear``; the W8A8 ``QuantLinear`` on the int8 path (static per-tensor and
dynamic per-token activation scales, input quantization included: real int8 arithmetic); the same layer on the
simulated path (fake-quantized float32 input, dense float32 weight: what every non-W8A8 setting such as W4A8 or
W4A4 runs). The calls are interleaved and each one's best of ``--repeats`` runs is kept (the machine is shared:
the minimum is the least disturbed run), for every thread count of ``--threads``.

    python benchmarks/int8_matmul.py --threads 1 2 --out benchmarks/int8_matmul.json
"""

import argparse
import json
import time
from pathlib import Path

import torch

from optimum_bc import kernels
from optimum_bc.algorithms.rtn import rtn_quantize
from optimum_bc.formats.activations import ActSpec, range_params
from optimum_bc.layers.int8_path import eligible
from optimum_bc.layers.qlinear import QuantLinear


SHAPES = {"qkv/proj 768->768": (768, 768), "fc1 768->3072": (768, 3072), "fc2 3072->768": (3072, 768)}
PATHS = {
    "fp32": "nn.Linear, float32",
    "int8_static": "real int8: torch._int_mm, static per-tensor input scale",
    "int8_dynamic": "real int8: torch._int_mm, dynamic per-token input scales",
    "simulated": "simulated: fake-quantized input, dense float32 weight (the path of W4A8, W4A4, W6A6)",
}


def best_times(calls: dict, repeats: int) -> dict:
    """Each call's best time over ``repeats`` interleaved rounds (after one warm-up round)."""
    best = {name: float("inf") for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def _layer(linear: torch.nn.Linear, spec: ActSpec, x: torch.Tensor) -> QuantLinear:
    qw = rtn_quantize(linear.weight.data, bits=8, group_size=-1, sym=False)
    layer = QuantLinear.from_quantized(qw.codes, qw.scales, qw.zeros, qw.g_idx, 8, -1, bias=linear.bias.data)
    layer.set_input_quantizer(spec, *((None, None) if spec.dynamic else range_params(x.min(), x.max(), spec)))
    assert eligible(layer, x)
    return layer


@torch.no_grad()
def bench(d_in: int, d_out: int, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(d_in, d_out)
    x = torch.randn(32, tokens, d_in)
    static = _layer(linear, ActSpec(8, False, "tensor", False), x)
    dynamic = _layer(linear, ActSpec(8, False, "token", True), x)
    simulated = _layer(linear, ActSpec(8, False, "tensor", False), x)
    simulated.kernel_backend = "reference"
    with kernels.use_backend("reference"):
        reference = static(x)
    row = {"int8_vs_simulated_max_abs": float((static(x) - reference).abs().max())}
    calls = {"fp32": lambda: linear(x), "int8_static": lambda: static(x), "int8_dynamic": lambda: dynamic(x)}
    calls["simulated"] = lambda: simulated(x)
    times = best_times(calls, repeats)
    row.update({f"{name}_s": seconds for name, seconds in times.items()})
    for name in ("int8_static", "int8_dynamic", "simulated"):
        row[f"speedup_{name}"] = times["fp32"] / times[name]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to run")
    parser.add_argument("--tokens", type=int, default=197, help="tokens per image (ViT-B/16 at 224 px: 197)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"torch": torch.__version__, "batch": 32, "tokens": args.tokens, "paths": PATHS}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (d_in, d_out) in SHAPES.items():
            result[f"{threads} thread(s), {name}"] = row = bench(d_in, d_out, args.tokens, args.repeats)
            print(threads, name, json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
