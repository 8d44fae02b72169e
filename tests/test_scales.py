"""Weights of small magnitude keep their grid: float16 subnormal scales instead of a clamp at 2^-14."""

import pytest
import torch

from optimum_bc import QuantLinear
from optimum_bc.formats.primitives import SCALE_DTYPE, compute_qparams, fake_quantize, quantize_codes

from .conftest import tiny_llama
from .test_validation import _no_calibration, _quantize


def _plain_minmax_mse(w: torch.Tensor, bits: int) -> float:
    """The float32 min-max grid with unrounded scales: the reference the stored grid should match."""
    maxq = 2**bits - 1
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return float(((scale * (q - zero) - w) ** 2).mean())


@pytest.mark.parametrize("bits,std,ratio", [(8, 1e-4, 1.05), (4, 2e-5, 1.05), (4, 1e-6, 1.3)])
def test_small_weights_are_quantized_nearly_as_well_as_a_float32_grid(bits: int, std: float, ratio: float) -> None:
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * std
    qp = compute_qparams(w, bits, sym=False)
    mse = float(((fake_quantize(w, qp) - w) ** 2).mean())
    assert mse <= ratio * _plain_minmax_mse(w, bits)
    assert float((fake_quantize(w, qp) == 0).float().mean()) < 0.2  # not collapsed to zero
    assert torch.equal(qp.scale.to(SCALE_DTYPE).float(), qp.scale)  # stored exactly (subnormals included)


def test_subnormal_scales_survive_packing_exactly() -> None:
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 2e-5
    qp = compute_qparams(w, 4, sym=False)
    assert bool((qp.scale < 2.0**-14).all())  # the subnormal range
    layer = QuantLinear.from_quantized(
        quantize_codes(w, qp).long(), qp.scale, qp.zero.long(), None, bits=4, group_size=-1
    )
    torch.testing.assert_close(layer.dequantize_weight(torch.float32), fake_quantize(w, qp), rtol=0, atol=0)


def test_weights_too_small_even_for_subnormal_scales_warn_naming_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e-6)
    _no_calibration(monkeypatch)
    with pytest.warns(UserWarning, match=r"layer 'model.layers.0.mlp.up_proj' has rows of weights spanning only"):
        with pytest.raises(AssertionError, match="calibration started"):
            _quantize(model)
