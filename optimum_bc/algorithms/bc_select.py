"""``bc_target="auto"``: the candidates of bias compensation, the rules that choose between them, and their math.

No single BC variant is best everywhere (measured on the packaged model, ``benchmarks/bc_auto.py``): the float target
with the first-token (sink) bias wins for RTN on mxfp4 and GPTQ at 3 bits, the sequential target for RTN at 3 bits,
the sink bias helps some cells and hurts others. Each variant is the least-squares optimum of the layer error it was
fitted on, so the layer-local error cannot choose between them; and a block's own output error cannot either: it
prefers the sequential target almost everywhere, while the effect of a block's bias shows up downstream.

So by default the choice is made for the whole model by a race (:mod:`optimum_bc.calibration.auto_race`): one
quantized stream per mode of :data:`RACE_MODES` runs through the blocks, each with the biases its mode fits on all
calibration batches, and the stream that ends closest to the float model wins. ``"none"`` (BC off) is a candidate:
the race's guard.

With layer-level BC (``bc_layer``, whose block bias the streams do not track) each block chooses on its own
(:func:`choose_block_mode`): each of :data:`MODES` sets every compensated Linear of the block to the biases it fits
on one half of the calibration batches (2-fold split by the batch's global index, so data-parallel ranks split as
one process does), the block runs on the other half, and the candidate's score is the RMS-normalised squared error of
the block output against the float model's, summed over both halves; the lowest wins and is refitted on all batches.
With fewer than two calibration batches (too small to hold out; the race is not run either) every block takes
:func:`fallback_mode` and the report says so.

All candidates come from the same streamed first moments: per fold and position class (sink positions, then all later
ones) the sums of the float inputs and of the quantized inputs give the sums of the float target's residual
``(W - Q) x`` and of the sequential one's ``(W - Q) x + Q (x - x̂)`` (see :mod:`optimum_bc.compensation`).
"""

from dataclasses import dataclass, field

import torch

from ..distributed import all_reduce_sum
from .compensation import ResidualMoments


#: Candidates, in the order ties are broken (the simplest first).
MODES = ("none", "float", "float+sink", "sequential", "sequential+sink")
#: Folds of the held-out split (batches alternate between them).
FOLDS = 2


def modes_for(sink_tokens: int) -> tuple[str, ...]:
    """The candidates when the layers hold ``sink_tokens`` sink rows (none: no "+sink" candidate)."""
    return MODES if sink_tokens else tuple(m for m in MODES if not m.endswith("+sink"))


#: The whole-model candidates of the race (:mod:`optimum_bc.calibration.auto_race`), in the order ties are broken.
#: One stream per mode runs through the model: shrink this tuple to cut passes ("none" is the BC-off guard).
RACE_MODES = ("none", "float+sink", "sequential", "sequential+sink")


def race_modes(sink_tokens: int) -> tuple[str, ...]:
    """The race's candidates when the layers hold ``sink_tokens`` sink rows (none: the "+sink" modes drop their sink,
    duplicates removed, and the float target joins as "float")."""
    if sink_tokens:
        return RACE_MODES
    return tuple(dict.fromkeys(m.removesuffix("+sink") for m in RACE_MODES))


def fallback_mode(sink_tokens: int) -> str:
    """The stated rule when nothing can be held out: the sequential target, with the sink bias when layers hold one
    (the variant measured best with GPTQ, the default method)."""
    return "sequential+sink" if sink_tokens else "sequential"


