"""Quantized layers and their kernels: ``QuantLinear`` (integer grid), ``MXLinear`` (MX formats), their common base
with the sink / position biases, the kernel paths and dequantization.

Floor above ``config``: nothing here imports calibration, the engine or the integrations. ``optimum_bc.layers`` was a
module before 0.2 holding the config-to-layer factory; that moved to :mod:`optimum_bc.calibration.skeleton` (it reads
layer shapes through model discovery), and its two names still resolve here with a DeprecationWarning.
"""

import importlib
import warnings
from typing import Any

from .._compat import moved_message
from .mxlinear import MXLinear
from .packed_base import PackedLinearBase, packed_layers
from .qlinear import QuantLinear


_MOVED = {"packed_layer": "optimum_bc.calibration.skeleton", "skeleton_layer": "optimum_bc.calibration.skeleton"}

__all__ = ["MXLinear", "PackedLinearBase", "QuantLinear", "packed_layers"]


def __getattr__(name: str) -> Any:
    """Old names of the ``optimum_bc.layers`` module, looked up on first use (importing them here would import
    upward, from ``calibration``)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(moved_message(f"{__name__}.{name}", f"{_MOVED[name]}.{name}"), DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
