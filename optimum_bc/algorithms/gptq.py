"""GPTQ (Frantar et al., arXiv 2210.17323, Algorithm 1) with groups, act-order and dampening escalation.

Notation follows the paper: ``W`` is the ``[out, in]`` weight, ``H = 2 X Xᵀ / N`` the Hessian of the layer-wise
squared error from the layer inputs ``X``, ``U`` the upper Cholesky factor of ``H⁻¹``. Columns are quantized one at a
time and the scaled error of each is spread over the columns not yet quantized; updates are applied lazily per block
of columns. With act-order (``desc_act``) columns go in order of decreasing ``diag(H)`` and groups are formed in that
order (``g_idx`` maps each original column to its group).
"""

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..formats.formats import INT_FORMAT, get_format, is_mx
from .base import GramQuantizer, LowerRows, QuantizedWeight
from .registry import register_algorithm
from .rtn import rtn_quantize


logger = logging.getLogger(__name__)

BLOCK_SIZE = 128
MAX_DAMP_TRIES = 8


def all_finite(M: torch.Tensor) -> bool:
    """Whether every entry of ``M`` is finite, checked one row block at a time (``isfinite`` of a whole in×in
    matrix makes temporaries of its size)."""
    return all(bool(torch.isfinite(M[r : r + BLOCK_SIZE]).all()) for r in range(0, M.shape[0], BLOCK_SIZE))


def _transpose_in_place(M: torch.Tensor) -> None:
    """``M = Mᵀ`` for a square matrix, one pair of tiles at a time (exact: entries only move)."""
    n = M.shape[0]
    for i in range(0, n, BLOCK_SIZE):
        M[i : i + BLOCK_SIZE, i : i + BLOCK_SIZE] = M[i : i + BLOCK_SIZE, i : i + BLOCK_SIZE].T.clone()
        for j in range(i + BLOCK_SIZE, n, BLOCK_SIZE):
            upper = M[i : i + BLOCK_SIZE, j : j + BLOCK_SIZE].clone()
            M[i : i + BLOCK_SIZE, j : j + BLOCK_SIZE] = M[j : j + BLOCK_SIZE, i : i + BLOCK_SIZE].T
            M[j : j + BLOCK_SIZE, i : i + BLOCK_SIZE] = upper.T


def factor_in_place(work: torch.Tensor, damp: float) -> bool:
    """Overwrite ``work`` (``H``, symmetric, contiguous) with the upper Cholesky factor of ``(H + λ I)⁻¹``,
    ``λ = damp · mean(diag H)``, without another in×in matrix.

    LAPACK works on column-major matrices; torch copies a row-major ``out`` through a column-major temporary of its
    size. The column-major view ``work.mT`` of a symmetric ``work`` is the same matrix, so every step runs in place
    on it, with the same LAPACK calls (and bits) as the out-of-place ``cholesky → cholesky_inverse →
    cholesky(upper)``; the upper factor then lies transposed in ``work`` and is moved back tile by tile.
    Returns whether it succeeded; on failure ``work`` holds garbage and must be refilled before another try.
    """
    work.diagonal().add_(damp * torch.diagonal(work).mean())
    A = work.mT
    info = torch.empty((), dtype=torch.int32, device=work.device)
    torch.linalg.cholesky_ex(A, out=(A, info))
    if info.item() != 0:
        return False
    torch.cholesky_inverse(A, out=A)
    torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
    if info.item() != 0:
        return False
    _transpose_in_place(work)
    return all_finite(work)


def inverse_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + λ I)⁻¹`` with ``λ = damp · mean(diag H)`` (``H`` is not modified).

    When the factorisation fails (``H`` not positive definite in float32), the relative dampening is multiplied by 10
    and retried. Returns ``(None, damp)`` if every try failed, so the caller can fall back instead of producing NaN.
    """
    damp = damp_percent
    work = torch.empty_like(H)
    for _ in range(MAX_DAMP_TRIES):
        work.copy_(H)
        if factor_in_place(work, damp):
            return work, damp
        damp *= 10.0
    return None, damp


def _permute_rows_in_place(M: torch.Tensor, perm: list[int]) -> None:
    """``M = M[perm]``, following the permutation's cycles with one row of temporary (exact: rows only move)."""
    seen = [False] * len(perm)
    for start in range(len(perm)):
        if seen[start]:
            continue
        first = M[start].clone()
        i = start
        while True:
            seen[i] = True
            j = perm[i]
            if j == start:
                M[i] = first
                break
            M[i] = M[j]
            i = j


def _fill_permuted(
    work: torch.Tensor, H: torch.Tensor | LowerRows, perm: torch.Tensor | None, dead: torch.Tensor
) -> None:
    """``work = H[perm][:, perm]`` with the dead diagonal set to 1, built in ``work`` one row block at a time (no
    whole-matrix temporary); ``H`` may be given as its lower triangle."""
    if isinstance(H, LowerRows):
        H.fill(work)
        if perm is not None:
            _permute_rows_in_place(work, perm.tolist())
    elif perm is None:
        work.copy_(H)
    else:
        torch.index_select(H, 0, perm, out=work)
    if perm is not None:
        for r in range(0, work.shape[0], BLOCK_SIZE):
            work[r : r + BLOCK_SIZE] = work[r : r + BLOCK_SIZE][:, perm]
        dead = dead[perm]
    work[dead, dead] = 1.0


