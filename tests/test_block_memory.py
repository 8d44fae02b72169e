"""The offload pre-check's estimate of one block's calibration memory (``block_calibration_bytes``) is within 20 % of
the measured peak, on an attention-heavy block and two wide-MLP blocks (intermediate 2.75x and 4x hidden)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent(
    """
    import ctypes, gc, json, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from optimum_bc import BCQuantizationConfig, quantize_model
    from optimum_bc.calibration.memory import block_calibration_bytes

    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def model(hidden, inter):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
            num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=256,
        )
        return LlamaForCausalLM(config).eval()

    def config():
        ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
        return BCQuantizationConfig(
            method="gptq", bits=4, group_size=128, dataset=ids, num_samples=4, seq_len=64, batch_size=4,
            bias_compensation=False,
        )

    quantize_model(model(256, 512), config())  # warm-up: BLAS/LAPACK buffers are allocated once per process
    results = []
    for hidden, inter in json.loads(sys.argv[1]):
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)
        base = rss("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
        m = model(hidden, inter)
        block = m.model.layers[0]
        names = [n for n, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)]
        estimate = block_calibration_bytes(block, [[n] for n in names], False)  # as the quantizer calls it
        quantize_model(m, config())
        results.append([rss("VmHWM") - base, estimate])
        del m, block
    print(json.dumps(results))
    """
)

SHAPES = [(1024, 1024), (768, 3072), (1024, 2816)]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
def test_block_estimate_within_20_percent_of_the_measured_peak() -> None:
    """Measured quantity: the process's peak resident memory (VmHWM, reset right before the model is built) over the
    resident memory before, for building a one-block LLaMA (vocabulary 256, so the block is nearly all of it) and
    quantizing it in memory (GPTQ 4-bit g128, no bias compensation: BC's input moments are not in the estimate),
    after a warm-up run, with glibc's mmap threshold fixed as ``bound_heap_growth`` does in offloaded runs."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(SHAPES)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    for shape, (peak, estimate) in zip(SHAPES, measured, strict=True):
        assert 0.8 < estimate / peak < 1.2, (shape, estimate / 2**20, peak / 2**20)
