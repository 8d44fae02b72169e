"""COMQ (Zhang et al., arXiv 2403.07134): coordinate-wise minimisation of the layer reconstruction error.

For every output row ``w`` with quantized values ``q``, COMQ minimises ``(w - q)ᵀ H (w - q)`` (``H`` the input Gram
matrix ``2 XᵀX / N``, the same Hessian as GPTQ) one coordinate at a time. With the other coordinates fixed the
problem in ``q_j`` is a 1-D convex quadratic whose minimiser is

    t* = w_j + Σ_{k≠j} H_jk (w_k - q_k) / H_jj

so the best grid value is the grid point nearest to ``t*``. Before the first sweep ``q = w`` (zero residual), so
coordinates not yet visited still hold their float value. Each row visits its coordinates in its own greedy order,
decreasing ``|w_j| · ||x_j||`` (the released code's ``--greedy``). ``G = (W - Q) H`` supplies the sums; it is updated
lazily in blocks of ``b`` steps (``n = in``):

- inside a block, step ``t`` adds its change times ``H[j_t, j_s]`` to the ``b - t - 1`` targets of the block still to
  come: ``rows · n · (b - 1) / 2`` scattered reads of ``H`` per sweep and ``n`` steps of ``O(rows)`` vector work;
- after the block, the rest of ``G``: row ``r``'s residual changed at its ``b`` visited columns only, so its row of
  ``G`` gains ``Σ_t d_t H[j_t, :]``, a weighted sum of ``b`` rows of ``H``
  (:func:`torch.nn.functional.embedding_bag`, one column tile of ``H`` and of ``G`` at a time): ``rows · n²``
  multiply-adds per sweep, plus per block one pass over ``G`` and, once ``rows · b >= n``, over nearly all of ``H``
  (``rows · n² / b + n³ / b`` memory traffic per sweep). The block size balances these passes against the scattered
  reads above (``BLOCK_SIZE``).

Weights, residuals and codes are kept in visiting order, so a block is a slice; the greedy order costs one sort,
``O(rows · n log n)``. The losses come from the ``G`` kept current (no further product); each extra sweep and each
scale update recompute ``G`` with one ``rows x n x n`` matrix product, so rounding drift does not accumulate.

A sweep is therefore ``O(rows · n²)``, the order of GPTQ's column loop, but not at matrix-product speed: the rows
visit their columns in different orders, so the update of ``G`` cannot be one shared product as in GPTQ (multiplying
by the dense ``rows x n`` block of changes instead would cost ``O(rows · n³ / b)``). Each row reads its own rows of
``H``, with little reuse between rows, so the update runs at memory speed; ``benchmarks/algorithm_speed.py`` measures
the ratio to GPTQ. At ``rows = n = 4096`` (one thread, per block of 32 steps) the update of ``G`` takes about 37 ms:
22 ms of multiply-adds at about 24 G/s (a float32 matrix product reaches about 85 G/s), 7 ms of fixed cost per
(row, tile) sum and 10 ms to read and write the 64 MB of ``G``; the in-block corrections take about 25 ms, 2 M
scattered reads of ``H`` that each fetch a cache line for 4 bytes. Both parts are bound by memory traffic, not by
arithmetic, and the block size trades one against the other. The blocked sums add the same terms as a step-by-step update in another order, so codes can differ
only where a target lies within float32 rounding of a decision boundary (a tie); such a flip then changes the rest of
that row's sweep.

The grid (min-max per row and per group, or an MX format's shared power-of-two scale per block of 32 columns) is
fitted once on the float weights and kept fixed, as in the reference code; "nearest grid point" is the format's own
rounding (:mod:`optimum_bc.formats`). ``update_scale`` adds the paper's claim that scales are variables too: after
each sweep every (row, group) scale takes the exact 1-D minimiser for the current codes, rounded to its storage (the
nearest float16; for MX the better of the two neighbouring powers of two), and is kept only when it lowers the error.
"""

import logging
import math
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

# Coordinates per lazy block, for as many rows as inputs. Keeping g current inside a block reads rows · in · b / 2
# scattered entries of H per sweep, while each block's update of G streams all of G and, once rows · b >= in, all of
# H (in / b passes per sweep): for rows = in, 32 balances the two (measured for in = 1024 and 4096). With fewer rows
# than inputs the scattered reads shrink and the passes over H dominate, so the block grows with sqrt(in / rows)
# (512 x 11008: 128-column blocks take 0.7x the time of 32-column ones).
BLOCK_SIZE = 32
MAX_BLOCK_SIZE = 256
# Columns per tile in the update of G (a power of two, so a column's tile is a shift): a tile of H (in x tile) and
# the matching tile of G stay in cache while the rows of H are summed. The tile is the widest power of two up to
# MAX_TILE_SHIFT whose tile of H fits in TILE_BYTES, and at least 2^MIN_TILE_SHIFT columns: wider tiles mean fewer
# (row, tile) sums, each of which has a fixed cost (in = 1024: 256-column tiles take 0.9x the time of 64-column ones;
# in = 11008: 64-column tiles beat 32- and 16-column ones although a tile of H then exceeds 1 MiB).
TILE_BYTES = 1 << 20
MIN_TILE_SHIFT = 6
MAX_TILE_SHIFT = 8


