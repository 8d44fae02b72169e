"""Peak host memory of quantizing a model that is mostly offloaded to disk, against the model's fp32 size.

Builds a LLaMA-shaped model with random weights from a ``LlamaConfig`` (>= 3 GB in fp32), saves it as safetensors to
a temporary folder, then quantizes it (GPTQ 4-bit, group 128) three times, each in its own child process so the peaks
do not mix:

* ``offload``: ``from_pretrained(..., device_map="auto", max_memory={"cpu": ...}, offload_folder=...)`` with a CPU
  budget that leaves room for about one block, so most blocks live on disk, with bias compensation;
* ``offload-nobc``: the same without bias compensation (no float stream, no BC input moments);
* ``memory``: the model loaded in RAM (no device map). With ``--memory-layers K`` only its first K blocks are
  loaded (``num_hidden_layers=K``: the same checkpoint and block weights), which keeps this reference run short on a
  small shared machine; time per block is what is compared.

Prints the model size, each run's peak RSS (``resource.getrusage``, kilobytes on Linux), its RSS after the imports
(the process's own share of the peak), the ratio peak / model size (target <= 0.35 with offload), the calibration
time per block of the runs side by side, per run the phases holding the highest RSS (an RSS timeline sampled every
5 ms, attributed to the innermost running step: ``block/forward`` a calibration forward, ``gptq`` the solve, ``gram``
the Hessian accumulation, ``pack`` building a packed layer, ``bc-moments`` / ``bc-solve`` bias compensation's
statistics), per calibrated block the RSS at its start (after its onload: what stays resident between blocks,
anonymous and file-backed, and of these the mapped ``.safetensors`` pages) and its peak inside, the pre-check's
estimate of one block beside the largest rise in a block over the RSS before its onload, and the device map.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/offload_memory.py [--layers 104] [--memory-layers 0] [--tmp /tmp]
[--modes offload,offload-nobc,memory] [--model DIR]`` (``--memory-layers 0``: the whole model in the reference run;
``--model``: keep the random checkpoint in DIR and reuse it). The children import the optimum_bc of this checkout.
``--hidden/--intermediate/--heads`` pick the block shape; the wide-MLP shape of issue #16 (intermediate 2.7x hidden,
where ``down_proj``'s in×in statistics and the stacked gate/up solve dominate a block's memory) is ``--layers 12
--hidden 2048 --intermediate 5504 --heads 16 --cpu-budget 600MB --modes offload,offload-nobc`` (600 MB: above the
smallest budget the pre-check accepts, 452 MiB with BC and 436 MiB without; the placement keeps the calibration
working set free, so every module is on disk); the StableLM-3B block is ``--hidden 2560 --intermediate 6912 --heads
32 --cpu-budget 800MB``.
"""

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time


HIDDEN, INTERMEDIATE, HEADS, VOCAB = 768, 2048, 12, 32000  # defaults of --hidden, --intermediate, --heads
MODES = ("offload", "offload-nobc", "memory")


