"""W8A8 on the CPU with integer arithmetic: ``torch._int_mm`` (int8 x int8 -> int32, a PyTorch-native op).

A ``QuantLinear`` with 8-bit per-channel weights and 8-bit activations stores ``W = s_w[o] (q[o, i] - z[o])`` and
quantizes its input to ``x̂ = s_a (q_a[i] - z_a)`` (asymmetric codes in ``[0, 255]``). Both code sets are shifted by
128 into int8 (``q' = q - 128``, ``z' = z - 128``, likewise for the input) and::

    y[o] = s_w[o] s_a (Σ_i q'[o,i] q_a'[i] - z_a' Σ_i q'[o,i] - z'[o] Σ_i q_a'[i] + K z'[o] z_a') + b[o]

The sum over ``i`` is the exact int32 matmul; the rest is a rank-one correction in float32. The result equals the
fake-quantized reference ``x̂ @ W.T + b`` up to float32 rounding. Other bit widths (W4A8, W4A4, W6A6) have no integer
kernel here: their activations are simulated (fake-quantized) and the weights take the usual packed-weight path.
"""

from dataclasses import dataclass

import torch

from ..formats.activations import dynamic_params


@dataclass
class Int8Weight:
    """The int8 form of an 8-bit per-channel weight: ``[in, out]`` codes, their column sums, scales and zeros."""

    codes: torch.Tensor  # int8 [in, out]
    code_sums: torch.Tensor  # float32 [out]: Σ_i q'[o, i]
    scales: torch.Tensor  # float32 [out]
    zeros: torch.Tensor  # float32 [out]: z' = z - 128


def eligible(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer(x)`` can take the int8 path: W8 per channel, A8 (static per tensor or dynamic), CPU, float32
    or bfloat16 input without gradients."""
    spec = getattr(layer, "act_spec", None)
    return (
        spec is not None
        and spec.bits == 8
        and not spec.sym
        and getattr(layer, "bits", None) == 8
        and getattr(layer, "group_size", None) == -1
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def int8_weight(layer: torch.nn.Module) -> Int8Weight:
    """Build (once per layer, cached on it) the int8 form of ``layer``'s weight."""
    cached = getattr(layer, "_int8_weight", None)
    if cached is not None:
        return cached
    codes, zeros = layer.unpack()
    shifted = (codes.to(torch.int16) - 128).to(torch.int8)
    form = Int8Weight(
        codes=shifted.T.contiguous(),
        code_sums=shifted.sum(dim=1, dtype=torch.int32).float(),
        scales=layer.scales[:, 0].float(),
        zeros=zeros[:, 0].float() - 128,
    )
    layer._int8_weight = form
    return form


def _input_codes(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / s) + z, 0, 255) - 128`` as int8 (in place on one float32 temporary)."""
    codes = rows / scale
    return codes.round_().add_(zero - 128).clamp_(-128, 127).to(torch.int8)


def int8_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x̂ @ W.T + bias`` with the int8 matmul (``x`` not yet quantized; the layer's activation spec applies)."""
    form = int8_weight(layer)
    spec = layer.act_spec
    rows = x.reshape(-1, x.shape[-1]).float()
    if spec.dynamic:
        scale, zero = dynamic_params(rows, spec)  # [rows, 1]
    else:
        scale, zero = layer.input_scale, layer.input_zero  # [1]
    codes = _input_codes(rows, scale, zero)
    zero = zero - 128
    out = torch._int_mm(codes, form.codes).float()
    # y = s_a s_w (acc - z_a' Σq' - z' Σq_a' + K z' z_a') + b: one scaling pass, then the per-row and per-column
    # terms as one rank-2 update [Σq_a', 1] @ [-s_a s_w z'; constant] (a K=2 matmul, a single pass over the output)
    code_rows = codes.sum(dim=1, dtype=torch.int32).float().unsqueeze(1)  # [rows, 1]
    row_scale = scale * form.scales  # [out] (static) or [rows, out] (dynamic)
    if spec.dynamic:
        out.sub_(zero * form.code_sums).sub_(code_rows * form.zeros).add_(x.shape[-1] * zero * form.zeros)
        out.mul_(row_scale).add_(layer.bias.float())
    else:
        constant = layer.bias.float() + row_scale * (x.shape[-1] * zero * form.zeros - zero * form.code_sums)
        left = torch.cat([code_rows, torch.ones_like(code_rows)], dim=1)
        out.mul_(row_scale).addmm_(left, torch.stack([-row_scale * form.zeros, constant]))
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)
