"""Bias compensation (Gong et al., arXiv 2404.01892): the closed-form bias that cancels the mean output error.

For a target output ``Y`` and a quantized output ``Ŷ`` the bias ``b* = mean_tokens(Y - Ŷ)`` minimises
``||Y - Ŷ - b||²`` (convex, closed form), so on the calibration tokens the error can only go down:
``E||r - b*||² = E||r||² - ||E r||²``.

For a Linear layer the residual is linear in the inputs, so everything needed is a few streamed moments:

* ``"float"`` target (the reference code's): both layers see the float model's input ``x``:
  ``r = (W - Q) x``, so ``b = (W - Q) E[x]`` and ``E[r_c²] = d_c E[x xᵀ] d_cᵀ`` with ``d = W - Q``.
* ``"sequential"`` target: the float layer sees the float model's input ``x``, the quantized layer the quantized
  prefix's input ``x̂``; with ``δ = x - x̂``: ``r = (W - Q) x + Q δ``, so ``b = (W - Q) E[x] + Q E[δ]`` and
  ``E[r_c²] = d_c E[x xᵀ] d_cᵀ + 2 d_c E[x δᵀ] Q_cᵀ + Q_c E[δ δᵀ] Q_cᵀ``.

All moments are taken over valid (non-padding) tokens only: each batch's sums in float32, added up in float64 and
rounded to float32 once when used, so the result hardly depends on the order of the batches (data-parallel ranks add
the same batch sums in another order, :mod:`optimum_bc.distributed`).

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
    """Bias of one layer and its per-element output MSE on the calibration tokens before and after adding it.

    With a ``base`` bias given to ``compensate``, ``bias`` is the new stored bias (base + compensation, rounded once)
    and ``added`` what it adds to the base, in float32.
    """

    bias: torch.Tensor  # (out,), or (positions, out) for the position granularity
    mse_before: float
    mse_after: float
    sink: torch.Tensor | None = None  # (sink_tokens, out): extra bias of the first positions, on top of ``bias``
    added: torch.Tensor | None = None


class InputMoments:
    """Streams the input moments of one Linear (or of several sharing an input) for bias compensation."""

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
        # Per-class moments: one class per position, or one per sink position plus one for all later positions.
        classes = positions if positions is not None else (sink_tokens + 1 if sink_tokens else None)
        self.classes = classes
        if classes is not None:
            self.count_pos = torch.zeros(classes, device=device)
            self.sum_x_pos = torch.zeros(classes, in_features, dtype=torch.float64, device=device)
            self.sum_delta_pos = torch.zeros(classes, in_features, dtype=torch.float64, device=device)
        self.num_tokens = 0
        zeros_vec = torch.zeros(in_features, dtype=torch.float64, device=device)
        zeros_mat = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.sum_x = zeros_vec.clone()
        self.xx = zeros_mat.clone()
        if target == "sequential":
            self.sum_delta = zeros_vec.clone()
            self.x_delta = zeros_mat.clone()
            self.delta_delta = zeros_mat.clone()

    def add_batch(
        self, x_float: torch.Tensor, x_quant: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> None:
        """Add paired inputs ``(tokens, in)``: the float model's and (sequential target) the quantized prefix's.

        ``positions`` (``(tokens,)`` long) gives each row's token position; needed for the position granularity.
        """
        x = x_float.float()
        self.num_tokens += x.shape[0]
        self.sum_x += x.sum(0)
        self.xx += x.T @ x
        delta = None
        if self.target == "sequential":
            if x_quant is None:
                raise ValueError("the sequential target needs the quantized prefix's inputs as well")
            delta = x - x_quant.float()
            self.sum_delta += delta.sum(0)
            self.x_delta += x.T @ delta
            self.delta_delta += delta.T @ delta
        if self.classes is not None:
            if positions is None:
                raise ValueError("position-dependent compensation needs each row's token position")
            if self.sink_tokens:
                positions = positions.clamp(max=self.sink_tokens)
            elif int(positions.max()) >= self.positions:
                raise ValueError(f"position granularity needs token positions below {self.positions} for every row")
            self.count_pos.index_add_(0, positions, torch.ones_like(positions, dtype=torch.float32))
            self.sum_x_pos.index_add_(0, positions, x.double())
            if delta is not None:
                self.sum_delta_pos.index_add_(0, positions, delta.double())

    def reduce(self) -> None:
        """Sum the moments over data-parallel ranks (:mod:`optimum_bc.distributed`; no-op in one process); call
        once, after the last ``add_batch`` and before ``compensate``."""
        names = ("sum_x", "xx", "sum_delta", "x_delta", "delta_delta", "count_pos", "sum_x_pos", "sum_delta_pos")
        all_reduce_sum([getattr(self, n) for n in names if hasattr(self, n)], "the bias-compensation moments")
        self.num_tokens = all_reduce_count(self.num_tokens, "the bias-compensation token count")

    def compensate(
        self, W: torch.Tensor, Q: torch.Tensor, bias_dtype: torch.dtype, base: torch.Tensor | None = None
    ) -> Compensation:
        """Closed-form bias for a layer with float weight ``W`` and quantized weight ``Q`` (both ``[out, in]``).

        ``base``: the layer's existing bias. The returned ``bias`` is then ``base + compensation``, summed in float32
        and rounded to ``bias_dtype`` once (adding a rounded compensation to a bf16 bias rounds twice: a median 10 %
        of the compensation lost, some channels all of it), and ``mse_after`` is that of the stored bias.
        """
        if self.num_tokens == 0:
            raise ValueError("bias compensation saw no calibration token (all padding?)")
        n = self.num_tokens
        W = W.float().to(self.xx.device)
        Q = Q.float().to(self.xx.device)
        d = W - Q
        mean_r = d @ (self.sum_x.float() / n)
        sq_r = ((d @ self.xx.float()) * d).sum(1) / n
        if self.target == "sequential":
            mean_r = mean_r + Q @ (self.sum_delta.float() / n)
            sq_r = (
                sq_r
                + (2 * (d @ self.x_delta.float()) * Q).sum(1) / n
                + ((Q @ self.delta_delta.float()) * Q).sum(1) / n
            )
        base = None if base is None else base.detach().float().to(mean_r.device)
        if self.classes is not None:
            return self._compensate_positions(d, Q, sq_r, bias_dtype, base)
        bias, b = _fold(mean_r, base, bias_dtype)
        after = sq_r - 2 * b * mean_r + b * b
        return Compensation(
            bias=bias, mse_before=float(sq_r.mean()), mse_after=float(after.clamp(min=0).mean()), added=b
        )

    def residual_power(self, W: torch.Tensor, Q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-channel ``E[r²]`` of the float target's residual and (with its moments) the sequential one's."""
        W = W.float().to(self.xx.device)
        Q = Q.float().to(self.xx.device)
        d = W - Q
        n = max(self.num_tokens, 1)
        power = {"float": ((d @ self.xx.float()) * d).sum(1) / n}
        if self.target == "sequential":
            cross = (2 * (d @ self.x_delta.float()) * Q).sum(1) / n + ((Q @ self.delta_delta.float()) * Q).sum(1) / n
            power["sequential"] = power["float"] + cross
        return power

    def _compensate_positions(
        self,
        d: torch.Tensor,
        Q: torch.Tensor,
        sq_r: torch.Tensor,
        bias_dtype: torch.dtype,
        base: torch.Tensor | None,
    ) -> Compensation:
        """Per-class means ``b[t]`` (classes never seen get no bias); for sink tokens split into bias + sink part.

        The position table is a separate buffer (``base`` is not folded into it); the sink split folds like
        :meth:`compensate`: the per-channel part into ``base``, the sink rows relative to that stored bias.
        """
        count = self.count_pos.clamp(min=1).unsqueeze(1)
        mean_pos = (self.sum_x_pos.float() / count) @ d.T  # (classes, out)
        if self.target == "sequential":
            mean_pos = mean_pos + (self.sum_delta_pos.float() / count) @ Q.T
        sink = None
        if self.sink_tokens:
            bias, added = _fold(mean_pos[-1], base, bias_dtype)
            sink = (mean_pos[:-1] - added).to(bias_dtype)
            b = torch.cat([added + sink.float(), added[None]])
        else:
            bias = mean_pos.to(bias_dtype)
            b = bias.float()
        weight = (self.count_pos / self.num_tokens).unsqueeze(1)
        after = sq_r - (weight * (2 * b * mean_pos - b * b)).sum(0)
        return Compensation(
            bias=bias, mse_before=float(sq_r.mean()), mse_after=float(after.clamp(min=0).mean()), sink=sink
        )


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
