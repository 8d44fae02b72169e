"""Tests for the int32 bit-packing of low-bit codes."""

import pytest
import torch

from optimum_bc.formats import packing
from optimum_bc.formats.packing import pack_int32, packed_width, unpack_int32


ALL_BITS = list(range(2, 9))
ROWS = [1, 3, 7]
LENGTHS = [1, 5, 31, 33, 97, 576]


def _reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Slow pure-Python packer following the bit-stream definition literally, used as an oracle."""
    rows, n = codes.shape
    width = -(-n * bits // 32)
    out = []
    for row in codes.tolist():
        stream = sum(int(c) << (k * bits) for k, c in enumerate(row))
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(width)]
        out.append([w - (1 << 32) if w >= (1 << 31) else w for w in words])
    return torch.tensor(out, dtype=torch.int32).reshape(rows, width)


def _int32(value: int) -> int:
    """Two's complement int32 value of an unsigned 32-bit word."""
    return value - (1 << 32) if value >= (1 << 31) else value


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_random(bits: int, rows: int, n: int) -> None:
    gen = torch.Generator().manual_seed(1000 * bits + 10 * rows + n)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=gen, dtype=torch.int64)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, packed_width(n, bits))
    assert packed.shape[1] == -(-n * bits // 32)
    unpacked = unpack_int32(packed, bits, n)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked.long(), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", LENGTHS)
def test_matches_reference_and_max_codes(bits: int, n: int) -> None:
    max_code = (1 << bits) - 1
    gen = torch.Generator().manual_seed(bits * 7 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=gen, dtype=torch.int64)
    codes[0] = max_code
    codes[1, ::2] = max_code
    codes[1, 1::2] = 0
    packed = pack_int32(codes, bits)
    assert torch.equal(packed, _reference_pack(codes, bits))
    assert torch.equal(unpack_int32(packed, bits, n).long(), codes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_accepts_integer_dtypes(dtype: torch.dtype) -> None:
    codes = torch.tensor([[0, 1, 2, 3, 7, 6, 5, 4, 3, 2, 1]], dtype=dtype)
    assert torch.equal(pack_int32(codes, 3), pack_int32(codes.long(), 3))


def test_known_3bit_example() -> None:
    # 11 codes of 3 bits = 33 bits: code 10 straddles, its low two bits end word 0 and its top bit starts word 1.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 7]])
    word0 = 0b11_010_001_000_111_110_101_100_011_010_001  # codes 10(low 2 bits) .. 0, most significant first
    assert word0 == 0xD11F58D1
    packed = pack_int32(codes, 3)
    assert packed.tolist() == [[_int32(word0), 1]]
    assert packed[0, 0].item() < 0  # the top bits are set, so the int32 word is negative
    assert unpack_int32(packed, 3, 11).tolist() == [[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 7]]


def test_known_4bit_and_8bit_examples() -> None:
    nibbles = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert pack_int32(nibbles, 4).tolist() == [[_int32(0x87654321), 9]]
    octets = torch.tensor([[0x01, 0x02, 0x03, 0xFF]])
    assert pack_int32(octets, 8).tolist() == [[_int32(0xFF030201)]]


def test_negative_int32_word() -> None:
    # A single code placed in the top bits of word 0 makes the int32 negative; unpacking must not sign-extend.
    codes = torch.zeros(2, 16, dtype=torch.int64)
    codes[0, 15] = 3  # 2-bit codes: code 15 occupies bits 30..31
    codes[1, 15] = 2  # only bit 31: exactly INT32_MIN
    packed = pack_int32(codes, 2)
    assert packed.tolist() == [[_int32(0xC0000000)], [-(1 << 31)]]
    assert torch.equal(unpack_int32(packed, 2, 16).long(), codes)


def test_empty_inputs() -> None:
    assert pack_int32(torch.zeros(3, 0, dtype=torch.int64), 4).shape == (3, 0)
    assert unpack_int32(torch.zeros(3, 0, dtype=torch.int32), 4, 0).shape == (3, 0)
    assert pack_int32(torch.zeros(0, 5, dtype=torch.int64), 4).shape == (0, 1)


def test_unpack_ignores_extra_words() -> None:
    codes = torch.tensor([[5, 1, 7]])
    packed = torch.cat([pack_int32(codes, 3), torch.full((1, 2), -1, dtype=torch.int32)], dim=1)
    assert unpack_int32(packed, 3, 3).tolist() == [[5, 1, 7]]


def test_packed_width() -> None:
    assert packed_width(0, 4) == 0
    assert packed_width(8, 4) == 1
    assert packed_width(9, 4) == 2
    assert packed_width(32, 3) == 3
    assert packed_width(33, 3) == 4
    assert packed_width(576, 5) == 90
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        packed_width(-1, 4)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
        packed_width(4, 9)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
        pack_int32(torch.zeros(1, 4, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
        unpack_int32(torch.zeros(1, 4, dtype=torch.int32), bits, 4)


def test_non_int_bits() -> None:
    with pytest.raises(ValueError, match="bits must be an int"):
        pack_int32(torch.zeros(1, 4, dtype=torch.int64), 4.0)  # type: ignore[arg-type]


def test_codes_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"codes must be in \[0, 7\] for bits=3"):
        pack_int32(torch.tensor([[0, 8]]), 3)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\] for bits=4"):
        pack_int32(torch.tensor([[-1, 2]]), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_codes_wrong_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="codes must have an integer dtype"):
        pack_int32(torch.zeros(2, 4, dtype=dtype), 4)


def test_codes_wrong_rank() -> None:
    with pytest.raises(ValueError, match="codes must be 2-D"):
        pack_int32(torch.zeros(4, dtype=torch.int64), 4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_packed_wrong_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="packed must have dtype torch.int32"):
        unpack_int32(torch.zeros(2, 4, dtype=dtype), 4, 8)


def test_packed_wrong_rank() -> None:
    with pytest.raises(ValueError, match="packed must be 2-D"):
        unpack_int32(torch.zeros(4, dtype=torch.int32), 4, 8)


def test_negative_n() -> None:
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        unpack_int32(torch.zeros(2, 4, dtype=torch.int32), 4, -1)


def test_packed_too_narrow() -> None:
    packed = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="packed has 3 words per row but 25 codes of 4 bits need 4"):
        unpack_int32(packed, 4, 25)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_unpack_in_blocks_of_rows_matches_one_block(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    """Rows unpacked a few at a time (a ragged last block too) give the codes of a one-block unpack."""
    codes = torch.randint(0, 2**bits, (29, 77), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(codes, bits)
    monkeypatch.setattr(packing, "UNPACK_CODES", 4 * 77)
    assert torch.equal(unpack_int32(packed, bits, 77), codes.to(torch.uint8))
    monkeypatch.setattr(packing, "UNPACK_CODES", 1)  # below one row: one row per block
    assert torch.equal(unpack_int32(packed, bits, 77), codes.to(torch.uint8))
