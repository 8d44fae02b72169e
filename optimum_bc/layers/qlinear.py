"""A real low-bit linear layer storing bit-packed integer weights.

``QuantLinear`` keeps the quantized weight as packed codes (``qweight``), packed integer zero points (``qzeros``),
float16 ``scales`` and a per-column group index (``g_idx``, which also covers act-order / permuted groups). The
dequantized weight is ``W[o, i] = scales[o, g] * (q[o, i] - z[o, g])`` with ``g = g_idx[i]``. ``bias`` is always
present because bias compensation gives bias-less layers a bias.

``forward`` picks a path per call (:mod:`optimum_bc.layers.kernels`): by default packed-weight ATen kernels (CPU int4 /
int8 for float32, bf16 and fp16 activations, computed in bf16; CUDA int4 for bf16) for short calls, per-call
dequantization into a bf16 matmul for long CPU calls (prefill), no dense cache; or the reference path that
dequantizes once (float32 math), caches the dense weight in the activation dtype and runs ``F.linear`` (exact, but
the cache costs 4 bytes/weight in float32, 2 in bf16/fp16). ``optimum_bc.layers.kernels.use_backend("reference")`` (or
``OPTIMUM_BC_KERNEL=reference``) forces the reference path, which calibration and anything needing gradients use.
"""

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.packing import MAX_BITS, MIN_BITS, pack_int32, packed_width, unpack_int32
from . import int8_path
from .dequant import contiguous_groups, dequantize_int_rows, row_blocks
from .kernel_forms import KernelForm, build_form, check_form, matmul
from .kernel_paths import _CUDA_CHECK_RTOL, REFERENCE, Plan, backend_of, plan, select_path
from .kernel_paths import logger as kernel_logger
from .packed_base import PackedLinearBase


