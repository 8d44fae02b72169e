"""What bias compensation runs on: a token budget, and the float outputs the report pairs without a pass of its own.

BC needs first moments only (the means of a layer's float and quantized inputs over the same tokens) and the
``bc_target="auto"`` race only a ranking of its streams; both settle on far fewer tokens than the weight method's
second moments (a GPTQ Hessian). So BC's input sums, the float stream (where only BC reads it), the race's other
streams and its scores run on the first calibration batches up to :data:`BC_TOKENS` tokens, the report's per-layer
MSEs on the first up to :data:`REPORT_TOKENS`; the weight method (GPTQ / COMQ statistics, ERQ's paired float inputs, static activation
scales, attention quantizers) keeps every window. The batches are chosen by their global index
(:func:`budget_batches`), so data-parallel ranks select what one process selects. Measured: docs/bc_auto.md, sixth
round.

The report's MSEs pair each compensated Linear's float output with its quantized output on the same tokens. The
float outputs come from the float block's one whole pass (stage 0), kept for the report's batches
(:class:`FloatOutputs`), so the pass to the next block measures them without running the float block again.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .. import distributed
from ..algorithms import get_algorithm
from ..config import BCQuantizationConfig
from .streams import _valid_rows, activation_bytes, activation_streams


#: Calibration tokens BC and the auto race run on (the first whole batches up to this many; at least one batch).
#: At least 4096: runs of up to 8 x 512 tokens are unchanged by it.
BC_TOKENS = 8192

#: Calibration tokens of the report's per-layer MSEs (the first whole batches up to this many, within BC's budget;
#: at least one batch): the float Linear outputs they pair are kept for these only (:class:`FloatOutputs`: every
#: Linear's output width per token, 1.4 GB at 8192 tokens for a 7B block, a quarter of it here). A diagnostic, so
#: a sample suffices.
REPORT_TOKENS = 2048


def budget_batches(
    valid_tokens: list[int], batch_ids: list[int], total_batches: int, limit: int | None = None
) -> tuple[int, int, int]:
    """(this rank's batches in the budget, the budget's batches over all ranks, the tokens they hold).

    ``valid_tokens``: the non-padding tokens of each local batch, ``batch_ids`` their global indices (a contiguous
    ascending range, :func:`optimum_bc.distributed.shard_range`), ``total_batches`` the count over all ranks. The
    budget takes the leading global batches whose tokens add up to at most ``limit`` (default :data:`BC_TOKENS`; at
    least the first); the token counts are summed over ranks first, so every rank decides as one process does, and its share is a
    prefix of its batches."""
    counts = torch.zeros(total_batches, dtype=torch.float64)
    for index, tokens in zip(batch_ids, valid_tokens, strict=True):
        counts[index] = tokens
    distributed.all_reduce_sum([counts], "the calibration batches' token counts")
    cumulative = counts.cumsum(0)
    limit = BC_TOKENS if limit is None else limit
    inside = max(int((cumulative <= limit).sum()), 1) if total_batches else 0
    local = sum(1 for index in batch_ids if index < inside)
    return local, inside, int(cumulative[inside - 1]) if inside else 0


def report_batches(valid_tokens: list[int], batch_ids: list[int], total_batches: int) -> tuple[int, int]:
    """(this rank's batches, their tokens over all ranks) of the report's MSEs: :func:`budget_batches` up to
    :data:`REPORT_TOKENS`, never beyond BC's own budget."""
    local, _, tokens = budget_batches(valid_tokens, batch_ids, total_batches, min(REPORT_TOKENS, BC_TOKENS))
    return local, tokens


def calibration_activation_bytes(
    config: BCQuantizationConfig, tokens: int, hidden_size: int, outputs: int, dtype: torch.dtype
) -> int:
    """Memory of the activations calibration keeps while a block is calibrated (``tokens``: all calibration
    tokens): the quantized stream and the float stream on every token (``streams.activation_bytes``); the race's
    other streams on the budget's tokens (at most :data:`BC_TOKENS`), or on every token where the weight method reads
    its inputs (the race of whole models, :mod:`optimum_bc.calibration.model_race`; counted so even where offloaded
    blocks take the shared-weight race: the safe side); with bias compensation, the float outputs the report pairs on
    :data:`REPORT_TOKENS` (:class:`FloatOutputs`; ``outputs``: the sum of the block's Linear output widths)."""
    base = 1 + int(config.needs_float_stream)
    race = activation_streams(config) - base
    kept = min(tokens, BC_TOKENS)
    raced = tokens if get_algorithm(config.method).needs_inputs else kept
    size = torch.empty((), dtype=dtype).element_size()
    reported = min(tokens, REPORT_TOKENS, BC_TOKENS)
    on_budget = reported * size * (outputs if config.bias_compensation else 0) + raced * size * 2 * hidden_size * race
    return activation_bytes(tokens, hidden_size, dtype, base) + on_budget


def weights_read_every_window(config: BCQuantizationConfig, needs_inputs: bool, needs_float_inputs: bool) -> bool:
    """Whether anything but BC reads the quantized stream beyond the budget: the weight method's statistics, static
    activation scales, attention quantizers. Otherwise (RTN + BC) calibration runs on the budget batches alone."""
    return needs_inputs or needs_float_inputs or config.act_bits is not None or config.act_attention


class FloatOutputs:
    """The float block's outputs of the compensated Linears (non-padding rows) on the report's batches, recorded in
    its stage-0 pass; with ``groups`` (each Linear's group: the first name of the Linears sharing its input), also
    the raw input of each group (the float target's residual ``W x - Q Q_a(x)`` needs it once ``Q`` and the input
    quantizer exist). Kept on ``store``."""

    def __init__(self, groups: dict[str, str], inputs: bool, store: torch.device) -> None:
        self.groups = groups
        self.keep_inputs = inputs
        self.store = store
        self.outputs: list[dict[str, torch.Tensor]] = []
        self.inputs: list[dict[str, torch.Tensor]] = []

    @contextmanager
    def recording(self, fblock: nn.Module, valid: torch.Tensor) -> Iterator[None]:
        """Record one batch (``valid``: its non-padding mask) during the float block's forward inside."""
        outputs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str) -> None:
            outputs[name] = _valid_rows(output.detach(), valid).to(self.store)
            if self.keep_inputs and self.groups[name] == name:
                inputs[name] = args[0].detach().to(self.store)

        handles = [
            fblock.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in self.groups
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.outputs.append(outputs)
        self.inputs.append(inputs)

    def float_input(self, batch: int, name: str) -> torch.Tensor:
        """The raw float input ``(batch, tokens, in)`` of Linear ``name`` in budget batch ``batch``."""
        return self.inputs[batch][self.groups[name]]

    def __len__(self) -> int:
        return len(self.outputs)
