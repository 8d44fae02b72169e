"""Which packed-weight matmul path a :class:`~optimum_bc.layers.qlinear.QuantLinear` call takes: backends and plans.

The paths themselves (kernel forms and their matmuls) are in :mod:`.kernel_forms`; model-level helpers and the
public names in :mod:`.kernels`. All built from stock ATen ops only.

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
from dataclasses import dataclass

import torch
from torch import nn

from ..config_fields import BACKENDS


logger = logging.getLogger(__name__)

ENV_VAR = "OPTIMUM_BC_KERNEL"

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


def _prefill(settings: _Settings, device_type: str, tokens: int | None) -> bool:
    """Whether a kernel-eligible CPU call of ``tokens`` rows dequantizes per call instead (see ``dense_min_tokens``)."""
    limit = settings.dense_min_tokens
    return device_type == "cpu" and limit is not None and tokens is not None and tokens >= limit


def is_prefill(device_type: str, tokens: int | None) -> bool:
    """Whether a call of ``tokens`` tokens on ``device_type`` takes ``dequant`` under the current backend settings."""
    return _prefill(_settings, device_type, tokens)


def select_path(layer: nn.Module, x: torch.Tensor) -> str:
    """The path ``layer.forward(x)`` takes under the current backend (see the module docstring)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or layer.bias.requires_grad)
    return decide(layer, x.device.type, x.dtype, tokens=x.numel() // layer.in_features, needs_grad=needs_grad)
