"""Weight quantization algorithms (``method=`` in the config) and the closed-form BC bias (``compensation``)."""

from . import comq, erq, gptq, rtn  # register the built-in algorithms
from .base import QuantizedWeight, WeightQuantizer
from .registry import available_algorithms, get_algorithm, register_algorithm


__all__ = [
    "QuantizedWeight",
    "WeightQuantizer",
    "available_algorithms",
    "get_algorithm",
    "register_algorithm",
]
