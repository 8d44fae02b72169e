"""ERQ (Zhong et al., ICML 2024, arXiv 2407.06794), the weight part, for weight-only quantized LLM Linears.

Notation: ``A`` holds the inputs the quantized layer sees (tokens as rows: the calibration stream through the already
quantized blocks), ``X`` the float model's inputs of the same layer and tokens, ``W`` the ``[out, in]`` weight. Only
Gram matrices are used: ``H = 2 AᵀA / N`` and ``C = 2 AᵀX / N``.

1. **Aqer** (ridge regression, closed form, :mod:`optimum_bc.algorithms.aqer`). The layer input carries the
   activation-quantization error (with ``act_bits``: ``A`` is the fake-quantized input the packed layer will see)
   and the error of the quantized blocks upstream. The float weight is corrected so that the layer fed by ``A``
   reproduces the float output ``Y = X Wᵀ``::

       ΔWᵀ = (AᵀA + λI)⁻¹ Aᵀ(Y - A Wᵀ) = (H + λI)⁻¹ (C - H) Wᵀ

   The reference also appends a ones column so the bias absorbs the mean error; here that job is left to bias
   compensation (``bias_compensation=True``), which is exactly that mean correction.
2. The grid (min-max per row and group, or an MX format's shared scale per 32-column block) is fitted on the
   corrected weight and kept fixed, as in the reference.
3. **Wqer** (progressive quantize-and-correct). While columns remain, the next ``chunk`` fraction of them (the
   reference halves the remainder), in natural order, is quantized: each coordinate starts at its nearest grid point;
   **rounding refinement** then flips, per row and one coordinate at a time (largest gradient whose sign agrees with
   the error), between the two grid points bracketing the weight while the proxy ``δᵀ H_SS δ`` decreases (at most
   ``refine_iters`` flips); **ridge regression** then moves the still-float columns ``R`` to cancel the chunk's
   output error: ``δ_R = -(H_RR + λI)⁻¹ H_RS δ_S``.

``λ`` (the reference's ``0.1 · coe``, an absolute number tied to its unnormalised ViT Gram matrices) is given here
relative to the mean diagonal of ``H``, like GPTQ's dampening, so it does not depend on the token count or the
activation scale: ``λ = lam · mean(diag H)``.

Cost per layer (``n = in``, ``chunk = c``, ``iters = refine_iters``; every step is a dense matrix operation):

- Aqer: ``(C - H) Wᵀ`` is ``rows · n²``; the ridge solve one Cholesky factorisation (``n³ / 3``) and two triangular
  solves with ``rows`` right-hand sides (``2 rows · n²``).
- Wqer, one chunk of ``k`` columns with ``m`` still float after it: refinement ``rows · k²`` for the start gradient
  and ``rows · k`` per flip (``≤ iters`` flips); the ridge step ``rows · m · k`` for ``H_RS δ``, a Cholesky of
  ``H_RR`` (``m³ / 3``) and its solves (``2 rows · m²``). The remainder shrinks geometrically, so the chunks sum to
  ``O(rows · n²)`` (at ``c = 1/2``: ``rows · n² / 3`` for the refinement gradients, ``rows · n²`` for the ridge
  steps), ``O(iters · rows · n)`` for the flips and ``n³ (1 - c)³ / (3 (1 - (1 - c)³))`` for the factorisations
  (``n³ / 21`` at ``c = 1/2``). A flip round works on the whole chunk, but a row leaves at its first rejected flip:
  on the layers of ``benchmarks/algorithm_speed.py`` (4096 x 1024) 2 to 7 rounds ran per chunk, not ``iters``.
- Losses: one ``rows · n²`` product.

In total ``O(rows · n² + n³)``, the order of GPTQ (whose ``H⁻¹`` factorisation is also ``O(n³)``); nothing is above
``O(rows · n²)`` once ``rows ≥ n``, and for ``rows < n`` the ``n³`` term is Aqer's one factorisation, which any ridge
solve with ``H`` needs.
"""

import logging
from typing import Any

import torch

from ..distributed import all_reduce_sum, is_distributed
from ..formats.formats import INT_FORMAT
from .aqer import aqer_correction, ridge_solve
from .base import GramQuantizer, QuantizedWeight
from .grid import GroupGrid, check_group_size
from .registry import register_algorithm
from .rtn import rtn_quantize


logger = logging.getLogger(__name__)

REFINE_ITERS = 100
#: ``erq_lambda=None``'s ridge for text models (calibrated on many windows of many tokens each).
TEXT_LAMBDA = 0.01


