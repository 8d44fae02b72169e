"""Layer-level bias compensation: the mean error of a whole decoder block's output, folded into one bias.

The bias goes to the module whose output adds unchanged to the block output (found by
:func:`optimum_bc.discovery.find_output_bias`). With ``sink_tokens = K`` the first ``K`` positions get their own
mean (an attention sink's error would otherwise dominate the all-token mean): the bias is the mean over positions
``>= K`` and, when the target is a packed layer, its ``sink_bias`` gets the first positions' difference on top. A
float target (a LayerNorm, a Linear left in float) cannot hold a per-position term; it gets the bias of the later
positions only.
"""

import logging

import torch
from torch import nn

from ..algorithms.compensation import Compensation, ResidualMean
from ..distributed import all_reduce_sum
from ..layers.packed_base import PackedLinearBase


logger = logging.getLogger(__name__)


class SinkResidualMean:
    """Streams ``r = target - output`` per position class: one class per sink position, one for all later ones."""

    def __init__(self, channels: int, sink_tokens: int, device: torch.device | None = None) -> None:
        self.sink_tokens = sink_tokens
        self.count = torch.zeros(sink_tokens + 1, device=device)
        self.sum_r = torch.zeros(sink_tokens + 1, channels, dtype=torch.float64, device=device)  # summed in float64
        self.sum_r2 = torch.zeros(sink_tokens + 1, channels, dtype=torch.float64, device=device)

    def add_batch(self, target: torch.Tensor, output: torch.Tensor, positions: torch.Tensor) -> None:
        """Add paired ``(tokens, channels)`` rows with each row's token position ``(tokens,)``."""
        r = target.float() - output.float()
        classes = positions.clamp(max=self.sink_tokens).to(r.device)
        self.count.index_add_(0, classes, torch.ones_like(classes, dtype=torch.float32))
        self.sum_r.index_add_(0, classes, r.double())
        self.sum_r2.index_add_(0, classes, (r * r).double())

    def reduce(self) -> None:
        """Sum the per-class sums over data-parallel ranks (no-op in one process); call once, before ``compensate``."""
        all_reduce_sum([self.count, self.sum_r, self.sum_r2], "the block residual sums per position class")

    def compensate(self, bias_dtype: torch.dtype, with_sink: bool) -> Compensation:
        """Bias of the later positions (plus the sink part if ``with_sink``); MSE over all tokens before/after."""
        total = float(self.count.sum())
        if total == 0:
            raise ValueError("bias compensation saw no calibration token (all padding?)")
        sum_r, sum_r2 = self.sum_r.float(), self.sum_r2.float()  # rounded once from the float64 sums
        mean = sum_r / self.count.clamp(min=1).unsqueeze(1)
        bias = (mean[-1] if self.count[-1] > 0 else sum_r.sum(0) / total).to(bias_dtype)
        applied = bias.float().expand_as(mean).clone()
        sink = None
        if with_sink and self.sink_tokens:
            sink = (mean[:-1] - bias.float()).to(bias_dtype)
            applied[:-1] += sink.float()
        before = sum_r2.sum(0) / total
        # sum over tokens of (r - b)^2 per class = sum_r2 - 2 b sum_r + n b^2
        after = (sum_r2 - 2 * applied * sum_r + self.count.unsqueeze(1) * applied * applied).sum(0) / total
        return Compensation(
            bias=bias, mse_before=float(before.mean()), mse_after=float(after.clamp(min=0).mean()), sink=sink
        )


def residual_accumulator(channels: int, sink_tokens: int, device: torch.device) -> ResidualMean | SinkResidualMean:
    """The all-token mean without sink tokens, else the per-class one."""
    return SinkResidualMean(channels, sink_tokens, device) if sink_tokens else ResidualMean(channels, device=device)


def fold_block_bias(target: nn.Module, comp: Compensation) -> tuple[bool, torch.Tensor, torch.Tensor | None]:
    """Add ``comp`` (float32) to ``target``'s bias (creating one if needed) and sink bias, summing in float32 and
    rounding once to the stored dtype; returns whether a bias was created and what the stored bias and sink bias
    actually gained (what the quantized stream must see)."""
    created = getattr(target, "bias", None) is None
    if created:
        reference = next(iter(target.parameters()), None)
        dtype = reference.dtype if reference is not None else torch.float32
        device = reference.device if reference is not None else comp.bias.device
        target.bias = nn.Parameter(torch.zeros(comp.bias.shape[0], dtype=dtype, device=device))
    old = target.bias.detach().float()
    target.bias.data = (old + comp.bias.float().to(old.device)).to(target.bias.dtype)
    added = target.bias.detach().float() - old
    added_sink = None
    if comp.sink is not None:
        old_sink = target.sink_bias.detach().float()
        target.set_sink_bias(old_sink + comp.sink.float().to(old_sink.device))
        added_sink = target.sink_bias.detach().float() - old_sink
    return created, added, added_sink


def holds_sink(target: nn.Module, name: str, sink_tokens: int) -> bool:
    """Whether ``target`` can hold the sink tokens' own bias (a packed layer with a ``sink_bias``); warns if not."""
    if not sink_tokens:
        return False
    if isinstance(target, PackedLinearBase) and target.sink_bias is not None:
        return True
    logger.warning(
        "optimum-bc: layer-level BC target %s is a float %s and cannot hold the first %d tokens' own bias; it gets "
        "the bias of the later tokens only",
        name,
        type(target).__name__,
        sink_tokens,
    )
    return False
