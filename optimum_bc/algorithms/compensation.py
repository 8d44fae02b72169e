"""Bias compensation (Gong et al., arXiv 2404.01892): the closed-form bias that cancels the mean output error.

For a target output ``Y`` and a quantized output ``Ŷ`` the bias ``b* = mean_tokens(Y - Ŷ)`` minimises
``||Y - Ŷ - b||²`` (convex, closed form), so on the calibration tokens the error can only go down:
``E||r - b*||² = E||r||² - ||E r||²``.

For a Linear layer the residual is linear in the inputs, so the bias needs only first moments of the inputs:

* ``"float"`` target (the reference code's): both layers see the float model's input ``x``:
  ``r = (W - Q) x``, so ``b = (W - Q) E[x]``.
* ``"sequential"`` target: the float layer sees the float model's input ``x``, the quantized layer the quantized
  prefix's input ``x̂``; with ``δ = x - x̂``: ``r = (W - Q) x + Q δ``, so ``b = (W - Q) E[x] + Q E[δ]``, and
  ``E[δ] = E[x] - E[x̂]`` over the same tokens: the float and quantized passes need not run together.

All sums are taken over valid (non-padding) tokens only, added up in float64 and rounded to float32 once when used,
so the result hardly depends on the order of the batches (data-parallel ranks add the same batch sums in another
order, :mod:`optimum_bc.distributed`). The report's MSEs before / after the bias come from the residual itself,
streamed as per-channel sums of ``r`` and ``r²`` (:class:`ResidualMoments`), not from ``in x in`` input moments.

With ``positions`` (the reference code's default granularity) the mean is taken per token position instead of over
all tokens: ``b[t] = (W - Q) E[x | t] (+ Q E[δ | t])``, a ``[positions, out]`` table that cannot fold into a bias.

With ``sink_tokens = K`` the positions ``t < K`` each get their own mean and all later positions share one: the
per-channel bias is the mean over positions ``>= K`` (it folds into the layer bias) and the first ``K`` positions get
``b[t] - b`` on top. In LLaMA-family models the first token is an attention sink whose activations are orders of
magnitude larger than the others; its error dominates an all-token mean, and the bias that mean gives is wrong for
every other token.
"""

from dataclasses import dataclass

import torch

from ..distributed import all_reduce_count, all_reduce_sum


BC_TARGETS = ("float", "sequential")
#: What ``BCQuantizationConfig.bc_target`` accepts: "auto" lets each block choose (:mod:`optimum_bc.bc_select`).
BC_TARGET_CHOICES = ("auto", *BC_TARGETS)
BC_GRANULARITIES = ("channel", "position")


@dataclass(frozen=True)
class Compensation:
    """Bias of one layer and, where the residual itself was streamed, its per-element output MSE on the calibration
    tokens before and after adding it (:class:`InputMoments` streams first moments only: its MSEs are None and come
    from :class:`ResidualMoments`).

    With a ``base`` bias given to ``compensate``, ``bias`` is the new stored bias (base + compensation, rounded once)
    and ``added`` what it adds to the base, in float32. ``applied``: per position class, what the layer adds on top
    of its base bias (float32, ``[classes, out]``): what :meth:`ResidualMoments.mse` takes.
    """

    bias: torch.Tensor  # (out,), or (positions, out) for the position granularity
    mse_before: float | None = None
    mse_after: float | None = None
    sink: torch.Tensor | None = None  # (sink_tokens, out): extra bias of the first positions, on top of ``bias``
    added: torch.Tensor | None = None
    applied: torch.Tensor | None = None


def position_classes(positions: torch.Tensor, classes: int) -> torch.Tensor:
    """The position class of each row: its position, the last class taking every later position (one class: all)."""
    return positions.clamp(max=classes - 1)


