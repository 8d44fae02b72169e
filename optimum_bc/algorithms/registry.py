"""The registry of weight quantization algorithms: each algorithm module registers its class here on import."""

from collections.abc import Callable

from .base import WeightQuantizer


_REGISTRY: dict[str, type[WeightQuantizer]] = {}


def register_algorithm(name: str) -> Callable[[type[WeightQuantizer]], type[WeightQuantizer]]:
    """Class decorator adding a :class:`WeightQuantizer` under ``name``."""

    def wrap(cls: type[WeightQuantizer]) -> type[WeightQuantizer]:
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_algorithm(name: str) -> type[WeightQuantizer]:
    """The quantizer class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantization method {name!r}; available: {available_algorithms()}")
    return _REGISTRY[name]


def available_algorithms() -> list[str]:
    """Names accepted by ``BCQuantizationConfig(method=...)``."""
    return sorted(_REGISTRY)
