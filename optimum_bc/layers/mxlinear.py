"""``MXLinear``: a linear layer storing OCP MX block-scaled weights (see :mod:`optimum_bc.formats`).

Storage (real, packed): ``qweight`` holds the element codes of each row as one little-endian bit stream in int32
words (:func:`optimum_bc.formats.packing.pack_int32`): 4-bit codes two per byte, 6-bit codes four per three bytes, 8-bit
codes one per byte. ``scales`` holds one E8M0 byte per block of 32 input columns (MX spec §5.4: ``2^(code - 127)``,
``0xFF`` = NaN). ``bias`` is always present because bias compensation gives bias-less layers a bias.

``forward`` dequantizes once (float32 math: element value x ``2^E`` is exact), caches the dense weight in the
activation dtype and runs ``F.linear``; there is no packed MX kernel on CPU.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.formats import MX_BLOCK_SIZE, MX_ELEMENTS, canonical_format, e8m0_to_scale, scale_to_e8m0
from ..formats.packing import pack_int32, packed_width, unpack_int32
from .dequant import dequantize_mx_rows, row_blocks
from .packed_base import PackedLinearBase


class MXLinear(PackedLinearBase):
    """Linear layer with MX weights: packed element codes, one E8M0 scale per 32 input columns, and a bias.

    An ``nn.Linear`` subclass whose ``weight`` is ``None`` (see :mod:`optimum_bc.layers.packed_base`): stock PEFT adapts it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        format: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        positions: int | None = None,
        sink_tokens: int = 0,
    ) -> None:
        super().__init__()
        name = canonical_format(format)
        if name not in MX_ELEMENTS:
            raise ValueError(f"MXLinear needs an MX format, one of {list(MX_ELEMENTS)}; got {format!r}")
        if in_features <= 0 or out_features <= 0 or in_features % MX_BLOCK_SIZE:
            raise ValueError(
                f"MXLinear needs positive sizes and in_features divisible by {MX_BLOCK_SIZE}; got "
                f"in_features={in_features}, out_features={out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.format = name
        self.element = MX_ELEMENTS[name]
        self._cached_weight: torch.Tensor | None = None
        bits = self.element.bits
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "scales", torch.zeros(out_features, in_features // MX_BLOCK_SIZE, dtype=torch.uint8, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        self._register_position_buffers(out_features, positions, sink_tokens, dtype, device)

    @property
    def bits(self) -> int:
        """Bit width of one element code."""
        return self.element.bits

    @classmethod
    def from_quantized(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        format: str,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "MXLinear":
        """Build a layer from element codes ``[out, in]`` and power-of-two block scales ``[out, in / 32]``."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out_features, in_features], got shape {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, format, dtype=dtype, device=codes.device)
        expected = (out_features, in_features // MX_BLOCK_SIZE)
        if tuple(scales.shape) != expected:
            raise ValueError(f"scales must have shape {expected} (out_features, blocks), got {tuple(scales.shape)}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},) (out_features,), got {tuple(bias.shape)}")
        with torch.no_grad():
            module.qweight.copy_(pack_int32(codes.to(torch.int64), module.bits))
            module.scales.copy_(scale_to_e8m0(scales.to(codes.device)))
            if bias is not None:
                module.bias.copy_(bias.detach().to(device=codes.device, dtype=dtype))
        return module

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Element codes ``[out, in]`` (uint8) and float32 block scales ``[out, in / 32]``."""
        return unpack_int32(self.qweight, self.bits, self.in_features), e8m0_to_scale(self.scales)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight ``[out, in]`` in ``dtype`` (default: the bias dtype): element value times block scale.

        Built a block of rows at a time into the result (:func:`optimum_bc.layers.dequant.dequantize_mx_rows`): the
        float32 product rounded once to ``dtype``, as the whole-layer float32 formula cast to ``dtype``, with a few
        MiB of temporaries beyond the result.
        """
        target = self.bias.dtype if dtype is None else dtype
        with torch.no_grad():
            weight = torch.empty(self.out_features, self.in_features, dtype=target, device=self.qweight.device)
            for rows in row_blocks(self.out_features, self.in_features):
                scales = e8m0_to_scale(self.scales[rows])
                dequantize_mx_rows(
                    self.qweight[rows][None], scales[None], self.element.values, self.bits, weight[rows][None]
                )
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` in ``x.dtype``."""
        x = self._quantize_input(x)
        out = F.linear(x, self._weight_for(x), self.bias.to(dtype=x.dtype, device=x.device))
        return self._add_position_terms(out, x)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Load buffers as usual, then drop the cache since the weight may have changed."""
        super()._load_from_state_dict(*args, **kwargs)
        self.reset_cache()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "MXLinear":
        """Drop the cache before moving or casting (the uint8 / int32 buffers are never cast by ``.to(dtype)``)."""
        self.reset_cache()
        return super()._apply(fn, recurse)

    def weight_bytes(self) -> int:
        """Bytes held by the quantized buffers (``qweight``, ``scales``)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales))

    def extra_repr(self) -> str:
        """Shape and format, shown by ``repr``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"
