"""Tests for the packed low-bit ``QuantLinear`` layer."""

import math

import pytest
import torch
import torch.nn.functional as F

from optimum_bc.formats.packing import packed_width
from optimum_bc.layers.qlinear import QuantLinear


STATE_KEYS = {"qweight", "qzeros", "scales", "g_idx", "bias"}


def _quant_data(
    out_features: int,
    in_features: int,
    bits: int,
    group_size: int,
    *,
    seed: int = 0,
    permute: bool = False,
) -> dict[str, torch.Tensor]:
    """Random codes, fp16-exact scales, integer zeros, a bias and a (possibly act-order permuted) g_idx."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=gen)
    zeros = torch.randint(0, 1 << bits, (out_features, groups), generator=gen)
    scales = (torch.rand(out_features, groups, generator=gen) * 0.05 + 1e-3).half().float()
    if group_size == -1:
        g_idx = torch.zeros(in_features, dtype=torch.int32)
    else:
        g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
    if permute:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    bias = torch.randn(out_features, generator=gen)
    return {"codes": codes, "scales": scales, "zeros": zeros, "g_idx": g_idx, "bias": bias}


def _build(
    data: dict[str, torch.Tensor], bits: int, group_size: int, dtype: torch.dtype = torch.float32
) -> QuantLinear:
    """``QuantLinear.from_quantized`` on the tensors from :func:`_quant_data`."""
    return QuantLinear.from_quantized(
        data["codes"], data["scales"], data["zeros"], data["g_idx"], bits, group_size, data["bias"], dtype
    )


def _direct_weight(data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dequantized weight from the unpacked inputs, element by element along the group index."""
    g = data["g_idx"].long()
    return data["scales"][:, g] * (data["codes"].float() - data["zeros"].float()[:, g])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_from_quantized_dequantize_and_forward(bits: int, group_size: int) -> None:
    data = _quant_data(24, 200, bits, group_size, seed=bits * 1000 + group_size)
    layer = _build(data, bits, group_size)
    groups = 1 if group_size == -1 else math.ceil(200 / group_size)
    assert layer.qweight.shape == (24, packed_width(200, bits))
    assert layer.qzeros.shape == (24, packed_width(groups, bits))
    assert layer.scales.shape == (24, groups) and layer.scales.dtype == torch.float16
    assert layer.g_idx.dtype == torch.int32 and torch.equal(layer.g_idx, data["g_idx"])

    codes, zeros = layer.unpack()
    assert codes.dtype == torch.uint8 and torch.equal(codes.long(), data["codes"])
    assert zeros.dtype == torch.uint8 and torch.equal(zeros.long(), data["zeros"])

    weight = layer.dequantize_weight()
    assert weight.dtype == torch.float32 and torch.equal(weight, _direct_weight(data))

    x = torch.randn(2, 5, 200)
    y = layer(x)
    assert y.shape == (2, 5, 24)
    assert torch.equal(y, F.linear(x, weight, layer.bias))


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_permuted_g_idx(bits: int) -> None:
    data = _quant_data(16, 200, bits, 32, seed=7, permute=True)
    assert not torch.equal(data["g_idx"], torch.arange(200) // 32)
    layer = _build(data, bits, 32)
    assert torch.equal(layer.g_idx, data["g_idx"])
    assert torch.equal(layer.dequantize_weight(), _direct_weight(data))
    x = torch.randn(3, 200)
    assert torch.equal(layer(x), F.linear(x, _direct_weight(data), data["bias"]))


def test_default_g_idx_and_none() -> None:
    assert torch.equal(QuantLinear(200, 4, 4, 32).g_idx, (torch.arange(200) // 32).int())
    assert torch.equal(QuantLinear(200, 4, 4, -1).g_idx, torch.zeros(200, dtype=torch.int32))
    data = _quant_data(4, 200, 4, 32)
    layer = QuantLinear.from_quantized(data["codes"], data["scales"], data["zeros"], None, 4, 32, None)
    assert torch.equal(layer.g_idx, data["g_idx"])
    assert torch.equal(layer.bias, torch.zeros(4))


def test_init_buffers_and_bias() -> None:
    layer = QuantLinear(200, 24, 3, 128, dtype=torch.bfloat16)
    assert layer.in_features == 200 and layer.out_features == 24
    assert layer.bits == 3 and layer.group_size == 128 and layer.num_groups == 2
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (24, 19)
    assert layer.qzeros.dtype == torch.int32 and layer.qzeros.shape == (24, 1)
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (24, 2)
    assert isinstance(layer.bias, torch.nn.Parameter)
    assert not layer.bias.requires_grad
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, torch.zeros(24, dtype=torch.bfloat16))


def test_state_dict_keys() -> None:
    layer = _build(_quant_data(8, 64, 4, 32), 4, 32)
    layer(torch.randn(2, 64))  # populate the cache; it must not show up in the state dict
    assert set(layer.state_dict()) == STATE_KEYS
    assert {name for name, _ in layer.named_buffers()} == STATE_KEYS - {"bias"}
    assert [name for name, _ in layer.named_parameters()] == ["bias"]


def test_meta_then_to_empty_then_load() -> None:
    src = _build(_quant_data(24, 200, 3, 128, seed=3), 3, 128)
    layer = QuantLinear(200, 24, 3, 128, device="meta")
    assert all(t.is_meta for t in layer.state_dict().values())
    assert layer.qweight.shape == src.qweight.shape and layer.qzeros.shape == src.qzeros.shape
    layer.to_empty(device="cpu")
    assert not any(t.is_meta for t in layer.state_dict().values())
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    layer.load_state_dict(src.state_dict())
    x = torch.randn(4, 200)
    assert torch.equal(layer(x), src(x))


def test_load_state_dict_fresh_module_and_invalidates_cache() -> None:
    first = _build(_quant_data(16, 200, 4, 32, seed=1), 4, 32)
    second = _build(_quant_data(16, 200, 4, 32, seed=2), 4, 32)
    x = torch.randn(3, 200)

    fresh = QuantLinear(200, 16, 4, 32)
    fresh.load_state_dict(first.state_dict())
    out_first = fresh(x)
    assert torch.equal(out_first, first(x))

    fresh.load_state_dict(second.state_dict())
    out_second = fresh(x)
    assert not torch.equal(out_second, out_first)
    assert torch.equal(out_second, second(x))


def test_reset_cache_after_in_place_change() -> None:
    layer = _build(_quant_data(8, 64, 4, -1, seed=5), 4, -1)
    x = torch.randn(2, 64)
    before = layer(x)
    with torch.no_grad():
        layer.scales.mul_(2)
    assert torch.equal(layer(x), before)  # documented: in-place edits need an explicit reset
    layer.reset_cache()
    after = layer(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, F.linear(x, layer.dequantize_weight(), layer.bias))


def test_dtype_change_does_not_return_stale_cache() -> None:
    data = _quant_data(16, 200, 4, 32, seed=11)
    layer = _build(data, 4, 32)
    x32 = torch.randn(3, 200)
    layer(x32)

    layer.to(torch.float64)
    assert layer.bias.dtype == torch.float64 and not layer.bias.requires_grad
    assert layer.scales.dtype == torch.float16  # the checkpoint format is kept
    x64 = x32.double()
    y64 = layer(x64)
    assert y64.dtype == torch.float64
    expected = F.linear(x64, _direct_weight(data).double(), data["bias"].double())
    assert torch.equal(y64, expected)

    layer.half()
    assert layer.bias.dtype == torch.float16
    y16 = layer(x32.half())
    assert y16.dtype == torch.float16
    assert torch.equal(y16, F.linear(x32.half(), _direct_weight(data).half(), data["bias"].half()))


def test_cache_is_built_once_and_dropped_on_conversion() -> None:
    layer = _build(_quant_data(8, 64, 4, 32, seed=23), 4, 32)
    x = torch.randn(2, 64)
    layer(x)
    cached = layer._cached_weight
    assert cached is not None and cached.dtype == torch.float32
    layer(x)
    assert layer._cached_weight is cached
    assert "_cached_weight" not in layer.state_dict()
    layer.to(torch.float64)
    assert layer._cached_weight is None
    layer(x)
    layer.load_state_dict(layer.state_dict())
    assert layer._cached_weight is None
    layer(x)
    layer.reset_cache()
    assert layer._cached_weight is None


def test_bfloat16_conversion_keeps_scales_exact() -> None:
    data = _quant_data(8, 64, 4, 32, seed=13)
    layer = _build(data, 4, 32)
    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize_weight(torch.float32), _direct_weight(data))


def test_forward_follows_input_dtype() -> None:
    data = _quant_data(8, 64, 4, 32, seed=17)
    layer = _build(data, 4, 32)
    x = torch.randn(2, 64)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        xd = x.to(dtype)
        expected = F.linear(xd, layer.dequantize_weight(dtype), layer.bias.to(dtype))
        assert torch.equal(layer(xd), expected)


def test_inference_mode_cache_then_backward() -> None:
    layer = _build(_quant_data(8, 64, 4, 32, seed=19), 4, 32)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, layer.dequantize_weight().sum(0).expand(2, 64))


