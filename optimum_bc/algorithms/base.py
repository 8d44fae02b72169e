"""The weight-quantizer protocol shared by every algorithm, and its result type.

A quantizer lives for one Linear layer and has three verbs (after the GPTQ reference): ``add_batch`` observes
calibration inputs, ``quantize`` solves for the integer codes, ``free`` releases the statistics.
"""

from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import all_reduce_count, all_reduce_sum, is_distributed
from ..formats.formats import INT_FORMAT, get_format


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes and grid of one quantized weight matrix ``[out, in]``, in the original column order.

    Integer format: ``W[o, i] ≈ scales[o, g_idx[i]] * (codes[o, i] - zeros[o, g_idx[i]])``. MX formats
    (:mod:`optimum_bc.formats`): ``W[o, i] ≈ scales[o, g_idx[i]] * element_value(codes[o, i])``, zeros all 0.
    """

    codes: torch.Tensor  # (out, in) uint8
    scales: torch.Tensor  # (out, groups) float32: representable in float16 (int) or powers of two 2^E (MX)
    zeros: torch.Tensor  # (out, groups) uint8
    g_idx: torch.Tensor  # (in,) int32, group of each input column
    row_losses: torch.Tensor  # (out,) algorithm objective per row (GPTQ: Σ (w - q)² / [H⁻¹]_jj / 2); zeros for RTN
    damp: float | None = None  # relative dampening that made the Hessian factorisable (GPTQ only)
    format: str = INT_FORMAT  # weight format of the codes (see optimum_bc.formats)

    @property
    def loss(self) -> float:
        """Total objective over all rows."""
        return float(self.row_losses.sum())

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """The output rows ``[start, stop)``: rows are independent, so several layers sharing an input (q/k/v) can
        be quantized as one stacked matrix and split afterwards."""
        return QuantizedWeight(
            codes=self.codes[start:stop],
            scales=self.scales[start:stop],
            zeros=self.zeros[start:stop],
            g_idx=self.g_idx,
            row_losses=self.row_losses[start:stop],
            damp=self.damp,
            format=self.format,
        )

    def dequantize(self) -> torch.Tensor:
        """Float32 weight ``[out, in]`` that the packed layer reproduces exactly."""
        idx = self.g_idx.long()
        fmt = get_format(self.format, bits=8)  # bits only matter for fitting, not decoding
        return fmt.decode(self.codes, self.scales[:, idx], self.zeros[:, idx])


class WeightQuantizer:
    """Base class: quantizes one ``[out, in]`` weight, optionally from observed inputs."""

    #: Whether ``add_batch`` needs the layer's calibration inputs (RTN does not).
    needs_inputs: bool = False
    #: Whether ``quantize`` honours ``format`` (block-scaled MX formats); the config refuses MX for the others.
    supports_mx: bool = False
    #: Whether ``add_float_batch`` must also be fed the float model's inputs of the same tokens (ERQ's Aqer).
    needs_float_inputs: bool = False

    def __init__(
        self,
        in_features: int,
        *,
        bits: int,
        group_size: int,
        sym: bool,
        format: str = INT_FORMAT,
        **options: object,
    ) -> None:
        self.in_features = in_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.format = format

    def add_batch(self, x: torch.Tensor) -> None:
        """Observe inputs ``x`` of shape ``(tokens, in_features)`` (padding already removed)."""

    def add_float_batch(self, x: torch.Tensor, x_float: torch.Tensor) -> None:
        """Observe the float model's inputs ``x_float`` of the tokens whose quantized-stream inputs are ``x``.

        Called after ``add_batch(x)`` and only for quantizers with ``needs_float_inputs``.
        """

    def reduce(self) -> None:
        """Sum the statistics over data-parallel ranks (:mod:`optimum_bc.distributed`); call once, after the last
        ``add_batch`` and before ``quantize``. No-op in one process and for algorithms without statistics."""

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Return the quantized form of ``weight`` (``[out, in]``); never modifies it."""
        raise NotImplementedError

    def free(self) -> None:
        """Release statistics held for this layer."""


#: Rows of each float64 block of the Gram sum: the sum is converted to the float32 Hessian one block at a time, so
#: the conversion never holds the whole float64 sum and the whole float32 result together.
GRAM_ROW_BLOCK = 256


