"""Which packed layer a config produces: ``QuantLinear`` for the integer grid, ``MXLinear`` for MX formats.

Used both after quantization (from a :class:`QuantizedWeight`) and before a pre-quantized reload (a meta-device
skeleton with the same buffers, so the checkpoint loads by name).
"""

import torch
from torch import nn

from ..algorithms import QuantizedWeight
from ..config import BCQuantizationConfig
from ..formats.activations import spec_from_config
from ..formats.formats import is_mx
from ..layers.mxlinear import MXLinear
from ..layers.qlinear import QuantLinear
from .discovery import layer_features


def packed_layer(
    qw: QuantizedWeight, config: BCQuantizationConfig, bias: torch.Tensor, dtype: torch.dtype
) -> QuantLinear | MXLinear:
    """The packed layer holding ``qw`` exactly, with ``bias``."""
    if is_mx(qw.format):
        return MXLinear.from_quantized(qw.codes, qw.scales, qw.format, bias=bias, dtype=dtype)
    return QuantLinear.from_quantized(
        qw.codes,
        qw.scales,
        qw.zeros,
        qw.g_idx,
        bits=config.bits,
        group_size=config.group_size,
        bias=bias,
        dtype=dtype,
    )


def skeleton_layer(
    linear: nn.Linear, config: BCQuantizationConfig, dtype: torch.dtype, positions: int | None
) -> QuantLinear | MXLinear:
    """An empty packed layer on the meta device, shaped for ``linear`` (an ``nn.Linear`` or ``Conv1D``) and
    ``config``."""
    layer = _empty_layer(linear, config, dtype, positions)
    layer.set_input_quantizer(spec_from_config(config))
    return layer


def _empty_layer(
    linear: nn.Linear, config: BCQuantizationConfig, dtype: torch.dtype, positions: int | None
) -> QuantLinear | MXLinear:
    in_features, out_features = layer_features(linear)
    if is_mx(config.format):
        return MXLinear(
            in_features,
            out_features,
            config.format,
            dtype=dtype,
            device="meta",
            positions=positions,
            sink_tokens=config.layer_sink_tokens,
        )
    return QuantLinear(
        in_features,
        out_features,
        config.bits,
        config.group_size,
        dtype=dtype,
        device="meta",
        positions=positions,
        sink_tokens=config.layer_sink_tokens,
    )