def test_weight_bytes_and_repr() -> None:
    layer = QuantLinear(200, 24, 4, 32)
    expected = 24 * packed_width(200, 4) * 4 + 24 * packed_width(7, 4) * 4 + 24 * 7 * 2 + 200 * 4
    assert layer.weight_bytes() == expected
    assert "in_features=200, out_features=24, bits=4, group_size=32" in repr(layer)


def test_float_codes_accepted_when_integral() -> None:
    data = _quant_data(4, 64, 4, 32)
    layer = QuantLinear.from_quantized(
        data["codes"].float(), data["scales"], data["zeros"].float(), data["g_idx"], 4, 32, data["bias"]
    )
    assert torch.equal(layer.dequantize_weight(), _direct_weight(data))
    with pytest.raises(ValueError, match="codes must hold integer values"):
        QuantLinear.from_quantized(
            data["codes"].float() + 0.5, data["scales"], data["zeros"], data["g_idx"], 4, 32, data["bias"]
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 1}, r"bits must be an int in \[2, 8\]"),
        ({"bits": 9}, r"bits must be an int in \[2, 8\]"),
        ({"group_size": 0}, "group_size must be -1"),
        ({"group_size": -2}, "group_size must be -1"),
        ({"in_features": 0}, "in_features and out_features must be positive"),
    ],
)
def test_init_validation(kwargs: dict[str, int], match: str) -> None:
    args = {"in_features": 64, "out_features": 8, "bits": 4, "group_size": 32} | kwargs
    with pytest.raises(ValueError, match=match):
        QuantLinear(**args)


