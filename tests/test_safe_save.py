"""Saves of BC models are atomic: a writer killed at any moment leaves the previous checkpoint or the new one.

The writer runs in a subprocess that SIGKILLs itself at a chosen moment of ``save_pretrained``; the parent then loads
the folder and compares its logits with those of the previous checkpoint (or of the new one, once swapped in).
"""

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import optimum_bc  # noqa: F401 - registers quant_method="bc"
from optimum_bc import BCQuantizationConfig
from optimum_bc.integrations.quantizer import REPORT_METADATA_KEY

from .conftest import VOCAB, tiny_llama


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 4-bit BC checkpoint (single safetensors file)."""
    src = tmp_path_factory.mktemp("float")
    tiny_llama().save_pretrained(src)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = BCQuantizationConfig(bits=4, group_size=32, method="rtn", dataset=ids, num_samples=4, seq_len=16)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    out = tmp_path_factory.mktemp("good") / "ckpt"
    model.save_pretrained(out)
    return out


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(IDS).logits


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


_WRITER = """
import os, signal, sys, torch
import optimum_bc, transformers
from optimum_bc.export import atomic
from optimum_bc.integrations import save_hooks
from transformers import AutoModelForCausalLM

folder, moment = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(folder)
with torch.no_grad():
    model.get_input_embeddings().weight.mul_(-1.5)  # the new checkpoint: clearly different logits

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def after(func, then):
    def wrapped(*args, **kwargs):
        result = func(*args, **kwargs)
        then(*args, **kwargs)
        return result
    return wrapped

def half_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    size = os.path.getsize(filename)
    with open(filename, "r+b") as f:
        f.truncate(size // 2)
    die()

real = transformers.modeling_utils.safe_save_file
if moment == "config":
    transformers.PretrainedConfig.save_pretrained = after(transformers.PretrainedConfig.save_pretrained, die)
elif moment == "half-weights":
    transformers.modeling_utils.safe_save_file = half_file
elif moment == "first-shard":
    transformers.modeling_utils.safe_save_file = after(real, die)
elif moment == "card":
    save_hooks.write_model_card = die
elif moment == "after-swap":
    atomic._swap_in = after(atomic._swap_in, die)
model.save_pretrained(folder, max_shard_size="20KB" if moment == "first-shard" else "50GB")
"""


@pytest.mark.parametrize("moment", ["config", "half-weights", "first-shard", "card", "after-swap"])
def test_save_killed_at_any_moment_leaves_a_complete_checkpoint(good: Path, tmp_path: Path, moment: str) -> None:
    folder = _copy(good, tmp_path / "ckpt")
    before = _logits(folder)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WRITER), str(folder), moment],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    after = _logits(folder)
    if moment == "after-swap":  # the new checkpoint is complete and in place; the old one is gone
        assert not torch.allclose(after, before)
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in good.iterdir())
    else:
        torch.testing.assert_close(after, before, rtol=0, atol=0)
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in good.iterdir())
    leftovers = [p for p in folder.parent.iterdir() if p.name != folder.name]
    assert leftovers, "the killed writer's temporary folder is expected beside the target"
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)  # the next save cleans up
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_resave_sharded_over_single_file_serves_the_new_weights(good: Path, tmp_path: Path) -> None:
    folder = _copy(good, tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(-1.5)
        expected = model(IDS).logits
    model.save_pretrained(folder, max_shard_size="20KB")
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    torch.testing.assert_close(_logits(folder), expected, rtol=0, atol=0)


def test_save_keeps_tokenizer_and_other_files_saved_before(good: Path, tmp_path: Path, word_tokenizer) -> None:
    folder = _copy(good, tmp_path / "ckpt")
    word_tokenizer.save_pretrained(folder)
    (folder / "notes.txt").write_text("mine")
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and (folder / "notes.txt").read_text() == "mine"


def test_damaged_report_metadata_warns_and_still_loads(good: Path, tmp_path: Path) -> None:
    folder = _copy(good, tmp_path / "ckpt")
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        metadata = dict(f.metadata())
    metadata[REPORT_METADATA_KEY] = '{"layers": [truncated'
    save_file(tensors, str(path), metadata=metadata)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = _logits(folder)
    torch.testing.assert_close(logits, _logits(good), rtol=0, atol=0)
    assert any(REPORT_METADATA_KEY in str(w.message) and "cannot be parsed" in str(w.message) for w in caught)


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def test_same_seed_gives_identical_tensors_and_reproducible_saves_identical_files(tmp_path: Path) -> None:
    src = tmp_path / "float"
    tiny_llama().save_pretrained(src)
    for run in range(2):
        cfg = BCQuantizationConfig(
            bits=4,
            group_size=32,
            method="gptq",
            dataset=torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1)),
            num_samples=4,
            seq_len=16,
            seed=3,
        )
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
        model.save_pretrained(tmp_path / f"run{run}" / "plain")
        model.save_pretrained(tmp_path / f"run{run}" / "repro", reproducible=True)  # the card names the folder
    a, b = _tensors(tmp_path / "run0" / "plain"), _tensors(tmp_path / "run1" / "plain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _file_bytes(tmp_path / "run0" / "repro") == _file_bytes(tmp_path / "run1" / "repro")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run0" / "repro")
    assert reloaded.quantization_report.total_seconds == 0.0
    assert reloaded.quantization_report.layers and all(r.seconds == 0.0 for r in reloaded.quantization_report.layers)
