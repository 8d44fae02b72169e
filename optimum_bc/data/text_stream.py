"""Calibration windows from a large text without reading or tokenizing all of it.

Tokenizing a whole corpus in one call costs about 110 bytes of RAM per character (a 48 MB text needs 5.5 GB) for the
few thousand tokens calibration keeps. A :class:`TextSource` is a text made of pieces (in-memory strings and files,
read by offset, never whole); :func:`sample_streamed` draws each window's start offset with ``random.Random(seed)``,
reads a span there (aligned to the next whitespace), tokenizes only that span (doubling it while it holds fewer than
``seq_len`` tokens) and keeps its first ``seq_len`` tokens. Memory stays bounded by a few spans; the windows depend
only on the text, the tokenizer, ``seq_len`` and the seed.
"""

import codecs
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

#: a span first read for one window: this many characters (bytes for files) per wanted token.
UNITS_PER_TOKEN = 8
#: extra tokens a span must hold beyond seq_len, so a word cut at its end never reaches the window.
SPAN_MARGIN = 8
#: redraws of a start offset that gave an already drawn window before the text counts as exhausted.
MAX_REDRAWS = 64


@dataclass(frozen=True)
class _Piece:
    """An in-memory string (``size`` characters) or a UTF-8 file (``size`` bytes)."""

    size: int
    text: str | None = None
    path: Path | None = None

    def read(self, offset: int, length: int) -> str:
        if self.text is not None:
            return self.text[offset : offset + length]
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        skip = 0
        while skip < min(len(raw), 3) and offset + skip > 0 and raw[skip] & 0xC0 == 0x80:
            skip += 1  # started inside a multi-byte character: begin at the next one
        try:
            return codecs.getincrementaldecoder("utf-8")().decode(raw[skip:], final=False)
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{os.fspath(self.path)!r} is not UTF-8 text (byte offset {offset + skip + err.start}): convert it "
                "with e.g. iconv -t UTF-8, or pass only UTF-8 .txt files"
            ) from None


class TextSource:
    """A text made of pieces joined by ``separator``, read by offset; its ``size`` counts characters and bytes."""

    def __init__(self, pieces: Sequence[str | Path], separator: str) -> None:
        self.pieces: list[_Piece] = []
        for index, piece in enumerate(pieces):
            if index:
                self.pieces.append(_Piece(len(separator), text=separator))
            if isinstance(piece, Path):
                self.pieces.append(_Piece(piece.stat().st_size, path=piece))
                self.pieces[-1].read(0, 4096)  # a non-UTF-8 file fails now, naming it
            else:
                self.pieces.append(_Piece(len(piece), text=piece))
        self.size = sum(p.size for p in self.pieces)

    def read(self, offset: int, length: int) -> str:
        """The text of ``[offset, offset + length)`` (fewer units at the end)."""
        out, start = [], 0
        for piece in self.pieces:
            end = start + piece.size
            if end > offset and start < offset + length:
                lo = max(offset, start) - start
                out.append(piece.read(lo, min(offset + length, end) - start - lo))
            start = end
        return "".join(out)


def _aligned(text: str, at_start: bool) -> str:
    """``text`` from its first word start (a span drawn mid-word would begin with a word fragment)."""
    if at_start:
        return text
    for i, char in enumerate(text):
        if char.isspace():
            return text[i + 1 :]
    return ""


def sample_streamed(
    source: TextSource,
    tokenize: Callable[[str], torch.Tensor],
    num_samples: int,
    seq_len: int,
    seed: int,
) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` windows of ``seq_len`` tokens at seeded offsets of ``source`` (see the module docstring)."""
    rng = random.Random(seed)
    samples, seen = [], set()
    units = tokens = 0
    for _ in range(num_samples):
        for _ in range(MAX_REDRAWS):
            offset = rng.randrange(source.size)
            length = min(source.size, (seq_len + SPAN_MARGIN) * UNITS_PER_TOKEN)
            while True:
                start = min(offset, source.size - length)
                ids = tokenize(_aligned(source.read(start, length), start == 0))
                if ids.numel() >= seq_len + SPAN_MARGIN or length >= source.size:
                    break
                length = min(source.size, 2 * length)
            if ids.numel() < seq_len:
                raise ValueError(
                    f"the text has only {ids.numel()} tokens, fewer than seq_len={seq_len}; pass a longer text or "
                    "a smaller seq_len"
                )
            window = ids[:seq_len].clone().unsqueeze(0)
            key = tuple(window[0].tolist())
            if key not in seen:
                break
        else:
            logger.warning(
                "optimum-bc: num_samples=%d windows of seq_len=%d tokens: the text holds fewer distinct windows, "
                "some repeat; pass more text or fewer samples",
                num_samples,
                seq_len,
            )
        seen.add(key)
        units, tokens = units + length, tokens + ids.numel()
        samples.append({"input_ids": window, "attention_mask": torch.ones_like(window)})
    held = source.size * tokens / max(units, 1) / seq_len
    if num_samples > held:
        logger.warning(
            "optimum-bc: num_samples=%d windows of seq_len=%d tokens ask for more than the text holds (about %d "
            "windows): they overlap; pass more text or fewer samples",
            num_samples,
            seq_len,
            int(held),
        )
    return samples
