"""CPU inference of packed models, side by side in one run: fp32 dense vs the default path vs the reference path.

For a LLaMA-shaped block (hidden 4096, intermediate 11008, 32 heads, 8 KV heads, ``--layers`` decoder layers, small
vocabulary so the block dominates) quantized with RTN at 4-bit g128, 3-bit g128 and 8-bit per-channel (no bias
compensation: no calibration data needed), and optionally the packaged SmolLM2-135M (real weights), every row
reports, for float32 activations (the dtype users load):

* decode ms/token: batch-1 single-token forwards with a KV cache after a 32-token prompt;
* prefill ms: one ``1 x --prefill`` forward without cache;
* weights x fp32: bytes held by the decoder layers' Linear weights on that path (packed buffers + kernel forms or
  dense caches, plus the float norms) over the fp32 layers' bytes (``kernels.runtime_bytes``);
* logit error: ``max |logits - reference logits| / max |reference logits|`` on the 32-token prompt (below
  ``dense_min_tokens``: the packed kernels) and on the prefill (the dequant path), top-1 agreement with the
  reference path on the prefill (the cost of the default path's bf16 compute), and top-1 agreement with fp32.

``default`` is ``kernels`` backend ``"auto"`` (bf16 packed kernels for decode, per-call dequantization to bf16 for
prefill, no dense cache); ``reference`` is ``use_backend("reference")`` (exact dequantize-once dense cache).

The CPU is shared with other jobs, so the variants are timed interleaved (one prefill and ``--decode`` steps of
every variant per round, ``--repeats`` rounds) and each cell is the median over rounds of the per-round median.

    python benchmarks/inference.py                      # block: ~10 min on 2 busy cores
    python benchmarks/inference.py --models block,packaged --repeats 3
"""

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.layers import kernels


TEXT = (
    "The history of the river valley begins with the first farmers who settled along its banks. Over the centuries "
    "the towns grew, bridges were built, and trade moved goods from the mountains to the sea. Today the valley is "
    "known for its orchards, its old stone churches and a railway that follows the water for most of its length. "
)
PROMPT = 32
# (label, bits, group_size)
SCHEMES = {"4": ("4-bit g128", 4, 128), "3": ("3-bit g128", 3, 128), "8": ("8-bit per-channel", 8, -1)}


@dataclass
class Variant:
    """One model on one path, with the timings collected over the rounds."""

    label: str
    model: torch.nn.Module
    backend: str | None  # None: a float model (no packed layers)
    weight_bytes: int = 0
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    logits: torch.Tensor | None = None
    prompt_logits: torch.Tensor | None = None
    paths: str = "-"


def _backend(variant: Variant):
    return kernels.use_backend(variant.backend or "auto")


@torch.no_grad()
def _prefill(variant: Variant, ids: torch.Tensor) -> float:
    with _backend(variant):
        start = time.perf_counter()
        logits = variant.model(ids, use_cache=False).logits
        elapsed = time.perf_counter() - start
    variant.logits = logits[0].float()
    return elapsed


@torch.no_grad()
def _decode(variant: Variant, ids: torch.Tensor, steps: int) -> float:
    """Median seconds of one cached single-token step (after the ``PROMPT``-token prompt)."""
    with _backend(variant):
        out = variant.model(ids[:, :PROMPT], use_cache=True)
        variant.prompt_logits = out.logits[0].float()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = variant.model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def _drop_caches(model: torch.nn.Module) -> None:
    model.apply(lambda m: m.reset_cache() if hasattr(m, "reset_cache") else None)


def _layer_bytes(variant: Variant, ids: torch.Tensor) -> int:
    """Bytes of the decoder layers after a decode step and a prefill on this variant's path only."""
    _drop_caches(variant.model)
    _decode(variant, ids, 1)
    _prefill(variant, ids)
    return kernels.runtime_bytes(variant.model.model.layers)


def _quantized(float_model: torch.nn.Module, bits: int, group_size: int) -> torch.nn.Module:
    model = copy.deepcopy(float_model)
    start = time.perf_counter()
    cfg = BCQuantizationConfig(bits=bits, group_size=group_size, method="rtn", bias_compensation=False)
    quantize_model(model, cfg)
    print(f"  quantized {bits}-bit g{group_size} in {time.perf_counter() - start:.1f} s", flush=True)
    return model


