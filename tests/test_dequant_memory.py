"""Dense weights of packed layers: bit-equal to the whole-layer float32 formula, built with bounded temporaries.

The peak is counted by :class:`LiveBytes`, a ``TorchDispatchMode`` that follows the storages every aten op allocates
while it runs (deterministic: it counts tensor bytes, not allocator or RSS noise; tracemalloc does not see torch's
CPU allocations).
"""

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from optimum_bc.formats.formats import MX_BLOCK_SIZE, MX_ELEMENTS, e8m0_to_scale
from optimum_bc.formats.packing import unpack_int32
from optimum_bc.layers import dequant
from optimum_bc.layers.mxlinear import MXLinear
from optimum_bc.layers.qlinear import QuantLinear


#: Temporaries allowed beyond the result, in float32 weights' worth (issue #16: "memory bounded by weights").
PEAK_BOUND = 1.5


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated under this mode and still referenced by a tensor, and their peak.

    An op's output that shares no storage with its inputs is a new allocation; a view of such a storage keeps it
    alive too. A storage is freed when the last tensor object seen referencing it is garbage collected. Storages that
    existed before the mode (the layer's buffers) are never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in (t for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self._refs:
                if key in inputs or storage.nbytes() == 0:
                    continue  # a view or in-place result of a storage made before the mode
                self._refs[key] = [storage.nbytes(), 0]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._refs[key][1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def reference_int(layer: QuantLinear) -> torch.Tensor:
    """The whole-layer float32 formula ``scale[g] * (code - zero[g])``."""
    codes, zeros = unpack_int32(layer.qweight, layer.bits, layer.in_features), layer.unpack()[1]
    g = layer.g_idx.long()
    return layer.scales.float()[:, g] * (codes.float() - zeros.float()[:, g])


def reference_mx(layer: MXLinear) -> torch.Tensor:
    """The whole-layer float32 formula ``value(code) * 2^E``."""
    codes = unpack_int32(layer.qweight, layer.bits, layer.in_features)
    return layer.element.decode(codes) * e8m0_to_scale(layer.scales).repeat_interleave(MX_BLOCK_SIZE, dim=1)


def bits_of(weight: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so -0.0 differs from 0.0 and NaNs compare)."""
    return weight.view({4: torch.int32, 2: torch.int16}[weight.element_size()])


def random_int_layer(out: int, k: int, bits: int, group_size: int, act_order: bool, seed: int) -> QuantLinear:
    """A packed layer with random codes, zero points and float16 scales (both signs), optionally act-order."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, 2**bits, (out, k), generator=gen)
    zeros = torch.randint(0, 2**bits, (out, groups), generator=gen)
    scales = torch.randn(out, groups, generator=gen) * 1e-2
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k) // (k if group_size == -1 else group_size))[torch.randperm(k, generator=gen)]
    return QuantLinear.from_quantized(codes, scales, zeros, g_idx, bits, group_size)


def random_mx_layer(out: int, k: int, fmt: str, seed: int) -> MXLinear:
    """An MX layer with random element codes and power-of-two block scales."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** MX_ELEMENTS[fmt].bits, (out, k), generator=gen)
    scales = torch.pow(2.0, torch.randint(-20, 10, (out, k // MX_BLOCK_SIZE), generator=gen).float())
    return MXLinear.from_quantized(codes, scales, fmt)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows so the small test layers go through many blocks (and a ragged last one)."""
    monkeypatch.setattr(dequant, "DENSE_BLOCK", 700)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_int_dense_weight_is_bit_equal(small_blocks: None, bits: int, group_size: int, act_order: bool) -> None:
    layer = random_int_layer(37, 256, bits, group_size, act_order, seed=bits * 100 + group_size)
    expected = reference_int(layer)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        weight = layer.dequantize_weight(dtype)
        assert weight.dtype == dtype and weight.shape == (37, 256)
        assert torch.equal(bits_of(weight), bits_of(expected.to(dtype))), dtype


@pytest.mark.parametrize("bits", [3, 4])
def test_int_uneven_groups_and_odd_width_bit_equal(small_blocks: None, bits: int) -> None:
    """``in`` not a multiple of 8 or of the group size: the gather path and the generic unpack."""
    layer = random_int_layer(19, 100, bits, 32, act_order=False, seed=bits)
    assert torch.equal(bits_of(layer.dequantize_weight()), bits_of(reference_int(layer)))


@pytest.mark.parametrize("fmt", sorted(MX_ELEMENTS))
def test_mx_dense_weight_is_bit_equal(small_blocks: None, fmt: str) -> None:
    layer = random_mx_layer(23, 128, fmt, seed=len(fmt))
    expected = reference_mx(layer)
    for dtype in (torch.float32, torch.bfloat16):
        weight = layer.dequantize_weight(dtype)
        assert torch.equal(bits_of(weight), bits_of(expected.to(dtype))), dtype


def test_meta_layers_give_meta_weights() -> None:
    """Layers on the meta device (built before loading) still report their dense weight's shape and dtype."""
    for layer in (QuantLinear(64, 8, 4, 32, device="meta"), MXLinear(64, 8, "mxfp4", device="meta")):
        weight = layer.dequantize_weight(torch.bfloat16)
        assert weight.is_meta and weight.shape == (8, 64) and weight.dtype == torch.bfloat16


def test_live_bytes_counts_temporaries() -> None:
    """The counter sees a dropped temporary in the peak but not in the live bytes, and ignores older storages."""
    old = torch.ones(1000)
    with LiveBytes() as counter:
        view = old[:10]
        temp = torch.ones(2000)
        kept = temp * 2
        del temp
    assert counter.live == 2000 * 4 and counter.peak == 4000 * 4
    assert view.numel() == 10 and kept.numel() == 2000


def packed_down_proj(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill a layer's packed buffers with random words (every bit pattern is a valid code) and sane scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(-(2**31), 2**31, layer.qweight.shape, generator=gen, dtype=torch.int64))
        if isinstance(layer, QuantLinear):
            layer.qzeros.copy_(torch.randint(-(2**31), 2**31, layer.qzeros.shape, generator=gen, dtype=torch.int64))
            layer.scales.copy_(torch.rand(layer.scales.shape, generator=gen) * 1e-2)
        else:
            layer.scales.copy_(torch.randint(100, 140, layer.scales.shape, generator=gen))
    return layer


@pytest.mark.parametrize(
    "make",
    [
        lambda: QuantLinear(5504, 2048, 4, 128),
        lambda: QuantLinear(5504, 2048, 3, 128),
        lambda: QuantLinear(5504, 2048, 8, -1),
        lambda: MXLinear(5504 + 32 - 5504 % 32, 2048, "mxfp4"),
    ],
    ids=["int4-g128", "int3-g128", "int8-channel", "mxfp4"],
)
def test_dense_weight_peak_bounded_by_weights(make: Any) -> None:
    """A 2048 x 5504 layer's dense weight: temporaries beyond the result at most 1.5 float32 weights' worth."""
    layer = packed_down_proj(make(), seed=0)
    if isinstance(layer, QuantLinear) and layer.bits == 3:  # act-order: the gather path
        layer.g_idx.copy_(layer.g_idx[torch.randperm(layer.in_features, generator=torch.Generator().manual_seed(1))])
    with LiveBytes() as counter:
        weight = layer.dequantize_weight(torch.float32)
    result = weight.numel() * weight.element_size()
    assert counter.live == result  # nothing else survives the call
    assert counter.peak - result <= PEAK_BOUND * result, (counter.peak - result) / result


@pytest.mark.parametrize("bits", [3, 4])
def test_packing_a_layer_peak_bounded_by_its_packed_size(bits: int) -> None:
    """Packing a 2048 x 5504 layer's uint8 codes (``QuantLinear.from_quantized``, as calibration does after each
    solve): everything allocated, the layer included, stays within 1.5 bytes a weight (the packed codes are
    ``bits / 8``; int64 copies of the whole layer were 26 bytes a weight). The packed weights round-trip."""
    out, k, group = 2048, 5504, 128
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (out, k), dtype=torch.uint8, generator=gen)
    zeros = torch.randint(0, 1 << bits, (out, k // group), dtype=torch.uint8, generator=gen)
    scales = torch.rand(out, k // group, generator=gen) + 0.5
    g_idx = torch.arange(k, dtype=torch.int32) // group
    with LiveBytes() as counter:
        layer = QuantLinear.from_quantized(codes, scales, zeros, g_idx, bits=bits, group_size=group)
    assert counter.peak <= 1.5 * out * k, counter.peak / (out * k)
    unpacked, unpacked_zeros = layer.unpack()
    assert torch.equal(unpacked, codes) and torch.equal(unpacked_zeros, zeros)
