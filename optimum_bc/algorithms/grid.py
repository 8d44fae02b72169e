"""The fixed quantization grid of a whole weight matrix, for algorithms that pick codes coordinate by coordinate.

COMQ and ERQ fit the grid once (one grid per output row and per group of input columns, in any weight format of
:mod:`optimum_bc.formats`) and then repeatedly ask for "the grid value nearest to t" at arbitrary columns, a different
column in every row. Fitting, rounding, stepping to a neighbouring grid point and rounding a scale to its storage are
the only places the number format enters those algorithms, so they work unchanged for the integer grid and for the
block-scaled MX formats.
"""

from dataclasses import dataclass

import torch

from ..formats.formats import INT_FORMAT, WeightFormat, get_format, is_mx
from .base import QuantizedWeight


@dataclass(frozen=True)
class GroupGrid:
    """One grid per (output row, group of input columns): ``value = fmt.decode(code, scale, zero)``.

    Integer format: ``scale * (code - zero)``; MX formats: ``scale * element_value(code)`` (zeros all 0).
    """

    fmt: WeightFormat
    scales: torch.Tensor  # (rows, groups) float32, exactly representable in their storage (float16 or E8M0)
    zeros: torch.Tensor  # (rows, groups) float32 holding integers
    g_idx: torch.Tensor  # (in,) long: group of each input column

    @classmethod
    def fit(
        cls, weight: torch.Tensor, *, bits: int, group_size: int, sym: bool, format: str = INT_FORMAT
    ) -> "GroupGrid":
        """The format's grid of every row and every group of ``group_size`` consecutive columns (-1: whole row)."""
        fmt = get_format(format, bits, sym)
        W = weight.float()
        n = W.shape[1]
        size = n if group_size == -1 else group_size
        grids = [fmt.fit(W[:, s : s + size]) for s in range(0, n, size)]
        return cls(
            fmt=fmt,
            scales=torch.cat([g.scale for g in grids], dim=1),
            zeros=torch.cat([g.zero for g in grids], dim=1),
            g_idx=torch.arange(n, device=W.device) // size,
        )

    def params(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zeros at columns ``cols`` (``(rows, k)``), for callers that round many times at one column."""
        groups = self.g_idx[cols]
        return self.scales.gather(1, groups), self.zeros.gather(1, groups)

    def nearest(self, values: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Codes of the grid points nearest to ``values`` (``(rows, k)``) at columns ``cols`` (``(rows, k)``)."""
        return self.fmt.grid(*self.params(cols)).quantize(values)

    def value(self, codes: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Float values of ``codes`` at columns ``cols``."""
        return self.fmt.decode(codes, *self.params(cols))

    def unit_value(self, codes: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``d value / d scale`` of ``codes``: the value with the scale set to 1 (``code - zero`` for integers)."""
        _, zeros = self.params(cols)
        return self.fmt.decode(codes, torch.ones_like(zeros), zeros)

    def step(self, codes: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """Codes of the adjacent grid points above (``direction`` +1) or below (-1) ``codes``; 0 keeps the code.

        At the end of the grid the code is kept. Scales are positive, so this order is the order of the values.
        """
        return self.fmt.step(codes, direction)

    def all_columns(self, rows: int) -> torch.Tensor:
        """The ``cols`` argument that addresses the whole ``[rows, in]`` matrix."""
        return torch.arange(self.g_idx.numel(), device=self.g_idx.device).expand(rows, -1)

    def result(self, codes: torch.Tensor, row_losses: torch.Tensor, damp: float | None = None) -> QuantizedWeight:
        """Package ``codes`` ``[rows, in]`` on this grid as a :class:`QuantizedWeight`."""
        return QuantizedWeight(
            codes=codes.to(torch.uint8),
            scales=self.scales,
            zeros=self.zeros.to(torch.uint8),
            g_idx=self.g_idx.to(torch.int32),
            row_losses=row_losses,
            damp=damp,
            format=self.fmt.name,
        )


def check_group_size(method: str, format: str, bits: int, sym: bool, group_size: int) -> None:
    """Raise unless an MX ``format`` meets ``group_size`` = its block size (a group must be one MX block)."""
    fmt = get_format(format, bits, sym)
    if is_mx(fmt.name) and group_size != fmt.block_size:
        raise ValueError(f"{method} with format={fmt.name!r} needs group_size={fmt.block_size}, got {group_size}")
