"""Data-parallel calibration: wall time and peak memory per rank for 1 and 2 processes launched by ``torchrun``.

A LLaMA-shaped random model (``--hidden``, ``--layers``) is saved once; then, for each process count, ``torchrun
--nproc-per-node N`` runs this file in worker mode, and every rank makes the user's call
``AutoModelForCausalLM.from_pretrained(folder, quantization_config=BCQuantizationConfig(...))`` (GPTQ + BC, sink
tokens) and ``save_pretrained`` (rank 0 writes). Each rank reports the wall time of the quantizing load, its peak
RSS (``ru_maxrss``) and, on CUDA, its peak GPU memory. The parent prints one row per rank, checks that the 2-process
checkpoint has the 1-process codes, and writes the rows to ``--json``.

CPU runs use gloo; ``--device cuda`` puts each rank on its own GPU (``LOCAL_RANK``) and uses NCCL.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/scaling.py [--procs 1 2] [--samples 32] [--seq-len 256]
[--hidden 512] [--layers 4] [--device cpu|cuda] [--json benchmarks/scaling.json]``
"""

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_model(folder: Path, hidden: int, layers: int) -> None:
    """A random LLaMA-shaped float model (GQA, SwiGLU width 8/3 x hidden) saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=(8 * hidden // 3 + 63) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def worker(args: argparse.Namespace) -> None:
    """One rank: the quantizing ``from_pretrained`` call and the save; one JSON line per rank to ``args.out``."""
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_bc  # noqa: F401 - registers quant_method="bc"
    from optimum_bc import BCQuantizationConfig, distributed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_map = {"": f"cuda:{local_rank}"} if args.device == "cuda" else {"": "cpu"}
    ids = torch.randint(0, 2048, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    config = BCQuantizationConfig(
        method="gptq",
        bits=4,
        group_size=128,
        dataset=ids,
        num_samples=args.samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config, device_map=device_map)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(args.save)
    save_s = time.perf_counter() - start
    row = {
        "procs": distributed.world(),
        "batch_size": args.batch_size,
        "rank": distributed.rank(),
        "windows_on_rank": len(distributed.shard(range(args.samples), args.batch_size)),
        "quantize_s": round(quantize_s, 2),
        "save_s": round(save_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device == "cuda" else None,
        "calibration_tokens": model.quantization_report.calibration_tokens,
        "gptq_loss_sum": round(sum(r.loss for r in model.quantization_report.layers), 4),
        "mse_after_bc_mean": sum(r.mse_after for r in model.quantization_report.layers)
        / len(model.quantization_report.layers),
    }
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare(a: Path, b: Path) -> dict[str, float]:
    """How far two saved checkpoints are apart: the share of differing packed code words (``qweight``, 8 codes per
    int32 word at 4 bits) and the largest difference of the float tensors."""
    from safetensors.torch import load_file

    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    words = [k for k in sa if k.endswith("qweight")]
    differing = sum(int((sa[k] != sb[k]).sum()) for k in words)
    return {
        "qweight_words_differing": differing / sum(sa[k].numel() for k in words),
        "max_float_diff": max(
            float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].is_floating_point()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--control-batch-size",
        type=int,
        default=2,
        help="also run one process with this batch size: the checkpoint difference that another summation order "
        "causes without any data parallelism (0: skip)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", default=None, help="write the rows and settings here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torchrun = Path(sys.executable).with_name("torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "float", args.hidden, args.layers)
        rows = []
        runs = [(procs, 1) for procs in args.procs] + (
            [(1, args.control_batch_size)] if args.control_batch_size else []
        )
        for procs, batch_size in runs:
            out, save = root / f"rows{procs}_{batch_size}.jsonl", root / f"q{procs}_{batch_size}"
            command = [
                str(torchrun),
                f"--nproc-per-node={procs}",
                f"--master-port={free_port()}",
                __file__,
                "--worker",
                f"--model={root / 'float'}",
                f"--save={save}",
                f"--out={out}",
                f"--samples={args.samples}",
                f"--seq-len={args.seq_len}",
                f"--device={args.device}",
                f"--batch-size={batch_size}",
            ]
            start = time.perf_counter()
            subprocess.run(command, check=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
            launch_s = time.perf_counter() - start
            ranks = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["rank"])
            rows += [r | {"launch_s": round(launch_s, 2)} for r in ranks]
        equal = {}
        base = root / f"q{runs[0][0]}_1"
        for procs, batch_size in runs[1:]:
            name = f"{procs} procs batch {batch_size} vs {runs[0][0]} proc batch 1"
            equal[name] = compare(base, root / f"q{procs}_{batch_size}")
    header = (
        f"{'procs':>5} {'batch':>5} {'rank':>4} {'windows':>7} {'quantize s':>10} {'save s':>7} {'peak RSS MiB':>12} "
        f"{'GPTQ loss':>10} {'mse after BC':>12}"
    )
    print(header + (f" {'peak GPU MiB':>12}" if args.device == "cuda" else ""))
    for r in rows:
        line = (
            f"{r['procs']:>5} {r['batch_size']:>5} {r['rank']:>4} {r['windows_on_rank']:>7} {r['quantize_s']:>10.2f} {r['save_s']:>7.2f} "
            f"{r['peak_rss_mib']:>12.1f} {r['gptq_loss_sum']:>10.4g} {r['mse_after_bc_mean']:>12.4g}"
        )
        print(line + (f" {r['peak_gpu_mib']:>12.1f}" if args.device == "cuda" else ""))
    print("checkpoints:", json.dumps(equal))
    if args.json:
        hidden = ("worker", "model", "save", "out", "json", "batch_size")
        settings = {k: v for k, v in vars(args).items() if k not in hidden}
        machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()}
        result = {"settings": settings, "machine": machine, "rows": rows, "checkpoints": equal}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
