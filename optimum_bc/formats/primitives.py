"""Integer quantization grid: min-max parameters, quantize and dequantize.

Follows the asymmetric min-max quantizer of the GPTQ reference (arXiv 2210.17323, `quant.py`): the range always
contains 0, ``scale = (xmax - xmin) / maxq`` and an integer zero point. Scales are rounded to float16 at fit time,
because that is how they are stored: codes computed here dequantize exactly after a save/reload round trip.
Scales may be float16 subnormals (down to ``MIN_SCALE``), for weights of small magnitude.
"""

from dataclasses import dataclass

import torch


SCALE_DTYPE = torch.float16
# Smallest positive float16 (a subnormal). Clamping at the smallest normal, 2^-14, made weights of small magnitude
# lose their grid (8-bit, weight std 1e-4: 876x the error of a plain min-max grid; 4-bit std 2e-5: 88 % zeros);
# subnormal scales keep them within 2 % of it down to scales of about 2^-20, where fp16's absolute step 2^-24
# starts to show (optimum_bc.layers.validation warns, naming the layer, below that).
MIN_SCALE = 2.0**-24


@dataclass(frozen=True)
class QParams:
    """Per-row grid: ``w ≈ scale * (q - zero)`` with integer ``q`` in ``[0, maxq]``."""

    scale: torch.Tensor  # (rows, 1) float32, exactly representable in float16
    zero: torch.Tensor  # (rows, 1) float32 holding integers
    maxq: int


def compute_qparams(w: torch.Tensor, bits: int, sym: bool) -> QParams:
    """Fit one min-max grid per row of ``w`` (rows = output channels)."""
    w = w.float()
    maxq = 2**bits - 1
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = _round_up_to_storage(((xmax - xmin) / maxq).clamp(min=MIN_SCALE))
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return QParams(scale.unsqueeze(1), zero.unsqueeze(1), maxq)


def _round_up_to_storage(scale: torch.Tensor) -> torch.Tensor:
    """Round float32 scales up to the next float16 value, so the stored grid still spans ``[xmin, xmax]``."""
    stored = scale.to(SCALE_DTYPE)
    below = stored.float() < scale
    stored = torch.where(below, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    return stored.float()


def quantize_codes(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes of ``w`` on the grid ``qp`` (float tensor holding integers)."""
    return torch.clamp(torch.round(w.float() / qp.scale) + qp.zero, 0, qp.maxq)


def dequantize_codes(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Float values of integer codes ``q``."""
    return qp.scale * (q - qp.zero)


def fake_quantize(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Round ``w`` to the nearest grid point (the value the packed layer will use)."""
    return dequantize_codes(quantize_codes(w, qp), qp)