def test_from_quantized_validation() -> None:
    d = _quant_data(8, 200, 4, 32)
    ok = (d["codes"], d["scales"], d["zeros"], d["g_idx"], 4, 32, d["bias"])

    def call(index: int, value: object) -> None:
        args = list(ok)
        args[index] = value
        QuantLinear.from_quantized(*args)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="codes must be 2-D"):
        call(0, d["codes"].flatten())
    with pytest.raises(ValueError, match=r"scales must have shape \(8, 7\)"):
        call(1, d["scales"][:, :6])
    with pytest.raises(ValueError, match=r"zeros must have shape \(8, 7\)"):
        call(2, d["zeros"][:4])
    with pytest.raises(ValueError, match=r"g_idx must have shape \(200,\)"):
        call(3, d["g_idx"][:10])
    with pytest.raises(ValueError, match=r"g_idx values must be in \[0, 6\]"):
        call(3, torch.full((200,), 7, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        call(6, torch.zeros(9))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\] for bits=4"):
        call(0, d["codes"] + 16)
    with pytest.raises(ValueError, match=r"zeros must be in \[0, 15\] for bits=4"):
        call(2, d["zeros"] - 16)
    with pytest.raises(ValueError, match="scales must be finite"):
        call(1, d["scales"] * 1e7)
    with pytest.raises(ValueError, match="scales must be a floating tensor"):
        call(1, torch.ones(8, 7, dtype=torch.int32))