class FoldInputSums:
    """Streams, per fold and position class, the token count and the sums of the float inputs ``x`` and of the
    quantized prefix's ``x̂`` of one input (``sum δ = sum x - sum x̂``: the two passes need not run together)."""

    def __init__(self, in_features: int, sink_tokens: int, device: torch.device | None = None) -> None:
        self.sink_tokens = sink_tokens
        classes = sink_tokens + 1
        # Summed in float64 (like every statistic data-parallel ranks reduce), read back as float32.
        self.count = torch.zeros(FOLDS, classes, dtype=torch.float64, device=device)
        self.count_q = torch.zeros(FOLDS, classes, dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(FOLDS, classes, in_features, dtype=torch.float64, device=device)
        self.sum_xq = torch.zeros(FOLDS, classes, in_features, dtype=torch.float64, device=device)
        # With activation quantization, the float inputs as the quantized layer sees them (the float target's
        # W x - Q Q_a(x)); unused (the float inputs themselves) without.
        self.sum_xa = torch.zeros(FOLDS, classes, in_features, dtype=torch.float64, device=device)
        self.act = False

    def _add(
        self, count: torch.Tensor, sums: torch.Tensor, fold: int, x: torch.Tensor, positions: torch.Tensor
    ) -> None:
        classes = positions.clamp(max=self.sink_tokens).to(sums.device)
        count[fold].index_add_(0, classes, torch.ones_like(classes, dtype=torch.float64))
        sums[fold].index_add_(0, classes, x.double().to(sums.device))

    def add_float(self, fold: int, x_float: torch.Tensor, positions: torch.Tensor) -> None:
        """Add the float inputs ``(tokens, in)`` of a batch of fold ``fold`` (from the batch's global index, see
        :func:`fold_of`) with their token positions ``(tokens,)``."""
        self._add(self.count, self.sum_x, fold, x_float, positions)

    def add_float_act(self, fold: int, x_act: torch.Tensor, positions: torch.Tensor) -> None:
        """Add the same float inputs through the layer's activation quantizer (only with activation quantization)."""
        self.act = True
        classes = positions.clamp(max=self.sink_tokens).to(self.sum_xa.device)
        self.sum_xa[fold].index_add_(0, classes, x_act.double().to(self.sum_xa.device))

    def add_quant(self, fold: int, x_quant: torch.Tensor, positions: torch.Tensor) -> None:
        """Add the quantized prefix's inputs of the same tokens."""
        self._add(self.count_q, self.sum_xq, fold, x_quant, positions)

    def add_batch(self, fold: int, x_float: torch.Tensor, x_quant: torch.Tensor, positions: torch.Tensor) -> None:
        """Add paired ``(tokens, in)`` rows of one batch: ``add_float`` and ``add_quant``."""
        self.add_float(fold, x_float, positions)
        self.add_quant(fold, x_quant, positions)

    def reduce(self) -> None:
        """Sum over data-parallel ranks (no-op in one process); call once, before ``residual_sums``."""
        sums = [self.count, self.count_q, self.sum_x, self.sum_xq] + ([self.sum_xa] if self.act else [])
        all_reduce_sum(sums, "the held-out fold input sums")

    def residual_sums(self, W: torch.Tensor, Q: torch.Tensor) -> "ResidualSums":
        """The per-(fold, class) sums of both targets' residuals for a layer with weights ``W`` and ``Q``."""
        if not torch.equal(self.count, self.count_q):
            raise ValueError(
                "the float and quantized inputs of bc_target='auto' cover different tokens "
                f"({int(self.count.sum())} against {int(self.count_q.sum())}); both passes must see every batch"
            )
        W = W.float().to(self.sum_x.device)
        Q = Q.float().to(self.sum_x.device)
        # Rounded once from the float64 sums.
        sum_x, sum_delta = self.sum_x.float(), (self.sum_x - self.sum_xq).float()
        weight_only = sum_x @ (W - Q).T
        # Float target W x - Q Q_a(x) = (W - Q) x + Q (x - Q_a(x)); sequential (W - Q) x + Q δ (x̂ carries Q_a).
        float_sum = weight_only + (self.sum_x - self.sum_xa).float() @ Q.T if self.act else weight_only
        return ResidualSums(count=self.count.float(), float_sum=float_sum, seq_sum=weight_only + sum_delta @ Q.T)


@dataclass
class ResidualSums:
    """Per fold and class: token counts ``[F, C]`` and residual sums ``[F, C, out]`` of the two targets."""

    count: torch.Tensor
    float_sum: torch.Tensor
    seq_sum: torch.Tensor

    def candidate(self, mode: str, folds: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(bias [out], sink [K, out] or None)`` that ``mode`` fits on the batches of ``folds`` (float32).

        The sink rows are relative to the bias (what a layer's ``sink_bias`` holds); a class without tokens in
        ``folds`` gets the bias of the others.
        """
        if mode not in MODES:
            raise ValueError(f"unknown bias compensation mode {mode!r}; known: {MODES}")
        count = self.count[folds].sum(0)
        out = self.float_sum.shape[-1]
        sink_rows = count.shape[0] - 1
        zero_sink = torch.zeros(sink_rows, out, device=count.device) if sink_rows else None
        if mode == "none":
            return torch.zeros(out, device=count.device), zero_sink
        sums = (self.float_sum if mode.startswith("float") else self.seq_sum)[folds].sum(0)
        if not mode.endswith("+sink"):
            return sums.sum(0) / count.sum().clamp(min=1), zero_sink
        later = sums[-1] / count[-1].clamp(min=1) if count[-1] > 0 else sums.sum(0) / count.sum().clamp(min=1)
        sink = torch.where(count[:-1, None] > 0, sums[:-1] / count[:-1, None].clamp(min=1) - later, 0.0)
        return later, sink

    def error_drop(self, bias: torch.Tensor, sink: torch.Tensor | None, target: str = "sequential") -> float:
        """How much ``bias`` (+ ``sink``) lowers the per-element MSE of ``target``'s residual on all tokens:
        ``sum_c w_c (2 b_c·m_c - ||b_c||²) / out``, the closed form of ``E||r||² - E||r - b||²``."""
        count = self.count.sum(0)
        sums = (self.seq_sum if target == "sequential" else self.float_sum).sum(0)
        applied = bias.expand_as(sums).clone()
        if sink is not None:
            applied[:-1] += sink
        total = float(count.sum())
        drop = (2 * applied * sums - count[:, None] * applied * applied).sum() / (total * sums.shape[-1])
        return float(drop)


def leader(scores: dict[str, float], order: tuple[str, ...]) -> str:
    """The mode with the lowest score (ties: the earlier of ``order``)."""
    return min(scores, key=lambda mode: (scores[mode], order.index(mode)))


def fold_of(global_index: int) -> int:
    """The fold of a calibration batch, from its index among ALL batches (of every data-parallel rank), so that
    every rank splits the same way one process does."""
    return global_index % FOLDS


def held_out_folds(batch_ids: list[int], total_batches: int) -> list[list[int]] | None:
    """Local batch positions per fold, for the batches with global indices ``batch_ids`` out of ``total_batches``
    (all ranks), or None when fewer than two batches in all leave nothing to hold out."""
    if total_batches < FOLDS:
        return None
    return [[b for b, g in enumerate(batch_ids) if fold_of(g) == f] for f in range(FOLDS)]


def token_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The non-padding tokens' rows of a block output ``(batch, tokens, ...)`` (some blocks carry extra axes, e.g.
    hyper-connection streams), flattened to ``(valid tokens, rest)``."""
    return x.reshape(valid.numel(), -1)[valid.reshape(-1)]


def normalized_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token squared error ``(tokens,)`` of two ``(tokens, d)`` block outputs after an RMS normalisation of each
    row: what the next block reads (it starts with a norm). The raw squared error is dominated by a few
    massive-activation channels and the attention-sink token, whose errors the next norm scales away."""
    out, target = out.double(), target.double()
    eps = torch.finfo(torch.float32).eps
    out = out / out.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    target = target / target.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    return (out - target).pow(2).sum(-1)


@dataclass
class AutoLayer:
    """A quantized Linear of the block being calibrated: its packed module, residual sums and original bias."""

    name: str
    module: torch.nn.Module
    sums: ResidualSums
    base: torch.Tensor  # the layer's own bias (float32), what the compensation adds to
    # Per target ("float", "sequential"): the streamed residual before compensation (filled after the choice).
    residual: dict[str, ResidualMoments] = field(default_factory=dict)
    bc_mode: str = "none"  # the mode its block chose (what ``apply`` last stored, once chosen)
    # The race: the residual sums of the candidate streams whose sequential target has its own quantized inputs
    # (every other mode reads ``sums``: the float target's only need the float inputs).
    sources: dict[str, ResidualSums] = field(default_factory=dict)

    def bias_of(self, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(bias, sink)`` that ``mode`` fits on all calibration batches, from its own stream's sums."""
        return self.sources.get(mode, self.sums).candidate(mode, list(range(FOLDS)))

    def report_mse(self, mode: str, target: str | None = None) -> tuple[float | None, float | None]:
        """(MSE before, MSE after) of the layer against ``target`` (default: the target ``mode`` compensates for, the
        sequential one for "none"), on all calibration tokens, with the bias ``mode`` fits on all of them (None: not
        measured)."""
        target = target or ("float" if mode.startswith("float") else "sequential")
        if target not in self.residual:
            return None, None
        bias, sink = self.bias_of(mode)
        per_class = bias[None] if sink is None else torch.cat([bias + sink, bias[None]])
        return self.residual[target].mse(), self.residual[target].mse(per_class)

    def apply(self, bias: torch.Tensor, sink: torch.Tensor | None) -> None:
        """Store ``base + bias`` (summed in float32, rounded once) and the sink rows."""
        stored = self.module.bias
        stored.data = (self.base.to(bias.device) + bias).to(stored.dtype).to(stored.device)
        if sink is not None and getattr(self.module, "sink_bias", None) is not None:
            self.module.set_sink_bias(sink)


@dataclass
class BlockChoice:
    """The chosen mode of one block and the held-out block-output MSE of every candidate (empty on fallback)."""

    mode: str
    scores: dict[str, float]
    fallback: str | None = None


@torch.no_grad()
def choose_block_mode(
    layers: list[AutoLayer],
    block: torch.nn.Module,
    inputs: list,
    targets: list,
    run: object,
    device: torch.device,
    batch_ids: list[int] | None = None,
    total_batches: int | None = None,
) -> BlockChoice:
    """Score every candidate by held-out block-output MSE, then apply the winner refitted on all batches.

    ``inputs`` / ``targets``: the quantized stream's block inputs and the float model's block outputs (batches with
    ``hidden``, ``kwargs``, ``valid``); ``run(block, hidden, kwargs)`` runs the block. ``batch_ids``: the global
    index of each local batch and ``total_batches`` the count over all data-parallel ranks (default: one process).
    The score sums are reduced over ranks (float64) before the choice, so every rank picks the same mode; ties go
    to the earlier mode of :data:`MODES`.
    """
    batch_ids = list(range(len(inputs))) if batch_ids is None else batch_ids
    total_batches = len(inputs) if total_batches is None else total_batches
    sink_tokens = layers[0].sums.count.shape[1] - 1 if layers else 0
    folds = held_out_folds(batch_ids, total_batches)
    if not layers:
        return BlockChoice(mode="none", scores={})
    if folds is None:
        mode = fallback_mode(sink_tokens)
        choice = BlockChoice(
            mode=mode,
            scores={},
            fallback=f"{total_batches} calibration batch: nothing to hold out, took {mode!r}",
        )
    else:
        modes = modes_for(sink_tokens)
        sums = torch.zeros(len(modes), 2, dtype=torch.float64, device=device)  # per mode: squared error, elements
        for m, mode in enumerate(modes):
            for f, held in enumerate(folds):
                fit = [g for g in range(FOLDS) if g != f]
                for layer in layers:
                    layer.apply(*layer.sums.candidate(mode, fit))
                for b in held:
                    out = run(block, inputs[b].hidden.to(device), inputs[b].kwargs)
                    valid = inputs[b].valid
                    error = normalized_error(token_rows(out, valid), token_rows(targets[b].hidden.to(device), valid))
                    sums[m, 0] += error.sum()
                    sums[m, 1] += error.numel() * out.shape[-1]
        all_reduce_sum([sums], "the held-out block-output errors of the BC candidates")
        scores = {mode: float(sums[m, 0] / sums[m, 1].clamp(min=1)) for m, mode in enumerate(modes)}
        best = min(range(len(modes)), key=lambda m: (scores[modes[m]], m))  # ties: the earlier (simpler) mode
        choice = BlockChoice(mode=modes[best], scores=scores)
    everything = list(range(FOLDS))
    for layer in layers:
        layer.apply(*layer.sums.candidate(choice.mode, everything))
    return choice
