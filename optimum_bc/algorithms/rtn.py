"""Round-to-nearest (RTN): the min-max grid of each group, no calibration data."""

import torch

from ..primitives import compute_qparams, quantize_codes
from . import register_algorithm
from .base import QuantizedWeight, WeightQuantizer


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` with one grid per row and per group of ``group_size`` columns."""
    W = weight.float()
    n = W.shape[1]
    size = n if group_size == -1 else group_size
    codes, scales, zeros = [], [], []
    for start in range(0, n, size):
        block = W[:, start : start + size]
        qp = compute_qparams(block, bits, sym)
        codes.append(quantize_codes(block, qp))
        scales.append(qp.scale)
        zeros.append(qp.zero)
    g_idx = (torch.arange(n, device=W.device) // size).to(torch.int32)
    return QuantizedWeight(
        codes=torch.cat(codes, dim=1).to(torch.uint8),
        scales=torch.cat(scales, dim=1),
        zeros=torch.cat(zeros, dim=1).to(torch.uint8),
        g_idx=g_idx,
        row_losses=torch.zeros(W.shape[0], device=W.device),
    )


@register_algorithm("rtn")
class RTNQuantizer(WeightQuantizer):
    """Round-to-nearest; ignores calibration inputs."""

    needs_inputs = False

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return rtn_quantize(weight, bits=self.bits, group_size=self.group_size, sym=self.sym)
