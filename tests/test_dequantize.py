"""``model.dequantize()``: packed layers become dense Linears with equal logits; stock transformers reloads the save."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.integrations.dense import BCDenseLinear, restore_position_biases
from optimum_bc.layers.kernels import use_backend
from optimum_bc.layers.packed_base import PackedLinearBase

from .conftest import VOCAB, tiny_llama, tiny_opt


#: float32 logits of the dense model against the packed reference path: same weights, same F.linear, bit-equal in
#: practice; 1e-6 leaves room for a summation-order change in a future torch.
ATOL_FP32 = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(family: str, calib_ids: torch.Tensor, **options: Any) -> nn.Module:
    model = tiny_llama() if family == "llama" else tiny_opt()
    grid = {} if "format" in options else {"bits": 4, "group_size": 32}
    settings = {**grid, "method": "rtn", "num_samples": 8, "seq_len": 32, **options}
    quantize_model(model, BCQuantizationConfig(dataset=calib_ids[:8], **settings))
    return model.eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), use_backend("reference"):
        return model(x).logits


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama", {"bc_sink_tokens": 0}),
        ("llama", {"bc_sink_tokens": 1}),
        ("llama", {"format": "mxfp4", "bc_sink_tokens": 1}),
        ("llama", {"bc_granularity": "position", "bc_sink_tokens": 0}),
        ("opt", {"bits": 3, "method": "gptq", "bc_sink_tokens": 1}),
        ("opt", {"format": "mxint8", "bc_sink_tokens": 0}),
    ],
)
def test_dequantize_gives_dense_layers_with_equal_logits(
    family: str, options: dict[str, Any], calib_ids: torch.Tensor
) -> None:
    model = _quantized(family, calib_ids, **options)
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinearBase)}
    assert len(packed) == (14 if family == "llama" else 12)
    expected = _logits(model, x)

    assert model.dequantize() is model
    assert not any(isinstance(m, PackedLinearBase) for m in model.modules())
    for name, layer in packed.items():
        dense = model.get_submodule(name)
        assert type(dense) is (nn.Linear if layer.sink_bias is None and layer.position_bias is None else BCDenseLinear)
        assert torch.equal(dense.weight, layer.dequantize_weight(torch.float32))
        assert torch.equal(dense.bias, layer.bias)
        for buffer in ("sink_bias", "position_bias"):
            same = getattr(layer, buffer) is None and getattr(dense, buffer, None) is None
            assert same or torch.equal(getattr(dense, buffer), getattr(layer, buffer))
    torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=ATOL_FP32)
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert model.is_quantized is False
    if family == "llama":
        assert model.config.attention_bias is True and model.config.mlp_bias is True


def test_dtype_argument_converts_the_whole_model(calib_ids: torch.Tensor) -> None:
    model = _quantized("llama", calib_ids, bc_sink_tokens=1)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    packed_bf16 = _logits(model.to(torch.bfloat16), x)  # reference path: the fp32 dequantized weight cast to bf16
    model.dequantize(dtype=torch.bfloat16)
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    assert dtypes == {torch.bfloat16} and model.config.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(model, x), packed_bf16, rtol=0, atol=0)

    with pytest.raises(ValueError, match="floating torch.dtype"):
        _quantized("llama", calib_ids).dequantize(dtype=torch.int8)


def test_stock_transformers_reloads_a_dequantized_checkpoint(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    """bc_sink_tokens=0: a plain float checkpoint, loaded in a process that never imports optimum_bc."""
    quantized = tmp_path / "bc"
    _quantized("llama", calib_ids, bc_sink_tokens=0).save_pretrained(quantized)
    model = AutoModelForCausalLM.from_pretrained(quantized)  # the pre-quantized reload path
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    expected = _logits(model, x)
    model.dequantize()
    model.save_pretrained(tmp_path / "float")
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    assert "quantization_config" not in config and config["attention_bias"] is True and config["mlp_bias"] is True
    assert not (tmp_path / "float" / "README.md").exists()  # no BC model card for a float model

    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "float")!r})
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "x.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "stock.pt")!r})
        assert not any(name.startswith("optimum_bc") for name in sys.modules)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "stock.pt"), expected, rtol=0, atol=ATOL_FP32)


def test_sink_biases_need_optimum_bc_to_reload(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = _quantized("llama", calib_ids, bc_sink_tokens=2, bc_target="sequential")  # always fits sink biases
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    model.dequantize()
    expected = _logits(model, x)
    model.save_pretrained(tmp_path)

    stock = AutoModelForCausalLM.from_pretrained(tmp_path)  # drops the sink_bias tensors
    assert (_logits(stock, x) - expected).abs().max() > 1e-4
    swapped = restore_position_biases(stock, tmp_path)
    assert len(swapped) == 14 and all(isinstance(stock.get_submodule(n), BCDenseLinear) for n in swapped)
    torch.testing.assert_close(_logits(stock, x), expected, rtol=0, atol=ATOL_FP32)
    with pytest.raises(ValueError, match="no .safetensors"):
        restore_position_biases(stock, tmp_path / "missing")


def test_offloaded_layers_are_refused_before_anything_changes(calib_ids: torch.Tensor) -> None:
    model = _quantized("llama", calib_ids)
    model.model.layers[1].mlp.down_proj.to("meta")  # what disk offload leaves on the module
    with pytest.raises(ValueError, match="meta device.*without disk/CPU offload"):
        model.dequantize()
    assert sum(isinstance(m, PackedLinearBase) for m in model.modules()) == 14
    assert model.hf_quantizer is not None