class InputMoments:
    """Streams the first input moments of one Linear (or of several sharing an input) for bias compensation: per
    position class the token count and the sums of the float model's inputs ``x`` and (sequential target) of the
    quantized prefix's ``x̂``. The float and quantized inputs may come from separate passes (``add_float`` /
    ``add_quant``) over the same tokens: ``sum δ = sum x - sum x̂``."""

    def __init__(
        self,
        in_features: int,
        target: str,
        device: torch.device | None = None,
        positions: int | None = None,
        sink_tokens: int = 0,
    ) -> None:
        if target not in BC_TARGETS:
            raise ValueError(f"bc_target={target!r} is not supported; use one of {BC_TARGETS}")
        if positions is not None and sink_tokens:
            raise ValueError("positions and sink_tokens are exclusive: the position table already covers every token")
        self.target = target
        self.positions = positions
        self.sink_tokens = sink_tokens
        # One class per position, or one per sink position plus one for all later positions, or one for all tokens.
        self.classes = positions if positions is not None else sink_tokens + 1
        # Summed in float64 (data-parallel ranks reduce them), read back as float32 once.
        self.count = torch.zeros(self.classes, dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(self.classes, in_features, dtype=torch.float64, device=device)
        if target == "sequential":
            self.count_q = torch.zeros(self.classes, dtype=torch.float64, device=device)
            self.sum_xq = torch.zeros(self.classes, in_features, dtype=torch.float64, device=device)

    def _classes(self, rows: int, positions: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if self.positions is None and not self.sink_tokens:
            return torch.zeros(rows, dtype=torch.long, device=device)
        if positions is None:
            raise ValueError("position-dependent compensation needs each row's token position")
        if self.positions is not None and int(positions.max()) >= self.positions:
            raise ValueError(f"position granularity needs token positions below {self.positions} for every row")
        return position_classes(positions, self.classes).to(device)

    def add_float(self, x_float: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Add the float model's inputs ``(tokens, in)``; ``positions`` ``(tokens,)`` gives each row's token position
        (needed for the position granularity and sink tokens)."""
        classes = self._classes(x_float.shape[0], positions, self.sum_x.device)
        self.count.index_add_(0, classes, torch.ones_like(classes, dtype=torch.float64))
        self.sum_x.index_add_(0, classes, x_float.double())

    def add_quant(self, x_quant: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Add the quantized prefix's inputs ``(tokens, in)`` of the same tokens (sequential target)."""
        if self.target != "sequential":
            return
        classes = self._classes(x_quant.shape[0], positions, self.sum_xq.device)
        self.count_q.index_add_(0, classes, torch.ones_like(classes, dtype=torch.float64))
        self.sum_xq.index_add_(0, classes, x_quant.double())

    def add_batch(
        self, x_float: torch.Tensor, x_quant: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> None:
        """Add paired inputs ``(tokens, in)``: the float model's and (sequential target) the quantized prefix's."""
        if self.target == "sequential" and x_quant is None:
            raise ValueError("the sequential target needs the quantized prefix's inputs as well")
        self.add_float(x_float, positions)
        if x_quant is not None:
            self.add_quant(x_quant, positions)

    @property
    def num_tokens(self) -> int:
        return int(self.count.sum())

    def reduce(self) -> None:
        """Sum the moments over data-parallel ranks (:mod:`optimum_bc.distributed`; no-op in one process); call
        once, after the last ``add_batch`` and before ``compensate``."""
        names = ("count", "sum_x", "count_q", "sum_xq")
        all_reduce_sum([getattr(self, n) for n in names if hasattr(self, n)], "the bias-compensation moments")

    def mean_residual(self, W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """Per class the mean residual ``[classes, out]``: ``(W - Q) E[x]`` (+ ``Q E[δ]``, sequential target)."""
        if self.num_tokens == 0:
            raise ValueError("bias compensation saw no calibration token (all padding?)")
        if self.target == "sequential" and not torch.equal(self.count, self.count_q):
            raise ValueError(
                "the float and quantized inputs of bias compensation cover different tokens "
                f"({int(self.count.sum())} against {int(self.count_q.sum())}); both passes must see every batch"
            )
        W = W.float().to(self.sum_x.device)
        Q = Q.float().to(self.sum_x.device)
        count = self.count.float().clamp(min=1).unsqueeze(1)
        mean = (self.sum_x.float() / count) @ (W - Q).T
        if self.target == "sequential":
            mean = mean + ((self.sum_x - self.sum_xq).float() / count) @ Q.T
        return mean

    def compensate(
        self, W: torch.Tensor, Q: torch.Tensor, bias_dtype: torch.dtype, base: torch.Tensor | None = None
    ) -> Compensation:
        """Closed-form bias for a layer with float weight ``W`` and quantized weight ``Q`` (both ``[out, in]``).

        ``base``: the layer's existing bias. The returned ``bias`` is then ``base + compensation``, summed in float32
        and rounded to ``bias_dtype`` once (adding a rounded compensation to a bf16 bias rounds twice: a median 10 %
        of the compensation lost, some channels all of it); ``applied`` is what the stored bias really adds.

        Per-class means ``b[t]`` (a position never seen gets no bias); with sink tokens the bias is the later
        positions' mean and the sink rows the first positions' difference to it. The position table is a separate
        buffer (``base`` is not folded into it).
        """
        mean = self.mean_residual(W, Q)
        base = None if base is None else base.detach().float().to(mean.device)
        if self.positions is not None:
            bias = mean.to(bias_dtype)
            return Compensation(bias=bias, applied=bias.float())
        if self.sink_tokens:
            bias, added = _fold(mean[-1], base, bias_dtype)
            sink = (mean[:-1] - added).to(bias_dtype)
            applied = torch.cat([added + sink.float(), added[None]])
            return Compensation(bias=bias, sink=sink, added=added, applied=applied)
        bias, added = _fold(mean[0], base, bias_dtype)
        return Compensation(bias=bias, added=added, applied=added[None])


class ResidualMoments:
    """Streams, per output channel and position class, the count and the sums of ``r`` and ``r²`` of a layer's
    residual ``r`` (float output - quantized output, before compensation): the report's MSE for ANY bias ``b`` then
    follows in closed form, ``E[(r - b)²] = E[r²] - 2 b E[r] + b²``, so the candidates of ``bc_target="auto"`` and the
    guard taking biases back need no new pass. Summed in float64 (data-parallel ranks reduce them before use)."""

    def __init__(self, channels: int, classes: int = 1, device: torch.device | None = None) -> None:
        self.count = torch.zeros(classes, dtype=torch.float64, device=device)
        self.sum_r = torch.zeros(classes, channels, dtype=torch.float64, device=device)
        self.sum_r2 = torch.zeros(classes, channels, dtype=torch.float64, device=device)

    def add_batch(self, residual: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Add residual rows ``(tokens, out)`` with their token positions ``(tokens,)`` (needed with several
        classes: the last class takes every later position)."""
        r = residual.double()
        classes = self.count.shape[0]
        if classes == 1:
            index = torch.zeros(r.shape[0], dtype=torch.long, device=r.device)
        elif positions is None:
            raise ValueError("a per-position-class residual needs each row's token position")
        else:
            index = position_classes(positions, classes).to(r.device)
        index = index.to(self.count.device)
        self.count.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        self.sum_r.index_add_(0, index, r.to(self.sum_r.device))
        self.sum_r2.index_add_(0, index, (r * r).to(self.sum_r.device))

    def reduce(self) -> None:
        """Sum over data-parallel ranks (no-op in one process); call once, before ``mse``."""
        all_reduce_sum([self.count, self.sum_r, self.sum_r2], "the layer residual sums")

    def mse(self, bias: torch.Tensor | None = None) -> float:
        """Per-element ``E[(r - b)²]`` over every token, ``bias`` ``[out]`` or per class ``[classes, out]`` (None:
        no bias, the MSE before compensation)."""
        total = float(self.count.sum())
        if total == 0:
            raise ValueError("the layer residual saw no calibration token (all padding?)")
        sq = self.sum_r2.sum()
        if bias is not None:
            b = bias.double().to(self.sum_r.device).expand_as(self.sum_r)
            sq = sq - 2 * (b * self.sum_r).sum() + (self.count[:, None] * b * b).sum()
        return max(float(sq) / (total * self.sum_r.shape[1]), 0.0)


def _fold(mean_r: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored bias ``round(base + mean_r)`` in ``dtype``, the float32 compensation it really adds to ``base``)."""
    if base is None:
        stored = mean_r.to(dtype)
        return stored, stored.float()
    stored = (base + mean_r).to(dtype)
    return stored, stored.float() - base


class ResidualMean:
    """Streams ``r = target - output`` of a whole block (per channel) for layer-level compensation."""

    def __init__(self, channels: int, device: torch.device | None = None) -> None:
        self.num_tokens = 0
        self.sum_r = torch.zeros(channels, dtype=torch.float64, device=device)  # batch sums added in float64
        self.sum_r2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add_batch(self, target: torch.Tensor, output: torch.Tensor) -> None:
        """Add paired ``(tokens, channels)`` rows."""
        r = target.float() - output.float()
        self.num_tokens += r.shape[0]
        self.sum_r += r.sum(0)
        self.sum_r2 += (r * r).sum(0)

    def reduce(self) -> None:
        """Sum over data-parallel ranks (no-op in one process); call once, before ``compensate``."""
        all_reduce_sum([self.sum_r, self.sum_r2], "the block residual sums")
        self.num_tokens = all_reduce_count(self.num_tokens, "the block residual token count")

    def compensate(self, bias_dtype: torch.dtype, base: torch.Tensor | None = None) -> Compensation:
        """The bias ``mean(r)`` (folded into ``base`` in float32 and rounded once) and the MSE before/after it."""
        if self.num_tokens == 0:
            raise ValueError("bias compensation saw no calibration token (all padding?)")
        mean_r = self.sum_r.float() / self.num_tokens
        sq_r = self.sum_r2.float() / self.num_tokens
        base = None if base is None else base.detach().float().to(mean_r.device)
        bias, b = _fold(mean_r, base, bias_dtype)
        after = sq_r - 2 * b * mean_r + b * b
        return Compensation(
            bias=bias, mse_before=float(sq_r.mean()), mse_after=float(after.clamp(min=0).mean()), added=b
        )
