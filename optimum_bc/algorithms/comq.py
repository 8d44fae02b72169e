"""COMQ (Zhang et al., arXiv 2403.07134): coordinate-wise minimisation of the layer reconstruction error.

For every output row ``w`` with quantized values ``q``, COMQ minimises ``(w - q)ᵀ H (w - q)`` (``H`` the input Gram
matrix ``2 XᵀX / N``, the same Hessian as GPTQ) one coordinate at a time. With the other coordinates fixed the
problem in ``q_j`` is a 1-D convex quadratic whose minimiser is

    t* = w_j + Σ_{k≠j} H_jk (w_k - q_k) / H_jj

so the best grid value is the grid point nearest to ``t*``. Before the first sweep ``q = w`` (zero residual), so
coordinates not yet visited still hold their float value. Each row visits its coordinates in its own greedy order,
decreasing ``|w_j| · ||x_j||`` (the released code's ``--greedy``). Keeping ``G = (W - Q) H`` up to date makes one step
cost ``O(rows · in)`` and a sweep ``O(rows · in²)``, the cost of GPTQ.

The grid (min-max per row and per group) is fitted once on the float weights and kept fixed, as in the reference
code. ``update_scale`` adds the paper's claim that scales are variables too: after each sweep every (row, group)
scale takes the exact 1-D minimiser for the current integer codes (rounded to its float16 storage, kept only when it
lowers the error).
"""

import logging
from dataclasses import replace

import torch

from ..primitives import MIN_SCALE, SCALE_DTYPE
from . import register_algorithm
from .base import GramQuantizer, QuantizedWeight
from .grid import GroupGrid
from .rtn import rtn_quantize


logger = logging.getLogger(__name__)


def comq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    sweeps: int = 1,
    update_scale: bool = False,
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` given the input Gram matrix ``H`` ``[in, in]`` (neither is modified).

    ``row_losses`` holds ``(w - q)ᵀ H (w - q) / 2`` per row: the mean squared output error per token when
    ``H = 2 XᵀX / N``.
    """
    W = weight.float()
    H = H.float().to(W.device)
    if not bool(torch.isfinite(H).all()):
        logger.warning("COMQ: the Gram matrix has non-finite entries; falling back to RTN for this layer")
        return rtn_quantize(weight, bits=bits, group_size=group_size, sym=sym)
    rows, n = W.shape
    grid = GroupGrid.fit(W, bits=bits, group_size=group_size, sym=sym)
    diag = torch.diagonal(H)
    order = torch.argsort(W.abs() * diag.clamp(min=0).sqrt(), dim=1, descending=True)
    codes = torch.zeros(rows, n, device=W.device)
    residual = torch.zeros_like(W)  # W - Q; Q starts at W
    row_index = torch.arange(rows, device=W.device)
    for _ in range(sweeps):
        G = residual @ H  # recomputed each sweep so rounding drift does not accumulate
        for t in range(n):
            j = order[:, t]
            h_jj = diag[j]
            r_j = residual[row_index, j]
            w_j = W[row_index, j]
            # Dead input (H_jj == 0): the coordinate does not affect the error; round to nearest.
            target = torch.where(h_jj > 0, w_j + (G[row_index, j] - h_jj * r_j) / h_jj.clamp(min=1e-30), w_j)
            cols = j.unsqueeze(1)
            code = grid.nearest(target.unsqueeze(1), cols)
            new_r = w_j - grid.value(code, cols)[:, 0]
            codes[row_index, j] = code[:, 0]
            residual[row_index, j] = new_r
            G += (new_r - r_j).unsqueeze(1) * H[j]
        if update_scale:
            grid = _update_scales(W, H, grid, codes)
            residual = W - grid.value(codes, grid.all_columns(rows))
    row_losses = ((residual @ H) * residual).sum(dim=1) / 2
    return grid.result(codes, row_losses)


def _update_scales(W: torch.Tensor, H: torch.Tensor, grid: GroupGrid, codes: torch.Tensor) -> GroupGrid:
    """One coordinate step on every (row, group) scale, groups in order, codes fixed.

    With ``v`` the integer offsets ``codes - zero`` of one group (zero elsewhere) and residual ``r = w - q``, changing
    the scale by ``d`` changes the error by ``-2 d vᵀHr + d² vᵀHv``; the minimiser is ``d = vᵀHr / vᵀHv``.
    """
    rows = W.shape[0]
    cols = grid.all_columns(rows)
    scales = grid.scales.clone()
    offsets = codes - grid.at(cols).zero
    residual = W - grid.value(codes, cols)
    for g in range(scales.shape[1]):
        mask = grid.g_idx == g
        v = torch.where(mask, offsets, torch.zeros_like(offsets))
        Hv = v @ H
        num = (Hv * residual).sum(dim=1)
        den = (Hv * v).sum(dim=1)
        old = scales[:, g]
        best = old + num / den.clamp(min=1e-30)
        new = best.to(SCALE_DTYPE).float().clamp(min=MIN_SCALE)
        d = new - old
        better = (den > 0) & torch.isfinite(new) & (d * d * den - 2 * d * num < 0)
        d = torch.where(better, d, torch.zeros_like(d))
        scales[:, g] = old + d
        residual -= d.unsqueeze(1) * v
    return replace(grid, scales=scales)


@register_algorithm("comq")
class COMQQuantizer(GramQuantizer):
    """Accumulates ``H = 2 Σ x xᵀ / N`` over calibration tokens, then runs :func:`comq_quantize`."""

    def __init__(
        self,
        in_features: int,
        *,
        bits: int,
        group_size: int,
        sym: bool,
        comq_sweeps: int = 1,
        comq_update_scale: bool = False,
        **options: object,
    ) -> None:
        super().__init__(in_features, bits=bits, group_size=group_size, sym=sym)
        self.sweeps = comq_sweeps
        self.update_scale = comq_update_scale

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return comq_quantize(
            weight,
            self.hessian(weight.device),
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            sweeps=self.sweeps,
            update_scale=self.update_scale,
        )
