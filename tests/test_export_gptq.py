"""GPTQ checkpoint layout export: exported tensors decode to our dequantized weight, and unexportable settings are refused.

The decoder below is written from GPTQ's published packing (AutoGPTQ / GPTQModel ``pack``): ``qweight`` packs input
rows into int32 words least significant bits first, ``32 / bits`` codes per word for 2/4/8 bits, and at 3 bits
32 rows into 3 words (codes 0-9 at bits 0..29 of word 0, code 10 split over word 0 bits 30-31 and word 1 bit 0,
codes 11-20 at word 1 bits 1..30, code 21 split over word 1 bit 31 and word 2 bits 0-1, codes 22-31 at word 2 bits
2..31); ``qzeros`` packs output columns the same way; v1 (``"gptq"``) stores ``zero - 1``. It uses nothing from
``optimum_bc`` but the layer under test.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPTQConfig

from optimum_bc import BCQuantizationConfig, MXLinear, QuantLinear, quantize_model
from optimum_bc.export.gptq import check_gptq_exportable, gptq_layer_tensors, gptq_quantization_config

from .conftest import tiny_llama


def _word_bits(words: torch.Tensor, shift: int, width: int) -> torch.Tensor:
    """``width`` bits of each (unsigned) int32 word starting at bit ``shift``."""
    return ((words.to(torch.int64) & 0xFFFFFFFF) >> shift) & ((1 << width) - 1)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ unpacking along dim 0: ``[n * bits / 32, cols]`` words -> ``[n, cols]`` codes."""
    rows = []
    if bits in (2, 4, 8):
        for word in packed:
            rows += [_word_bits(word, bits * j, bits) for j in range(32 // bits)]
    else:
        assert bits == 3
        for w0, w1, w2 in packed.reshape(-1, 3, packed.shape[1]):
            rows += [_word_bits(w0, 3 * j, 3) for j in range(10)]
            rows.append(_word_bits(w0, 30, 2) | (_word_bits(w1, 0, 1) << 2))
            rows += [_word_bits(w1, 3 * j + 1, 3) for j in range(10)]
            rows.append(_word_bits(w1, 31, 1) | (_word_bits(w2, 0, 2) << 1))
            rows += [_word_bits(w2, 3 * j + 2, 3) for j in range(10)]
    return torch.stack(rows)


def _gptq_dense(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str) -> torch.Tensor:
    """Dense ``[out, in]`` weight of a GPTQ layer: ``W[i, o] = scales[g, o] * (q[i, o] - z[g, o])``, ``g = g_idx[i]``."""
    q = _unpack_rows(tensors["qweight"], bits)  # [in, out]
    z = _unpack_rows(tensors["qzeros"].t(), bits).t()  # [G, out]
    if checkpoint_format == "gptq":
        z = z + 1
    g = tensors["g_idx"].long()
    return (tensors["scales"].float()[g] * (q.float() - z.float()[g])).t()


def _layer(bits: int, group_size: int, sym: bool, act_order: bool, seed: int = 0) -> QuantLinear:
    """A 96 -> 64 layer whose codes and (asymmetric) zero points include 0 and 2**bits - 1."""
    out_features, in_features = 64, 96
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    groups = 1 if group_size == -1 else in_features // group_size
    codes = torch.randint(0, maxq + 1, (out_features, in_features), generator=g)
    codes[0, :2] = torch.tensor([0, maxq])
    if sym:
        zeros = torch.full((out_features, groups), 2 ** (bits - 1))
    else:
        zeros = torch.randint(0, maxq + 1, (out_features, groups), generator=g)
        zeros[:2, 0] = torch.tensor([0, maxq])
    scales = (torch.rand(out_features, groups, generator=g) + 0.01).half()
    g_idx = None
    if act_order:
        size = in_features if group_size == -1 else group_size
        perm = torch.randperm(in_features, generator=g)
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_features) // size).to(torch.int32)
    bias = torch.randn(out_features, generator=g)
    return QuantLinear.from_quantized(codes, scales, zeros, g_idx, bits, group_size, bias=bias)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exported_tensors_decode_to_the_dequantized_weight(bits, group_size, sym, act_order) -> None:
    layer = _layer(bits, group_size, sym, act_order)
    fmt = gptq_quantization_config(BCQuantizationConfig(bits=bits, group_size=group_size, sym=sym, bc_sink_tokens=0))[
        "checkpoint_format"
    ]
    assert fmt == ("gptq" if sym else "gptq_v2")
    tensors = gptq_layer_tensors(layer, checkpoint_format=fmt)
    groups = 1 if group_size == -1 else 3
    assert tensors["qweight"].shape == (96 * bits // 32, 64) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (groups, 64 * bits // 32) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].shape == (groups, 64) and tensors["scales"].dtype == torch.float16
    assert tensors["g_idx"].dtype == torch.int32 and tensors["bias"].dtype == torch.float16
    if act_order and group_size != -1:
        assert not bool((tensors["g_idx"][1:] >= tensors["g_idx"][:-1]).all())
    assert torch.equal(_gptq_dense(tensors, bits, fmt), layer.dequantize_weight(torch.float32))
    assert torch.equal(tensors["bias"], layer.bias.half())
    assert gptq_layer_tensors(layer).keys() == tensors.keys()  # the layer-inferred format gives the same tensors
    for name, value in gptq_layer_tensors(layer).items():
        assert torch.equal(value, tensors[name]), name


@pytest.mark.parametrize(("bits", "word"), [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_v1_zeros_are_gptq_constants(bits, word) -> None:
    """GPTQ's symmetric zero 2**(bits-1), stored minus one: the familiar 0x77777777 of 4-bit sym checkpoints."""
    tensors = gptq_layer_tensors(_layer(bits, 32, sym=True, act_order=False))
    expected = word - (1 << 32) if word >= 1 << 31 else word
    assert bool((tensors["qzeros"] == expected).all())


def test_v1_stores_asymmetric_zeros_minus_one_but_refuses_zero() -> None:
    layer = _layer(4, 32, sym=False, act_order=False)
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq_layer_tensors(layer, checkpoint_format="gptq")
    codes, zeros = layer.unpack()
    shifted = QuantLinear.from_quantized(codes, layer.scales, zeros.clamp(min=1), None, 4, 32, bias=layer.bias)
    v1 = gptq_layer_tensors(shifted, checkpoint_format="gptq")
    v2 = gptq_layer_tensors(shifted, checkpoint_format="gptq_v2")
    assert torch.equal(_gptq_dense(v1, 4, "gptq"), shifted.dequantize_weight(torch.float32))
    assert torch.equal(_unpack_rows(v1["qzeros"].t(), 4) + 1, _unpack_rows(v2["qzeros"].t(), 4))
    assert torch.equal(v1["qweight"], v2["qweight"])


def test_quantize_model_gptq_act_order_exports_exactly(calib_ids) -> None:
    torch.manual_seed(0)
    config = BCQuantizationConfig(
        bits=4,
        group_size=32,
        sym=False,
        method="gptq",
        desc_act=True,
        bc_sink_tokens=0,
        dataset=calib_ids,
        num_samples=8,
        seq_len=32,
    )
    model = tiny_llama()
    quantize_model(model, config)
    entry = gptq_quantization_config(config)
    assert entry["checkpoint_format"] == "gptq_v2" and entry["desc_act"] is True and entry["sym"] is False
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    shuffled = 0
    for layer in layers:
        tensors = gptq_layer_tensors(layer, checkpoint_format=entry["checkpoint_format"])
        assert torch.equal(_gptq_dense(tensors, 4, "gptq_v2"), layer.dequantize_weight(torch.float32))
        assert torch.equal(tensors["bias"], layer.bias.half())
        shuffled += not bool((layer.g_idx[1:] >= layer.g_idx[:-1]).all())
    assert shuffled == len(layers)


def test_quantization_config_is_what_gptqconfig_reads_back() -> None:
    entry = gptq_quantization_config(
        BCQuantizationConfig(bits=3, group_size=64, sym=True, desc_act=True, damp_percent=0.05, bc_sink_tokens=0)
    )
    reread = GPTQConfig.from_dict(json.loads(json.dumps(entry)))
    assert entry["quant_method"] == "gptq"
    assert (reread.bits, reread.group_size, reread.sym, reread.desc_act) == (3, 64, True, True)
    assert (reread.format, entry["checkpoint_format"], reread.damp_percent) == ("gptq", "gptq", 0.05)
    assert entry["meta"]["quantizer"][0].startswith("optimum-bc:")


@pytest.mark.parametrize(
    ("options", "named", "fix"),
    [
        ({"format": "mxfp4", "method": "rtn"}, "format='mxfp4'", "format='int', bits=4, group_size=32, sym=True"),
        ({"format": "mxfp6_e3m2", "method": "rtn"}, "format='mxfp6_e3m2'", "bits=8"),
        ({"group_size": 2048}, "group_size=2048", "group_size=1024"),
        ({"group_size": 48}, "group_size=48", "group_size=64"),
        ({"bc_granularity": "position"}, "bc_granularity='position'", 'bc_granularity="channel"'),
    ],
)
def test_unexportable_configs_are_refused_with_the_closest_setting(options, named, fix) -> None:
    config = BCQuantizationConfig(**({"bc_sink_tokens": 0} | options))
    for call in (check_gptq_exportable, gptq_quantization_config):
        with pytest.raises(ValueError) as info:
            call(config)
        assert named in str(info.value) and fix in str(info.value)


def test_sink_tokens_without_compensation_are_exportable() -> None:
    check_gptq_exportable(BCQuantizationConfig(bias_compensation=False, bc_sink_tokens=1))


def test_unexportable_layers_are_refused() -> None:
    g = torch.Generator().manual_seed(0)
    narrow = QuantLinear.from_quantized(
        torch.randint(0, 16, (64, 48), generator=g), torch.ones(64, 1), torch.full((64, 1), 8), None, 4, -1
    )
    with pytest.raises(ValueError, match="in_features=48"):
        gptq_layer_tensors(narrow)
    six_bit = QuantLinear.from_quantized(
        torch.randint(0, 64, (64, 64), generator=g), torch.ones(64, 2), torch.full((64, 2), 32), None, 6, 32
    )
    with pytest.raises(ValueError, match="bits=8"):
        gptq_layer_tensors(six_bit)
    sink = _layer(4, 32, sym=True, act_order=False)
    sink.set_sink_bias(torch.zeros(1, 64))
    with pytest.raises(ValueError, match="sink_bias"):
        gptq_layer_tensors(sink)
    assert set(gptq_layer_tensors(sink, drop_sink_bias=True)) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    with pytest.raises(ValueError, match="checkpoint_format='gptq_v3'"):
        gptq_layer_tensors(_layer(4, 32, sym=True, act_order=False), checkpoint_format="gptq_v3")
    huge = _layer(4, 32, sym=True, act_order=False)
    huge.bias.data[3] = 1e6
    with pytest.raises(ValueError, match="float16"):
        gptq_layer_tensors(huge)
    with pytest.raises(ValueError, match="QuantLinear"):
        gptq_layer_tensors(MXLinear(64, 64, "mxfp4"))


# Reads, per layer, our ``quantization_config`` entry with GPTQModel's own parser and the layer's tensors with its torch
# kernel built from that parsed config, as GPTQModel loads a checkpoint (v1 zero points converted to v2 first), and
# prints which layers dequantize to the stored expected weight.
_GPTQMODEL_READER = """
import json, sys
import torch
from safetensors.torch import load_file
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.quantization.config import FORMAT, QuantizeConfig
from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

tensors = load_file(sys.argv[1])
equal = []
for n, entry in enumerate(json.loads(sys.argv[2])):
    cfg = QuantizeConfig.from_quant_config(entry)
    expected = tensors[f"{n}.expected"]
    module = TorchLinear(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.desc_act,
                         in_features=expected.shape[1], out_features=expected.shape[0], bias=True)
    module.load_state_dict({k: tensors[f"{n}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx", "bias")})
    if cfg.format == FORMAT.GPTQ:
        convert_gptq_v1_to_v2_format_module(module, bits=cfg.bits, pack_dtype=torch.int32)
    module.post_init()
    equal.append(bool(torch.equal(module.dequantize_weight().T, expected)))
print(json.dumps(equal))
"""


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel")
def test_gptqmodel_reads_the_config_entry_and_the_tensors(tmp_path) -> None:
    """GPTQModel (in a subprocess that never imports optimum_bc) dequantizes every export to our float16 weight."""
    tensors, entries = {}, []
    for bits in (2, 3, 4, 8):
        for group_size in (32, -1):
            for sym in (True, False):
                for act_order in (False, True):
                    layer = _layer(bits, group_size, sym, act_order)
                    entry = gptq_quantization_config(
                        BCQuantizationConfig(
                            bits=bits, group_size=group_size, sym=sym, desc_act=act_order, bc_sink_tokens=0
                        )
                    )
                    n = len(entries)
                    exported = gptq_layer_tensors(layer, checkpoint_format=entry["checkpoint_format"])
                    tensors |= {f"{n}.{k}": v for k, v in exported.items()}
                    tensors[f"{n}.expected"] = layer.dequantize_weight(torch.float16)
                    entries.append(entry)
    save_file(tensors, tmp_path / "layers.safetensors")
    run = subprocess.run(
        [sys.executable, "-c", _GPTQMODEL_READER, str(tmp_path / "layers.safetensors"), json.dumps(entries)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    equal = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(equal) == 32 and all(equal), [e for e, ok in zip(entries, equal, strict=True) if not ok]
