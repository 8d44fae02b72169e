"""Weight formats: the integer grid of today and the OCP Microscaling (MX) block-scaled formats.

A *format* fits a *grid* to a block of weight columns (``fit``); the grid rounds values to the nearest
representable value (``quantize`` gives codes, ``dequantize`` their values). RTN, GPTQ and any other quantizer only
talk to this interface, so they work with every format.

* ``"int"``: the min-max integer grid of :mod:`optimum_bc.formats.primitives` (one scale / zero point per row and group).
* MX formats, after the OCP Microscaling Formats (MX) Specification v1.0 (2023-09, "MX spec" below): a block of
  ``k = 32`` consecutive elements along the input dimension shares one power-of-two scale stored as E8M0 (MX spec
  §5.1, Table 1; §5.4 for E8M0); each element is a narrow float or integer (§5.3). Quantization follows the
  conversion of §6.3: ``X = 2^(floor(log2(amax)) - emax_elem)`` and each element is ``V / X`` rounded to nearest,
  ties to even, normal values saturating to the element's largest normal.

Special values (our choices, per the spec): the E8M0 code ``0xFF`` is NaN (§5.4) and a block whose scale is NaN
decodes to NaN (§5.2); a block holding a NaN or an infinite input gets that NaN scale (§6.3 leaves the element
conversion of such blocks undefined, so the whole block is marked). ``api.quantize_model`` refuses non-finite weights
before calibration, so a quantized model never contains such a block. The FP8 element codes reserved for NaN/Inf by
OFP8 (E4M3: ``S.1111.111``; E5M2: exponent ``11111``) are never produced, since values saturate (§6.3). FP6 and FP4
have no special codes (§5.3.2, §5.3.3).

``mxint4`` is not in MX spec v1.0: it is MXINT8 (§5.3.4, two's complement with an implicit scale ``2^-6``) with
4 bits, i.e. implicit scale ``2^-2`` (as TensorCast's ``mxint4``). Integer elements use the symmetric range
``[-max, max]``: the most negative code (``-2`` for MXINT8) is never produced.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch

from .primitives import MIN_SCALE, SCALE_DTYPE, QParams, compute_qparams, dequantize_codes, quantize_codes


MX_BLOCK_SIZE = 32
E8M0_BIAS = 127
E8M0_NAN = 255
#: Range of the E8M0 exponent (MX spec §5.4: codes 0..254 are 2^-127..2^127, 255 is NaN).
E8M0_MIN, E8M0_MAX = -127, 127
INT_FORMAT = "int"


@dataclass(frozen=True)
class ElementFormat:
    """One MX element type: a sign-magnitude float ``e{ebits}m{mbits}`` or a two's complement integer."""

    bits: int
    ebits: int  # exponent bits (0 for integers)
    mbits: int  # mantissa bits; for integers the fraction bits of the implicit scale 2^-mbits
    is_int: bool = False
    ieee_specials: bool = False  # E5M2: exponent all ones is Inf/NaN (OFP8)
    nan_max_code: bool = False  # E4M3: only S.1111.111 is NaN (OFP8)

    @property
    def bias(self) -> int:
        """Exponent bias ``2^(ebits-1) - 1`` (MX spec §5.3)."""
        return 2 ** (self.ebits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal; subnormals share it."""
        return 1 - self.bias

    @cached_property
    def values(self) -> torch.Tensor:
        """float32 value of every code ``0 .. 2^bits - 1`` (NaN / Inf where the code is reserved)."""
        codes = torch.arange(2**self.bits)
        if self.is_int:
            signed = torch.where(codes >= 2 ** (self.bits - 1), codes - 2**self.bits, codes)
            return signed.float() * 2.0**-self.mbits
        sign = torch.where(codes >> (self.bits - 1) == 1, -1.0, 1.0)
        exp = (codes >> self.mbits) & (2**self.ebits - 1)
        man = (codes & (2**self.mbits - 1)).float()
        normal = (1 + man / 2**self.mbits) * torch.exp2((exp - self.bias).float())
        subnormal = man * 2.0 ** (self.emin - self.mbits)
        out = sign * torch.where(exp == 0, subnormal, normal)
        top = exp == 2**self.ebits - 1
        if self.ieee_specials:
            out = torch.where(top & (man == 0), sign * torch.inf, out)
            out = torch.where(top & (man != 0), torch.nan, out)
        if self.nan_max_code:
            out = torch.where(top & (man == 2**self.mbits - 1), torch.nan, out)
        return out

    @cached_property
    def max_normal(self) -> float:
        """Largest finite value: the saturation bound of the conversion (MX spec §6.3)."""
        return float(self.values[torch.isfinite(self.values)].max())

    @property
    def emax(self) -> int:
        """``emax_elem``: exponent of the largest power of two not above ``max_normal`` (MX spec §6.3)."""
        return _floor_log2(torch.tensor(self.max_normal)).int().item()

    def round(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest representable value of finite ``y`` (ties to even, saturating to ``±max_normal``)."""
        y = y.float()
        if self.is_int:
            step = 2.0**-self.mbits
            return torch.round(y / step).clamp(-(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1) * step
        a = y.abs()
        exp = _floor_log2(a).clamp(min=self.emin)
        step = torch.exp2(exp - self.mbits)
        # Dividing by a power of two is exact, so torch.round (half to even) rounds the mantissa to even.
        r = (torch.round(a / step) * step).clamp(max=self.max_normal)
        return torch.copysign(r, y)

    def encode(self, r: torch.Tensor) -> torch.Tensor:
        """Codes (int64) of values ``r`` already on this format (the output of :meth:`round`); zero is code 0."""
        if self.is_int:
            return torch.round(r * 2**self.mbits).long() % 2**self.bits
        half = 2 ** (self.bits - 1)
        positive = self.values[:half]
        positive = positive[torch.isfinite(positive)].to(r.device)
        magnitude = torch.searchsorted(positive, r.abs().contiguous())
        return torch.where(r < 0, magnitude + half, magnitude)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of integer ``codes``."""
        return self.values.to(codes.device)[codes.long()]

    @cached_property
    def ordered(self) -> torch.Tensor:
        """The distinct values :meth:`round` can produce, ascending (``-0`` and ``+0`` are one value; for integers the
        most negative code is left out, as the symmetric range never produces it)."""
        values = self.values[torch.isfinite(self.values)]
        return torch.unique(values[values.abs() <= self.max_normal])

    def step(self, codes: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """Codes of the next larger (``direction`` +1) or smaller (-1) value; 0 or the end of the range keeps it."""
        table = self.ordered.to(codes.device)
        idx = torch.searchsorted(table, self.decode(codes).contiguous())
        idx = (idx + direction.long()).clamp(0, table.numel() - 1)
        return self.encode(table[idx]).to(codes.dtype)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(a))`` of positive finite float32 values (``-inf`` for 0), via ``frexp``."""
    mantissa, exponent = torch.frexp(a.float())
    return torch.where(mantissa == 0, -torch.inf, (exponent - 1).float())


#: MX element types by format name (MX spec §5.1 Table 1, plus mxint4).
MX_ELEMENTS: dict[str, ElementFormat] = {
    "mxfp8_e4m3": ElementFormat(8, 4, 3, nan_max_code=True),
    "mxfp8_e5m2": ElementFormat(8, 5, 2, ieee_specials=True),
    "mxfp6_e3m2": ElementFormat(6, 3, 2),
    "mxfp6_e2m3": ElementFormat(6, 2, 3),
    "mxfp4": ElementFormat(4, 2, 1),
    "mxint8": ElementFormat(8, 0, 6, is_int=True),
    "mxint4": ElementFormat(4, 0, 2, is_int=True),
}
#: Other spellings accepted by the config, mapped to the canonical name.
ALIASES = {
    "mxfp4_e2m1": "mxfp4",
    "mxfp8e4m3": "mxfp8_e4m3",
    "mxfp8e5m2": "mxfp8_e5m2",
    "mxfp6e3m2": "mxfp6_e3m2",
    "mxfp6e2m3": "mxfp6_e2m3",
}
FORMATS = (INT_FORMAT, *MX_ELEMENTS)


def canonical_format(name: str) -> str:
    """The canonical spelling of a format name (case-insensitive, aliases resolved); unknown names unchanged."""
    if not isinstance(name, str):
        return name
    lowered = name.lower()
    return ALIASES.get(lowered, lowered)


def is_mx(name: str) -> bool:
    """Whether ``name`` (canonical) is a block-scaled MX format."""
    return name in MX_ELEMENTS


class Grid(Protocol):
    """Rounding grid of one block of columns, one row per output channel."""

    scale: torch.Tensor  # (rows, 1) float32
    zero: torch.Tensor  # (rows, 1) float32 holding integers (0 for MX)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Codes (float tensor holding integers) of the nearest representable values of ``w``."""

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Values of ``codes``."""


@dataclass(frozen=True)
class IntGrid:
    """The integer min-max grid (delegates to :mod:`optimum_bc.formats.primitives`, so results are unchanged)."""

    qp: QParams

    @property
    def scale(self) -> torch.Tensor:
        return self.qp.scale

    @property
    def zero(self) -> torch.Tensor:
        return self.qp.zero

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_codes(w, self.qp)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return dequantize_codes(codes, self.qp)


@dataclass(frozen=True)
class MXGrid:
    """One MX block per row: shared scale ``2^E`` (float32, NaN for a NaN block) and the element type."""

    scale: torch.Tensor
    element: ElementFormat

    @property
    def zero(self) -> torch.Tensor:
        return torch.zeros_like(self.scale)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        y = w.float() / self.scale
        y = torch.where(torch.isfinite(y), y, torch.zeros_like(y))  # NaN blocks: codes are irrelevant
        return self.element.encode(self.element.round(y)).float()

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self.element.decode(codes) * self.scale


def mx_scale(w: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    """Shared scale ``2^(floor(log2(amax)) - emax_elem)`` of each row of ``w`` (MX spec §6.3), as float32 ``(rows, 1)``.

    The exponent is clamped to the E8M0 range (§5.4); an all-zero block gets the smallest scale (any scale encodes
    zeros exactly); a block holding NaN or ±Inf gets NaN.
    """
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True)
    exp = (_floor_log2(amax) - element.emax).clamp(E8M0_MIN, E8M0_MAX)
    exp = torch.where(amax == 0, float(E8M0_MIN), exp)
    scale = torch.ldexp(torch.ones_like(amax), exp.int())
    return torch.where(torch.isfinite(amax), scale, torch.nan)


def scale_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 codes (uint8) of power-of-two scales; NaN becomes ``0xFF``. Raises on a scale that is not ``2^E``."""
    finite = torch.isfinite(scale)
    mantissa, exponent = torch.frexp(torch.where(finite, scale.float(), 1.0))
    if not bool(((mantissa == 0.5) | ~finite).all()):
        raise ValueError("MX scales must be powers of two 2^E (E8M0); got a scale that is not")
    code = exponent - 1 + E8M0_BIAS
    if code.numel() and (int(code.min()) < 0 or int(code.max()) > E8M0_NAN - 1):
        raise ValueError(f"MX scale exponents must be in [{E8M0_MIN}, {E8M0_MAX}] (E8M0)")
    return torch.where(finite, code, E8M0_NAN).to(torch.uint8)


def e8m0_to_scale(code: torch.Tensor) -> torch.Tensor:
    """float32 scales ``2^(code - 127)`` of E8M0 codes; ``0xFF`` is NaN (MX spec §5.4)."""
    code = code.long()
    scale = torch.ldexp(torch.ones(code.shape, device=code.device), (code - E8M0_BIAS).int())
    return torch.where(code == E8M0_NAN, torch.nan, scale)


@dataclass(frozen=True)
class IntFormat:
    """Integer min-max grid with ``bits`` bits (asymmetric unless ``sym``)."""

    bits: int
    sym: bool
    name: str = INT_FORMAT

    def fit(self, w: torch.Tensor) -> IntGrid:
        """Min-max grid of each row of the block ``w``."""
        return IntGrid(compute_qparams(w, self.bits, self.sym))

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """Values of codes given per-column scales and zeros."""
        return scales * (codes.float() - zeros.float())

    def grid(self, scale: torch.Tensor, zero: torch.Tensor) -> IntGrid:
        """The grid with these (broadcastable) scales and zero points."""
        return IntGrid(QParams(scale, zero, 2**self.bits - 1))

    def step(self, codes: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """Codes one step up (``direction`` +1) or down (-1), kept inside ``[0, 2^bits - 1]``."""
        return (codes + direction).clamp(0, 2**self.bits - 1)

    def scale_candidates(self, scale: torch.Tensor) -> torch.Tensor:
        """Storable scales near float32 ``scale`` ``(rows,)``: its float16 rounding, as ``(rows, 1)``."""
        return scale.to(SCALE_DTYPE).float().clamp(min=MIN_SCALE).unsqueeze(1)


@dataclass(frozen=True)
class MXFormat:
    """A block-scaled MX format: element type and block size ``k = 32`` (MX spec §5.1)."""

    name: str
    element: ElementFormat
    block_size: int = MX_BLOCK_SIZE

    @property
    def bits(self) -> int:
        return self.element.bits

    def fit(self, w: torch.Tensor) -> MXGrid:
        """Shared scale of each row of the block ``w`` (``block_size`` columns, or fewer for one column)."""
        return MXGrid(mx_scale(w, self.element), self.element)

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """Values of codes given per-column scales (zeros are unused)."""
        return self.element.decode(codes) * scales

    def grid(self, scale: torch.Tensor, zero: torch.Tensor) -> MXGrid:
        """The grid with these (broadcastable) shared scales."""
        return MXGrid(scale, self.element)

    def step(self, codes: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """Codes of the adjacent element values (see :meth:`ElementFormat.step`)."""
        return self.element.step(codes, direction)

    def scale_candidates(self, scale: torch.Tensor) -> torch.Tensor:
        """Storable scales near ``scale`` ``(rows,)``: the powers of two just below and above it (E8M0, §5.4)."""
        exp = _floor_log2(scale.clamp(min=2.0**E8M0_MIN)).clamp(E8M0_MIN, E8M0_MAX - 1)
        low = torch.ldexp(torch.ones_like(scale), exp.int())
        return torch.stack([low, 2 * low], dim=1)


WeightFormat = IntFormat | MXFormat


def get_format(name: str, bits: int, sym: bool = False) -> WeightFormat:
    """The format called ``name`` (``"int"`` uses ``bits`` and ``sym``; an MX format fixes both)."""
    name = canonical_format(name)
    if name == INT_FORMAT:
        return IntFormat(bits, sym)
    if name not in MX_ELEMENTS:
        raise ValueError(f"unknown weight format {name!r}; available: {list(FORMATS)}")
    return MXFormat(name, MX_ELEMENTS[name])


def check_mx_shapes(in_features: dict[str, int], format_name: str) -> None:
    """Raise, naming the first offending layer, if an MX format meets an ``in_features`` not divisible by 32."""
    if not is_mx(canonical_format(format_name)):
        return
    for name, n in in_features.items():
        if n % MX_BLOCK_SIZE:
            raise ValueError(
                f"layer {name!r} has in_features={n}, not divisible by the MX block size {MX_BLOCK_SIZE} that "
                f"format={format_name!r} needs. Fix: add it to modules_to_not_convert, or use format='int'."
            )
