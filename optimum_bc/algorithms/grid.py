"""The fixed quantization grid of a whole weight matrix, for algorithms that pick codes coordinate by coordinate.

COMQ and ERQ fit the grid once (min-max per output row and per group of input columns, :mod:`optimum_bc.primitives`)
and then repeatedly ask for "the grid value nearest to t" at arbitrary columns, a different column in every row. These
two steps (fit, nearest) are the only places the grid's number format enters those algorithms.
"""

from dataclasses import dataclass

import torch

from ..primitives import QParams, compute_qparams, dequantize_codes, quantize_codes
from .base import QuantizedWeight


@dataclass(frozen=True)
class GroupGrid:
    """One integer grid per (output row, group of input columns): ``value = scale * (code - zero)``."""

    scales: torch.Tensor  # (rows, groups) float32, exactly representable in float16
    zeros: torch.Tensor  # (rows, groups) float32 holding integers
    g_idx: torch.Tensor  # (in,) long: group of each input column
    maxq: int

    @classmethod
    def fit(cls, weight: torch.Tensor, *, bits: int, group_size: int, sym: bool) -> "GroupGrid":
        """Min-max grid of every row and every group of ``group_size`` consecutive columns (-1: whole row)."""
        W = weight.float()
        n = W.shape[1]
        size = n if group_size == -1 else group_size
        params = [compute_qparams(W[:, s : s + size], bits, sym) for s in range(0, n, size)]
        return cls(
            scales=torch.cat([p.scale for p in params], dim=1),
            zeros=torch.cat([p.zero for p in params], dim=1),
            g_idx=torch.arange(n, device=W.device) // size,
            maxq=2**bits - 1,
        )

    def at(self, cols: torch.Tensor) -> QParams:
        """Grid parameters at columns ``cols`` (``(rows, k)`` column indices, one set per row)."""
        groups = self.g_idx[cols]
        return QParams(self.scales.gather(1, groups), self.zeros.gather(1, groups), self.maxq)

    def nearest(self, values: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Codes of the grid points nearest to ``values`` (``(rows, k)``) at columns ``cols``."""
        return quantize_codes(values, self.at(cols))

    def value(self, codes: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Float values of ``codes`` at columns ``cols``."""
        return dequantize_codes(codes, self.at(cols))

    def all_columns(self, rows: int) -> torch.Tensor:
        """The ``cols`` argument that addresses the whole ``[rows, in]`` matrix."""
        return torch.arange(self.g_idx.numel(), device=self.g_idx.device).expand(rows, -1)

    def result(self, codes: torch.Tensor, row_losses: torch.Tensor, damp: float | None = None) -> QuantizedWeight:
        """Package integer ``codes`` ``[rows, in]`` on this grid as a :class:`QuantizedWeight`."""
        return QuantizedWeight(
            codes=codes.to(torch.uint8),
            scales=self.scales,
            zeros=self.zeros.to(torch.uint8),
            g_idx=self.g_idx.to(torch.int32),
            row_losses=row_losses,
            damp=damp,
        )
