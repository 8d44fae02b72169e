"""``bc_target="auto"``'s held-out windows: the race of whole models is scored on calibration windows no candidate
was fitted on.

The race of whole models (:mod:`optimum_bc.calibration.model_race`) fits every candidate's weights, biases and
activation scales on the calibration windows. Scored on those same windows it misranked the candidates on the
coarsest grids of the packaged model (docs/bc_auto.md, eighth round: ERQ 2-bit g64 chose a biased model with 2.8x
the held-out perplexity of BC off, its calibration KL 0.83 against 1.03). So one window in
:data:`HELD_OUT_EVERY` (by global index, so data-parallel ranks split as one process does; at most BC's token budget
of them) is kept out of every candidate's fit: each candidate's finished blocks and the float model run them, and the
final score is measured on them. The price is fitting on 7/8 of the windows.

With too few windows to hold one out and keep at least :data:`~optimum_bc.algorithms.bc_select.FOLDS` batches to fit
on, the race is scored on the fitted windows (the stated fallback, said in the report's ``bc_summary``).
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

from ..algorithms.bc_select import FOLDS
from .bc_budget import BC_TOKENS


T = TypeVar("T")

#: One calibration window in this many (the last of every group, by global index) is held out of the fit.
HELD_OUT_EVERY = 8


def split_held_out(
    windows: Sequence[T], batch_size: int, tokens: Callable[[T], int], limit: int = BC_TOKENS
) -> tuple[list[T], list[T]]:
    """``(fit, held_out)``: every :data:`HELD_OUT_EVERY`-th window held out (global indices 7, 15, ...) while their
    ``tokens`` add up to at most ``limit`` (one window at least); the rest, in order, to fit on. ``(windows, [])``
    when that would leave fewer than :data:`~optimum_bc.algorithms.bc_select.FOLDS` batches of ``batch_size`` to
    fit on, or there are fewer than :data:`HELD_OUT_EVERY` windows."""
    held: list[int] = []
    total = 0
    for index in range(HELD_OUT_EVERY - 1, len(windows), HELD_OUT_EVERY):
        count = tokens(windows[index])
        if held and total + count > limit:
            break
        held.append(index)
        total += count
    kept_out = set(held)
    fit = [w for i, w in enumerate(windows) if i not in kept_out]
    if not held or -(-len(fit) // max(batch_size, 1)) < FOLDS:
        return list(windows), []
    return fit, [windows[i] for i in held]
