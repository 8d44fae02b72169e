"""CPU inference speed and memory of packed QuantLinear models against fp32 / bf16, side by side in one run.

Models: (a) the packaged SmolLM2-135M (real weights), (b) a LLaMA-shaped stack (hidden 4096, intermediate 11008,
32 heads, random weights, small vocabulary so the decoder layers dominate). Quantized rows use RTN, group 128, no
bias compensation (no calibration data needed). For each row:

* prefill tokens/s: one ``1 x --prefill`` forward without cache (best of ``--repeats``);
* decode tokens/s: batch-1 single-token forwards with a KV cache (``--decode`` steps after a 16-token prompt;
  1 / median step time);
* resident: bytes actually held by parameters + buffers + QuantLinear caches / kernel forms after the timed runs,
  for the whole model and for the decoder layers only (``x fp32`` compares the layers with the fp32 layers);
* disk: size of the ``save_pretrained`` folder;
* top-1: agreement of the prefill's argmax tokens with the fp32 model (a sanity check of the fast paths).

Rows ``bf16 act`` run the model in bfloat16 (default ``auto`` backend: quantized layers on the ATen int4/int8
kernels); ``fp32 act, auto`` is the default for a float32 model (exact dequantize-once cache); ``fp32 act, fast``
keeps the model in float32 with ``kernels.set_backend("fast")`` (quantized layers compute in bf16 inside). The
float32-activation rows are measured for 4-bit only unless ``--fp32-all``.

    python benchmarks/inference.py                       # default: ~5 min on 2 cores
    python benchmarks/inference.py --layers 4 --bits 4 --repeats 3 --decode 64 --models llama
"""

import argparse
import copy
import gc
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from optimum_bc import BCQuantizationConfig, kernels, quantize_model


TEXT = (
    "The history of the river valley begins with the first farmers who settled along its banks. Over the centuries "
    "the towns grew, bridges were built, and trade moved goods from the mountains to the sea. Today the valley is "
    "known for its orchards, its old stone churches and a railway that follows the water for most of its length. "
)


@dataclass
class Row:
    model: str
    variant: str
    prefill_tps: float
    decode_tps: float
    resident: int
    resident_layers: int
    disk: int
    top1: float
    paths: str


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    model(ids[:, :8], use_cache=False)  # warm-up: builds kernel forms / dense caches
    best, logits = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        logits = model(ids, use_cache=False).logits
        best = min(best, time.perf_counter() - start)
    return ids.shape[1] / best, logits[0].float()


