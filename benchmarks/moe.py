"""Packed experts vs float on a small Mixtral (8 experts, top-2): expert weight bytes, prefill and decode time.

Run: ``OMP_NUM_THREADS=1 python benchmarks/moe.py``. Random weights (speed and memory do not depend on them); RTN
4 bit per channel, BC on (per-expert biases through the forward hook). Prints one line per measurement.
"""

import time

import torch
from torch.nn.utils import parametrize
from transformers import MixtralConfig, MixtralForCausalLM

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.calibration.experts import packed_expert_modules


def _model() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    return MixtralForCausalLM(config).eval()


def _time(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def main() -> None:
    prompt = torch.randint(3, 512, (1, 128), generator=torch.Generator().manual_seed(1))

    def prefill(model: MixtralForCausalLM) -> None:
        model(prompt)

    def decode(model: MixtralForCausalLM) -> None:
        model.generate(prompt[:, :8], attention_mask=torch.ones(1, 8), max_new_tokens=32, min_new_tokens=32)

    model = _model()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 3)
    results = {"float": (_time(lambda: prefill(model)), _time(lambda: decode(model)))}
    calibration = list(torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(2)))
    quantize_model(model, BCQuantizationConfig(bits=4, group_size=-1, method="rtn", dataset=calibration, seq_len=64))
    packed_bytes = sum(p.weight_bytes() for p in packed_expert_modules(model).values())
    results["packed"] = (_time(lambda: prefill(model)), _time(lambda: decode(model)))
    with parametrize.cached():  # one dequantization per expert weight for the whole block of calls
        results["packed, parametrize.cached()"] = (_time(lambda: prefill(model)), _time(lambda: decode(model)))
    print(
        f"expert weights: float32 {float_bytes / 2**20:.2f} MiB, packed {packed_bytes / 2**20:.2f} MiB "
        f"({packed_bytes / float_bytes:.3f}x)"
    )
    for name, (p, d) in results.items():
        print(f"{name}: prefill 128 tokens {p * 1000:.1f} ms, decode 32 tokens {d * 1000:.1f} ms")


if __name__ == "__main__":
    main()