def comq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    sweeps: int = 1,
    update_scale: bool = False,
    block_size: int | None = None,
    format: str = INT_FORMAT,
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` given the input Gram matrix ``H`` ``[in, in]`` (neither is modified).

    ``format`` picks the grid (MX formats need ``group_size`` = the MX block size). ``row_losses`` holds
    ``(w - q)ᵀ H (w - q) / 2`` per row: the mean squared output error per token when ``H = 2 XᵀX / N``.
    ``block_size`` (steps per lazy block) only changes the speed and the float summation order; None picks it from
    the shape (:func:`default_block_size`).
    """
    check_group_size("COMQ", format, bits, sym, group_size)
    W = weight.float()
    H = H.float().to(W.device)
    if not bool(torch.isfinite(H).all()):
        logger.warning("COMQ: the Gram matrix has non-finite entries; falling back to RTN for this layer")
        return rtn_quantize(weight, bits=bits, group_size=group_size, sym=sym, format=format)
    H = H.contiguous()
    rows, n = W.shape
    block_size = block_size or default_block_size(rows, n)
    grid = GroupGrid.fit(W, bits=bits, group_size=group_size, sym=sym, format=format)
    diag = torch.diagonal(H).contiguous()
    order = torch.argsort(W.abs() * diag.clamp(min=0).sqrt(), dim=1, descending=True)
    # Weights, residuals W - Q and codes are kept in visiting order and transposed ([t, r] is column order[r, t] of
    # row r), so that a block is a slice of contiguous rows. Indices into them are int32 (half the memory of int64).
    visits = order.T.to(torch.int32).contiguous()
    w_seq = W.gather(1, order).T.contiguous()
    r_seq = torch.zeros_like(w_seq)  # Q starts at W
    codes_seq = torch.empty_like(w_seq)
    shift = tile_shift(n)
    H_tiles = _tiles(H, 1 << shift)
    G = torch.zeros(H_tiles.shape[0], rows, 1 << shift, device=W.device)  # G = (W - Q) H in tiles, like H
    positions = _tile_positions(visits if G.numel() < 2**31 else visits.long(), shift)  # each visit's entry in G
    for sweep in range(sweeps):
        for t0 in range(0, n, block_size):
            seq = slice(t0, t0 + block_size)
            Jt = visits[seq]  # (b, rows): the columns each row visits in this block
            g = G.view(-1).index_select(0, positions[seq].reshape(-1)).view(Jt.shape)
            r = r_seq[seq] if sweep > 0 else None  # the first sweep starts from a zero residual
            codes_seq[seq], delta = _sweep_block(w_seq[seq], r, g, H, diag, Jt, grid)
            r_seq[seq] += delta
            _add_selected_rows(G, Jt.T.contiguous(), delta.T.contiguous(), H_tiles)
        codes = torch.empty_like(W).scatter_(1, order, codes_seq.T.contiguous())
        if update_scale:
            grid = _update_scales(W, H, grid, codes)
        if update_scale or sweep + 1 < sweeps:  # recomputed so that rounding drift does not accumulate
            residual = W - grid.value(codes, grid.all_columns(rows))
            r_seq = residual.gather(1, order).T.contiguous()
            G = _tiles(residual @ H, 1 << shift)
    # G = (W - Q) H is current, so the losses need no further product.
    residual = torch.empty_like(W).scatter_(1, order, r_seq.T.contiguous())
    row_losses = (_untile(G, n) * residual).sum(dim=1) / 2
    return grid.result(codes, row_losses)


def default_block_size(rows: int, n: int) -> int:
    """``BLOCK_SIZE · sqrt(n / rows)``, kept within ``[BLOCK_SIZE, MAX_BLOCK_SIZE]`` (see ``BLOCK_SIZE``)."""
    return int(min(MAX_BLOCK_SIZE, max(BLOCK_SIZE, round(BLOCK_SIZE * math.sqrt(n / max(rows, 1))))))


def tile_shift(n: int) -> int:
    """log2 of the columns per tile of ``H`` and ``G`` for ``n`` inputs (see ``TILE_BYTES``)."""
    fits = (TILE_BYTES // (4 * max(n, 1))).bit_length() - 1  # the widest power of two whose in x tile float32 fits
    return max(MIN_TILE_SHIFT, min(MAX_TILE_SHIFT, fits, (n - 1).bit_length()))  # no wider than n needs


def _tiles(M: torch.Tensor, width: int) -> torch.Tensor:
    """``M`` ``(m, n)`` as ``(tiles, m, width)`` contiguous column tiles, the last one zero-padded (a copy)."""
    m, n = M.shape
    count = -(-n // width)
    if n == count * width:  # no padding: one copy
        return M.view(m, count, width).transpose(0, 1).contiguous()
    padded = torch.zeros(m, count * width, dtype=M.dtype, device=M.device)
    padded[:, :n] = M
    return padded.view(m, count, width).transpose(0, 1).contiguous()


def _untile(T: torch.Tensor, n: int) -> torch.Tensor:
    """The ``(m, n)`` matrix whose :func:`_tiles` is ``T``."""
    count, m, width = T.shape
    return T.transpose(0, 1).reshape(m, count * width)[:, :n]


def _tile_positions(visits: torch.Tensor, shift: int) -> torch.Tensor:
    """Flat positions, in a ``(tiles, rows, 2^shift)`` tiling of ``G``, of the entries ``[r, visits[t, r]]``."""
    rows, width = visits.shape[1], 1 << shift
    row_start = torch.arange(rows, dtype=visits.dtype, device=visits.device) * width
    return ((visits >> shift) * (rows * width)).add_(visits & (width - 1)).add_(row_start)


def _add_selected_rows(G: torch.Tensor, J: torch.Tensor, delta: torch.Tensor, H_tiles: torch.Tensor) -> None:
    """``G[r] += Σ_t delta[r, t] H[J[r, t], :]`` in place, tile by tile (``G`` and ``H`` as :func:`_tiles`).

    ``O(rows · b · in)``: a weighted sum of ``b`` rows of ``H`` per row (:func:`torch.nn.functional.embedding_bag`),
    one column tile of ``H`` and of ``G`` at a time.
    """
    for G_k, H_k in zip(G, H_tiles, strict=True):
        G_k += F.embedding_bag(J, H_k, per_sample_weights=delta, mode="sum")


def _sweep_block(
    w: torch.Tensor,
    r: torch.Tensor | None,
    g: torch.Tensor,
    H: torch.Tensor,
    diag: torch.Tensor,
    Jt: torch.Tensor,
    grid: GroupGrid,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visit columns ``Jt[t]`` (one per row) for ``t = 0..b-1``; return their codes and residual changes.

    Every argument and result is laid out ``(b, rows)``, so that each step works on contiguous vectors of length
    ``rows``: ``w``, ``r``, ``g`` are the weights, residuals ``w - q`` and ``G = (W - Q) H`` at the visited columns
    when the block starts (``r`` None: all zero, two operations fewer per step). ``g`` is kept current inside the
    block: step ``t`` adds its change times ``H[Jt[t, r], Jt[s, r]]`` to the targets ``s > t`` still to come.
    """
    b, n = Jt.shape[0], H.shape[0]
    Jf = Jt if n * n < 2**31 else Jt.long()  # flat indices into H
    rows_of_H = Jf * n
    H_flat = H.view(-1)
    h = diag.index_select(0, Jt.view(-1)).view(Jt.shape)
    # Per block, not per step: the grid at the visited columns, and the parts of the target that do not change
    # inside the block (a column's own residual only changes when it is visited). A dead input (H_jj <= 0) does not
    # affect the error: dividing by inf leaves its target at w, the nearest grid point.
    groups = grid.g_idx.index_select(0, Jt.view(-1)).view(Jt.shape)
    scales, zeros = grid.scales.T.gather(0, groups), grid.zeros.T.gather(0, groups)
    hc = torch.where(h > 0, h.clamp(min=1e-30), torch.inf)
    fmt = grid.fmt
    codes, deltas = [], []
    rs, hrs = (r.unbind(), (h * r).unbind()) if r is not None else ((None,) * b, (None,) * b)
    steps = zip(w.unbind(), g.unbind(), hc.unbind(), scales.unbind(), zeros.unbind(), rs, hrs, strict=True)
    for t, (w_t, g_t, hc_t, scale, zero, r_t, hr_t) in enumerate(steps):
        code = fmt.grid(scale, zero).quantize(torch.addcdiv(w_t, g_t if r_t is None else g_t - hr_t, hc_t))
        d = w_t - fmt.decode(code, scale, zero)
        if r_t is not None:
            d -= r_t
        codes.append(code)
        deltas.append(d)
        if t + 1 < b:  # only the columns still to come in this block need the change
            flat = rows_of_H[t] + Jf[t + 1 :]
            g[t + 1 :].addcmul_(H_flat.index_select(0, flat.view(-1)).view(flat.shape), d)
    return torch.stack(codes), torch.stack(deltas)


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