@torch.no_grad()
def decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Batch-1 decode tokens/s from the median step time (robust to other jobs sharing the CPU)."""
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def disk_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def measure(name: str, variant: str, model, ids, prompt, args, reference_top1) -> Row:
    gc.collect()
    prefill_tps, logits = prefill(model, ids, args.repeats)
    decode_tps = decode(model, prompt, args.decode)
    top1 = logits.argmax(-1)
    agree = 1.0 if reference_top1 is None else float((top1 == reference_top1).float().mean())
    dtype = next(model.parameters()).dtype
    counts = kernels.paths(model, dtype) if kernels.get_backend() != "reference" else {}
    paths = ", ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"
    row = Row(
        name,
        variant,
        prefill_tps,
        decode_tps,
        kernels.runtime_bytes(model),
        kernels.runtime_bytes(model.model.layers),
        0 if args.no_disk else disk_bytes(model),
        agree,
        paths,
    )
    print(f"  {variant:<24} prefill {prefill_tps:8.1f} tok/s  decode {decode_tps:7.2f} tok/s  [{paths}]", flush=True)
    return row


def run_model(name: str, float_model: torch.nn.Module, ids: torch.Tensor, args) -> list[Row]:
    print(f"{name}: {sum(p.numel() for p in float_model.parameters()) / 1e6:.1f} M parameters", flush=True)
    prompt = ids[:, :16]
    rows = [measure(name, "fp32", float_model, ids, prompt, args, None)]
    _, ref_logits = prefill(float_model, ids, 0)
    reference_top1 = ref_logits.argmax(-1)
    bf16 = copy.deepcopy(float_model).to(torch.bfloat16)
    rows.append(measure(name, "bf16", bf16, ids, prompt, args, reference_top1))
    del bf16
    for bits in args.bits:
        model = copy.deepcopy(float_model)
        start = time.perf_counter()
        cfg = BCQuantizationConfig(bits=bits, group_size=args.group_size, method="rtn", bias_compensation=False)
        quantize_model(model, cfg)
        print(f"  quantized {bits}-bit g{args.group_size} in {time.perf_counter() - start:.1f} s", flush=True)
        if bits == 4 or args.fp32_all:
            kernels.set_backend("auto")  # float32 activations: exact dequantize-once cache
            rows.append(measure(name, f"{bits}-bit fp32 act, auto", model, ids, prompt, args, reference_top1))
            model.apply(lambda m: m.reset_cache() if hasattr(m, "reset_cache") else None)
            kernels.set_backend("fast")
            rows.append(measure(name, f"{bits}-bit fp32 act, fast", model, ids, prompt, args, reference_top1))
        kernels.set_backend("auto")
        model.to(torch.bfloat16)  # drops the fp32 caches / kernel forms
        rows.append(measure(name, f"{bits}-bit bf16 act", model, ids, prompt, args, reference_top1))
        del model
    return rows


def packaged(args) -> tuple[torch.nn.Module, torch.Tensor]:
    from optimum_bc.packaged import packaged_model_dir

    path = packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(TEXT * 8, return_tensors="pt").input_ids[:, : args.prefill]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), ids


def llama(args) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        max_position_embeddings=max(256, args.prefill + args.decode + 32),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, args.vocab, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    return model, ids


def human(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def print_table(rows: list[Row]) -> None:
    print()
    print(
        "| model | variant | prefill tok/s | decode tok/s | decode x fp32 | resident (all) | resident (layers) "
        "| layers x fp32 | disk | top-1 vs fp32 | quantized-layer paths |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    base = {}
    for row in rows:
        if row.variant == "fp32":
            base[row.model] = row
        ref = base[row.model]
        print(
            f"| {row.model} | {row.variant} | {row.prefill_tps:.1f} | {row.decode_tps:.2f} "
            f"| {row.decode_tps / ref.decode_tps:.2f}x | {human(row.resident)} | {human(row.resident_layers)} "
            f"| {row.resident_layers / ref.resident_layers:.3f} | {human(row.disk) if row.disk else '-'} "
            f"| {row.top1:.3f} | {row.paths} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="packaged,llama", help="comma list of: packaged, llama")
    parser.add_argument("--bits", default="2,3,4,8", help="comma list of bit widths")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=128, help="prefill tokens (batch 1)")
    parser.add_argument("--decode", type=int, default=16, help="timed decode steps (batch 1)")
    parser.add_argument("--repeats", type=int, default=1, help="timed prefill runs (best kept)")
    parser.add_argument("--layers", type=int, default=2, help="LLaMA-shaped stack: decoder layers")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument(
        "--vocab", type=int, default=1024, help="LLaMA-shaped stack vocabulary (small: layers dominate)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's choice). Use 1 on a CPU shared with other jobs: OpenMP "
        "barriers make 2-thread ops 10-100x slower when a core is taken (measured)",
    )
    parser.add_argument("--no-disk", action="store_true", help="skip the save_pretrained size measurement")
    parser.add_argument(
        "--fp32-all", action="store_true", help="fp32-activation rows (auto and fast) for every bit width, not only 4"
    )
    args = parser.parse_args()
    args.bits = [int(b) for b in args.bits.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    start = time.perf_counter()
    rows: list[Row] = []
    for name in [m for m in args.models.split(",") if m]:
        if name == "packaged":
            model, ids = packaged(args)
            label = "SmolLM2-135M"
        elif name == "llama":
            model, ids = llama(args)
            label = f"LLaMA-{args.hidden}x{args.layers}L"
        else:
            raise ValueError(f"--models: unknown model {name!r}; use packaged and/or llama")
        rows += run_model(label, model, ids, args)
        del model
        gc.collect()
    kernels.set_backend(None)
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
