"""The blocked W8A8 int8 path equals the simulated (fake-quantized) path on every activation spec it takes."""

import pytest
import torch

from optimum_bc import kernels
from optimum_bc.formats.activations import ActSpec, range_params
from optimum_bc.layers import int8_path
from optimum_bc.layers.qlinear import QuantLinear


SPECS = [ActSpec(8, False, "tensor", False), ActSpec(8, False, "token", True), ActSpec(8, False, "tensor", True)]


def _layer(d_in: int, d_out: int) -> QuantLinear:
    torch.manual_seed(0)
    codes, zeros = torch.randint(0, 256, (d_out, d_in)), torch.randint(90, 170, (d_out, 1))
    return QuantLinear.from_quantized(codes, torch.rand(d_out, 1) * 0.01, zeros, None, 8, -1, bias=torch.randn(d_out))


@pytest.mark.parametrize("spec", SPECS, ids=["static", "dynamic-token", "dynamic-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_int8_path_equals_the_simulated_path(spec: ActSpec, dtype: torch.dtype) -> None:
    layer = _layer(96, 40)
    x = (torch.randn(2, int8_path.BLOCK_ROWS + 7, 96) * 3 + 0.5).to(dtype)  # several blocks and a short tail
    params = (None, None) if spec.dynamic else range_params(x.float().min(), x.float().max(), spec)
    layer.set_input_quantizer(spec, *params)
    assert int8_path.eligible(layer, x)
    with torch.no_grad():
        with kernels.use_backend("reference"):
            ref = layer(x.float())  # the simulated path in float32 (bfloat16 inputs are exact in float32)
        out = layer(x)
    assert out.dtype == dtype and out.shape == (2, int8_path.BLOCK_ROWS + 7, 40)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    else:  # computed in float32, rounded once to bfloat16
        torch.testing.assert_close(out, ref.to(dtype), atol=1e-6, rtol=2**-7)  # one bfloat16 step


def test_block_size_does_not_change_the_result(monkeypatch) -> None:
    layer = _layer(64, 24)
    x = torch.randn(300, 64)
    spec = ActSpec(8, False, "token", True)
    layer.set_input_quantizer(spec)
    with torch.no_grad():
        whole = layer(x)
        monkeypatch.setattr(int8_path, "block_rows", lambda rows: 7)
        blocked = layer(x)
    torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=1e-6)
