"""Round-to-nearest (RTN): each group's grid from its own weights (min-max or MX scale), no calibration data."""

import torch

from ..formats.formats import INT_FORMAT, get_format
from .base import QuantizedWeight, WeightQuantizer
from .registry import register_algorithm


def rtn_quantize(
    weight: torch.Tensor, *, bits: int, group_size: int, sym: bool, format: str = INT_FORMAT
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` with one grid per row and per group of ``group_size`` columns."""
    fmt = get_format(format, bits, sym)
    W = weight.float()
    n = W.shape[1]
    size = n if group_size == -1 else group_size
    codes, scales, zeros = [], [], []
    for start in range(0, n, size):
        block = W[:, start : start + size]
        grid = fmt.fit(block)
        codes.append(grid.quantize(block))
        scales.append(grid.scale)
        zeros.append(grid.zero)
    g_idx = (torch.arange(n, device=W.device) // size).to(torch.int32)
    return QuantizedWeight(
        codes=torch.cat(codes, dim=1).to(torch.uint8),
        scales=torch.cat(scales, dim=1),
        zeros=torch.cat(zeros, dim=1).to(torch.uint8),
        g_idx=g_idx,
        row_losses=torch.zeros(W.shape[0], device=W.device),
        format=fmt.name,
    )


@register_algorithm("rtn")
class RTNQuantizer(WeightQuantizer):
    """Round-to-nearest; ignores calibration inputs."""

    needs_inputs = False
    supports_mx = True

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return rtn_quantize(weight, bits=self.bits, group_size=self.group_size, sym=self.sym, format=self.format)