def run_model(name: str, float_model: torch.nn.Module, ids: torch.Tensor, schemes: list[str], args) -> None:
    params = sum(p.numel() for p in float_model.model.layers.parameters())
    print(f"\n{name}: decoder layers {params / 1e6:.1f} M parameters, prefill {ids.shape[1]} tokens", flush=True)
    variants = [Variant("fp32 dense", float_model, None)]
    for key in schemes:
        label, bits, group_size = SCHEMES[key]
        model = _quantized(float_model, bits, group_size)
        variants.append(Variant(f"{label}, default", model, "auto"))
        variants.append(Variant(f"{label}, reference", model, "reference"))
    for variant in variants:  # memory on each path alone, then both paths' derived tensors stay built
        variant.weight_bytes = _layer_bytes(variant, ids)
        if variant.backend is not None:
            counts = kernels.paths(variant.model.model.layers, torch.float32) if variant.backend == "auto" else {}
            variant.paths = ", ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "reference"
    for variant in variants:  # warm-up: rebuild the kernel forms next to the reference caches, without timing
        _prefill(variant, ids)
        _decode(variant, ids, 1)
    for round_index in range(args.repeats):
        for variant in variants:
            variant.prefill_s.append(_prefill(variant, ids))
            variant.decode_s.append(_decode(variant, ids, args.decode))
        print(f"  round {round_index + 1}/{args.repeats} done", flush=True)
    print_table(name, variants)
    for variant in variants:
        _drop_caches(variant.model)


def print_table(name: str, variants: list[Variant]) -> None:
    base = variants[0]
    base_decode, base_prefill = statistics.median(base.decode_s), statistics.median(base.prefill_s)
    references = {v.model: v for v in variants if v.backend == "reference"}
    print(f"\n{name}")
    print(
        "| variant | decode ms/token | decode speed-up vs fp32 | prefill ms | prefill speed-up vs fp32 "
        "| weights x fp32 | logit error vs reference (prompt / prefill) | top-1 vs reference | top-1 vs fp32 "
        "| decode paths (fp32 input) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for v in variants:
        decode, prefill = statistics.median(v.decode_s), statistics.median(v.prefill_s)
        ref = references.get(v.model)
        if ref is None or ref is v:
            error, agree_ref = "-", "-"
        else:
            errors = [
                float((mine - theirs).abs().max() / theirs.abs().max())
                for mine, theirs in ((v.prompt_logits, ref.prompt_logits), (v.logits, ref.logits))
            ]
            error = " / ".join(f"{e:.2e}" for e in errors)
            agree_ref = f"{float((v.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean()):.3f}"
        agree_fp32 = float((v.logits.argmax(-1) == base.logits.argmax(-1)).float().mean())
        print(
            f"| {v.label} | {decode * 1e3:.1f} | {base_decode / decode:.2f}x | {prefill * 1e3:.0f} "
            f"| {base_prefill / prefill:.2f}x | {v.weight_bytes / base.weight_bytes:.3f} | {error} | {agree_ref} "
            f"| {agree_fp32:.3f} | {v.paths} |"
        )


def block(args) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=args.prefill + PROMPT + args.decode + 8,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, args.vocab, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    return model, ids


def packaged(args) -> tuple[torch.nn.Module, torch.Tensor]:
    from optimum_bc.data.packaged import packaged_model_dir

    path = packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(TEXT * 12, return_tensors="pt").input_ids[:, : args.prefill]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), ids


MODELS: dict[str, tuple[str, Callable]] = {
    "block": ("LLaMA-shaped block (4096 / 11008, 8 KV heads)", block),
    "packaged": ("SmolLM2-135M (packaged)", packaged),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="block", help=f"comma list of: {', '.join(MODELS)}")
    parser.add_argument("--bits", default="4,3,8", help=f"comma list of schemes: {', '.join(SCHEMES)}")
    parser.add_argument("--prefill", type=int, default=512, help="prefill tokens (batch 1)")
    parser.add_argument("--decode", type=int, default=8, help="timed decode steps per round (batch 1)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians reported)")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the LLaMA-shaped block model")
    parser.add_argument("--vocab", type=int, default=1024, help="block model vocabulary (small: the layers dominate)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    schemes = [b for b in args.bits.split(",") if b]
    for name in models:
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; use {', '.join(MODELS)}")
    for key in schemes:
        if key not in SCHEMES:
            parser.error(f"--bits: unknown scheme {key!r}; use {', '.join(SCHEMES)}")
    if args.prefill < PROMPT or args.repeats < 1 or args.decode < 1:
        parser.error(f"--prefill must be >= {PROMPT}, --repeats and --decode >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability {capability}")
    print(f"dense_min_tokens {kernels.DENSE_MIN_TOKENS} (default: prefill >= this takes the dequant path)")
    start = time.perf_counter()
    for name in models:
        label, build = MODELS[name]
        model, ids = build(args)
        run_model(label, model, ids, schemes, args)
        del model
        gc.collect()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
