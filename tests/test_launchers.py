"""The CLI under the launchers users run: ``torchrun`` and ``accelerate launch`` with 2 CPU processes (gloo) write
the checkpoint one process writes from the same windows (issue #16: "the same call shards the windows across ranks").

Each launcher starts real processes running ``python -m optimum_bc.cli quantize``; nothing here imports a rank."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import TEXTS, tiny_llama


BIN = Path(sys.executable).parent
ARGS = ["--method", "gptq", "--bits", "3", "--group-size", "32", "--num-samples", "4", "--seq-len", "16"]
LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--nproc-per-node", "2", "-m"],
    # On a CPU-only machine `--multi_gpu` is accelerate's torch.distributed launcher (gloo); `--cpu` would run one process.
    "accelerate": [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
    ],
}


def _run(prefix: list[str], model: Path, text: Path, out: Path) -> str:
    """Run the CLI under ``prefix``; its logs (stderr) on success."""
    argv = [*prefix, "optimum_bc.cli", "quantize", str(model), "--output", str(out), "--dataset", str(text), *ARGS]
    env = {"OMP_NUM_THREADS": "1", "PATH": str(BIN) + ":/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_under_a_launcher_equal_one_process(launcher, word_tokenizer, tmp_path) -> None:
    model = tmp_path / "float"
    tiny_llama().save_pretrained(model)
    word_tokenizer.save_pretrained(model)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXTS * 3))
    _run([sys.executable, "-m"], model, text, tmp_path / "one")
    logs = _run(LAUNCHERS[launcher], model, text, tmp_path / "two")
    for rank in (0, 1):  # each process calibrated on its own half of the windows
        assert f"rank {rank} of 2 calibrates on 2 of 4 windows" in logs, logs[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys() and any(k.endswith("qweight") for k in one)
    for key in one:
        if one[key].is_floating_point():
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(two[key], one[key]), key
    assert not (tmp_path / "two.partial").exists()
