"""Kernel paths of :class:`~optimum_bc.layers.qlinear.QuantLinear`: the backend switch, the per-model helpers
(:func:`prepare`, :func:`paths`, :func:`runtime_bytes`) and the public names of :mod:`.kernel_paths` (which path a
call takes; the path table) and :mod:`.kernel_forms` (the forms and their matmuls).

Sits above ``qlinear`` (the helpers walk a model's ``QuantLinear`` layers); ``qlinear`` uses the two modules below
it, so the registration runs one way.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernel_forms import KernelForm, build_form, check_form, matmul
from .kernel_paths import (
    BACKENDS,
    CPU_INT4,
    CPU_INT4X2,
    CPU_INT8,
    CUDA_INT4,
    DENSE_MIN_TOKENS,
    DEQUANT,
    ENV_VAR,
    HAS_CPU_INT4,
    HAS_CPU_INT8,
    HAS_CUDA_INT4,
    KERNEL_GROUPS,
    PATHS,
    REFERENCE,
    Plan,
    _check_backend,
    backend_of,
    decide,
    get_backend,
    is_prefill,
    plan,
    select_path,
    set_backend,
    use_backend,
)
from .qlinear import QuantLinear


def _quant_linears(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, QuantLinear)]


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


__all__ = [
    "backend_of",
    "set_model_backend",
    "BACKENDS",
    "CPU_INT4",
    "CPU_INT4X2",
    "CPU_INT8",
    "CUDA_INT4",
    "DENSE_MIN_TOKENS",
    "DEQUANT",
    "ENV_VAR",
    "HAS_CPU_INT4",
    "HAS_CPU_INT8",
    "HAS_CUDA_INT4",
    "KERNEL_GROUPS",
    "KernelForm",
    "PATHS",
    "Plan",
    "REFERENCE",
    "build_form",
    "check_form",
    "decide",
    "get_backend",
    "is_prefill",
    "matmul",
    "paths",
    "plan",
    "prepare",
    "runtime_bytes",
    "select_path",
    "set_backend",
    "use_backend",
]
