"""Per-layer wall time of the weight algorithms (RTN, GPTQ, COMQ, ERQ) side by side, on synthetic Linear layers.

Each shape ``OUTxIN`` gets a float32 weight and a Gram matrix ``H = 2 XᵀX / N`` of random inputs with outlier
channels (every 50th channel 20x larger); ERQ also gets the cross term with a perturbed copy of those inputs. Every
method quantizes the same layer (4-bit, group 128, asymmetric) once; the table gives seconds, the ratio to GPTQ and
the layer error ``Σ_rows (w - q)ᵀ H (w - q) / 2`` against the float weight (ERQ targets its Aqer-corrected weight,
so its error here includes that correction). Building the statistics and measuring the error are not timed.

Seconds are the process's CPU time (``time.process_time``) and, beside it, wall time. With one thread the two agree
on an idle machine; on a shared one the wall time also counts the time other processes held the core, so the ratios
are taken from CPU time. ``--repeats`` runs every method that many times per shape, the methods taking turns (so a
change in the machine's load reaches all of them alike), and reports the median CPU time; the JSON also keeps the
best. COMQ is bound by memory traffic (gathers of rows of ``H``), GPTQ mostly by matrix products, so other processes
competing for memory bandwidth raise COMQ's ratio more than GPTQ's.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice python benchmarks/algorithm_speed.py

The default shapes are the ones the per-layer targets are stated for: ``rows = in`` and ``rows = 4 in`` at
``in = 1024``, ``rows = in`` at 4096 and 512 rows at 11008. ``--rows`` overrides the output rows of every shape (all
four methods are linear in the rows, apart from GPTQ's and ERQ's ``O(in³)`` factorisations, which do not depend on
them: fewer rows favour COMQ in the ratio to GPTQ). The large projections of 7B-class models are measured with

    PYTHONPATH=. OMP_NUM_THREADS=1 nice python benchmarks/algorithm_speed.py --shapes 11008x4096,4096x11008 \
        --methods gptq,comq --repeats 3 --json benchmarks/algorithm_speed_large.json
"""

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from statistics import median

import torch

from optimum_bc.algorithms.base import QuantizedWeight
from optimum_bc.algorithms.comq import comq_quantize
from optimum_bc.algorithms.erq import erq_quantize
from optimum_bc.algorithms.gptq import gptq_quantize
from optimum_bc.algorithms.rtn import rtn_quantize


GRID = {"bits": 4, "group_size": 128, "sym": False}
Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], QuantizedWeight]
METHODS: dict[str, Method] = {
    "rtn": lambda w, H, C: rtn_quantize(w, **GRID),
    "gptq": lambda w, H, C: gptq_quantize(w, H, **GRID),
    "comq": lambda w, H, C: comq_quantize(w, H, **GRID),
    "erq": lambda w, H, C: erq_quantize(w, H, C, **GRID),
}


def parse_shape(text: str) -> tuple[int, int]:
    """``"OUTxIN"`` -> ``(out, in)``."""
    out, _, inp = text.partition("x")
    if not (out.isdigit() and inp.isdigit()):
        raise SystemExit(f"bad shape {text!r}: write OUTxIN, e.g. 4096x11008")
    return int(out), int(inp)


def statistics(n: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = 2 XᵀX / N`` and ``C = 2 AᵀX / N`` for random inputs ``X`` with outlier channels, ``A = X + noise``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g)
    X[:, ::50] *= 20.0
    A = X + 0.05 * torch.randn(tokens, n, generator=g)
    return 2 * A.T @ A / tokens, 2 * A.T @ X / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x1024,4096x1024,4096x4096,512x11008")
    parser.add_argument("--rows", type=int, default=None, help="output rows of every shape (default: the shape's)")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens behind H")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method and shape; the median is reported")
    parser.add_argument("--json", default="benchmarks/algorithm_speed.json")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if unknown or "gptq" not in methods:
        raise SystemExit(f"--methods must include gptq and name only {sorted(METHODS)}; got {args.methods!r}")
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    torch.set_num_threads(args.threads)

    small = torch.randn(64, 256)
    H_small, C_small = statistics(256, 512, seed=1)
    for name in methods:  # first-call overheads (allocator, kernels) are not part of any timing
        METHODS[name](small, H_small, C_small)

    results = []
    for out, n in shapes:
        rows = args.rows or out
        H, C = statistics(n, args.tokens, seed=n)
        w = 0.02 * torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
        cpu_times: dict[str, list[float]] = {name: [] for name in methods}
        wall_times: dict[str, list[float]] = {name: [] for name in methods}
        errors = {}
        for _ in range(args.repeats):
            for name in methods:
                wall, cpu = time.perf_counter(), time.process_time()
                qw = METHODS[name](w, H, C)
                cpu_times[name].append(time.process_time() - cpu)
                wall_times[name].append(time.perf_counter() - wall)
                residual = w - qw.dequantize()
                errors[name] = float(((residual @ H) * residual).sum() / 2)
                del qw, residual
        gptq_cpu = median(cpu_times["gptq"])
        for name in methods:
            cpu, wall = median(cpu_times[name]), median(wall_times[name])
            ratio, best_ratio = cpu / gptq_cpu, min(cpu_times[name]) / min(cpu_times["gptq"])
            results.append({"shape": f"{out}x{n}", "rows": rows, "in": n, "method": name, "cpu_seconds": cpu,
                            "wall_seconds": wall, "ratio_to_gptq": ratio, "cpu_seconds_all": cpu_times[name],
                            "best_ratio_to_gptq": best_ratio, "error": errors[name]})  # fmt: skip
            print(
                f"{out}x{n} rows={rows:<5} {name:<5} {cpu:8.2f} s cpu {wall:8.2f} s wall {ratio:6.2f}x GPTQ"
                f" (best {best_ratio:.2f}x)  error {errors[name]:.4g}",
                flush=True,
            )

    setup = {
        "args": vars(args),
        "grid": GRID,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    with open(args.json, "w") as f:
        json.dump({"setup": setup, "results": results}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
