"""Dense weight of a packed layer: the whole-layer float32 formula vs ``dequantize_weight`` (blocks of rows), side by side.

For 2048 x 5504 layers (a wide ``down_proj``) with random packed buffers, every row reports, for both ways of making
the float32 dense weight: the peak bytes of tensors alive during the call per weight (result included; counted by
``tests/test_dequant_memory.py``'s ``LiveBytes`` dispatch mode, deterministic) and the best wall time of
``--repeats`` calls, interleaved. The whole-layer formula (``scale[g] * (code - zero[g])`` with float32 gathers over
the full layer) is what ``dequantize_weight`` computed before, here on codes from today's block-wise
``unpack_int32`` (the former whole-tensor int64 unpack added more: 33 bytes a weight in all, measured the same way).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/dequant_memory.py
"""

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from optimum_bc.layers.mxlinear import MXLinear
from optimum_bc.layers.qlinear import QuantLinear
from tests.test_dequant_memory import LiveBytes, packed_down_proj, reference_int, reference_mx


LAYERS: dict[str, Callable[[], torch.nn.Module]] = {
    "int4 g128": lambda: QuantLinear(5504, 2048, 4, 128),
    "int3 g128 act-order": lambda: QuantLinear(5504, 2048, 3, 128),
    "int8 per-channel": lambda: QuantLinear(5504, 2048, 8, -1),
    "int2 g32": lambda: QuantLinear(5504, 2048, 2, 32),
    "mxfp4": lambda: MXLinear(5504 + 32 - 5504 % 32, 2048, "mxfp4"),
}


def peak_per_weight(make: Callable[[], torch.Tensor]) -> float:
    """Peak bytes alive during ``make()`` per element of its result."""
    with LiveBytes() as counter:
        weight = make()
    return counter.peak / weight.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each way (best reported)")
    args = parser.parse_args()
    print("| layer | whole-layer B/weight | blocks B/weight | whole-layer ms | blocks ms | time ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, build in LAYERS.items():
        layer = packed_down_proj(build(), seed=0)
        if "act-order" in name:
            perm = torch.randperm(layer.in_features, generator=torch.Generator().manual_seed(1))
            layer.g_idx.copy_(layer.g_idx[perm])
        whole = partial(reference_int if isinstance(layer, QuantLinear) else reference_mx, layer)
        blocks = partial(layer.dequantize_weight, torch.float32)
        assert torch.equal(whole().view(torch.int32), blocks().view(torch.int32)), name
        times: dict[str, list[float]] = {"whole": [], "blocks": []}
        for _ in range(args.repeats):
            for key, fn in (("whole", whole), ("blocks", blocks)):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        t_whole, t_blocks = min(times["whole"]) * 1e3, min(times["blocks"]) * 1e3
        print(
            f"| {name} | {peak_per_weight(whole):.2f} | {peak_per_weight(blocks):.2f} | {t_whole:.0f} | "
            f"{t_blocks:.0f} | {t_whole / t_blocks:.1f}x |"
        )


if __name__ == "__main__":
    main()
