"""compressed-tensors layout of BC layers: the ``pack-quantized`` format that stock transformers and vLLM load.

Per quantized Linear the checkpoint holds ``weight_packed`` (int32, codes offset to signed and packed along the input
dimension), ``weight_scale`` ``[out, G]``, ``weight_shape`` and, for asymmetric grids, ``weight_zero_point`` (signed,
packed along the output dimension), plus the Linear's ``bias``. The packing and the config classes are
compressed-tensors' own (``pack_to_int32``, ``QuantizationArgs``, ``QuantizationScheme``, ``QuantizationConfig``).

What the format cannot hold, and is therefore refused before anything is written:

* act-order groups (a permuted ``g_idx``): compressed-tensors 0.20 removed ``actorder="group"`` and has no
  ``g_idx`` tensor, so only per-channel act-order (every column in group 0) is exportable;
* a group size that does not divide a layer's input width (compressed-tensors dequantizes whole groups only);
* MX formats: compressed-tensors' MX compressors (mxfp4/6/8) are not wired here yet.

Asymmetric grids: compressed-tensors 0.20 packs the zero point along the output dimension
(``[ceil(out * bits / 32), G]`` int32), but when transformers builds the compressed skeleton on the meta device
(``compress_model`` at load) the meta branch of ``PackedQuantizationCompressor.compress`` leaves ``weight_zero_point``
unpacked (``[out, G]``), so the default load fails with a size mismatch. That is why an asymmetric export sets
``dequantize: true`` in its quantization_config: transformers' ``CompressedTensorsConfig`` reads it and decompresses
each layer from the checkpoint tensors while loading (``CompressedTensorsDequantize``), which unpacks the zero point
correctly. vLLM reads the packed zero point natively and ignores the flag.

Scales are written in float32 for a float32 model (so the loaders' dequantization is exact) and float16 otherwise
(the exact stored values; the loader casts them).
"""

import math
from typing import Any

import torch

from ..config import BCQuantizationConfig
from ..formats import is_mx
from ..qlinear import QuantLinear


FORMAT_NAME = "compressed-tensors"
CT_FORMAT = "pack-quantized"
_MIN_CT_BITS = 1
_MAX_CT_BITS = 8


def check_ct_exportable(config: BCQuantizationConfig) -> None:
    """Raise ValueError naming the setting compressed-tensors cannot express and the closest one it can."""
    if is_mx(config.format):
        raise ValueError(
            f"format={config.format!r} cannot be exported as compressed-tensors by optimum-bc (only integer grids "
            "are wired to its pack-quantized layout). Fix: quantize with format='int' (e.g. bits=4, group_size=32), "
            "or keep save_format='native'."
        )
    if not _MIN_CT_BITS <= config.bits <= _MAX_CT_BITS:
        raise ValueError(
            f"bits={config.bits} cannot be exported as compressed-tensors (pack-quantized holds 1..8 bits). "
            "Fix: bits=4 or bits=8."
        )
    if config.desc_act and config.group_size != -1:
        raise ValueError(
            f"desc_act=True with group_size={config.group_size} cannot be exported as compressed-tensors: its "
            "groups follow a permuted g_idx, and compressed-tensors 0.20 holds neither a g_idx tensor nor "
            "actorder='group'. Fix: desc_act=False (same group size), or desc_act=True with group_size=-1 "
            "(per channel), or save_format='gptq'."
        )


def check_ct_layer(name: str, layer: Any, config: BCQuantizationConfig) -> None:
    """Raise ValueError when one packed layer cannot be written in the pack-quantized layout."""
    if not isinstance(layer, QuantLinear):
        raise ValueError(
            f"{name} is a {type(layer).__name__}; compressed-tensors export holds integer QuantLinear layers only. "
            "Fix: quantize with format='int', or keep save_format='native'."
        )
    if layer.group_size != -1 and layer.in_features % layer.group_size:
        fit = math.gcd(layer.in_features, layer.group_size)
        fit &= -fit  # largest power of two dividing both
        raise ValueError(
            f"{name}: group_size={layer.group_size} does not divide its in_features={layer.in_features}, and "
            "compressed-tensors dequantizes whole groups only. Fix: quantize with "
            f"group_size={fit if fit >= 8 else -1} (divides it), or keep save_format='native'."
        )
    if layer.group_size != -1 and not torch.equal(layer.g_idx.cpu(), _contiguous_g_idx(layer)):
        raise ValueError(
            f"{name} has permuted act-order groups (g_idx), which compressed-tensors 0.20 cannot hold. "
            "Fix: quantize with desc_act=False, or group_size=-1 with desc_act=True, or save_format='gptq'."
        )
    if config.sym and not _zeros_at_middle(layer):
        raise ValueError(
            f"{name} has zero points off the middle of the grid although the config says sym=True, so the symmetric "
            "scheme (which stores no zero point) would change its weights. Fix: re-quantize with sym=False."
        )


def _contiguous_g_idx(layer: QuantLinear) -> torch.Tensor:
    return torch.div(torch.arange(layer.in_features, dtype=torch.int32), layer.group_size, rounding_mode="floor")


def _weight_args(config: BCQuantizationConfig) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    per_channel = config.group_size == -1
    return QuantizationArgs(
        num_bits=config.bits,
        type="int",
        symmetric=config.sym,
        strategy="channel" if per_channel else "group",
        group_size=None if per_channel else config.group_size,
    )


def ct_quantization_config(config: BCQuantizationConfig, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` dict of config.json (``quant_method: compressed-tensors``, compressed status).

    ``ignore``: full names of the Linears kept dense (modules_to_not_convert).
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    scheme = QuantizationScheme(targets=["Linear"], weights=_weight_args(config))
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=CT_FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=sorted(ignore),
    )
    out = {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        **qconfig.model_dump(exclude={"quant_method"}, mode="json"),
    }
    if not config.sym:
        out["dequantize"] = True  # see the module docstring: the packed zero point loads only this way
    return out


def ct_layer_tensors(layer: QuantLinear, symmetric: bool) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one layer (names relative to the layer), bias included.

    ``symmetric`` (the config's ``sym``) drops the zero points, which then all sit at ``2^(bits-1)`` (signed 0).
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits = layer.bits
    offset = 1 << (bits - 1)
    codes, zeros = layer.unpack()
    out = {
        "weight_packed": pack_to_int32((codes.to(torch.int32) - offset).to(torch.int8), bits),
        "weight_scale": layer.scales.detach().to(
            torch.float32 if layer.bias.dtype == torch.float32 else torch.float16
        ),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features]),
        "bias": layer.bias.detach().clone(),
    }
    if not symmetric:
        out["weight_zero_point"] = pack_to_int32((zeros.to(torch.int32) - offset).to(torch.int8), bits, packed_dim=0)
    return out


def _zeros_at_middle(layer: QuantLinear) -> bool:
    """Whether every zero point sits at the middle of the grid (the symmetric scheme, which stores none)."""
    _, zeros = layer.unpack()
    return bool((zeros == (1 << (layer.bits - 1))).all())
