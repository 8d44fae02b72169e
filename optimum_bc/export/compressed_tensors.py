"""compressed-tensors layout of BC layers: the formats that stock transformers and vLLM load.

Integer grids use ``pack-quantized``: per quantized Linear ``weight_packed`` (int32, codes offset to signed and packed
along the input dimension), ``weight_scale`` ``[out, G]``, ``weight_shape`` and, for asymmetric grids,
``weight_zero_point`` (signed, packed along the output dimension), plus the Linear's ``bias``. MX formats use
compressed-tensors' MX formats (``mxfp4-pack-quantized``, ``mxfp6-pack-quantized`` = E2M3, ``mxfp8-quantized`` =
E4M3; E8M0 uint8 scales per 32 columns), written by its own compressors from our exact dequantized weight and
power-of-two scales (checked to decompress back bit for bit). The packing, compressors and config classes are all
compressed-tensors' own (``pack_to_int32``, ``BaseCompressor`` registry, ``QuantizationArgs``, preset schemes,
``QuantizationScheme``, ``QuantizationConfig``).

What the format cannot hold, and is therefore refused before anything is written:

* act-order groups (a permuted ``g_idx``): compressed-tensors 0.20 removed ``actorder="group"`` and has no
  ``g_idx`` tensor, so only per-channel act-order (every column in group 0) is exportable;
* a group size that does not divide a layer's input width (compressed-tensors dequantizes whole groups only);
* MX formats compressed-tensors has no format for (mxfp6_e3m2, mxfp8_e5m2, mxint8, mxint4).

Asymmetric grids: compressed-tensors 0.20 packs the zero point along the output dimension
(``[ceil(out * bits / 32), G]`` int32), but when transformers builds the compressed skeleton on the meta device
(``compress_model`` at load) the meta branch of ``PackedQuantizationCompressor.compress`` leaves ``weight_zero_point``
unpacked (``[out, G]``), so the default load fails with a size mismatch. That is why an asymmetric export sets
``dequantize: true`` in its quantization_config: transformers' ``CompressedTensorsConfig`` reads it and decompresses
each layer from the checkpoint tensors while loading (``CompressedTensorsDequantize``), which unpacks the zero point
correctly. vLLM reads the packed zero point natively and ignores the flag. MX exports set it too: without it the
default path decompresses MX weights in bfloat16 (``decompress_mx_scale``) and a float32 model fails on the dtype
mismatch; with it the weight is cast to the model dtype (MX values times powers of two are exact in bfloat16).

vLLM's compressed-tensors WNA16 kernels take 4- and 8-bit integer weights; 2/3-bit exports load in transformers
only.

Scales are written in float32 for a float32 model (so the loaders' dequantization is exact) and float16 otherwise
(the exact stored values; the loader casts them).
"""

import importlib.util
import math
from typing import Any

import torch

from ..config import BCQuantizationConfig
from ..formats.formats import e8m0_to_scale, is_mx
from ..layers.mxlinear import MXLinear
from ..layers.qlinear import QuantLinear


FORMAT_NAME = "compressed-tensors"
CT_FORMAT = "pack-quantized"
#: our MX format -> (compressed-tensors format, its preset scheme for weight-only MX).
MX_CT_FORMATS = {
    "mxfp4": ("mxfp4-pack-quantized", "MXFP4A16"),
    "mxfp6_e2m3": ("mxfp6-pack-quantized", "MXFP6A16"),
    "mxfp8_e4m3": ("mxfp8-quantized", "MXFP8A16"),
}
#: our MX formats compressed-tensors has no format for -> the closest one it has (same width where possible).
_MX_CLOSEST = {"mxfp6_e3m2": "mxfp6_e2m3", "mxfp8_e5m2": "mxfp8_e4m3", "mxint8": "mxfp8_e4m3", "mxint4": "mxfp4"}
_MIN_CT_BITS = 1
_MAX_CT_BITS = 8


