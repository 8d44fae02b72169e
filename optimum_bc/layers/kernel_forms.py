"""Kernel forms of a :class:`~optimum_bc.layers.qlinear.QuantLinear` (derived tensors, never saved) and their matmuls.

Which form a layer gets is decided in :mod:`.kernel_paths` (the path table and its measured errors are documented
there); a form is built once per device from the packed buffers and checked on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .dequant import DequantSource
from .kernel_paths import (
    CPU_INT4,
    CPU_INT4X2,
    CPU_INT8,
    CUDA_INT4,
    DEQUANT,
    Plan,
    _kernel_group,
    is_prefill,
)


@dataclass
class KernelForm:
    """Tensors one kernel path needs, derived from a layer's buffers on one device."""

    path: str
    device: torch.device
    out_features: int
    padded_out: int
    group: int = 0
    perm: torch.Tensor | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dequant: DequantSource | None = None  # CPU forms: what the ``dequant`` (prefill) path reads

    def nbytes(self) -> int:
        """Bytes held by this form's tensors (the dequant source's references to the layer's buffers excluded)."""
        extra = [] if self.perm is None else [self.perm]
        held = sum(t.numel() * t.element_size() for t in [*self.tensors.values(), *extra])
        return held + (0 if self.dequant is None else self.dequant.nbytes())