def _solve_factor(
    H: torch.Tensor | LowerRows, dead: torch.Tensor, perm: torch.Tensor | None, damp_percent: float
) -> tuple[torch.Tensor | None, float]:
    """The upper Cholesky factor of the permuted, dampened ``H⁻¹`` in one new in×in matrix (``H`` untouched)."""
    damp = damp_percent
    device = H.device if isinstance(H, torch.Tensor) else H.blocks[0].device
    work = torch.empty(H.shape if isinstance(H, torch.Tensor) else (H.n, H.n), device=device)
    for _ in range(MAX_DAMP_TRIES):
        _fill_permuted(work, H, perm, dead)
        if factor_in_place(work, damp):
            return work, damp
        damp *= 10.0
    return None, damp


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor | Callable[[], torch.Tensor | LowerRows],
    *,
    bits: int,
    group_size: int,
    sym: bool,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    block_size: int = BLOCK_SIZE,
    format: str = INT_FORMAT,
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` given the input Hessian ``H`` ``[in, in]`` (not modified), or a function that
    returns it or its lower triangle (:class:`~optimum_bc.algorithms.base.LowerRows`; then this call holds its only
    reference and frees it once its inverse factor exists).

    ``format`` picks the grid (:mod:`optimum_bc.formats`); each group's grid is fitted when the loop reaches the
    group's first column, on the already-updated columns. MX formats need ``group_size`` = the MX block size and
    no act-order, so that a group is a block of consecutive input columns.

    Memory: besides ``H`` only one in×in matrix is made (the factor ``U``, computed in place by LAPACK), so while
    factoring at most 1.5 in×in matrices are alive when ``H`` comes as its lower triangle, and one (``U``) in the
    column loop; the float32 working copy of the weights is made only after ``H`` is freed, and the codes are uint8.
    """
    fmt = get_format(format, bits, sym)
    if is_mx(fmt.name) and (group_size != fmt.block_size or desc_act):
        raise ValueError(
            f"GPTQ with format={fmt.name!r} needs group_size={fmt.block_size} and desc_act=False, got "
            f"group_size={group_size}, desc_act={desc_act}"
        )
    H = H() if callable(H) else H
    if isinstance(H, torch.Tensor):
        H = H.float()
    rows, n = weight.shape
    if not (all_finite(H) if isinstance(H, torch.Tensor) else H.all_finite()):
        logger.warning("GPTQ: the Hessian has non-finite entries; falling back to RTN for this layer")
        return rtn_quantize(weight, bits=bits, group_size=group_size, sym=sym, format=format)

    diag = torch.diagonal(H).clone() if isinstance(H, torch.Tensor) else H.diagonal()
    dead = diag == 0
    if desc_act:
        diag[dead] = 1.0
        perm = torch.argsort(diag, descending=True)
    else:
        perm = torch.arange(n, device=weight.device)

    U, damp = _solve_factor(H, dead, perm if desc_act else None, damp_percent)
    del H
    if U is None:
        logger.warning("GPTQ: Hessian not factorisable even with damp=%.3g; falling back to RTN for this layer", damp)
        return rtn_quantize(weight, bits=bits, group_size=group_size, sym=sym, format=format)
    # The working copy of the weights only after the Hessian is gone: the two are never held together.
    W = weight.float()[:, perm] if desc_act else weight.float().clone()
    W[:, dead[perm] if desc_act else dead] = 0.0

    size = n if group_size == -1 else group_size
    # Blocks are whole multiples of the group size, so every group is fitted on its current, updated columns.
    B = block_size if group_size == -1 else size * max(1, block_size // size)
    num_groups = -(-n // size)
    codes = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(rows, num_groups, device=W.device)
    zeros = torch.zeros(rows, num_groups, device=W.device)
    losses = torch.zeros(rows, device=W.device)
    grid = fmt.fit(W) if group_size == -1 else None  # else fitted per group, at its first column

    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % size == 0:
                if group_size != -1:
                    grid = fmt.fit(W1[:, i : i + size])
                scales[:, j // size] = grid.scale[:, 0]
                zeros[:, j // size] = grid.zero[:, 0]
            w = W1[:, i : i + 1]  # (rows, 1)
            q = grid.quantize(w)
            err = (w - grid.dequantize(q)) / U1[i, i]
            codes[:, j] = q[:, 0]
            losses += err[:, 0] ** 2 / 2
            W1[:, i:] -= err @ U1[i : i + 1, i:]
            Err1[:, i] = err[:, 0]
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)  # in place: no temporary the size of W

    invperm = torch.argsort(perm)
    g_idx = torch.empty(n, dtype=torch.int32, device=W.device)
    g_idx[perm] = (torch.arange(n, device=W.device) // size).to(torch.int32)
    return QuantizedWeight(
        codes=codes[:, invperm],
        scales=scales,
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx,
        row_losses=losses,
        damp=damp,
        format=fmt.name,
    )


@register_algorithm("gptq")
class GPTQQuantizer(GramQuantizer):
    """Accumulates ``H = 2 Σ x xᵀ / N`` over calibration tokens, then runs :func:`gptq_quantize`.

    ``quantize`` hands over its statistics (``take_lower``): the float64 lower triangle becomes the float32 one block
    by block (the factor is filled from it, and refilled on a dampening retry), and it is freed once the inverse
    factor exists, so the column loop holds one in×in matrix.
    """

    supports_mx = True

    def __init__(
        self, in_features: int, *, damp_percent: float = 0.01, desc_act: bool = False, **options: Any
    ) -> None:
        super().__init__(in_features, **options)
        self.damp_percent = damp_percent
        self.desc_act = desc_act

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return gptq_quantize(
            weight,
            lambda: self.take_lower(weight.device),
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            damp_percent=self.damp_percent,
            desc_act=self.desc_act,
            format=self.format,
        )