def check_ct_exportable(config: BCQuantizationConfig) -> None:
    """Raise ValueError naming the setting compressed-tensors cannot express and the closest one it can (or that
    the package is missing)."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise ValueError(
            "save_format='compressed-tensors' needs the compressed-tensors package. Fix: pip install "
            '"optimum-bc[export]" (or pip install compressed-tensors).'
        )
    if is_mx(config.format):
        if config.format not in MX_CT_FORMATS:
            raise ValueError(
                f"format={config.format!r} cannot be exported as compressed-tensors (its MX formats are "
                f"{sorted(MX_CT_FORMATS)}). Fix: quantize with format={_MX_CLOSEST[config.format]!r}, or keep "
                "save_format='native'."
            )
        return
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
    if is_mx(config.format):
        if not isinstance(layer, MXLinear) or layer.format != config.format:
            raise ValueError(
                f"{name} is a {type(layer).__name__} ({getattr(layer, 'format', 'int')}) in a model whose config "
                f"says format={config.format!r}. Fix: re-quantize the model with one format."
            )
        return
    if not isinstance(layer, QuantLinear):
        raise ValueError(
            f"{name} is a {type(layer).__name__} in a model whose config says format='int'. Fix: re-quantize the "
            "model with one format."
        )
    if (layer.bits, layer.group_size) != (config.bits, config.group_size):
        raise ValueError(
            f"{name} has bits={layer.bits}, group_size={layer.group_size} but the config says bits={config.bits}, "
            f"group_size={config.group_size}; one compressed-tensors scheme covers every layer. Fix: re-quantize "
            "the model with one setting."
        )
    if layer.group_size != -1 and layer.in_features % layer.group_size:
        raise ValueError(group_size_problem(name, layer.in_features, layer.group_size))
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


def group_size_problem(name: str, in_features: int, group_size: int) -> str:
    """The message for a group size that does not divide a layer's input width, with the closest one that does."""
    fit = math.gcd(in_features, group_size)
    fit &= -fit  # largest power of two dividing both
    return (
        f"{name}: group_size={group_size} does not divide its in_features={in_features}, and compressed-tensors "
        f"dequantizes whole groups only. Fix: quantize with group_size={fit if fit >= 8 else -1} (divides it), or "
        "keep save_format='native'."
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


def ct_scheme(config: BCQuantizationConfig) -> Any:
    """The compressed-tensors ``QuantizationScheme`` (weight-only, every Linear not ignored)."""
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    if is_mx(config.format):
        return preset_name_to_scheme(MX_CT_FORMATS[config.format][1], ["Linear"])
    return QuantizationScheme(targets=["Linear"], weights=_weight_args(config))


def ct_format(config: BCQuantizationConfig) -> str:
    """compressed-tensors' name of the storage format."""
    return MX_CT_FORMATS[config.format][0] if is_mx(config.format) else CT_FORMAT


def ct_quantization_config(config: BCQuantizationConfig, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` dict of config.json (``quant_method: compressed-tensors``, compressed status).

    ``ignore``: full names of the Linears kept dense (modules_to_not_convert).
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    qconfig = QuantizationConfig(
        config_groups={"group_0": ct_scheme(config)},
        format=ct_format(config),
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=sorted(ignore),
    )
    out = {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        **qconfig.model_dump(exclude={"quant_method"}, mode="json"),
    }
    if is_mx(config.format) or not config.sym:
        out["dequantize"] = True  # see the module docstring: these load exactly only this way in transformers
    return out


def ct_layer_tensors(layer: Any, config: BCQuantizationConfig) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one layer (names relative to the layer), bias included."""
    if isinstance(layer, MXLinear):
        return _mx_tensors(layer, config)
    return _int_tensors(layer, config.sym)


def _mx_tensors(layer: MXLinear, config: BCQuantizationConfig) -> dict[str, torch.Tensor]:
    """compressed-tensors' MX compressor applied to our exact weight and scales, checked by decompressing it."""
    from compressed_tensors.compressors import BaseCompressor

    ct_name, _ = MX_CT_FORMATS[config.format]
    compressor = BaseCompressor.get_value_from_registry(ct_name)
    scheme = ct_scheme(config)
    weight = layer.dequantize_weight(torch.float32).cpu()
    out = compressor.compress({"weight": weight, "weight_scale": e8m0_to_scale(layer.scales).cpu()}, scheme)
    back = compressor.decompress(dict(out), scheme)["weight"].float()
    if not torch.equal(back, weight):
        raise RuntimeError(
            f"{layer!r}: compressed-tensors' {ct_name} compressor does not reproduce the weight (max error "
            f"{float((back - weight).abs().max()):.3g}); keep save_format='native'"
        )
    return {**out, "bias": layer.bias.detach().clone()}


def _int_tensors(layer: QuantLinear, symmetric: bool) -> dict[str, torch.Tensor]:
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