def erq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    C: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    lam: float = 0.01,
    chunk: float = 0.5,
    refine_iters: int = REFINE_ITERS,
    format: str = INT_FORMAT,
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` from ``H = 2 AᵀA / N`` and, for Aqer, ``C = 2 AᵀX / N`` (None: no Aqer).

    ``lam`` is relative to ``mean(diag H)``; ``chunk`` is the fraction of the remaining columns fixed per step.
    ``format`` picks the grid (MX formats need ``group_size`` = the MX block size). ``row_losses`` holds
    ``(w̃ - q)ᵀ H (w̃ - q) / 2`` per row, ``w̃`` the Aqer-corrected weight.
    """
    check_group_size("ERQ", format, bits, sym, group_size)
    W = weight.float().clone()
    H = H.float().to(W.device)
    if not bool(torch.isfinite(H).all()) or (C is not None and not bool(torch.isfinite(C).all())):
        logger.warning("ERQ: non-finite input statistics; falling back to RTN for this layer")
        return rtn_quantize(weight, bits=bits, group_size=group_size, sym=sym, format=format)
    rows, n = W.shape
    ridge = lam * max(float(torch.diagonal(H).mean()), 1e-12)
    if C is not None:
        W += aqer_correction(W, H, C.float().to(W.device), ridge)
    target = W.clone()
    grid = GroupGrid.fit(W, bits=bits, group_size=group_size, sym=sym, format=format)
    codes = torch.zeros(rows, n, device=W.device)
    done = 0
    while done < n:
        k = max(1, int(chunk * (n - done)))
        S, R = slice(done, done + k), slice(done + k, n)
        cols = torch.arange(done, done + k, device=W.device).expand(rows, k)
        chunk_codes, delta = _refine(W[:, S], cols, grid, H[S, S], refine_iters)
        codes[:, S] = chunk_codes
        if done + k < n:
            W[:, R] -= ridge_solve(H[R, R], H[R, S] @ delta.T, ridge).T
        done += k
    residual = target - grid.value(codes, grid.all_columns(rows))
    row_losses = ((residual @ H) * residual).sum(dim=1) / 2
    return grid.result(codes, row_losses)


def _refine(
    w: torch.Tensor, cols: torch.Tensor, grid: GroupGrid, C: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounding refinement of one chunk: codes and errors ``δ = q - w`` (``[rows, k]``).

    Each row starts at round-to-nearest and then flips single coordinates to the other bracketing grid point, the
    one with the largest ``|g|`` among those where ``g = 2 C δ`` has the sign of ``δ``, while ``δᵀ C δ`` decreases.
    """
    code = grid.nearest(w, cols)
    delta = grid.value(code, cols) - w
    other = grid.step(code, -torch.sign(delta))  # the grid neighbour on the other side of w
    alt = grid.value(other, cols) - w
    g = 2 * delta @ C
    active = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    rows = torch.arange(w.shape[0], device=w.device)
    for _ in range(iters):
        if not bool(active.any()):
            break
        score = torch.where(torch.sign(g) == torch.sign(delta), g.abs(), torch.full_like(g, -1.0))
        i = score.argmax(dim=1)
        g_i, d_i, a_i = g[rows, i], delta[rows, i], alt[rows, i]
        # The proposal is whichever bracketing point is closer to δ_i - g_i; only a flip can lower the proxy.
        flip = (a_i - (d_i - g_i)).abs() < g_i.abs()
        step = a_i - d_i
        gain = step * g_i + step * step * C[i, i]
        accept = active & (score[rows, i] >= 0) & flip & (gain < 0)
        active &= accept
        step = torch.where(accept, step, torch.zeros_like(step))
        c_i, o_i = code[rows, i], other[rows, i]
        code[rows, i] = torch.where(accept, o_i, c_i)
        other[rows, i] = torch.where(accept, c_i, o_i)
        alt[rows, i] = torch.where(accept, d_i, a_i)
        delta[rows, i] = d_i + step
        g += 2 * step.unsqueeze(1) * C[i]
    return code, delta


@register_algorithm("erq")
class ERQQuantizer(GramQuantizer):
    """Accumulates ``H = 2 AᵀA / N`` and the cross term ``C = 2 AᵀX / N``, then runs :func:`erq_quantize`."""

    needs_float_inputs = True
    supports_mx = True

    def __init__(
        self,
        in_features: int,
        *,
        erq_lambda: float | None = None,
        erq_chunk: float = 0.5,
        **options: Any,
    ) -> None:
        super().__init__(in_features, **options)
        self.lam = TEXT_LAMBDA if erq_lambda is None else erq_lambda
        self.chunk = erq_chunk
        self.cross: torch.Tensor | None = None

    def add_float_batch(self, x: torch.Tensor, x_float: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).float()
        x_float = x_float.reshape(-1, self.in_features).float().to(x.device)
        if self.cross is None:
            self.cross = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
        self.cross += x.T @ x_float  # summed in float64 like the Gram matrix

    def reduce(self) -> None:
        super().reduce()
        if not is_distributed():
            return
        if self.cross is None:  # this rank saw no token of the layer: it adds zeros
            self.cross = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        all_reduce_sum([self.cross], "ERQ's cross term")

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        H = self.hessian(weight.device)
        C = self.cross.float().to(weight.device) * (2.0 / self.num_tokens) if self.cross is not None else None
        return erq_quantize(
            weight,
            H,
            C,
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            lam=self.lam,
            chunk=self.chunk,
            format=self.format,
        )

    def free(self) -> None:
        super().free()
        self.cross = None