def _num_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups per output row (one when ``group_size == -1``)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def _as_integer(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``tensor`` as an integer tensor (itself when it is one: an int64 copy of a layer's codes would cost 8
    bytes a weight), accepting floating tensors only when every value is integral (then as int64)."""
    if tensor.dtype == torch.bool or tensor.dtype.is_complex:
        raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")
    if tensor.dtype.is_floating_point:
        if not torch.isfinite(tensor).all() or not torch.equal(tensor, tensor.round()):
            raise ValueError(f"{name} must hold integer values, got non-integral {tensor.dtype} values")
        return tensor.to(torch.int64)
    return tensor


class QuantLinear(PackedLinearBase):
    """Linear layer with ``bits``-bit grouped weights: packed-weight kernels or a dequantize-once dense cache.

    Paths (see :mod:`optimum_bc.layers.kernels`; ``kernel_path(x)`` tells which one an input takes):

    * CPU, 2/3/4-bit, groups made of runs of 32/64/128/256 columns (per-channel and act-order included):
      ``aten._weight_int4pack_mm_for_cpu``; +0.5 byte/weight (computed in bf16; fp16/fp32 inputs are cast).
    * CPU, 5..8-bit per-channel: ``aten._weight_int8pack_mm`` (+1 byte/weight); 5..8-bit grouped: two int4
      matmuls on the high and low nibbles (+1 byte/weight).
    * CPU calls of ``dense_min_tokens`` tokens or more (prefill): the packed weight dequantized per call into a
      bf16 matmul, nothing cached.
    * CUDA, 2/3/4-bit, bf16: ``aten._weight_int4pack_mm`` (untested, self-checked when built).
    * The ``"reference"`` backend, anything needing gradients, float64, layouts without a kernel: the reference dense
      cache, 4 bytes/weight in float32 (2 in bf16/fp16) on top of the packed buffers.

    Kernel forms and the dense cache are derived data: never in the ``state_dict``, dropped by :meth:`reset_cache`.
    An ``nn.Linear`` subclass whose ``weight`` is ``None`` (see :mod:`optimum_bc.layers.packed_base`): stock PEFT adapts it.
    """

    #: This layer's own backend (``BCQuantizationConfig.backend``, see ``kernels.set_model_backend``); None: the
    #: process default.
    kernel_backend: str | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        positions: int | None = None,
        sink_tokens: int = 0,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features and out_features must be positive, got in_features={in_features}, "
                f"out_features={out_features}"
            )
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"group_size must be -1 (per channel) or positive, got {group_size}")
        self._in_features = in_features
        self._out_features = out_features
        self._bits = bits
        self._group_size = group_size
        self._cached_weight: torch.Tensor | None = None
        self._kernel_form: KernelForm | None = None
        self._kernel_plans: dict[str, Plan] = {}

        groups = _num_groups(in_features, group_size)
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.int32, device=device),
        )
        self.register_buffer(
            "qzeros", torch.zeros(out_features, packed_width(groups, bits), dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        if group_size == -1:
            g_idx = torch.zeros(in_features, dtype=torch.int32, device=device)
        else:
            g_idx = torch.div(
                torch.arange(in_features, dtype=torch.int32, device=device), group_size, rounding_mode="floor"
            )
        self.register_buffer("g_idx", g_idx)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        self._register_position_buffers(out_features, positions, sink_tokens, dtype, device)

    @property
    def in_features(self) -> int:
        """Number of input features, as on ``nn.Linear``."""
        return self._in_features

    @property
    def out_features(self) -> int:
        """Number of output features, as on ``nn.Linear``."""
        return self._out_features

    @property
    def bits(self) -> int:
        """Bit width of the weight codes and zero points."""
        return self._bits

    @property
    def group_size(self) -> int:
        """Input columns per quantization group (-1: one group per row)."""
        return self._group_size

    @property
    def num_groups(self) -> int:
        """Number of quantization groups per output row."""
        return _num_groups(self._in_features, self._group_size)

    @classmethod
    def from_quantized(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor | None,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "QuantLinear":
        """Build a layer from integer codes ``[out, in]``, scales/zeros ``[out, G]`` and ``g_idx`` ``[in]``.

        Scales are stored as float16 (callers pass values already representable in float16); zeros are integer
        zero points. ``g_idx=None`` means the default contiguous grouping.
        """
        if codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out_features, in_features], got shape {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, bits, group_size, dtype=dtype, device=codes.device)
        groups = module.num_groups
        expected = (out_features, groups)
        if tuple(scales.shape) != expected:
            raise ValueError(
                f"scales must have shape {expected} (out_features, num_groups), got {tuple(scales.shape)}"
            )
        if tuple(zeros.shape) != expected:
            raise ValueError(f"zeros must have shape {expected} (out_features, num_groups), got {tuple(zeros.shape)}")
        if not scales.dtype.is_floating_point:
            raise ValueError(f"scales must be a floating tensor, got {scales.dtype}")
        scales16 = scales.detach().to(device=codes.device, dtype=torch.float16)
        if not torch.isfinite(scales16).all():
            raise ValueError("scales must be finite and within the float16 range")
        if g_idx is not None:
            if tuple(g_idx.shape) != (in_features,):
                raise ValueError(f"g_idx must have shape ({in_features},) (in_features,), got {tuple(g_idx.shape)}")
            g_idx_int = _as_integer(g_idx, "g_idx")
            if g_idx_int.numel() and (int(g_idx_int.min()) < 0 or int(g_idx_int.max()) >= groups):
                raise ValueError(
                    f"g_idx values must be in [0, {groups - 1}], got values in [{int(g_idx_int.min())}, "
                    f"{int(g_idx_int.max())}]"
                )
        codes_int = _as_integer(codes.detach(), "codes")
        zeros_int = _as_integer(zeros.detach(), "zeros").to(codes.device)
        max_code = (1 << bits) - 1
        for name, values in (("codes", codes_int), ("zeros", zeros_int)):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) > max_code):
                raise ValueError(
                    f"{name} must be in [0, {max_code}] for bits={bits}, got values in "
                    f"[{int(values.min())}, {int(values.max())}]"
                )
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},) (out_features,), got {tuple(bias.shape)}")

        with torch.no_grad():
            module.qweight.copy_(pack_int32(codes_int, bits))
            module.qzeros.copy_(pack_int32(zeros_int, bits))
            module.scales.copy_(scales16)
            if g_idx is not None:
                module.g_idx.copy_(g_idx_int.to(device=codes.device, dtype=torch.int32))
            if bias is not None:
                module.bias.copy_(bias.detach().to(device=codes.device, dtype=dtype))
        return module

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the integer codes ``[out, in]`` and zero points ``[out, G]`` as uint8."""
        codes = unpack_int32(self.qweight, self._bits, self._in_features)
        zeros = unpack_int32(self.qzeros, self._bits, self.num_groups)
        return codes, zeros

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight ``[out, in]`` in ``dtype`` (default: the bias dtype), ``scale * (code - zero)``.

        Built a block of rows at a time into the result (:func:`optimum_bc.layers.dequant.dequantize_int_rows`):
        the product is exact in float32 and rounded once to ``dtype``, so the values equal the float32 formula cast
        to ``dtype`` bit for bit, while the temporaries stay a few MiB beyond the result.
        """
        target = self.bias.dtype if dtype is None else dtype
        k, groups = self._in_features, self.num_groups
        with torch.no_grad():
            zeros = unpack_int32(self.qzeros, self._bits, groups)
            scales = self.scales.float()
            g_idx = self.g_idx.view(1, k)
            # Meta tensors (no values) take the gather path, which needs none.
            g_idx = None if not g_idx.is_meta and contiguous_groups(g_idx, groups) else g_idx
            weight = torch.empty(self._out_features, k, dtype=target, device=self.qweight.device)
            for rows in row_blocks(self._out_features, k):
                dequantize_int_rows(
                    self.qweight[rows][None],
                    zeros[rows][None],
                    scales[rows][None],
                    self._bits,
                    k,
                    g_idx,
                    weight[rows][None],
                )
        return weight

    def reset_cache(self) -> None:
        """Drop the cached dense weight and kernel forms so the next forward recomputes them from the buffers."""
        self._cached_weight = None
        self._kernel_form = None
        self._kernel_plans = {}
        self._int8_weight = None

    def kernel_plan(self, device_type: str) -> Plan:
        """The kernel this layer can use on ``device_type`` (decided once from its shape and ``g_idx``)."""
        layer_plan = self._kernel_plans.get(device_type)
        return self._build_kernel_plan(device_type) if layer_plan is None else layer_plan

    @torch.compiler.disable
    def _build_kernel_plan(self, device_type: str) -> Plan:
        """Decide and remember the plan eagerly (it reads ``g_idx`` values, which a compiled graph cannot)."""
        layer_plan = plan(self, device_type)
        self._kernel_plans[device_type] = layer_plan
        return layer_plan

    def kernel_path(self, x: torch.Tensor) -> str:
        """The path ``forward(x)`` takes under the current backend (``"reference"``, ``"cpu_int4"``, ...)."""
        return select_path(self, x)

    @torch.compiler.disable
    def kernel_form(self, device: torch.device | str) -> "KernelForm | None":
        """This layer's kernel form on ``device``, built on first use; ``None`` when the device has no usable kernel.

        Runs eagerly under ``torch.compile`` (a graph break on the first call only). A CUDA form is checked against
        the dequantized weight once; on failure the layer falls back to the reference path with a warning.
        """
        device = torch.device(device)
        form = self._kernel_form
        if form is not None and form.device == device:
            return form
        layer_plan = self.kernel_plan(device.type)
        if layer_plan.path == REFERENCE:
            return None
        try:
            form = build_form(self, device, layer_plan)
            error = check_form(self, form) if device.type == "cuda" else 0.0
            problem = None if error <= _CUDA_CHECK_RTOL else f"relative error {error:.3g}"
        except RuntimeError as exc:  # an op missing or refusing this shape on this device
            form, problem = None, str(exc).splitlines()[0]
        if problem is not None:
            kernel_logger.warning(
                "%s kernel disabled for %s (%s); using the reference path", layer_plan.path, self, problem
            )
            self._kernel_plans[device.type] = Plan(REFERENCE, f"{layer_plan.path} failed: {problem}")
            return None
        self._kernel_form = form
        return form

    def cache_bytes(self) -> int:
        """Bytes held by derived data: the dense weight cache and the kernel form (0 when neither is built)."""
        dense = self._cached_weight
        total = 0 if dense is None else dense.numel() * dense.element_size()
        return total + (0 if self._kernel_form is None else self._kernel_form.nbytes())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` in ``x.dtype``, on the path :func:`optimum_bc.layers.kernels.select_path` picks."""
        if backend_of(self) != REFERENCE and int8_path.eligible(self, x):
            return self._add_position_terms(int8_path.int8_linear(self, x), x)  # W8A8: int8 x int8 matmul
        x = self._quantize_input(x)
        path = select_path(self, x)
        form = None
        if path != REFERENCE:
            form = self._kernel_form
            if form is None or form.device != x.device:
                form = self.kernel_form(x.device)  # built eagerly, outside any compiled graph
        if form is None:
            out = F.linear(x, self._weight_for(x), self.bias.to(dtype=x.dtype, device=x.device))
        else:
            out = matmul(form, x) + self.bias.to(dtype=x.dtype, device=x.device)
        return self._add_position_terms(out, x)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Load buffers as usual, then drop the cache since the weight may have changed."""
        super()._load_from_state_dict(*args, **kwargs)
        self.reset_cache()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "QuantLinear":
        """Drop the cache, convert as usual, but keep ``scales`` in float16 (the checkpoint format).

        ``module.to(dtype)`` would otherwise convert the floating ``scales`` buffer too, which changes the saved
        format and, for bfloat16, rounds the scales.
        """
        self.reset_cache()
        old_scales = self._buffers.get("scales")
        super()._apply(fn, recurse)
        new_scales = self._buffers.get("scales")
        if old_scales is not None and new_scales is not None and new_scales.dtype != torch.float16:
            if old_scales.dtype == torch.float16 and not old_scales.is_meta:
                self._buffers["scales"] = old_scales.to(new_scales.device)
            else:
                self._buffers["scales"] = new_scales.to(torch.float16)
        return self

    def weight_bytes(self) -> int:
        """Bytes held by the quantized buffers (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales, self.g_idx))

    def extra_repr(self) -> str:
        """Shape and quantization settings, shown by ``repr``."""
        return (
            f"in_features={self._in_features}, out_features={self._out_features}, bits={self._bits}, "
            f"group_size={self._group_size}"
        )