def build(
    folder: str, layers: int, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, heads: int = HEADS
) -> None:
    """Save a random LLaMA-shaped fp32 model with ``layers`` blocks to ``folder`` (safetensors, 1 GB shards)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="1GB")


class PhaseTimeline:
    """Samples RSS in a thread and keeps the peak per phase, the phase being the innermost wrapped call running
    (``phase/sub-phase``): says which step of a block's calibration holds the peak."""

    def __init__(self, period: float = 0.005) -> None:
        self.stack = ["load"]
        self.peaks: dict[str, int] = {}
        # Per calibrated block: RSS when it starts (what stays resident between blocks: anonymous, file-backed) and
        # the highest RSS sampled while it runs.
        self.blocks: list[dict[str, int]] = []
        self.onload_rss = 0
        self.running = True
        self.period = period
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self.running:
            phase, rss = "/".join(self.stack[-2:]), _rss()
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
            if self.blocks and "block" in self.stack:
                self.blocks[-1]["peak"] = max(self.blocks[-1]["peak"], rss)
            time.sleep(self.period)

    def mark_blocks(self, owner: object, attr: str) -> None:
        """Record the resident memory at the start of every call of ``owner.attr`` (one calibrated block), and as
        its ``base`` the RSS before the block's onload (:meth:`mark_onloads`), else the RSS at its start."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*args: object, **kwargs: object) -> object:
            rss = _rss()
            self.blocks.append({**_rss_parts(), "peak": rss, "base": self.onload_rss or rss})
            self.onload_rss = 0
            return fn(*args, **kwargs)

        setattr(owner, attr, wrapped)

    def mark_onloads(self, owner: object, attr: str) -> None:
        """Remember the RSS before each call of ``owner.attr`` (onloading a block's weights from the offload store)."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*args: object, **kwargs: object) -> object:
            rss = _rss()
            result = fn(*args, **kwargs)
            self.onload_rss = rss
            return result

        setattr(owner, attr, wrapped)

    def wrap(self, owner: object, attr: str, label: str) -> None:
        """Make every call of ``owner.attr`` a phase named ``label``."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*args: object, **kwargs: object) -> object:
            self.stack.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()

        setattr(owner, attr, wrapped)


def _timeline() -> PhaseTimeline:
    from optimum_bc.algorithms import base, compensation, gptq
    from optimum_bc.calibration import calibrator, offload

    timeline = PhaseTimeline()
    timeline.wrap(offload.OffloadedCalibration, "onload", "onload")
    timeline.wrap(offload.OffloadedCalibration, "offload", "offload")
    timeline.wrap(calibrator.BlockCalibrator, "quantize_block", "block")
    timeline.mark_blocks(calibrator.BlockCalibrator, "quantize_block")
    timeline.mark_onloads(offload.OffloadedCalibration, "onload")
    timeline.wrap(calibrator, "_run_block", "forward")
    timeline.wrap(base.GramQuantizer, "add_batch", "gram")
    timeline.wrap(gptq.GPTQQuantizer, "quantize", "gptq")
    timeline.wrap(compensation.InputMoments, "add_batch", "bc-moments")
    timeline.wrap(compensation.InputMoments, "compensate", "bc-solve")
    timeline.wrap(calibrator, "packed_layer", "pack")
    return timeline


def quantize(folder: str, mode: str, cpu_budget: str, samples: int, tokens: int, memory_layers: int) -> dict:
    """Quantize the saved model in this process; return peak RSS, the peak per phase and timings."""
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_bc
    from optimum_bc import BCQuantizationConfig
    from optimum_bc.calibration.calibrator import set_progress_bars

    set_progress_bars(False)
    torch.set_num_threads(1)
    imports_rss = _rss()
    timeline = _timeline()
    ids = torch.randint(0, VOCAB, (samples, tokens), generator=torch.Generator().manual_seed(1))
    config = BCQuantizationConfig(
        method="gptq",
        bits=4,
        group_size=128,
        dataset=ids,
        num_samples=samples,
        seq_len=tokens,
        batch_size=samples,
        bias_compensation=mode != "offload-nobc",
    )
    kwargs: dict = {}
    offload_dir = None
    if mode.startswith("offload"):
        offload_dir = tempfile.mkdtemp(prefix="offload_", dir=os.path.dirname(folder))
        kwargs = {"device_map": "auto", "max_memory": {"cpu": cpu_budget}, "offload_folder": offload_dir}
    elif memory_layers > 0:
        kwargs = {"num_hidden_layers": memory_layers}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, **kwargs)
    wall = time.perf_counter() - start
    timeline.running = False
    calibration_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = model.quantization_report
    device_map = getattr(model, "hf_device_map", {"": "cpu"})
    # The pre-check's estimate of one block's calibration on the CPU (float copy streamed) plus the activations.
    needs = model.hf_quantizer._block_needs
    estimate = needs[0] + needs[2] if needs is not None else 0
    blocks = len(report.blocks)
    on_disk = sum(1 for i in range(blocks) if _placement(device_map, f"model.layers.{i}") == "disk")
    with torch.no_grad():  # inference: with autograd on, the graph would keep every block's dense weight alive
        logits = model(ids[:1, :16]).logits
    if offload_dir is not None:
        shutil.rmtree(offload_dir, ignore_errors=True)
    del model
    return {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "imports_rss_bytes": imports_rss,
        "calibration_peak_rss_bytes": calibration_peak,
        "estimate_bytes": estimate,
        "phase_peaks": sorted(timeline.peaks.items(), key=lambda kv: -kv[1])[:6],
        "block_timeline": timeline.blocks,
        "seconds_per_block": report.total_seconds / blocks,
        "load_and_quantize_seconds": wall,
        "blocks": blocks,
        "blocks_on_disk": on_disk,
        "on_cpu": sorted(k for k, v in device_map.items() if v == "cpu"),
        "device_map": {k: str(v) for k, v in device_map.items()},
        "package": os.path.dirname(optimum_bc.__file__),
        "finite_logits": bool(logits.isfinite().all()),
    }


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_parts() -> dict[str, int]:
    """The process's resident memory split into anonymous (heap, tensors) and file-backed bytes, and of these the
    resident pages of mapped ``.safetensors`` files (the checkpoint, the offload store)."""
    parts = {"mapped": 0}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                parts[line.split(":")[0][3:].lower()] = int(line.split()[1]) * 1024
    with open("/proc/self/smaps") as f:
        path = ""
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: address range, perms, offset, dev, inode
                path = fields[5] if len(fields) > 5 else ""
            elif fields[0] == "Rss:" and path.endswith(".safetensors"):
                parts["mapped"] += int(fields[1]) * 1024
    return parts


def _placement(device_map: dict, name: str) -> object:
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else "cpu"


def _child(folder: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--folder", folder, "--cpu-budget", args.cpu_budget]
    cmd += ["--samples", str(args.samples), "--tokens", str(args.tokens), "--memory-layers", str(args.memory_layers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    """The children import this checkout's optimum_bc, not an installed copy: a script's ``sys.path`` starts at its
    own folder, so without this an editable install elsewhere is what gets measured."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=104, help="decoder blocks (104: 3.0 GB in fp32)")
    parser.add_argument("--memory-layers", type=int, default=0, help="blocks loaded by the in-memory run (0: all)")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--cpu-budget", default="200MB", help="max_memory['cpu'] of the offload run")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--modes",
        default="offload,offload-nobc,memory",
        help="runs to make, comma-separated (at least one offload run)",
    )
    parser.add_argument(
        "--model", help="a folder to save the random model in and reuse when it is there (default: a temporary one)"
    )
    parser.add_argument("--child", choices=["build", *MODES])
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.hidden <= 0 or args.intermediate <= 0 or args.heads <= 0 or args.hidden % args.heads:
        parser.error(
            f"--hidden {args.hidden} must be a positive multiple of --heads {args.heads}, --intermediate > 0; "
            "fix: e.g. --hidden 2048 --heads 16 --intermediate 5504"
        )
    modes = args.modes.split(",")
    if not any(m.startswith("offload") for m in modes) or not set(modes) <= set(MODES):
        parser.error(
            f"--modes {args.modes!r}: a comma-separated subset of {','.join(MODES)} with an offload run in it"
        )
    if args.child == "build":
        build(args.folder, args.layers, args.hidden, args.intermediate, args.heads)
        return
    if args.child is not None:
        print(
            json.dumps(
                quantize(args.folder, args.child, args.cpu_budget, args.samples, args.tokens, args.memory_layers)
            )
        )
        return

    root = tempfile.mkdtemp(prefix="optimum_bc_offload_bench_", dir=args.tmp)
    folder = args.model or os.path.join(root, "model")
    try:
        if args.model is None or not os.path.exists(os.path.join(folder, "config.json")):
            subprocess.run(
                [sys.executable, __file__, "--child", "build", "--folder", folder, "--layers", str(args.layers)]
                + ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--heads", str(args.heads)],
                check=True,
                env=_env(),
            )
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
        runs = {mode: _child(folder, mode, args) for mode in modes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    off = next(run for mode, run in runs.items() if mode.startswith("offload"))
    print(
        f"model: LLaMA-shaped, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {VOCAB} "
        f"(tied), fp32 size {size / 2**30:.2f} GiB"
    )
    print(
        f"quantization: GPTQ 4-bit g128 (with and without BC), calibration {args.samples} x {args.tokens} tokens, 1 thread; "
        f"offload run: device_map='auto', max_memory={{'cpu': '{args.cpu_budget}'}}, "
        f"{off['blocks_on_disk']}/{off['blocks']} blocks on disk, on the CPU: {', '.join(off['on_cpu']) or 'nothing'}"
    )
    print(f"{'run':<14}{'blocks':>8}{'imports GiB':>13}{'peak RSS GiB':>14}{'peak / model':>14}{'s / block':>12}")
    for mode, run in runs.items():
        peak, base = run["peak_rss_bytes"], run["imports_rss_bytes"]
        print(
            f"{mode:<14}{run['blocks']:>8}{base / 2**30:>13.2f}{peak / 2**30:>14.2f}{peak / size:>14.3f}"
            f"{run['seconds_per_block']:>12.2f}"
        )
    for mode, run in runs.items():
        phases = ", ".join(f"{name} {peak / 2**30:.2f}" for name, peak in run["phase_peaks"])
        print(f"{mode} peak RSS (GiB) by phase: {phases}")
        blocks = run["block_timeline"]
        steps = ", ".join(
            f"{b['anon'] / 2**30:.2f}+{b['file'] / 2**30:.2f} ({b['mapped'] / 2**30:.2f})/{b['peak'] / 2**30:.2f}"
            for b in blocks
        )
        print(
            f"{mode} per block, RSS at its start anonymous+file-backed (of which mapped .safetensors) / peak inside "
            f"(GiB): {steps}"
        )
        rise = max((b["peak"] - b["base"] for b in blocks), default=0)
        if run["estimate_bytes"] and rise:
            print(
                f"{mode} pre-check estimate of one block (streamed float copy + activations) "
                f"{run['estimate_bytes'] / 2**30:.3f} GiB; largest rise in a block (peak inside - RSS before its "
                f"onload) {rise / 2**30:.3f} GiB; estimate / rise {run['estimate_bytes'] / rise:.2f}"
            )
        print(
            f"{mode} peak RSS at the end of from_pretrained (calibration) {run['calibration_peak_rss_bytes'] / 2**30:.2f}"
            f" GiB; device map after calibration: {run['device_map']}; optimum_bc from {run['package']}"
        )
    summary = ", ".join(
        f"{mode} peak RSS / model size: {run['peak_rss_bytes'] / size:.3f}"
        for mode, run in runs.items()
        if mode.startswith("offload")
    )
    summary += " (target <= 0.35)"
    if "memory" in runs:
        summary += (
            f"; time per block offload / memory: {off['seconds_per_block'] / runs['memory']['seconds_per_block']:.2f}x"
        )
    finite = all(run["finite_logits"] for run in runs.values())
    print(f"{summary}; logits finite: {finite}")


if __name__ == "__main__":
    main()
