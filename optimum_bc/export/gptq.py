"""Our ``QuantLinear`` tensors in the GPTQ checkpoint layout (``quant_method="gptq"``), with its ``config.json`` entry.

Layout, per quantized Linear (``in`` input and ``out`` output features, ``G`` groups, ``bits`` in 2/3/4/8):

* ``qweight`` int32 ``[in * bits / 32, out]``: the codes of each output column packed along the INPUT dimension,
  least significant bits first. 2/4/8 bits hold ``32 / bits`` codes per word; 3 bits pack 32 input rows into 3 words
  (10 codes, then one code split 2+1 bits across the word boundary, 10 codes, one code split 1+2, 10 codes): in
  every case one little-endian bit stream per column, the same stream :mod:`optimum_bc.formats.packing` writes along a row.
* ``qzeros`` int32 ``[G, out * bits / 32]``: the zero points packed the same way along the OUTPUT dimension.
* ``scales`` float16 ``[G, out]``, ``g_idx`` int32 ``[in]`` (act-order: not monotonic), ``bias`` float16 ``[out]``.
* Dequantized: ``W[i, o] = scales[g, o] * (q[i, o] - z[g, o])`` with ``g = g_idx[i]`` (``W`` is ``weight.T``).

Stored zero points. ``checkpoint_format="gptq"`` (v1, AutoGPTQ's original layout) stores ``zero - 1`` and every v1
reader adds 1 back; a zero point of 0 has no v1 encoding (it underflows: -1 sets every bit of the packed word, and
GPTQModel's whole-word ``+0x11111111`` conversion carries into the neighbour). ``"gptq_v2"`` stores the zero as is.
GPTQModel itself saves ``sym=True`` models as v1 and ``sym=False`` ones as v2, and so do we
(:func:`gptq_quantization_config`): our symmetric grid (:mod:`optimum_bc.formats.primitives`: ``zero = 2**(bits-1)``,
``scale = 2 * max|w| / maxq``) is GPTQ's symmetric grid, so v1 holds it exactly; an asymmetric grid has zero points
of 0 whenever a group's minimum rounds to 0, so it goes to v2.

Readers, and their limits as read in their code (GPTQModel 7.7.0's torch kernel is run by the tests when installed;
the GPU readers were not run):

* GPTQModel (what ``transformers`` 5.x loads GPTQ checkpoints with, via ``optimum``): v1 and v2 (converts v1 to v2
  on load for the kernels that need it). Its torch kernel, the fallback on every device, takes 2/3/4/8 bits, sym and
  asym, desc_act, group sizes -1/16/32/64/128/256/512/1024 (:data:`GPTQ_GROUP_SIZES`; before 7.x only up to 128).
  Its buffers are ``in // 32 * bits`` rows and ``out // 32 * bits`` zero columns: in/out features multiples of 32.
* AutoGPTQ (unmaintained): v1; ``gptq_v2`` came with its PR #640 ("Fix Sym=False").
* ExLlama v1/v2 kernels (GPTQModel's, TGI's): 4-bit only, group sizes -1/32/64/128, sym and asym, in/out % 32.
* Marlin (vLLM ``gptq_marlin``, GPTQModel, TGI): 4/8-bit ``sym=True`` only (it ignores ``qzeros`` and assumes
  ``zero = 2**(bits-1)``), group sizes -1/32/64/128, act-order supported, v1 and v2 (the same for its grid); vLLM
  also wants ``out % 64 == 0`` and ``in % 128 == 0`` per shard. GPTQModel's Machete: 4/8 bits, -1/64/128, v1-labelled only.
* vLLM ``gptq`` (exllama-derived ``gptq_gemm``): 2/3/4/8 bits, sym and asym, ``in % group_size == 0``; reads
  ``gptq_v2`` zero points only since vllm-project/vllm PR #26092 (older vLLM misreads v2 checkpoints).
* TGI: ``gptq`` through its exllama (4-bit), Marlin or Triton kernels; v1 (no ``gptq_v2`` handling found).

So the most portable export is ``sym=True``, 4 bits, group size 128 (or -1), in/out multiples of 128/64: v1, read
by all of the above. What the layout cannot hold is refused by :func:`check_gptq_exportable` (config) and
:func:`gptq_layer_tensors` (layer): MX formats, other bit widths and group sizes, the per-position bias (and the sink
bias, unless dropped).
A loader that rebuilds the model from its float config gives Linears a ``bias`` only where the float model has one
(LLaMA has none): the exporter must make the architecture config ask for biases, or the BC bias is dropped.
"""

