"""W8A8 on the CPU with integer arithmetic: ``torch._int_mm`` (int8 x int8 -> int32, a PyTorch-native op).

A ``QuantLinear`` with 8-bit per-channel weights and 8-bit activations stores ``W = s_w[o] (q[o, i] - z[o])`` and
quantizes its input to ``x̂ = s_a (q_a[i] - z_a)`` (asymmetric codes in ``[0, 255]``). Both code sets are shifted by
128 into int8 (``q' = q - 128``, ``z' = z - 128``, likewise for the input) and::

    y[o] = s_w[o] s_a (Σ_i q'[o,i] q_a'[i] - z_a' Σ_i q'[o,i] - z'[o] Σ_i q_a'[i] + K z'[o] z_a') + b[o]

The sum over ``i`` is the exact int32 matmul; the rest is a rank-two correction in float32. The result equals the
fake-quantized reference ``x̂ @ W.T + b`` up to float32 rounding. Other bit widths (W4A8, W4A4, W6A6) have no integer
kernel here: their activations are simulated (fake-quantized) and the weights take the usual packed-weight path.

Speed: on one thread the input is processed in blocks of ``BLOCK_ROWS`` token rows so that the float32 temporaries
of the input quantization (divide, round, shift, clamp) and of the output rescale (int32 -> float32, scale,
rank-two update) stay in the CPU cache; each block runs one ``_int_mm``. With several threads the whole input is one
block: every op is a parallel region, and on a shared machine each region's barrier waits for the slowest thread
(measured: 256-row blocks ran 2-4x slower than one block with 2 threads under load). The per-row code sums come from the rounded float block
(exact: at most ``K · 128 < 2^24``), one cached pass instead of an int8 reduction.
"""

from dataclasses import dataclass

import torch

from ..formats.activations import dynamic_params


#: Token rows per block on one thread (with a 768..3072-wide input, a block's float32 temporaries are 0.8..3 MB).
BLOCK_ROWS = 256


def block_rows(rows: int) -> int:
    """Rows per block: ``BLOCK_ROWS`` on one thread, all of them with several (see the module docstring)."""
    return BLOCK_ROWS if torch.get_num_threads() == 1 else max(rows, 1)


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


def _block_codes(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / s) + z - 128, -128, 127)`` in float32 (one temporary, updated in place)."""
    return torch.div(rows, scale).round_().add_(zero - 128).clamp_(-128, 127)


def _static_block(
    rows: torch.Tensor,
    form: Int8Weight,
    scale: torch.Tensor,
    zero: torch.Tensor,
    right: torch.Tensor,
    row_scale: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """One block of the static path, written into ``out``: ``s_a s_w acc + [Σq_a', 1] @ right``."""
    codes = _block_codes(rows, scale, zero)
    left = torch.stack([codes.sum(dim=1), torch.ones(codes.shape[0])], dim=1)
    acc = torch._int_mm(codes.to(torch.int8), form.codes)
    out.copy_(acc).mul_(row_scale).addmm_(left, right)


def _dynamic_block(rows: torch.Tensor, form: Int8Weight, spec: object, bias: torch.Tensor, out: torch.Tensor) -> None:
    """One block of the dynamic path (one ``(s_a, z_a)`` per token row or per block, from its own min-max)::

    y = s_a[m] s_w[o] (acc + [z_a', Σq_a' - K z_a'] @ [-Σq'; -z']) + b
    """
    scale, zero = dynamic_params(rows, spec)  # [rows, 1] or [1]
    codes = _block_codes(rows, scale, zero)
    zero = (zero - 128).reshape(-1, 1).expand(rows.shape[0], 1)
    left = torch.cat([zero, codes.sum(dim=1, keepdim=True) - rows.shape[1] * zero], dim=1)
    acc = torch._int_mm(codes.to(torch.int8), form.codes)
    out.copy_(acc).addmm_(left, torch.stack([-form.code_sums, -form.zeros]))
    out.mul_(form.scales).mul_(scale.reshape(-1, 1)).add_(bias)


def int8_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x̂ @ W.T + bias`` with the int8 matmul (``x`` not yet quantized; the layer's activation spec applies)."""
    form = int8_weight(layer)
    spec = layer.act_spec
    rows = x.reshape(-1, x.shape[-1]).float()
    bias = layer.bias.float()
    out = torch.empty(rows.shape[0], form.codes.shape[1])
    step = block_rows(rows.shape[0])
    blocks = [slice(start, start + step) for start in range(0, rows.shape[0], step)]
    if spec.dynamic and spec.granularity == "token":
        for block in blocks:
            _dynamic_block(rows[block], form, spec, bias, out[block])
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)
    # one (s_a, z_a) for the whole input: the stored static pair, or the input's own range (dynamic per tensor)
    scale, zero = dynamic_params(rows, spec) if spec.dynamic else (layer.input_scale, layer.input_zero)
    shifted = zero - 128
    row_scale = scale * form.scales
    constant = bias + row_scale * (rows.shape[1] * shifted * form.zeros - shifted * form.code_sums)
    right = torch.stack([-row_scale * form.zeros, constant])
    for block in blocks:
        _static_block(rows[block], form, scale, zero, right, row_scale, out[block])
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)
