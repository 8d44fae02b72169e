"""W8A8 int8 x int8 (``torch._int_mm``) against float32 for ViT-B-sized Linears at batch 32 (32 x 197 tokens).

Times one forward of: the float ``nn.Linear``; the W8A8 ``QuantLinear`` on the int8 path (static per-tensor and
dynamic per-token activation scales, input quantization included); the same layer on the simulated path
(fake-quantized input, dense float32 weight). Median of ``--repeats`` runs after a warm-up.

    python benchmarks/int8_matmul.py --threads 1 --out benchmarks/int8_matmul.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from optimum_bc import kernels
from optimum_bc.algorithms.rtn import rtn_quantize
from optimum_bc.formats.activations import ActSpec, range_params
from optimum_bc.layers.int8_path import eligible
from optimum_bc.layers.qlinear import QuantLinear


SHAPES = {"qkv/proj 768->768": (768, 768), "fc1 768->3072": (768, 3072), "fc2 3072->768": (3072, 768)}


def timed(fn: object, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


@torch.no_grad()
def bench(d_in: int, d_out: int, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(d_in, d_out)
    x = torch.randn(32, tokens, d_in)
    qw = rtn_quantize(linear.weight.data, bits=8, group_size=-1, sym=False)
    layer = QuantLinear.from_quantized(qw.codes, qw.scales, qw.zeros, qw.g_idx, 8, -1, bias=linear.bias.data)
    row = {"fp32_s": timed(lambda: linear(x), repeats)}
    static = ActSpec(8, False, "tensor", False)
    layer.set_input_quantizer(static, *range_params(x.min(), x.max(), static))
    assert eligible(layer, x)
    row["int8_static_s"] = timed(lambda: layer(x), repeats)
    with kernels.use_backend("reference"):
        reference = layer(x)
        row["simulated_s"] = timed(lambda: layer(x), repeats)
    row["int8_vs_simulated_max_abs"] = float((layer(x) - reference).abs().max())
    layer.set_input_quantizer(ActSpec(8, False, "token", True))
    row["int8_dynamic_s"] = timed(lambda: layer(x), repeats)
    row["speedup_static"] = row["fp32_s"] / row["int8_static_s"]
    row["speedup_dynamic"] = row["fp32_s"] / row["int8_dynamic_s"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tokens", type=int, default=197, help="tokens per image (ViT-B/16 at 224 px: 197)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": 32, "tokens": args.tokens}
    for name, (d_in, d_out) in SHAPES.items():
        result[name] = bench(d_in, d_out, args.tokens, args.repeats)
        print(name, json.dumps(result[name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
