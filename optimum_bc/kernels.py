"""Fast packed-weight matmul paths for :class:`~optimum_bc.qlinear.QuantLinear`, built from stock ATen ops only.

``QuantLinear.forward`` asks :func:`select_path` which path to run, per call, from the backend switch, the device,
the activation dtype, autograd, the layer's bits / grouping / shape and the number of tokens in the call:

========================  ============================================================================================
path                      what runs
========================  ============================================================================================
``reference``             dequantize once (float32 math), cache the dense weight in the activation dtype, ``F.linear``.
                          Bit-exact ``F.linear(x, layer.dequantize_weight(x.dtype), bias)``. Memory: the cache costs
                          4 bytes/weight in float32 (2 in bf16/fp16) on top of the packed buffers.
``cpu_int4``              ``aten._weight_int4pack_mm_for_cpu`` on bfloat16 activations. 2, 3 and 4-bit codes all fit a
                          4-bit slot (centred in it, see :func:`_centre`), so one kernel covers them. Extra memory:
                          0.5 byte/weight + bf16 scales/zero terms.
``cpu_int4x2``            5..8-bit codes with several groups per row: ``q = 16 * hi + lo``, two ``cpu_int4`` matmuls
                          (``hi`` with scale ``16 s``, ``lo`` with scale ``s``) summed in float32. Exact algebra, one
                          byte/weight. (The int8 ATen op only takes one scale per output channel.)
``cpu_int8``              5..8-bit codes with one group per row: ``aten._weight_int8pack_mm`` on ``q - c`` (int8, ``c``
                          the code nearest the zero point that keeps ``q - c`` in range) with per-channel bf16 scales,
                          plus ``s (c - z) * sum(x)`` in float32 (zero for 5..7 bits). One byte/weight.
``dequant``               CPU calls of at least ``dense_min_tokens`` tokens (prefill) of a layer with a CPU kernel: the
                          weight is dequantized from the packed buffers a block of rows at a time (float32, rounded
                          once to bf16: the reference path's bf16 weight) into reused scratch and multiplied in bf16;
                          nothing is cached. The packed kernels cost per token, this path per call: it wins from
                          64-180 tokens (measured on a 4096 x 11008 layer, 1 and 2 busy threads; default 128).
``cuda_int4``             ``aten._weight_int4pack_mm`` (tinygemm, bf16, sm80+) for 2/3/4-bit on CUDA. UNTESTED here (no
                          GPU); every CUDA form is checked against the dequantized weight once when it is built and
                          the layer falls back to ``reference`` (with a warning) if the check fails or the op raises.
========================  ============================================================================================

All non-reference paths compute in bfloat16: activations are rounded to bf16 on the way in (float32 and float16
inputs included) and the result is cast back to the input dtype. Relative output error against a float64 matmul of
the dequantized weight: ~2.4e-3 for every bit width (the same as a bf16 ``F.linear`` of the bf16-rounded weight);
on whole tiny models the float32 logits move by <1 % of their range (see ``tests/test_kernels.py``).

Kernel preconditions (checked by :func:`plan`): a kernel group size ``kg`` in {256, 128, 64, 32} must divide
``in_features`` such that, once the input columns are sorted by ``g_idx`` (stable), each run of ``kg`` columns
belongs to one quantization group. That covers group sizes that are multiples of 32 (a last, shorter group too when
its length is a multiple of 32), per-channel grids (``group_size=-1``, any ``kg`` dividing ``in_features``) and
GPTQ act-order ``g_idx``: the input is permuted once per call (``x[..., perm]``) against a weight repacked in that
column order. ``out_features`` is padded to a multiple of 16 (zero rows, sliced away). The int8 op additionally
needs ``in_features % 16 == 0`` (its bf16 path returns garbage or crashes otherwise in torch 2.13, verified).

Backends: a process default (:func:`set_backend`, or ``OPTIMUM_BC_KERNEL`` read at import), a per-model choice
(``BCQuantizationConfig(backend=...)``, applied by the quantizer with :func:`set_model_backend`: it wins over the
process default for that model's layers), and :func:`use_backend`, a block inside which every layer takes the given
backend whatever its model's choice (calibration runs under ``use_backend("reference")``):

* ``"auto"`` (default): on CPU the packed kernels (decode) and ``dequant`` (prefill) for float32, bf16 and fp16
  activations; on CUDA the kernel for bf16 only. ``reference`` for float64, anything needing gradients, layouts
  without a kernel, and layers whose ``out_features`` padding would waste more than 1/8 of the kernel's work (tiny
  layers). Calibration always runs the packed layers on ``reference`` (exact) and drops their caches afterwards.
* ``"fast"``: as ``"auto"``, plus CUDA float16/float32 inputs (cast to bf16) and any padding.
* ``"reference"``: always the dequantize-once path (exact evaluation, bit-exact comparisons, gradients).

``dense_min_tokens`` (default :data:`DENSE_MIN_TOKENS`; ``None``: never) sets where ``dequant`` takes over.

In-memory and reloaded models pick the same path for the same input, so their logits stay bit-identical.

Kernel forms are derived from the buffers at first use (or by :func:`prepare`), are never in the ``state_dict``,
and are dropped by ``QuantLinear.reset_cache`` (called on ``load_state_dict``, ``.to()``, ``.half()`` ...). Like the
dense cache, in-place edits of the buffers need an explicit ``reset_cache()``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .dequant import DequantSource


logger = logging.getLogger(__name__)

ENV_VAR = "OPTIMUM_BC_KERNEL"
BACKENDS = ("auto", "fast", "reference")

REFERENCE = "reference"
CPU_INT4 = "cpu_int4"
CPU_INT4X2 = "cpu_int4x2"
CPU_INT8 = "cpu_int8"
CUDA_INT4 = "cuda_int4"
DEQUANT = "dequant"
PATHS = (REFERENCE, CPU_INT4, CPU_INT4X2, CPU_INT8, CUDA_INT4, DEQUANT)

DENSE_MIN_TOKENS = 128  # default: CPU calls with this many tokens or more take ``dequant`` (measured crossover 64-180)

KERNEL_GROUPS = (256, 128, 64, 32)
_N_ALIGN = 16
_MAX_PAD_WASTE = 1 / 8  # "auto" skips layers whose padded out_features exceed this fraction of extra work
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_CHECK_RTOL = 2e-2


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _aten_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


HAS_CPU_INT4 = _aten_op("_weight_int4pack_mm_for_cpu") and _aten_op("_convert_weight_to_int4pack_for_cpu")
HAS_CPU_INT8 = _aten_op("_weight_int8pack_mm")
HAS_CUDA_INT4 = _aten_op("_weight_int4pack_mm") and _aten_op("_convert_weight_to_int4pack")


@dataclass
class _Settings:
    backend: str = "auto"
    dense_min_tokens: int | None = DENSE_MIN_TOKENS
    forced: bool = False  # set by use_backend: overrides the layers' own backend


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"kernel backend must be one of {BACKENDS}, got {name!r}; e.g. set_backend('reference') or "
            f"{ENV_VAR}=reference for the exact dequantize-once path"
        )
    return name


def _from_env() -> _Settings:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a kernel backend; use one of {BACKENDS} or unset it")
    return _Settings(value or "auto")


def _check_min_tokens(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"dense_min_tokens must be a positive int (calls with that many tokens dequantize per call) or None "
            f"(always the packed kernels), got {value!r}"
        )
    return value


_settings = _from_env()


def get_backend() -> str:
    """The active backend: ``"auto"``, ``"fast"`` or ``"reference"``."""
    return _settings.backend


def set_backend(name: str | None = None, *, dense_min_tokens: int | None = DENSE_MIN_TOKENS) -> str:
    """Select the process default backend (``None``: back to ``$OPTIMUM_BC_KERNEL`` or ``"auto"``).

    Layers of a model quantized or loaded with ``BCQuantizationConfig(backend=...)`` keep their own backend (see
    :func:`set_model_backend`).

    ``dense_min_tokens``: CPU calls with at least this many tokens (prefill) take the ``dequant`` path instead of
    the packed kernel (``None``: never). Returns the previous backend name. Layers keep their built kernel forms;
    only the choice per call changes.
    """
    global _settings
    previous = _settings.backend
    backend = _from_env().backend if name is None else _check_backend(name)
    _settings = _Settings(backend, _check_min_tokens(dense_min_tokens))
    return previous


@contextmanager
def use_backend(name: str, *, dense_min_tokens: int | None = DENSE_MIN_TOKENS) -> Iterator[None]:
    """Every layer takes backend ``name`` inside the block, its model's own choice included; restores on exit."""
    global _settings
    saved = _settings
    _settings = _Settings(_check_backend(name), _check_min_tokens(dense_min_tokens), forced=True)
    try:
        yield
    finally:
        _settings = saved