import torch
from transformers import GPTQConfig

from ..config import BCQuantizationConfig
from ..formats.formats import INT_FORMAT, MX_BLOCK_SIZE, MX_ELEMENTS, is_mx
from ..formats.packing import pack_int32
from ..layers.qlinear import QuantLinear


GPTQ_V1 = "gptq"
GPTQ_V2 = "gptq_v2"
GPTQ_FORMATS = (GPTQ_V1, GPTQ_V2)
GPTQ_BITS = (2, 3, 4, 8)
# Group sizes of GPTQModel's torch kernel, the reader that runs everywhere (Marlin and ExLlama: -1/32/64/128).
GPTQ_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
# qweight / qzeros pack whole 32-value runs (3 words per 32 values at 3 bits).
_FEATURE_MULTIPLE = 32


def _refuse(setting: str, value: object, why: str, fix: str) -> None:
    raise ValueError(f"GPTQ export: {setting}={value!r} cannot be stored in the GPTQ layout ({why}). Fix: {fix}")


def _closest(value: int, allowed: tuple[int, ...]) -> int:
    """The allowed value nearest to ``value`` (ties go to the larger, the more precise)."""
    return min(allowed, key=lambda a: (abs(a - value), -a))


def check_gptq_exportable(config: BCQuantizationConfig) -> None:
    """Raise ValueError, naming the setting and the closest exportable one, if ``config`` has no GPTQ equivalent."""
    if is_mx(config.format):
        element_bits = MX_ELEMENTS[config.format].bits
        bits = element_bits if element_bits in GPTQ_BITS else 8
        _refuse(
            "format",
            config.format,
            "GPTQ stores integer codes with float16 scales and integer zero points, not MX elements with shared "
            "power-of-two scales",
            f"re-quantize with format={INT_FORMAT!r}, bits={bits}, group_size={MX_BLOCK_SIZE}, sym=True",
        )
    if config.bits not in GPTQ_BITS:
        _refuse(
            "bits", config.bits, f"GPTQ readers take {list(GPTQ_BITS)}", f"bits={_closest(config.bits, GPTQ_BITS)}"
        )
    if config.group_size not in GPTQ_GROUP_SIZES:
        _refuse(
            "group_size",
            config.group_size,
            f"GPTQModel's torch kernel takes {list(GPTQ_GROUP_SIZES)}; Marlin and ExLlama -1/32/64/128",
            f"group_size={_closest(config.group_size, GPTQ_GROUP_SIZES[1:])}",
        )
    if config.bias_compensation and config.bc_granularity != "channel":
        _refuse(
            "bc_granularity",
            config.bc_granularity,
            "a GPTQ Linear has one bias per output channel, no per-position table",
            'bc_granularity="channel"',
        )


def _checkpoint_format(config: BCQuantizationConfig) -> str:
    """v1 for the symmetric grid (every reader), v2 for the asymmetric one (zero points of 0 have no v1 encoding)."""
    return GPTQ_V1 if config.sym else GPTQ_V2


def gptq_quantization_config(config: BCQuantizationConfig) -> dict:
    """The ``quantization_config`` entry of ``config.json`` for a GPTQ export of a model quantized with ``config``.

    Built with ``transformers.GPTQConfig`` and written as its ``to_dict()`` (both ``format`` and the legacy
    ``checkpoint_format`` keys, as transformers writes them). ``act_group_aware`` is False because we never reorder
    groups that way; ``meta.quantizer`` names the producer, as GPTQModel does.
    """
    from ..version import __version__

    check_gptq_exportable(config)
    gptq = GPTQConfig(
        bits=config.bits,
        group_size=config.group_size,
        damp_percent=float(config.damp_percent),
        desc_act=config.desc_act,
        act_group_aware=False,
        sym=config.sym,
        true_sequential=config.true_sequential,
        format=_checkpoint_format(config),
        meta={"quantizer": [f"optimum-bc:{__version__}"], "method": config.method},
    )
    out = gptq.to_dict()
    out["quant_method"] = str(gptq.quant_method.value)
    # GPTQConfig's own fields, set on the dict: passing them to GPTQConfig(...) requires the optimum package.
    out["block_name_to_quantize"] = config.blocks_path
    out["modules_in_block_to_quantize"] = config.modules_in_block_to_quantize
    return out


