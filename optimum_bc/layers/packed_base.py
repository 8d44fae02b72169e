"""Base classes of the packed layers (``QuantLinear``, ``MXLinear``): position-dependent biases, dense-weight cache.

Packed layers subclass ``nn.Linear`` so that code dispatching on ``isinstance(m, nn.Linear)`` treats them as the
Linears they replace: PEFT's ``target_modules="all-linear"`` selects them and its default dispatcher wraps them in
``peft.tuners.lora.Linear``. They own no dense ``weight`` parameter: ``weight`` is ``None`` (as ``bias`` is on a
bias-less ``nn.Linear``), ``dequantize_weight()`` gives the dense weight. Code that reads ``layer.weight`` to change
it (e.g. merging a LoRA adapter) therefore cannot silently act on a copy; dequantize the model first
(``model.dequantize()``), after which the layers are plain dense Linears.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..formats.activations import ActSpec, quantize_input
from .positions import position_term, sink_term


_cache_dense = True


@contextmanager
def transient_dense_weights() -> Iterator[None]:
    """Inside, a packed layer on the reference path builds its dense weight for each forward and frees it after,
    instead of caching it: an offloaded calibration then holds only the packed weights of a block's quantized layers,
    not their dense copies (the price: one dequantization per forward)."""
    global _cache_dense
    saved, _cache_dense = _cache_dense, False
    try:
        yield
    finally:
        _cache_dense = saved


class PositionBiases:
    """Mixin for Linears carrying the optional position-dependent BC buffers next to ``bias``.

    ``position_bias`` ``[positions, out]``: the reference code's per-position table (``bc_granularity="position"``).
    ``sink_bias`` ``[sink_tokens, out]``: the extra bias of the first positions (``bc_sink_tokens``).
    Both read the token positions that the decoder blocks publish (:mod:`optimum_bc.layers.positions`).
    """

    position_bias: torch.Tensor | None
    sink_bias: torch.Tensor | None
    bias: torch.Tensor

    def _register_position_buffers(
        self, out_features: int, positions: int | None, sink_tokens: int, dtype: torch.dtype, device: object
    ) -> None:
        table = None if positions is None else torch.zeros(positions, out_features, dtype=dtype, device=device)
        self.register_buffer("position_bias", table)
        sink = torch.zeros(sink_tokens, out_features, dtype=dtype, device=device) if sink_tokens else None
        self.register_buffer("sink_bias", sink)

    def _add_position_terms(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.position_bias is not None:
            out = out + position_term(x, self.position_bias, repr(self))
        if self.sink_bias is not None:
            out = out + sink_term(x, self.sink_bias, repr(self))
        return out

    def _checked(self, table: torch.Tensor, name: str) -> torch.Tensor:
        if table.dim() != 2 or table.shape[1] != self.bias.shape[0]:
            raise ValueError(f"{name} must be [positions, {self.bias.shape[0]}], got {tuple(table.shape)}")
        return table.to(self.bias.dtype).to(self.bias.device)

    def set_position_bias(self, position_bias: torch.Tensor) -> None:
        """Attach a ``[positions, out]`` bias added by token position (the reference code's BC granularity)."""
        self.position_bias = self._checked(position_bias, "position_bias")

    def set_sink_bias(self, sink_bias: torch.Tensor) -> None:
        """Attach the ``[sink_tokens, out]`` extra bias of the first token positions (see ``bc_sink_tokens``)."""
        self.sink_bias = self._checked(sink_bias, "sink_bias")


class PackedLinearBase(PositionBiases, nn.Linear):
    """What every packed layer shares: ``nn.Linear`` identity without a dense weight, the dense-weight cache and the
    optional position-dependent BC buffers.

    Subclasses define ``in_features``, ``out_features``, ``dequantize_weight(dtype)`` and a ``bias``.
    """

    def __init__(self) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__, which would allocate a dense float weight
        self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        """Refused: the weights are quantized codes, set by ``from_quantized`` or loaded from a checkpoint."""
        raise ValueError(
            f"{type(self).__name__} holds quantized weights; they cannot be re-initialized. Fix: build it with "
            "from_quantized(...) or load a checkpoint"
        )

    def reset_cache(self) -> None:
        """Drop the cached dense weight."""
        self._cached_weight = None

    def set_input_quantizer(
        self, spec: ActSpec | None, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
    ) -> None:
        """Fake-quantize every input with ``spec`` (see :mod:`optimum_bc.activations`); None turns it off.

        A static spec stores its ``[1]`` float32 ``input_scale`` / ``input_zero`` as buffers (saved and reloaded
        with the weights); without values they are zeros, to be filled by a checkpoint.
        """
        self.act_spec = spec
        static = spec is not None and not spec.dynamic
        device = self.bias.device
        for name, value in (("input_scale", scale), ("input_zero", zero)):
            if not static:
                self._buffers.pop(name, None)
                continue
            value = torch.zeros(1) if value is None else value.detach().reshape(1).clone()
            self.register_buffer(name, value.to(device=device, dtype=torch.float32))

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer sees it: fake-quantized when an activation spec is set."""
        spec = getattr(self, "act_spec", None)
        if spec is None:
            return x
        if spec.dynamic:
            return quantize_input(x, spec)
        return quantize_input(x, spec, self.input_scale, self.input_zero)

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """Cached dense weight in ``x``'s dtype and device, rebuilt only when those change or the cache was dropped
        (inside :func:`transient_dense_weights` a missing or stale cache is built for this call and not kept)."""
        cached = getattr(self, "_cached_weight", None)
        if (
            cached is not None
            and cached.dtype == x.dtype
            and cached.device == x.device
            # Inference-mode tensors cannot be saved for backward outside inference mode.
            and (not cached.is_inference() or torch.is_inference_mode_enabled())
        ):
            return cached
        # Drop the stale cache first so it is not alive next to the new one (its bytes would add to the peak).
        self._cached_weight = None
        dense = self.dequantize_weight(x.dtype).to(x.device)
        if _cache_dense:
            self._cached_weight = dense
        return dense


def packed_layers(model: nn.Module) -> dict[str, "PackedLinearBase"]:
    """The packed layers of ``model`` by full module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinearBase)}
