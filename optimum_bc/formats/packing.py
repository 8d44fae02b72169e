"""Bit-packing of low-bit integer codes into int32 words.

Each row of codes is laid out as one little-endian bit stream: code ``k`` occupies stream bits
``[k * bits, (k + 1) * bits)`` and word ``w`` holds stream bits ``[32 * w, 32 * w + 32)`` with bit 0 the least
significant bit. Codes may straddle two words (3, 5, 6 and 7 bits), so no bit is wasted. Words are stored as
int32 (two's complement) because that is the dtype checkpoints of low-bit linear layers use.

The work is done in int64 with whole-tensor ops (no Python loop over elements), so it is fast on CPU and GPU.
:func:`unpack_int32` works through blocks of rows (:data:`UNPACK_CODES` codes at a time) into its uint8 result, so
its int64 temporaries stay a few MiB whatever the tensor's size instead of ~30 bytes a code.
"""

import torch


MIN_BITS = 2
MAX_BITS = 8
_WORD_BITS = 32
_WORD_MASK = (1 << _WORD_BITS) - 1
#: Codes packed per block of rows by :func:`pack_int32`.
PACK_BLOCK = 1 << 16
#: Codes unpacked per block of rows: the int64 temporaries of a block (about 32 bytes a code) stay near 8 MiB.
UNPACK_CODES = 1 << 18


def _check_bits(bits: int) -> None:
    """Reject bit widths outside the supported range (and non-integers, including bools)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for integer dtypes (signed or unsigned), false for float, complex and bool."""
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words needed to hold ``n`` codes of ``bits`` bits each."""
    _check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return (n * bits + _WORD_BITS - 1) // _WORD_BITS


def _code_positions(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset inside that word of the first bit of each of ``n`` codes."""
    start = torch.arange(n, dtype=torch.int64, device=device) * bits
    return start // _WORD_BITS, start % _WORD_BITS


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[rows, n]`` in ``[0, 2**bits - 1]`` into int32 words ``[rows, packed_width(n, bits)]``."""
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if not _is_integer_dtype(codes.dtype):
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, n], got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    max_code = (1 << bits) - 1
    if codes.numel() > 0 and not codes.is_meta:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > max_code:
            raise ValueError(f"codes must be in [0, {max_code}] for bits={bits}, got values in [{lo}, {hi}]")

    width = packed_width(n, bits)
    word, offset = _code_positions(n, bits, codes.device)
    packed = torch.empty(rows, width, dtype=torch.int32, device=codes.device)
    # A block of rows at a time: the int64 temporaries (~30 bytes a code) stay near PACK_BLOCK codes, not the layer.
    step = max(1, PACK_BLOCK // max(n, 1))
    for start in range(0, rows, step):
        values = codes[start : start + step].to(torch.int64)
        # One spare word absorbs the (always zero) spill of the last code when it does not straddle.
        words = torch.zeros(values.shape[0], width + 1, dtype=torch.int64, device=codes.device)
        shifted = values << offset
        # Codes never overlap, so adding their bit patterns is the same as OR-ing them.
        words.index_add_(1, word, shifted & _WORD_MASK)
        words.index_add_(1, word + 1, shifted >> _WORD_BITS)
        words = words[:, :width]
        # Reinterpret unsigned 32-bit values as two's complement int32.
        packed[start : start + step] = torch.where(words >= (1 << 31), words - (1 << _WORD_BITS), words)
    return packed


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: recover the first ``n`` codes of each row as uint8 ``[rows, n]``."""
    _check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.int32:
        raise ValueError(f"packed must have dtype torch.int32, got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D [rows, words], got shape {tuple(packed.shape)}")
    rows, have = packed.shape
    need = packed_width(n, bits)
    if have < need:
        raise ValueError(f"packed has {have} words per row but {n} codes of {bits} bits need {need}")

    codes = torch.empty(rows, n, dtype=torch.uint8, device=packed.device)
    if rows == 0 or n == 0:
        return codes
    word, offset = _code_positions(n, bits, packed.device)
    high_shift = _WORD_BITS - offset
    step = max(1, UNPACK_CODES // n)
    for start in range(0, rows, step):
        block = slice(start, min(rows, start + step))
        words = packed[block, :need].to(torch.int64) & _WORD_MASK
        # A zero spare word lets every code read "its word and the next one" without bounds checks.
        words = torch.cat([words, words.new_zeros(words.shape[0], 1)], dim=1)
        low = words[:, word] >> offset
        # Only the low ``bits - 1`` bits of the next word can belong to a code, so masking keeps the shift in range.
        high = (words[:, word + 1] & 0xFF) << high_shift
        codes[block] = low.bitwise_or_(high).bitwise_and_((1 << bits) - 1)
    return codes