def _scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[blocks, N, 2]`` tensor of (scale, zero term) for ATen's ``w = (q - 8) * scale + zero`` convention."""
    s = scales.float()
    return torch.stack([s, (8.0 - zeros.float()) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)


def _centre(bits: int) -> int:
    """Shift that puts ``bits``-bit codes (``bits <= 4``) in the middle of the 4-bit slot: ``8 - 2**(bits - 1)``.

    ATen computes ``(q - 8) * scale + zero_term`` with a bf16 zero term ``(8 - z) * scale``. Codes at the bottom of
    the slot (2-bit codes in 0..3) make both terms ~8x larger than the weight they cancel to, so the bf16 rounding of
    the zero term dominates; shifting codes and zeros by the same amount leaves ``q - z`` (the weight) unchanged.
    """
    return 8 - (1 << (bits - 1))


def _int4_parts(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    block_groups: torch.Tensor,
    padded_out: int,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[Np, K]`` (int32, padded rows) and scales-and-zeros ``[K/kg, Np, 2]`` (bf16) for one int4 matmul.

    ``bits`` (<= 4) is the width of ``codes``; they are centred in the 4-bit slot (see :func:`_centre`).
    """
    shift = _centre(bits)
    codes, zeros = codes + shift, zeros + shift
    n = codes.shape[0]
    s = scales.float()[:, block_groups]
    z = zeros.float()[:, block_groups]
    if padded_out != n:
        pad = padded_out - n
        codes = F.pad(codes, (0, 0, 0, pad))
        s = F.pad(s, (0, 0, 0, pad))  # zero scale and zero term: padded rows contribute exactly 0
        z = F.pad(z, (0, 0, 0, pad), value=8.0)
    return codes.to(torch.int32).contiguous(), _scales_and_zeros(s, z, torch.bfloat16)


def _pack_cpu(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)


def _pack_cuda(codes: torch.Tensor) -> torch.Tensor:
    k = codes.shape[1]
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)


@torch.no_grad()
def build_form(layer: nn.Module, device: torch.device, layer_plan: Plan) -> KernelForm:
    """Derive ``layer_plan.path``'s tensors from ``layer``'s buffers on ``device``."""
    codes, zeros = layer.unpack()
    codes = codes.to(device=device, dtype=torch.int32)
    zeros = zeros.to(device=device, dtype=torch.int32)
    scales = layer.scales.to(device)
    n = layer.out_features
    form = KernelForm(layer_plan.path, device, n, layer_plan.padded_out, layer_plan.group)
    if device.type == "cpu":
        form.dequant = DequantSource.build(layer)
    if layer_plan.path == CPU_INT8:
        # Per row, subtract the code ``c`` nearest the zero point that keeps ``q - c`` in int8 (``c = z`` whenever
        # ``bits <= 7``), so the bf16 int8 matmul carries the weight itself; the rest, ``s (c - z) sum(x)``, is
        # added in float32 (zero for ``bits <= 7``).
        s = scales[:, 0].float()
        centre = torch.minimum(torch.maximum(zeros[:, 0], codes.amax(1) - 127), codes.amin(1) + 128)
        form.tensors["weight"] = (codes - centre[:, None]).to(torch.int8).contiguous()
        form.tensors["scales"] = s.to(torch.bfloat16)
        form.tensors["zero_term"] = s * (centre - zeros[:, 0]).float()
        return form
    kg, perm = _kernel_group(layer.g_idx, layer.in_features)
    g = layer.g_idx.to(device=device, dtype=torch.int64)
    if perm is not None:
        perm = perm.to(device)
        codes, g = codes[:, perm], g[perm]
        form.perm = perm
    block_groups = g[::kg]
    if layer_plan.path == CPU_INT4X2:
        parts = (  # high nibble: bits - 4 wide (centred like a low-bit code); low nibble: the full 4 bits
            (codes >> 4, zeros >> 4, scales.float() * 16, layer.bits - 4, "hi"),
            (codes & 15, zeros & 15, scales.float(), 4, "lo"),
        )
        for part_codes, part_zeros, part_scales, part_bits, name in parts:
            c, sz = _int4_parts(part_codes, part_zeros, part_scales, block_groups, form.padded_out, part_bits)
            form.tensors[f"weight_{name}"] = _pack_cpu(c)
            form.tensors[f"scales_zeros_{name}"] = sz
        return form
    c, sz = _int4_parts(codes, zeros, scales, block_groups, form.padded_out, layer.bits)
    form.tensors["weight"] = _pack_cpu(c) if layer_plan.path == CPU_INT4 else _pack_cuda(c)
    form.tensors["scales_zeros"] = sz
    return form


def matmul(form: KernelForm, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """``x @ W.T`` (no bias) with a kernel form; returns ``x.dtype`` with shape ``[..., out_features]``.

    ``path``: ``form.path`` or ``DEQUANT`` (CPU forms); ``None`` picks ``DEQUANT`` for inputs with at least
    ``dense_min_tokens`` tokens, as :func:`select_path` does.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if path is None:
        path = DEQUANT if form.dequant is not None and is_prefill(x.device.type, x2.shape[0]) else form.path
    if path == DEQUANT:
        if form.dequant is None:
            raise ValueError(
                f"the {form.path} form on {form.device} has no packed source; the dequant path is CPU-only"
            )
        y = form.dequant.matmul(x2) if x2.shape[0] else x2.new_zeros(0, form.out_features, dtype=torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], form.out_features)
    if path != form.path:
        raise ValueError(f"a {form.path} kernel form cannot run the {path} path; use {form.path!r} or {DEQUANT!r}")
    if form.perm is not None:
        x2 = x2.index_select(1, form.perm)
    xb = x2.to(torch.bfloat16).contiguous()
    t = form.tensors
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, form.padded_out, dtype=torch.float32)
    elif form.path == CPU_INT4:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t["weight"], form.group, t["scales_zeros"])
    elif form.path == CUDA_INT4:
        y = torch.ops.aten._weight_int4pack_mm(xb, t["weight"], form.group, t["scales_zeros"])
    elif form.path == CPU_INT4X2:
        hi = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t["weight_hi"], form.group, t["scales_zeros_hi"])
        lo = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t["weight_lo"], form.group, t["scales_zeros_lo"])
        y = hi.float() + lo.float()
    elif form.path == CPU_INT8:
        y = torch.ops.aten._weight_int8pack_mm(xb, t["weight"], t["scales"])
        y = torch.addcmul(y.float(), x2.float().sum(-1, keepdim=True), t["zero_term"])
    else:
        raise ValueError(f"unknown kernel path {form.path!r}")
    if form.padded_out != form.out_features:
        y = y[:, : form.out_features]
    return y.to(x.dtype).reshape(*x.shape[:-1], form.out_features)


def check_form(layer: nn.Module, form: KernelForm) -> float:
    """Max relative error of ``form``'s matmul against the dequantized float32 weight on a random input."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, layer.in_features, generator=gen).to(device=form.device, dtype=torch.bfloat16)
    ref = x.float() @ layer.dequantize_weight(torch.float32).to(form.device).T
    got = matmul(form, x, form.path).float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
