"""COMQ (Zhang et al., arXiv 2403.07134): coordinate-wise minimisation of the layer reconstruction error.

For every output row ``w`` with quantized values ``q``, COMQ minimises ``(w - q)ᵀ H (w - q)`` (``H`` the input Gram
matrix ``2 XᵀX / N``, the same Hessian as GPTQ) one coordinate at a time. With the other coordinates fixed the
problem in ``q_j`` is a 1-D convex quadratic whose minimiser is

    t* = w_j + Σ_{k≠j} H_jk (w_k - q_k) / H_jj

so the best grid value is the grid point nearest to ``t*``. Before the first sweep ``q = w`` (zero residual), so
coordinates not yet visited still hold their float value. Each row visits its coordinates in its own greedy order,
decreasing ``|w_j| · ||x_j||`` (the released code's ``--greedy``). ``G = (W - Q) H`` supplies the sums; it is updated
lazily in blocks of ``b`` steps:

- inside a block, only the visited entries: ``b x b`` entries of ``H`` per row, gathered once per block, so
  ``O(rows · in · b)`` per sweep;
- after the block, the rest of ``G``: row ``r``'s residual changed at its ``b`` visited columns only, so its row of
  ``G`` gains ``Σ_t d_t H[j_t, :]``, ``O(b · in)`` per row (a weighted sum of ``b`` rows of ``H``,
  :func:`torch.nn.functional.embedding_bag`, over column tiles of ``H`` that stay in cache), ``O(rows · in²)`` per
  sweep. The tiles are one copy of ``H``.

A sweep therefore costs ``O(rows · in²)`` multiply-adds, the order of GPTQ's, plus one ``rows x in x in`` product per
extra sweep (``G`` recomputed from the residual) and one for the final losses. The rows visit their columns in
different orders, so the update cannot be one shared matrix product as in GPTQ: it reads ``rows · in²`` entries of
``H`` with little reuse and runs at memory speed, not matmul speed (see ``benchmarks/algorithm_speed.py``). Multiplying
by the dense ``rows x in`` block of changes instead, the earlier implementation, costs ``O(rows · in³ / b)``.
Both sum the same terms of ``G`` in a different order, so their codes can differ only where a target lies within
float32 rounding of a decision boundary (a tie); such a flip then changes the rest of that row's sweep.

The grid (min-max per row and per group, or an MX format's shared power-of-two scale per block of 32 columns) is
fitted once on the float weights and kept fixed, as in the reference code; "nearest grid point" is the format's own
rounding (:mod:`optimum_bc.formats`). ``update_scale`` adds the paper's claim that scales are variables too: after
each sweep every (row, group) scale takes the exact 1-D minimiser for the current codes, rounded to its storage (the
nearest float16; for MX the better of the two neighbouring powers of two), and is kept only when it lowers the error.
"""

import logging
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..formats.formats import INT_FORMAT
from .base import GramQuantizer, QuantizedWeight
from .grid import GroupGrid, check_group_size
from .registry import register_algorithm
from .rtn import rtn_quantize


logger = logging.getLogger(__name__)

# Coordinates per lazy block. The within-block gather grows with it (O(rows · in · b) per sweep) while the update of G
# does not (O(rows · in²) per sweep), so blocks are kept short; below ~16 the per-block Python overhead shows.
BLOCK_SIZE = 32
# Columns of H per tile in the update of G: a tile of H (in x 128) and of G stay in cache while the rows are summed
# (twice as fast as summing whole rows of H for in = 4096).
TILE = 128