def _inferred_format(zeros: torch.Tensor, bits: int) -> str:
    """v1 when every zero point is the symmetric midpoint (what ``sym=True`` produces), else v2."""
    return GPTQ_V1 if bool((zeros == 1 << (bits - 1)).all()) else GPTQ_V2


def gptq_layer_tensors(
    layer: QuantLinear, checkpoint_format: str | None = None, drop_sink_bias: bool = False
) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` and ``bias`` of ``layer`` in the GPTQ layout (module docstring).

    A layer with a ``sink_bias`` is refused unless ``drop_sink_bias`` (the export decides that policy).

    ``checkpoint_format`` decides the stored zero points: ``"gptq"`` (v1, ``zero - 1``; refused when a zero point
    is 0) or ``"gptq_v2"`` (as is). For a whole checkpoint pass
    ``gptq_quantization_config(config)["checkpoint_format"]`` so that every layer follows the config. ``None``
    decides from this layer alone: v1 when all its zero points are the symmetric midpoint ``2**(bits-1)``, else v2
    (the same choice as the config's for symmetric models; an asymmetric layer whose zero points all happen to sit
    at the midpoint would come out v1, hence the argument).
    """
    if not isinstance(layer, QuantLinear):
        raise ValueError(
            f"GPTQ export takes QuantLinear layers, got {type(layer).__name__}. Fix: quantize with format='int' "
            "(MX layers have no GPTQ equivalent)"
        )
    if checkpoint_format is not None and checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(
            f"GPTQ export: checkpoint_format={checkpoint_format!r} is unknown. Fix: one of {list(GPTQ_FORMATS)} "
            "(or None to decide from the layer)"
        )
    bits = layer.bits
    if bits not in GPTQ_BITS:
        _refuse(
            "bits", bits, f"GPTQ readers take {list(GPTQ_BITS)}", f"re-quantize with bits={_closest(bits, GPTQ_BITS)}"
        )
    for name in ("position_bias",) if drop_sink_bias else ("position_bias", "sink_bias"):
        if getattr(layer, name) is not None:
            _refuse(
                name,
                tuple(getattr(layer, name).shape),
                "a GPTQ Linear has only a per-channel bias",
                "re-quantize with bc_granularity='channel' and bc_sink_tokens=0",
            )
    for name, size in (("in_features", layer.in_features), ("out_features", layer.out_features)):
        if size % _FEATURE_MULTIPLE:
            _refuse(
                name,
                size,
                f"qweight/qzeros pack runs of {_FEATURE_MULTIPLE} values and readers size them as {name} // 32 * bits",
                "keep this layer in float (modules_to_not_convert) or export another format",
            )

    codes, zeros = layer.unpack()
    zeros = zeros.to(torch.int64)
    fmt = _inferred_format(zeros, bits) if checkpoint_format is None else checkpoint_format
    if fmt == GPTQ_V1:
        underflow = int((zeros == 0).sum())
        if underflow:
            raise ValueError(
                f"GPTQ export: {underflow} zero point(s) of {layer!r} are 0, which checkpoint_format='gptq' (v1, "
                "stores zero - 1) cannot hold. Fix: checkpoint_format='gptq_v2' (what gptq_quantization_config "
                "picks for sym=False), or re-quantize with sym=True"
            )
        zeros = zeros - 1
    bias = layer.bias.detach().to(torch.float16)
    if not torch.isfinite(bias).all():
        _refuse(
            "bias",
            f"max |bias| {float(layer.bias.abs().max()):.4g}",
            "GPTQ stores the bias in float16 (largest 65504)",
            "keep this layer in float (modules_to_not_convert)",
        )
    return {
        "qweight": pack_int32(codes, bits).t().contiguous(),
        "qzeros": pack_int32(zeros.t(), bits),
        "scales": layer.scales.detach().t().contiguous(),
        "g_idx": layer.g_idx.detach().to(torch.int32).clone(),
        "bias": bias,
    }