# --------------------------------------------------------------------------------------------------------------------
# Static plan: which kernel a layer could use on a device type, decided once from its shape and g_idx.
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a layer can run on one device type: ``path`` (``reference`` when no kernel fits) and why."""

    path: str
    reason: str
    group: int = 0  # kernel group size (int4 paths)
    padded_out: int = 0
    permuted: bool = False


def _kernel_group(g_idx: torch.Tensor, in_features: int) -> tuple[int, torch.Tensor | None]:
    """Largest kernel group ``kg`` such that sorted-by-group columns form uniform runs of ``kg``; 0 if none.

    Also returns the stable sort permutation (``None`` when ``g_idx`` is already non-decreasing).
    """
    g = g_idx.detach().to("cpu", torch.int64)
    perm = None
    if g.numel() > 1 and bool((g[1:] < g[:-1]).any()):
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    for kg in KERNEL_GROUPS:
        if in_features % kg:
            continue
        runs = g.view(-1, kg)
        if bool((runs == runs[:, :1]).all()):
            return kg, perm
    return 0, perm


def _padded(n: int) -> int:
    return -(-n // _N_ALIGN) * _N_ALIGN


def plan(layer: nn.Module, device_type: str) -> Plan:
    """The kernel ``layer`` (a ``QuantLinear``) can use on ``device_type`` (``"cpu"``, ``"cuda"``), with the reason."""
    bits, k, n = layer.bits, layer.in_features, layer.out_features
    padded = _padded(n)
    if device_type == "cpu":
        if bits > 4 and layer.num_groups == 1:
            if not HAS_CPU_INT8:
                return Plan(REFERENCE, "this torch has no aten._weight_int8pack_mm")
            if k % 16:
                return Plan(REFERENCE, f"in_features={k} is not a multiple of 16 (int8 kernel constraint)")
            return Plan(CPU_INT8, "per-channel int8 weight-only matmul", padded_out=n)
        if not HAS_CPU_INT4:
            return Plan(REFERENCE, "this torch has no aten._weight_int4pack_mm_for_cpu")
        kg, perm = _kernel_group(layer.g_idx, k)
        if not kg:
            return Plan(REFERENCE, _no_group_reason(layer))
        path = CPU_INT4 if bits <= 4 else CPU_INT4X2
        what = "int4 weight-only matmul" if bits <= 4 else "two int4 matmuls (high and low nibbles)"
        return Plan(path, f"{what}, kernel group {kg}", group=kg, padded_out=padded, permuted=perm is not None)
    if device_type == "cuda":
        if not HAS_CUDA_INT4:
            return Plan(REFERENCE, "this torch has no aten._weight_int4pack_mm")
        if bits > 4:
            return Plan(REFERENCE, "no CUDA kernel for 5..8-bit codes here (dense cache in the activation dtype)")
        if _torch_version() < (2, 5):
            return Plan(REFERENCE, "CUDA int4pack needs torch >= 2.5 (uint8 packing)")
        kg, perm = _kernel_group(layer.g_idx, k)
        if not kg:
            return Plan(REFERENCE, _no_group_reason(layer))
        return Plan(CUDA_INT4, f"tinygemm int4, kernel group {kg} (untested)", kg, padded, perm is not None)
    return Plan(REFERENCE, f"no kernel for device type {device_type!r}")


def _no_group_reason(layer: nn.Module) -> str:
    return (
        f"no kernel group in {KERNEL_GROUPS} fits in_features={layer.in_features}, group_size={layer.group_size} "
        "(needs groups made of whole runs of 32, 64, 128 or 256 columns)"
    )


def decide(
    layer: nn.Module,
    device_type: str,
    dtype: torch.dtype,
    *,
    tokens: int | None = None,
    needs_grad: bool = False,
) -> str:
    """The path for a ``dtype`` input of ``tokens`` rows on ``device_type`` under the layer's backend."""
    settings = _settings
    backend = backend_of(layer)
    if backend == "reference" or dtype not in _FLOATS or needs_grad:
        return REFERENCE
    if backend == "auto" and device_type == "cuda" and dtype != torch.bfloat16:
        return REFERENCE
    layer_plan = layer.kernel_plan(device_type)
    if layer_plan.path == REFERENCE:
        return REFERENCE
    if backend == "auto" and layer_plan.padded_out > layer.out_features * (1 + _MAX_PAD_WASTE):
        return REFERENCE
    if _prefill(settings, device_type, tokens):
        return DEQUANT
    return layer_plan.path


