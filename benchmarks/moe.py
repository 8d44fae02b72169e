"""Packed experts vs float on Mixtral-shaped models (8 experts, top-2): expert weight bytes, prefill and decode time.

Run: ``OMP_NUM_THREADS=1 python benchmarks/moe.py [small|large ...]`` (default: both). ``small``: hidden 256,
intermediate 512; ``large``: hidden 1024, intermediate 2816 (closer to real expert shapes). Two layers, random
weights (speed and memory do not depend on them); RTN 4 bit per channel, BC on (per-expert biases through the
forward hook). Rows: float; packed (default: only the routed experts dequantized, into the shared scratch);
packed with every expert dequantized per forward (the path before routing was read); packed under
``parametrize.cached()`` (one dense copy held). Prints one line per measurement.
"""

import sys
import time
from collections.abc import Callable

import torch
from torch.nn.utils import parametrize
from transformers import MixtralConfig, MixtralForCausalLM

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.calibration.experts import packed_expert_modules
from optimum_bc.layers.experts import PackedExperts


SHAPES = {"small": (256, 512), "large": (1024, 2816)}


def _model(hidden: int, intermediate: int) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    return MixtralForCausalLM(config).eval()


def _time(fn: Callable[[], None], repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class _AllExperts:
    """Ignore the routing: every expert dequantized in each forward (the path before routed dequantization)."""

    def __enter__(self) -> None:
        self.original = PackedExperts.begin_forward
        PackedExperts.begin_forward = lambda packed, routed: self.original(packed, None)

    def __exit__(self, *exc: object) -> None:
        PackedExperts.begin_forward = self.original


@torch.no_grad()
def run(name: str) -> None:
    hidden, intermediate = SHAPES[name]
    prompt = torch.randint(3, 512, (1, 128), generator=torch.Generator().manual_seed(1))

    def prefill(model: MixtralForCausalLM) -> None:
        model(prompt)

    def decode(model: MixtralForCausalLM) -> None:
        model.generate(prompt[:, :8], attention_mask=torch.ones(1, 8), max_new_tokens=32, min_new_tokens=32)

    def measure(model: MixtralForCausalLM) -> tuple[float, float]:
        return _time(lambda: prefill(model)), _time(lambda: decode(model))

    model = _model(hidden, intermediate)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 3)
    results = {"float": measure(model)}
    calibration = list(torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(2)))
    quantize_model(model, BCQuantizationConfig(bits=4, group_size=-1, method="rtn", dataset=calibration, seq_len=64))
    packed_bytes = sum(p.weight_bytes() for p in packed_expert_modules(model).values())
    results["packed (routed experts)"] = measure(model)
    with _AllExperts():
        results["packed, every expert per forward"] = measure(model)
    with parametrize.cached():  # one dequantization per expert weight for the whole block of calls
        results["packed, parametrize.cached()"] = measure(model)
    print(f"[{name}] hidden {hidden}, intermediate {intermediate}, 8 experts, top-2, 2 layers, 1 thread")
    print(
        f"[{name}] expert weights: float32 {float_bytes / 2**20:.2f} MiB, packed {packed_bytes / 2**20:.2f} MiB "
        f"({packed_bytes / float_bytes:.3f}x)"
    )
    base_p, base_d = results["float"]
    for row, (p, d) in results.items():
        print(
            f"[{name}] {row}: prefill 128 tokens {p * 1000:.1f} ms ({p / base_p:.2f}x), "
            f"decode 32 tokens {d * 1000:.1f} ms ({d / base_d:.2f}x)"
        )


if __name__ == "__main__":
    for shape in sys.argv[1:] or list(SHAPES):
        run(shape)
