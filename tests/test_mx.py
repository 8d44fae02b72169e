"""OCP MX block-scaled formats: element conversion against a slow reference, scales, storage, RTN/GPTQ/BC, reload,
and every bad-input error."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import optimum_bc
from optimum_bc import BCQuantizationConfig
from optimum_bc.algorithms.gptq import gptq_quantize
from optimum_bc.algorithms.rtn import RTNQuantizer, rtn_quantize
from optimum_bc.formats.formats import MX_ELEMENTS, e8m0_to_scale, get_format, mx_scale, scale_to_e8m0
from optimum_bc.layers.mxlinear import MXLinear
from optimum_bc.layers.qlinear import QuantLinear

from .conftest import gram, tiny_llama, tiny_opt


# (ebits, mbits, max normal) straight from MX spec §5.3 / OFP8, written out independently of optimum_bc.formats.
SPEC_FP = {
    "mxfp8_e4m3": (4, 3, 448.0),
    "mxfp8_e5m2": (5, 2, 57344.0),
    "mxfp6_e3m2": (3, 2, 28.0),
    "mxfp6_e2m3": (2, 3, 7.5),
    "mxfp4": (2, 1, 6.0),
}
SPEC_INT = {"mxint8": (8, 127 / 64), "mxint4": (4, 7 / 4)}
FORMATS = list(MX_ELEMENTS)
#: A tiny LLaMA MLP width that is not a multiple of 32: its down_proj cannot be MX-quantized.
ODD_MLP = 80


def reference_table(name: str) -> dict[int, float]:
    """Every finite code of the element format and its value, decoded bit field by bit field in plain Python."""
    table = {}
    if name in SPEC_INT:
        bits, _ = SPEC_INT[name]
        for code in range(2**bits):
            signed = code - 2**bits if code >= 2 ** (bits - 1) else code
            if signed == -(2 ** (bits - 1)):
                continue  # the most negative code is not used (symmetric range, our documented choice)
            table[code] = signed / 2 ** (bits - 2)
        return table
    ebits, mbits, _ = SPEC_FP[name]
    bits, bias = 1 + ebits + mbits, 2 ** (ebits - 1) - 1
    for code in range(2**bits):
        s, e, m = code >> (ebits + mbits), (code >> mbits) & (2**ebits - 1), code & (2**mbits - 1)
        if name == "mxfp8_e4m3" and e == 15 and m == 7:
            continue  # NaN
        if name == "mxfp8_e5m2" and e == 31:
            continue  # Inf / NaN
        value = (m / 2**mbits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**mbits) * 2.0 ** (e - bias)
        table[code] = -value if s else value
    return table


def reference_round(y: float, table: dict[int, float]) -> tuple[int, float]:
    """Nearest finite value; ties to the even code, then to the smaller code (+0 over -0). Saturates by design."""
    best = min(abs(v - y) for v in table.values())
    ties = [c for c, v in table.items() if abs(v - y) == best]
    even = [c for c in ties if c % 2 == 0] or ties
    code = min(even)
    return code, table[code]


def probe_values(table: dict[int, float]) -> torch.Tensor:
    """Every value, every midpoint between neighbours, points just off the midpoints, and values beyond the max."""
    values = sorted(set(table.values()))
    mids = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
    off = [m * (1 + s * 2**-10) for m in mids for s in (-1, 1)]
    top = max(values)
    beyond = [top * 1.01, top * 1.5, top * 4, -top * 1.3, top + (top - values[-2]) / 2]
    return torch.tensor(values + mids + off + beyond, dtype=torch.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_element_conversion_matches_reference(name: str) -> None:
    element = MX_ELEMENTS[name]
    table = reference_table(name)
    y = probe_values(table)
    rounded = element.round(y)
    codes = element.encode(rounded)
    expected = [reference_round(float(v), table) for v in y]
    assert codes.tolist() == [c for c, _ in expected]
    assert rounded.tolist() == [v for _, v in expected]
    assert element.decode(codes).tolist() == [v for _, v in expected]


@pytest.mark.parametrize("name", FORMATS)
def test_element_max_and_emax_follow_the_spec(name: str) -> None:
    element = MX_ELEMENTS[name]
    spec_max = SPEC_FP[name][2] if name in SPEC_FP else SPEC_INT[name][1]
    assert element.max_normal == spec_max
    assert element.emax == math.floor(math.log2(spec_max))
    table = reference_table(name)
    values = element.values.tolist()
    assert all(values[code] == value for code, value in table.items())
    unused = [c for c, v in enumerate(values) if c not in table and math.isfinite(v)]
    assert unused == ([2 ** (element.bits - 1)] if name in SPEC_INT else [])


def test_e8m0_round_trip_and_nan() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    scales = e8m0_to_scale(codes)
    assert torch.isnan(scales[255])
    assert scales[127] == 1.0 and scales[0] == 2.0**-127 and scales[254] == 2.0**127
    assert torch.equal(scale_to_e8m0(scales), codes)
    with pytest.raises(ValueError, match="powers of two"):
        scale_to_e8m0(torch.tensor([3.0]))


@pytest.mark.parametrize("name", FORMATS)
def test_scale_is_floor_log2_amax_minus_emax(name: str) -> None:
    element = MX_ELEMENTS[name]
    torch.manual_seed(0)
    w = torch.randn(64, 32) * torch.logspace(-3, 3, 64).unsqueeze(1)
    scale = mx_scale(w, element)
    amax = w.abs().amax(dim=1)
    expected = [2.0 ** (math.floor(math.log2(a)) - element.emax) for a in amax.tolist()]
    assert scale[:, 0].tolist() == expected
    # Scaled values never exceed 2^(emax+1): only the top binade can saturate.
    assert bool(((w / scale).abs() < 2.0 ** (element.emax + 1)).all())


@pytest.mark.parametrize("name", FORMATS)
def test_spec_edge_cases(name: str) -> None:
    fmt = get_format(name, bits=8)
    element = fmt.element
    # All-zero block: exact zeros with code 0 and the smallest E8M0 scale.
    zeros = torch.zeros(2, 32)
    grid = fmt.fit(zeros)
    assert torch.equal(grid.quantize(zeros), torch.zeros(2, 32))
    assert scale_to_e8m0(grid.scale).tolist() == [[0], [0]]
    # amax a power of two: X = amax / 2^emax, so amax itself is represented exactly.
    w = torch.zeros(1, 32)
    w[0, 3] = 2.0**5
    w[0, 4] = -(2.0**5)
    grid = fmt.fit(w)
    assert grid.scale.item() == 2.0 ** (5 - element.emax)
    assert grid.dequantize(grid.quantize(w))[0, 3:5].tolist() == [2.0**5, -(2.0**5)]
    # amax just below the next power of two saturates to the max normal (MX spec §6.3), never wraps or overflows.
    w[0, 3] = 2.0**6 * (1 - 2**-20)
    grid = fmt.fit(w)
    assert grid.dequantize(grid.quantize(w))[0, 3].item() == element.max_normal * grid.scale.item()
    # Exponent far below the E8M0 range is clamped to 2^-127.
    assert mx_scale(torch.full((1, 32), 2.0**-140), element).item() == 2.0**-127
    # A block with NaN or Inf gets the NaN scale (E8M0 0xFF) and decodes to NaN; the other rows are untouched.
    bad = torch.randn(3, 32)
    bad[0, 5], bad[1, 7] = float("nan"), float("inf")
    grid = fmt.fit(bad)
    assert scale_to_e8m0(grid.scale)[:, 0].tolist()[:2] == [255, 255]
    out = grid.dequantize(grid.quantize(bad))
    assert bool(torch.isnan(out[:2]).all()) and bool(torch.isfinite(out[2]).all())


def test_fp_subnormals_are_used() -> None:
    element = MX_ELEMENTS["mxfp4"]  # emin = 0: 0.5 is the only subnormal
    fmt = get_format("mxfp4", bits=4)
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 6.0, 0.5, 0.3
    grid = fmt.fit(w)
    assert grid.scale.item() == 1.0
    codes = grid.quantize(w)
    assert codes[0, 1].item() == 1 and codes[0, 2].item() == 1  # exponent field 0, mantissa 1: subnormal 0.5
    assert element.decode(codes)[0, :3].tolist() == [6.0, 0.5, 0.5]
    e4m3 = MX_ELEMENTS["mxfp8_e4m3"]
    tiny = torch.tensor([2.0**-9, 3 * 2.0**-9, 2.0**-10, 2.0**-10 * 3])
    # Smallest E4M3 subnormal 2^-9; halfway cases tie to the even code: 2^-10 -> 0, 1.5 * 2^-9 -> 2 * 2^-9.
    assert e4m3.round(tiny).tolist() == [2.0**-9, 3 * 2.0**-9, 0.0, 2.0**-8]


@pytest.mark.parametrize("name", FORMATS)
def test_pack_unpack_round_trip_and_storage(name: str) -> None:
    torch.manual_seed(1)
    W = torch.randn(24, 96)
    qw = rtn_quantize(W, bits=8, group_size=32, sym=True, format=name)
    layer = MXLinear.from_quantized(qw.codes, qw.scales, name, bias=torch.randn(24))
    codes, scales = layer.unpack()
    assert torch.equal(codes, qw.codes)
    assert torch.equal(scales, qw.scales)
    assert torch.equal(layer.dequantize_weight(), qw.dequantize())
    bits = MX_ELEMENTS[name].bits
    assert layer.qweight.numel() * 4 == 24 * 96 * bits // 8  # 4-bit: two codes per byte; 6-bit: 3 bytes per 4
    assert layer.scales.dtype == torch.uint8 and layer.scales.shape == (24, 3)  # one E8M0 byte per 32 columns
    assert layer.weight_bytes() == 24 * 96 * bits // 8 + 24 * 3
    x = torch.randn(5, 96)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, qw.dequantize(), layer.bias))


def _correlated_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(
        2048, 128, generator=g
    )
    W = torch.randn(48, 128, generator=g)
    return W, X


@pytest.mark.parametrize("name", FORMATS)
def test_gptq_beats_rtn_on_correlated_inputs(name: str) -> None:
    W, X = _correlated_problem()
    H = gram(X)
    rtn = rtn_quantize(W, bits=8, group_size=32, sym=True, format=name)
    gptq = gptq_quantize(W, H, bits=8, group_size=32, sym=True, format=name)
    err_rtn = ((W - rtn.dequantize()) @ X.T).pow(2).sum()
    err_gptq = ((W - gptq.dequantize()) @ X.T).pow(2).sum()
    assert err_gptq < err_rtn
    # GPTQ codes are on the grid the stored scales describe (the packed layer reproduces them exactly).
    layer = MXLinear.from_quantized(gptq.codes, gptq.scales, name)
    assert torch.equal(layer.dequantize_weight(), gptq.dequantize())


def test_more_bits_less_error() -> None:
    W, _ = _correlated_problem()
    err = {
        name: (W - rtn_quantize(W, bits=8, group_size=32, sym=True, format=name).dequantize()).pow(2).mean().item()
        for name in FORMATS
    }
    assert err["mxint8"] < err["mxfp6_e2m3"] < err["mxfp4"]
    assert err["mxfp8_e4m3"] < err["mxfp6_e3m2"] < err["mxfp4"]
    assert err["mxint8"] < err["mxint4"]


def _targets(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MXLinear | QuantLinear)]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize(
    "method,name",
    [(m, f) for m in ("rtn", "gptq") for f in FORMATS]
    + [(m, f) for m in ("comq", "erq") for f in ("mxfp4", "mxint4", "mxfp6_e3m2", "mxfp8_e4m3")],
)
def test_quantize_model_with_bc(family: str, method: str, name: str, calib_ids: torch.Tensor) -> None:
    model = tiny_llama() if family == "llama" else tiny_opt()
    ids = calib_ids[:2]
    with torch.no_grad():
        ref = model(ids).logits
    config = BCQuantizationConfig(format=name, method=method, dataset=calib_ids, num_samples=16, seq_len=32)
    report = optimum_bc.quantize_model(model, config)
    layers = _targets(model)
    assert len(layers) == len(report.layers) == (14 if family == "llama" else 12)
    assert all(isinstance(m, MXLinear) and m.format == name for m in layers)
    for row in report.layers:
        assert row.mse_after <= row.mse_before
    element = MX_ELEMENTS[name]
    for layer in layers:
        codes, scales = layer.unpack()
        assert bool((scales > 0).all())
        assert bool(torch.isfinite(element.decode(codes)).all())
    with torch.no_grad():
        out = model(ids).logits
    assert bool(torch.isfinite(out).all())
    assert 0 < (out - ref).pow(2).mean().item() < ref.pow(2).mean().item()


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "comq"])
@pytest.mark.parametrize("name", ["mxfp4", "mxint4"])
def test_quantize_model_without_bc_and_bc_helps(family: str, method: str, name: str, calib_ids: torch.Tensor) -> None:
    outputs = {}
    for bc in (False, True):
        model = tiny_llama() if family == "llama" else tiny_opt()
        config = BCQuantizationConfig(
            format=name, method=method, bias_compensation=bc, dataset=calib_ids, num_samples=16, seq_len=32
        )
        optimum_bc.quantize_model(model, config)
        assert all(isinstance(m, MXLinear) for m in _targets(model))
        with torch.no_grad():
            outputs[bc] = model(calib_ids).logits
    with torch.no_grad():
        ref = (tiny_llama() if family == "llama" else tiny_opt())(calib_ids).logits
    # On its own calibration data, BC lowers the output error of the whole model.
    assert (outputs[True] - ref).pow(2).mean() < (outputs[False] - ref).pow(2).mean()


def test_rtn_without_bc_matches_rtn_quantize_exactly() -> None:
    model = tiny_llama()
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    optimum_bc.quantize_model(model, BCQuantizationConfig(format="mxfp6_e2m3", method="rtn", bias_compensation=False))
    layer = model.model.layers[0].mlp.down_proj
    expected = rtn_quantize(weight, bits=6, group_size=32, sym=True, format="mxfp6_e2m3").dequantize()
    assert torch.equal(layer.dequantize_weight(torch.float32), expected)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["gptq", "comq", "erq"])
def test_save_reload_bit_identical(family: str, method: str, calib_ids: torch.Tensor, tmp_path) -> None:
    model = tiny_llama() if family == "llama" else tiny_opt()
    config = BCQuantizationConfig(format="mxfp4", method=method, dataset=calib_ids, num_samples=16, seq_len=32)
    optimum_bc.quantize_model(model, config)
    with torch.no_grad():
        before = model(calib_ids[:3]).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.format == "mxfp4"
    layers = _targets(reloaded)
    assert layers and all(isinstance(m, MXLinear) for m in layers)
    with torch.no_grad():
        after = reloaded(calib_ids[:3]).logits
    assert torch.equal(before, after)


def test_position_granularity_reloads(calib_ids: torch.Tensor, tmp_path) -> None:
    model = tiny_llama()
    config = BCQuantizationConfig(
        format="mxint4", method="rtn", bc_granularity="position", dataset=calib_ids, num_samples=16, seq_len=32
    )
    optimum_bc.quantize_model(model, config)
    layer = model.model.layers[1].self_attn.o_proj
    assert isinstance(layer, MXLinear) and layer.position_bias.shape == (32, 64)
    with torch.no_grad():
        before = model(calib_ids[:2]).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(before, reloaded(calib_ids[:2]).logits)
    with pytest.raises(ValueError, match="calibrated for 32 positions"):
        reloaded(torch.zeros(1, 40, dtype=torch.long))


def test_from_pretrained_quantizes_to_mx(tiny_model_dir: str, calib_ids: torch.Tensor) -> None:
    config = BCQuantizationConfig(format="mxint8", method="rtn", dataset=calib_ids, num_samples=16, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config)
    assert all(isinstance(m, MXLinear) and m.format == "mxint8" for m in _targets(model))
    assert model.config.quantization_config.to_dict()["bits"] == 8


# --- configuration ---------------------------------------------------------------------------------------------------


def test_config_derives_bits_group_and_sym_from_format() -> None:
    c = BCQuantizationConfig(format="MXFP6_E3M2", method="rtn", bias_compensation=False)
    assert (c.format, c.bits, c.group_size, c.sym) == ("mxfp6_e3m2", 6, 32, True)
    assert BCQuantizationConfig(format="mxfp4_e2m1").format == "mxfp4"
    d = BCQuantizationConfig.from_dict(c.to_dict())
    assert (d.format, d.bits, d.group_size, d.sym) == ("mxfp6_e3m2", 6, 32, True)
    plain = BCQuantizationConfig()
    assert (plain.format, plain.bits, plain.group_size, plain.sym) == ("int", 4, 128, False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "mxfp5"}, r"format='mxfp5' is invalid; allowed: \['int', 'mxfp8_e4m3'"),
        ({"format": "mxfp8"}, r"format='mxfp8' is invalid.*'mxfp8_e4m3', 'mxfp8_e5m2'"),
        ({"format": "mxfp4", "bits": 8}, r"bits=8 is invalid; allowed: 4 with format='mxfp4'.*mxint8=8"),
        ({"format": "mxint8", "bits": 4}, r"bits=4 is invalid; allowed: 8 with format='mxint8'"),
        ({"format": "mxfp4", "group_size": 128}, r"group_size=128 is invalid; allowed: 32 with format='mxfp4'"),
        ({"format": "mxfp4", "group_size": -1}, r"group_size=-1 is invalid; allowed: 32"),
        ({"format": "mxint4", "sym": False}, r"sym=False is invalid; allowed: True with format='mxint4'.*no zero"),
        ({"format": "mxfp4", "desc_act": True}, r"desc_act=True is invalid.*act-order would scatter"),
        ({"format": "int", "bits": 5}, r"bits=5 is invalid; allowed: \(2, 3, 4, 6, 8\)"),
    ],
)
def test_config_rejects_bad_combinations(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BCQuantizationConfig(**kwargs)


def test_config_rejects_method_without_mx_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RTNQuantizer, "supports_mx", False)
    with pytest.raises(
        ValueError, match=r"method='rtn' is invalid; allowed: \['comq', 'erq', 'gptq'\] with format='mxfp4'"
    ):
        BCQuantizationConfig(format="mxfp4", method="rtn")


def test_in_features_not_multiple_of_32_fails_before_calibration() -> None:
    # dataset=None would fail in calibration: the MX error must come first.
    config = BCQuantizationConfig(format="mxfp4", method="gptq", dataset=None)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj' has in_features=80.*divisible by"):
        optimum_bc.quantize_model(tiny_llama(intermediate_size=ODD_MLP), config)


def test_skipping_the_odd_layer_is_the_fix(calib_ids: torch.Tensor) -> None:
    model = tiny_llama(intermediate_size=ODD_MLP)
    skip = ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    config = BCQuantizationConfig(
        format="mxfp4", method="rtn", dataset=calib_ids, num_samples=16, seq_len=32, modules_to_not_convert=skip
    )
    optimum_bc.quantize_model(model, config)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, MXLinear)


def test_from_pretrained_checks_shapes_before_calibration(
    tmp_path, calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_llama(intermediate_size=ODD_MLP).save_pretrained(tmp_path)

    def no_calibration(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibration started before the layer shapes were checked")

    monkeypatch.setattr(optimum_bc.integrations.quantizer, "build_calibration", no_calibration)
    config = BCQuantizationConfig(format="mxint4", method="rtn", dataset=calib_ids, num_samples=16, seq_len=32)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj' has in_features=80"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)


def test_non_finite_weights_are_refused_before_calibration() -> None:
    model = tiny_opt()
    with torch.no_grad():
        model.model.decoder.layers[1].fc1.weight[3, 7] = float("nan")
    config = BCQuantizationConfig(format="mxfp8_e4m3", method="gptq", dataset=None)
    with pytest.raises(ValueError, match=r"layer 'model.decoder.layers.1.fc1' has NaN or infinite weights"):
        optimum_bc.quantize_model(model, config)


def test_gptq_and_mxlinear_reject_bad_shapes() -> None:
    W, X = _correlated_problem()
    H = gram(X)
    with pytest.raises(ValueError, match="needs group_size=32 and desc_act=False"):
        gptq_quantize(W, H, bits=4, group_size=64, sym=True, format="mxfp4")
    with pytest.raises(ValueError, match="needs an MX format"):
        MXLinear(64, 8, "int")
    with pytest.raises(ValueError, match="in_features divisible by 32"):
        MXLinear(48, 8, "mxfp4")


@pytest.mark.slow
def test_mx_rtn_on_packaged_model() -> None:
    """Real SmolLM2-135M (every Linear has in_features 576 or 1536): MXFP8 stays close to fp32, MXFP4 is coarser."""
    from transformers import AutoTokenizer

    from optimum_bc.data.evaluation import evaluate_perplexity
    from optimum_bc.data.packaged import packaged_model_dir

    path = packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ppl = {}
    for name in ("fp32", "mxfp8_e4m3", "mxfp4"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if name != "fp32":
            config = BCQuantizationConfig(format=name, method="rtn", bias_compensation=False)
            optimum_bc.quantize_model(model, config)
            assert sum(isinstance(m, MXLinear) for m in model.modules()) == 30 * 7
        ppl[name] = evaluate_perplexity(model, tokenizer, "wiki-vital", seq_len=256, max_samples=2, progress=False)
    assert abs(ppl["mxfp8_e4m3"] / ppl["fp32"] - 1) < 0.05
    assert ppl["mxfp8_e4m3"] < ppl["mxfp4"]


def test_model_card_names_the_mx_format() -> None:
    from optimum_bc.integrations.hub_card import build_model_card

    config = BCQuantizationConfig(format="mxfp6_e2m3", method="rtn", bias_compensation=False)
    text = str(build_model_card(config.to_dict()))
    assert "OCP MX format `mxfp6_e2m3` (6-bit elements, 32 per E8M0 scale)" in text
    assert '`weight_format` | `"mxfp6_e2m3"`' in text


def test_cli_format_flag() -> None:
    from optimum_bc.cli import _build_parser, _config_from_args

    args = _build_parser().parse_args(["quantize", "m", "--output", "o", "--format", "mxfp4", "--method", "comq"])
    config = _config_from_args(args, tokenizer=None)
    assert (config.format, config.bits, config.group_size, config.sym, config.method) == ("mxfp4", 4, 32, True, "comq")
    plain = _config_from_args(_build_parser().parse_args(["quantize", "m", "--output", "o"]), tokenizer=None)
    assert (plain.format, plain.bits, plain.group_size, plain.sym) == ("int", 4, 128, False)


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--format", "mxfp4", "--group-size", "128"], "group_size=128 is invalid; allowed: 32"),
        (["--format", "mxfp9"], "format='mxfp9' is invalid"),
        (["--format", "mxint8", "--bits", "4"], "bits=4 is invalid; allowed: 8"),
    ],
)
def test_cli_format_errors_before_loading(flags: list[str], match: str, capsys, tmp_path, monkeypatch) -> None:
    from optimum_bc.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "does-not-exist", "--output", "o", *flags]) == 2
    assert match in capsys.readouterr().err
