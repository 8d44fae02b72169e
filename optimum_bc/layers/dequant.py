"""The ``dequant`` path of :mod:`optimum_bc.layers.kernels`: per-call dequantization of packed rows into a bf16 matmul.

The packed int4/int8 CPU kernels cost time per token; for prefill (many tokens) it is faster to rebuild the weight
from the packed codes on every call, a block of rows at a time, and run bf16 matmuls (AMX / AVX512-BF16). Nothing
persists but :class:`DequantSource` (1 byte per quantization group plus two ``[in]`` index vectors); the scratch
is ``CHUNK`` bf16 weights plus ``SERIAL`` float32 ones, reused by every block of a call.

The stacked paths (:func:`dequantize_int_rows`, :func:`dequantize_mx_rows`) rebuild the exact weights of several
packed layers at once (the routed experts of a mixture-of-experts block, :mod:`optimum_bc.layers.experts`): one
unpack over all their rows (:func:`unpack_rows`), a few whole-tensor ops, the result written into the caller's
buffer. ``QuantLinear.dequantize_weight`` and ``MXLinear.dequantize_weight`` use them too, one block of rows at a time
(:func:`row_blocks`) written into the result, so a layer's dense weight costs its own bytes plus a few MiB of
temporaries, not ~8 float32 weights' worth of whole-layer int64 and float32 intermediates.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..formats.formats import MX_BLOCK_SIZE
from ..formats.packing import unpack_int32


# Weights per bf16 matmul (32 MiB of bf16 scratch): few matmuls, as each parallel region costs on a busy CPU.
CHUNK = 1 << 24
# Weights dequantized per elementwise op: below ATen's parallel grain size (32768) the ops run inline on the calling
# thread. With OpenMP threads on a CPU shared with other jobs, every parallel region waits for descheduled threads;
# the hundreds of small regions of a parallel dequantization made the path ~10x slower (measured), the few big
# matmuls are not affected.
SERIAL = (1 << 15) - 1
_MIN_ROWS = 16
#: Weights dequantized per block of rows by :func:`row_blocks`: the block's temporaries (codes, ``code - zero``,
#: gathered scales: at most ~20 bytes a weight) stay near 1 MiB.
DENSE_BLOCK = 1 << 16


def row_blocks(rows: int, k: int) -> Iterator[slice]:
    """Slices of ``rows`` rows of ``k`` weights, about :data:`DENSE_BLOCK` weights each (at least one row)."""
    step = max(1, DENSE_BLOCK // max(k, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def planes(bits: int, k: int) -> int:
    """Code planes :func:`unpack_planes` splits a row into: plane ``j`` holds columns ``j, j + P, j + 2P, ...``."""
    if k % 8 or sys.byteorder != "little":
        return 1
    return {8: 1, 4: 2, 2: 4}.get(bits, 8)


def unpack_planes(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Codes of packed rows as uint8 ``[rows, P, k / P]`` (``P = planes(bits, k)``), read a byte at a time.

    With ``k % 8 == 0`` every 8 codes fill ``bits`` whole bytes, so shifting bytes (or ``bits``-byte words) yields
    each plane as one contiguous block, without interleaving them back into column order (the caller permutes the
    input columns instead, which is much cheaper).
    """
    count = planes(bits, k)
    rows = qweight.shape[0]
    if count == 1 and bits != 8:
        return unpack_int32(qweight, bits, k).view(rows, 1, k)
    octets = qweight.contiguous().view(torch.uint8)[:, : k * bits // 8]
    if bits == 8:
        return octets.view(rows, 1, k)
    mask = (1 << bits) - 1
    if bits in (2, 4):
        out = torch.empty(rows, count, k // count, dtype=torch.uint8, device=qweight.device)
        for j in range(count):
            torch.bitwise_and(octets >> (bits * j) if j else octets, mask, out=out[:, j])
        return out
    words = octets.reshape(rows, k // 8, bits).to(torch.int64)
    word = words[..., 0]
    for i in range(1, bits):
        word |= words[..., i] << (8 * i)
    shifts = torch.arange(0, 8 * bits, bits, device=qweight.device)
    return ((word.unsqueeze(1) >> shifts[:, None]) & mask).to(torch.uint8)


@dataclass
class DequantSource:
    """What the ``dequant`` path reads: the layer's own ``qweight`` / ``scales`` buffers plus small derived data."""

    qweight: torch.Tensor  # the layer's buffer (not a copy)
    scales: torch.Tensor  # the layer's float16 buffer (not a copy)
    zeros: torch.Tensor  # uint8 [out, G]
    bits: int
    width: int  # columns per group when groups are contiguous and equal (0: gather per column)
    order: torch.Tensor | None  # input column order of the code planes (None: identity)
    g_planes: torch.Tensor | None  # group of each column in plane order (only when width == 0)

    @classmethod
    def build(cls, layer: torch.nn.Module) -> DequantSource:
        """Derive the source of a ``QuantLinear`` (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
        k, bits, groups = layer.in_features, layer.bits, layer.scales.shape[1]
        count = planes(bits, k)
        device = layer.qweight.device
        order = torch.arange(k, device=device).view(k // count, count).T.reshape(k) if count > 1 else None
        g_idx = layer.g_idx.long()
        width = k // groups if k % groups == 0 else 0
        if width % count or not torch.equal(g_idx, torch.arange(k, device=device) // max(width, 1)):
            width = 0  # act-order or uneven groups: gather the scale and zero of every column
        g_planes = None if width else (g_idx if order is None else g_idx[order])
        zeros = unpack_int32(layer.qzeros, bits, groups)
        return cls(layer.qweight, layer.scales, zeros, bits, width, order, g_planes)

    def nbytes(self) -> int:
        """Bytes this source adds to the layer (its buffers are not counted)."""
        extra = [t for t in (self.zeros, self.order, self.g_planes) if t is not None]
        return sum(t.numel() * t.element_size() for t in extra)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W.T`` for ``x2`` ``[tokens, in]``: bf16 ``[tokens, out]`` (a transposed view).

        A block's weights are ``q * s - z * s`` in float32 (both products and their difference are exact: codes
        have at most 8 bits, float16 scales 11) rounded once to bf16, i.e. exactly the reference path's bf16
        weight; the matmul is a bf16 ``torch.mm`` (float32 accumulation).
        """
        n, k = self.qweight.shape[0], x2.shape[1]
        count = planes(self.bits, k)
        groups = self.scales.shape[1]
        xb = (x2 if self.order is None else x2.index_select(1, self.order)).to(torch.bfloat16)
        out_t = torch.empty(n, x2.shape[0], dtype=torch.bfloat16, device=x2.device)  # [out, tokens]: no copies
        step = min(n, max(_MIN_ROWS, CHUNK // k))
        sub = max(1, SERIAL // k)
        weight_bf16 = torch.empty(step, k, dtype=torch.bfloat16, device=x2.device)
        scratch = torch.empty(sub * k, dtype=torch.float32, device=x2.device)
        for start in range(0, n, step):
            stop = min(n, start + step)
            for first in range(start, stop, sub):
                rows = slice(first, min(stop, first + sub))
                codes = unpack_planes(self.qweight[rows], self.bits, k)
                size = codes.shape[0]
                s = self.scales[rows].float()
                zs = self.zeros[rows].float().mul_(s)
                if self.width:
                    shape = (size, count, groups, self.width // count)
                    s, zs = s[:, None, :, None], zs[:, None, :, None]
                else:
                    shape = (size, k)
                    s, zs = s[:, self.g_planes], zs[:, self.g_planes]
                weight = scratch[: size * k].view(shape)
                weight.copy_(codes.view(shape)).mul_(s).sub_(zs)
                weight_bf16[first - start : first - start + size].copy_(weight.view(size, k))
            torch.mm(weight_bf16[: stop - start], xb.T, out=out_t[start:stop])
        return out_t.T


def unpack_rows(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Codes of packed rows ``[rows, words]`` as uint8 ``[rows, k]`` in column order, one unpack for all rows.

    4 bits (``k % 8 == 0``): each byte's two codes spread into the two bytes of an int16 (four vectorized ops).
    2 bits: each byte's four codes written straight into their interleaved places. 8-bit: the bytes themselves. Other widths: the byte planes of :func:`unpack_planes` interleaved back in one uint8 copy.
    """
    rows, count = qweight.shape[0], planes(bits, k)
    if bits == 4 and count > 1:  # a byte's two nibbles into the two bytes of an int16: (x << 4 | x) & 0x0F0F
        pairs = qweight.contiguous().view(torch.uint8)[:, : k // 2].to(torch.int16)
        pairs = (pairs << 4).bitwise_or_(pairs).bitwise_and_(0x0F0F)
        return pairs.view(torch.uint8).view(rows, k)
    if bits == 2 and count > 1:
        octets = qweight.contiguous().view(torch.uint8)[:, : k * bits // 8]
        codes = torch.empty(rows, k // count, count, dtype=torch.uint8, device=qweight.device)
        for j in range(count - 1):
            torch.bitwise_and(octets >> (bits * j) if j else octets, (1 << bits) - 1, out=codes[..., j])
        torch.bitwise_right_shift(octets, bits * (count - 1), out=codes[..., count - 1])
        return codes.view(rows, k)
    codes = unpack_planes(qweight, bits, k)
    if codes.shape[1] == 1:
        return codes.view(rows, k)
    return codes.transpose(1, 2).reshape(rows, k)


def _targets(
    out: torch.Tensor | list[torch.Tensor] | None, shape: tuple[int, ...], device: torch.device
) -> list[torch.Tensor]:
    """``out`` as a list of destinations of ``shape`` (``[E, ...]``: one tensor, or one ``shape[1:]`` per expert),
    a new float32 tensor when None."""
    if out is None:
        out = torch.empty(shape, device=device)
    if isinstance(out, torch.Tensor):
        return [out.view(shape)]
    return [target.view(shape[1:]) for target in out]


def contiguous_groups(g_idx: torch.Tensor, groups: int) -> bool:
    """Whether every row of ``g_idx`` ``[E, in]`` is the default grouping: ``groups`` runs of ``in / groups``."""
    k = g_idx.shape[-1]
    if k % groups:
        return False
    return torch.equal(g_idx, (torch.arange(k, device=g_idx.device) // (k // groups)).expand_as(g_idx))


def dequantize_int_rows(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    k: int,
    g_idx: torch.Tensor | None = None,
    out: torch.Tensor | list[torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Weights ``[E, out, k]`` of ``E`` stacked integer-grid layers, exactly ``QuantLinear.dequantize_weight``.

    ``qweight`` ``[E, out, words]``; ``zeros`` (uint8 zero points) and ``scales`` (float32) ``[E, out, G]``; ``g_idx``
    ``[E, k]`` for act-order or uneven groups, None for the default grouping (:func:`contiguous_groups`). One unpack
    over all ``E * out`` rows; ``code - zero`` is an integer of at most 9 bits (exact in any float dtype) and
    ``scale * (code - zero)`` is one rounding-free product (at most 9 by 11 significant bits: scales are float16
    values) stored once, so the result equals the per-layer dequantization bit for bit, for a lower-precision
    ``out`` too. ``out`` (a tensor of that shape or one ``[out, k]`` view per expert, any float dtype) receives it
    and nothing is allocated at its size; without it a float32 tensor is returned (None for a list).
    """
    experts, rows, _ = qweight.shape
    groups = scales.shape[2]
    codes = unpack_rows(qweight.reshape(experts * rows, -1), bits, k).view(experts, rows, k)
    # code - zero in integers (int8 holds both when bits < 8), then one conversion and one multiply in float.
    signed = torch.int8 if bits < 8 else torch.int16
    codes, zeros = codes.view(signed) if bits < 8 else codes.to(signed), zeros.to(signed)
    if g_idx is None:
        shape = (experts, rows, groups, k // groups)
        diff = codes.view(shape) - zeros.unsqueeze(-1)
        scales = scales.unsqueeze(-1)
    else:  # act-order or uneven groups: the zero and scale of every column
        shape = (experts, rows, k)
        index = g_idx.long().unsqueeze(1).expand(shape)
        diff = codes - torch.gather(zeros, 2, index)
        scales = torch.gather(scales, 2, index)
    targets = _targets(out, shape, qweight.device)
    pairs = list(zip(diff, scales, strict=True)) if isinstance(out, list) else [(diff, scales)]
    for target, (d, s) in zip(targets, pairs, strict=True):
        target.copy_(d).mul_(s)  # same-dtype vectorized passes (mixed-dtype or fused ops are slower on CPU)
    return None if out is not None and not isinstance(out, torch.Tensor) else targets[0].view(experts, rows, k)


def dequantize_mx_rows(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    values: torch.Tensor,
    bits: int,
    out: torch.Tensor | list[torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Weights ``[E, out, in]`` of ``E`` stacked MX layers, exactly ``MXLinear.dequantize_weight``.

    ``qweight`` ``[E, out, words]``, ``scales`` float32 block scales ``[E, out, in / 32]``, ``values`` the float32
    value of every element code. One unpack and one table lookup over all rows; ``out`` as for
    :func:`dequantize_int_rows`.
    """
    experts, rows, _ = qweight.shape
    blocks = scales.shape[2]
    shape = (experts, rows, blocks, MX_BLOCK_SIZE)
    codes = unpack_rows(qweight.reshape(experts * rows, -1), bits, blocks * MX_BLOCK_SIZE)
    decoded = values.to(qweight.device)[codes.long()].view(shape)
    targets = _targets(out, shape, qweight.device)
    scales = scales.unsqueeze(-1)
    pairs = list(zip(decoded, scales, strict=True)) if isinstance(out, list) else [(decoded, scales)]
    for target, (v, s) in zip(targets, pairs, strict=True):
        torch.mul(v, s, out=target)
    return None if out is not None and not isinstance(out, torch.Tensor) else targets[0].view(experts, rows, -1)