def comq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    sweeps: int = 1,
    update_scale: bool = False,
    block_size: int = BLOCK_SIZE,
    format: str = INT_FORMAT,
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` given the input Gram matrix ``H`` ``[in, in]`` (neither is modified).

    ``format`` picks the grid (MX formats need ``group_size`` = the MX block size). ``row_losses`` holds
    ``(w - q)ᵀ H (w - q) / 2`` per row: the mean squared output error per token when ``H = 2 XᵀX / N``.
    """
    check_group_size("COMQ", format, bits, sym, group_size)
    W = weight.float()
    H = H.float().to(W.device)
    if not bool(torch.isfinite(H).all()):
        logger.warning("COMQ: the Gram matrix has non-finite entries; falling back to RTN for this layer")
        return rtn_quantize(weight, bits=bits, group_size=group_size, sym=sym, format=format)
    rows, n = W.shape
    grid = GroupGrid.fit(W, bits=bits, group_size=group_size, sym=sym, format=format)
    diag = torch.diagonal(H)
    order = torch.argsort(W.abs() * diag.clamp(min=0).sqrt(), dim=1, descending=True)
    codes = torch.zeros(rows, n, device=W.device)
    residual = torch.zeros_like(W)  # W - Q; Q starts at W
    tiles = _column_tiles(H, TILE)
    for sweep in range(sweeps):
        # Recomputed each sweep so rounding drift does not accumulate; the first sweep starts from a zero residual.
        G = residual @ H if sweep > 0 else torch.zeros_like(W)
        for t0 in range(0, n, block_size):
            J = order[:, t0 : t0 + block_size]  # (rows, b): the columns each row visits in this block
            codes_b, delta = _sweep_block(W.gather(1, J), residual.gather(1, J), G.gather(1, J), H, J, grid)
            codes.scatter_(1, J, codes_b)
            residual.scatter_add_(1, J, delta)
            _add_selected_rows(G, J, delta, tiles)
        if update_scale:
            grid = _update_scales(W, H, grid, codes)
            residual = W - grid.value(codes, grid.all_columns(rows))
    row_losses = ((residual @ H) * residual).sum(dim=1) / 2
    return grid.result(codes, row_losses)


def _column_tiles(H: torch.Tensor, width: int) -> torch.Tensor:
    """``H`` as ``(tiles, in, width)`` contiguous column tiles, the last one zero-padded (a copy of ``H``)."""
    n = H.shape[1]
    count = -(-n // width)
    padded = torch.zeros(H.shape[0], count * width, dtype=H.dtype, device=H.device)
    padded[:, :n] = H
    return padded.view(H.shape[0], count, width).transpose(0, 1).contiguous()


def _add_selected_rows(G: torch.Tensor, J: torch.Tensor, delta: torch.Tensor, tiles: torch.Tensor) -> None:
    """``G[r] += Σ_t delta[r, t] H[J[r, t], :]`` in place: the rows of ``H`` that each row's changes select.

    ``O(rows · b · in)``: a weighted sum of ``b`` rows of ``H`` per row (:func:`torch.nn.functional.embedding_bag`),
    one column tile of ``H`` at a time.
    """
    n = G.shape[1]
    width = tiles.shape[2]
    for k in range(tiles.shape[0]):
        stop = min((k + 1) * width, n)
        part = F.embedding_bag(J, tiles[k], per_sample_weights=delta, mode="sum")
        G[:, k * width : stop] += part[:, : stop - k * width]


def _sweep_block(
    w: torch.Tensor, r: torch.Tensor, g: torch.Tensor, H: torch.Tensor, J: torch.Tensor, grid: GroupGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visit columns ``J[:, t]`` (one per row) for ``t = 0..b-1``; return their codes and residual changes.

    ``w``, ``r``, ``g`` are the weights, residuals ``w - q`` and ``G = (W - Q) H`` at ``J`` when the block starts; ``g``
    is kept current inside the block from the ``b x b`` sub-matrices ``H[J_r, J_r]`` of each row.
    """
    rows, b = J.shape
    n = H.shape[0]
    flat = (J.unsqueeze(2) * n + J.unsqueeze(1)).reshape(-1)
    Hb = H.reshape(-1).index_select(0, flat).view(rows, b, b)  # H[J_r][:, J_r] per row
    h = torch.diagonal(Hb, dim1=1, dim2=2)
    # Per block, not per step: the grid at the visited columns, and the parts of the target that do not change
    # inside the block (a column's own residual only changes when it is visited).
    scales, zeros = grid.params(J)
    live, hr, hc = h > 0, h * r, h.clamp(min=1e-30)
    g = g.clone()
    codes = torch.zeros_like(w)
    delta = torch.zeros_like(w)
    for t in range(b):
        # Dead input (H_jj == 0): the coordinate does not affect the error; round to nearest.
        target = torch.where(live[:, t], w[:, t] + (g[:, t] - hr[:, t]) / hc[:, t], w[:, t])
        scale, zero = scales[:, t : t + 1], zeros[:, t : t + 1]
        code = grid.fmt.grid(scale, zero).quantize(target.unsqueeze(1))
        d = w[:, t] - grid.fmt.decode(code, scale, zero)[:, 0] - r[:, t]
        codes[:, t] = code[:, 0]
        delta[:, t] = d
        g += d.unsqueeze(1) * Hb[:, t]
    return codes, delta


def _update_scales(W: torch.Tensor, H: torch.Tensor, grid: GroupGrid, codes: torch.Tensor) -> GroupGrid:
    """One coordinate step on every (row, group) scale, groups in order, codes fixed.

    With ``v`` the unit values of one group's codes (``codes - zero`` for integers, the element values for MX; zero
    elsewhere) and residual ``r = w - q``, changing the scale by ``d`` changes the error by ``-2 d vᵀHr + d² vᵀHv``;
    the minimiser is ``d = vᵀHr / vᵀHv``. Of the storable scales next to it the one with the lowest error is taken.
    Cost: one ``rows x group x in`` product per group, ``O(rows · in²)`` per call.
    """
    rows = W.shape[0]
    cols = grid.all_columns(rows)
    scales = grid.scales.clone()
    offsets = grid.unit_value(codes, cols)
    residual = W - grid.value(codes, cols)
    for g in range(scales.shape[1]):
        idx = torch.nonzero(grid.g_idx == g).squeeze(1)
        v = offsets[:, idx]
        Hv = v @ H[idx]  # (rows, in): the group's v, zero elsewhere, times H
        num = (Hv * residual).sum(dim=1)
        den = (Hv[:, idx] * v).sum(dim=1)
        old = scales[:, g]
        best = old + num / den.clamp(min=1e-30)
        cand = grid.fmt.scale_candidates(torch.where(torch.isfinite(best) & (best > 0), best, old))
        dc = cand - old.unsqueeze(1)
        change = dc * dc * den.unsqueeze(1) - 2 * dc * num.unsqueeze(1)  # error change of each candidate
        change = torch.where(torch.isfinite(change), change, torch.inf)
        pick = change.argmin(dim=1, keepdim=True)
        d = dc.gather(1, pick)[:, 0]
        better = (den > 0) & (change.gather(1, pick)[:, 0] < 0)
        d = torch.where(better, d, torch.zeros_like(d))
        scales[:, g] = old + d
        residual[:, idx] -= d.unsqueeze(1) * v
    return replace(grid, scales=scales)


@register_algorithm("comq")
class COMQQuantizer(GramQuantizer):
    """Accumulates ``H = 2 Σ x xᵀ / N`` over calibration tokens, then runs :func:`comq_quantize`."""

    supports_mx = True

    def __init__(
        self, in_features: int, *, comq_sweeps: int = 1, comq_update_scale: bool = False, **options: Any
    ) -> None:
        super().__init__(in_features, **options)
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
            format=self.format,
        )