class LowerRows:
    """A symmetric float32 ``n × n`` matrix kept as its lower triangle: row blocks ``[rows, :rows.stop]``.

    Half the memory of the full matrix; :meth:`fill` writes the full (exactly symmetric) matrix into a given one.
    """

    def __init__(self, blocks: list[torch.Tensor], n: int) -> None:
        self.blocks = blocks
        self.n = n

    def slices(self) -> list[slice]:
        """The row range of each block."""
        return row_slices(self.n)

    def diagonal(self) -> torch.Tensor:
        """The diagonal (a new vector)."""
        return torch.cat([b[:, s].diagonal() for s, b in zip(self.slices(), self.blocks, strict=True)])

    def all_finite(self) -> bool:
        """Whether every stored entry is finite."""
        return all(bool(torch.isfinite(b).all()) for b in self.blocks)

    def fill(self, out: torch.Tensor) -> torch.Tensor:
        """Write the full symmetric matrix into ``out`` (``n × n``): the lower triangle as stored, the upper one
        mirrored, tile by tile (no whole-matrix temporary). Returns ``out``."""
        for rows, block in zip(self.slices(), self.blocks, strict=True):
            out[rows, : rows.stop] = block
            diag = out[rows, rows]
            diag.copy_(diag.tril() + diag.tril(-1).T)
            out[: rows.start, rows] = block[:, : rows.start].T
        return out


def row_slices(n: int) -> list[slice]:
    """The :data:`GRAM_ROW_BLOCK` row ranges of an ``n``-row matrix."""
    return [slice(r, min(r + GRAM_ROW_BLOCK, n)) for r in range(0, n, GRAM_ROW_BLOCK)]


class GramQuantizer(WeightQuantizer):
    """Base for algorithms that need only the input Gram matrix ``H = 2 Σ x xᵀ / N`` (the GPTQ Hessian).

    Each batch's ``xᵀx`` is computed in float32 and summed in float64, rounded to float32 once before the solve: the
    sum then hardly depends on the order of the batches, so data-parallel ranks (:mod:`optimum_bc.distributed`),
    which add the same batch products in another order, get the same float32 Hessian and the same codes.

    Memory: the matrix is symmetric, so only its lower triangle is summed, as blocks of :data:`GRAM_ROW_BLOCK` rows
    (``[rows, :rows.stop]``), each batch product formed one row block at a time: the float64 sum takes the bytes of
    one float32 in×in matrix. :meth:`take_lower` converts it to the float32 triangle (:class:`LowerRows`) block by
    block, freeing each float64 block as it goes, so the two never exceed that size together.
    """

    needs_inputs = True

    def __init__(self, in_features: int, **options: Any) -> None:
        super().__init__(in_features, **options)
        self.gram_blocks: list[torch.Tensor] | None = None
        self.num_tokens = 0

    def _row_slices(self) -> list[slice]:
        return row_slices(self.in_features)

    def _zero_blocks(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [torch.zeros(s.stop - s.start, s.stop, dtype=torch.float64, device=device) for s in self._row_slices()]

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).float()
        if self.gram_blocks is None:
            self.gram_blocks = self._zero_blocks(x.device)
        for rows, block in zip(self._row_slices(), self.gram_blocks, strict=True):
            block += x[:, rows].T @ x[:, : rows.stop]
        self.num_tokens += x.shape[0]

    def reduce(self) -> None:
        if not is_distributed():
            return
        if self.gram_blocks is None:  # this rank saw no token of the layer: it adds zeros
            self.gram_blocks = self._zero_blocks()
        all_reduce_sum(self.gram_blocks, "the Gram matrix")
        self.num_tokens = all_reduce_count(self.num_tokens, "the Gram matrix's token count")

    def _check_observed(self) -> list[torch.Tensor]:
        if self.gram_blocks is None or self.num_tokens == 0:
            raise ValueError(
                f"{type(self).__name__} needs calibration inputs: add_batch() was never called with any token"
            )
        return self.gram_blocks

    def hessian(self, device: torch.device) -> torch.Tensor:
        """``2 Σ x xᵀ / N`` on ``device`` (a new float32 matrix; the statistics are kept); raises when no token was
        observed."""
        blocks = self._check_observed()
        scale = 2.0 / self.num_tokens
        lower = LowerRows([b.float().to(device) * scale for b in blocks], self.in_features)
        return lower.fill(torch.empty(self.in_features, self.in_features, device=device))

    def take_lower(self, device: torch.device) -> LowerRows:
        """The lower triangle of :meth:`hessian`, freeing each float64 row block as soon as it is converted: the
        statistics are gone afterwards (call once, right before the solve)."""
        blocks = self._check_observed()
        scale = 2.0 / self.num_tokens
        self.gram_blocks = None
        rows = []
        while blocks:
            rows.append(blocks.pop(0).float().to(device) * scale)
        self.num_tokens = 0
        return LowerRows(rows, self.in_features)

    def take_hessian(self, device: torch.device) -> torch.Tensor:
        """:meth:`hessian` from :meth:`take_lower` (the statistics are gone afterwards)."""
        lower = self.take_lower(device)
        return lower.fill(torch.empty(self.in_features, self.in_features, device=device))

    def free(self) -> None:
        self.gram_blocks = None
        self.num_tokens = 0