def backend_of(layer: nn.Module) -> str:
    """The backend ``layer`` runs under: a :func:`use_backend` block, else its model's, else the process default."""
    own = getattr(layer, "kernel_backend", None)
    return _settings.backend if _settings.forced or own is None else own


def set_model_backend(module: nn.Module, name: str | None) -> int:
    """Give every packed layer of ``module`` its own backend (``None``: follow the process default again).

    Other models in the process keep theirs. Returns the number of layers set (``MXLinear`` layers always run the
    reference path and are not counted).
    """
    if name is not None:
        _check_backend(name)
    layers = _quant_linears(module)
    for layer in layers:
        layer.kernel_backend = name
    return len(layers)


def _prefill(settings: _Settings, device_type: str, tokens: int | None) -> bool:
    """Whether a kernel-eligible CPU call of ``tokens`` rows dequantizes per call instead (see ``dense_min_tokens``)."""
    limit = settings.dense_min_tokens
    return device_type == "cpu" and limit is not None and tokens is not None and tokens >= limit


def select_path(layer: nn.Module, x: torch.Tensor) -> str:
    """The path ``layer.forward(x)`` takes under the current backend (see the module docstring)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or layer.bias.requires_grad)
    return decide(layer, x.device.type, x.dtype, tokens=x.numel() // layer.in_features, needs_grad=needs_grad)


# --------------------------------------------------------------------------------------------------------------------
# Kernel forms (derived tensors, never saved) and their matmuls.
# --------------------------------------------------------------------------------------------------------------------


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
        path = DEQUANT if form.dequant is not None and _prefill(_settings, x.device.type, x2.shape[0]) else form.path
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


# --------------------------------------------------------------------------------------------------------------------
# Model-level helpers.
# --------------------------------------------------------------------------------------------------------------------


def _quant_linears(module: nn.Module) -> list[nn.Module]:
    from .qlinear import QuantLinear

    return [m for m in module.modules() if isinstance(m, QuantLinear)]


def prepare(module: nn.Module, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> dict:
    """Build every ``QuantLinear``'s kernel form now (e.g. before ``torch.compile`` or timing) for ``dtype`` inputs.

    Follows the current backend's choice for a ``dtype`` input on ``device`` (default: where the layer's buffers
    are). Layers that would take ``reference`` are left alone (their dense cache is still built lazily). Returns the
    number of layers per path.
    """
    counts: dict[str, int] = {}
    for layer in _quant_linears(module):
        dev = torch.device(device) if device is not None else layer.qweight.device
        path = decide(layer, dev.type, dtype)
        if path != REFERENCE and layer.kernel_form(dev) is None:
            path = REFERENCE  # a CUDA form that failed its check
        counts[path] = counts.get(path, 0) + 1
    return counts


def paths(module: nn.Module, dtype: torch.dtype = torch.bfloat16, device_type: str = "cpu") -> dict[str, int]:
    """Number of ``QuantLinear`` layers per path for a ``dtype`` input on ``device_type`` (builds no forms)."""
    counts: dict[str, int] = {}
    for layer in _quant_linears(module):
        path = decide(layer, device_type, dtype)
        counts[path] = counts.get(path, 0) + 1
    return counts


def runtime_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers (shared tensors once) plus every ``QuantLinear``'s dense cache / kernel forms."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.device.index or 0) if t.device.type != "meta" else (id(t), -1)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.device.type != "meta" else 0
    return total + sum(layer.cache_bytes() for layer in _quant_linears(module))
