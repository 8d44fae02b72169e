"""``bc_target="auto"``: a race of whole-model candidate streams, scored where their effect ends.

A block's own output error prefers the sequential target almost everywhere, yet end to end the float target often
wins: a block's bias choice shows up downstream, not at its own output (docs/bc_auto.md). So the choice is made for
the whole model, by the streams themselves. The rule:

- One quantized stream per candidate of :func:`optimum_bc.algorithms.bc_select.race_modes` runs through the blocks.
  All streams share the quantized weights, fitted on the leading stream (the one closest to the float model after
  the previous block; at block 0 the stated rule's mode). Each stream gets the biases its mode fits on the
  budget's calibration batches from its own inputs: a float mode needs only the float stream's, a sequential mode its own
  quantized inputs, taken by one stopped pass per stage. So with RTN each stream is exactly the model the manual
  variant gives, and with GPTQ it differs only by the inputs the weights were fitted on.
- After every block each stream's output is scored against the float model's: the per-token RMS-normalised squared
  error (:func:`optimum_bc.algorithms.bc_select.normalized_error`) over every budget token but the sink
  positions (:meth:`AutoRace._scored`), summed over data-parallel ranks: it picks the leading stream and is
  reported, but drops no stream. Every stream runs to the end: on the packaged model these mid-depth errors rank the
  streams unlike perplexity (GPTQ 3-bit g128: the float target's stream is third at block 14 and the best model),
  so no stream can be dropped on them (docs/bc_auto.md, fifth round).
- After the last block the streams are scored by the mean KL divergence of their next-token distributions from the
  float model's (the model's final norm and LM head; the normalised error where the model has none), and the
  closest wins: its biases are stored in every block. The normalised error of the final hidden states ranked the
  streams unlike perplexity too (RTN 3-bit g128: the sink-bias stream first, third by perplexity); the KL ranked
  all four as perplexity does in the three cells measured. An image encoder (ViT, DeiT, DINOv2: no LM head, every
  token's final feature is an output, the CLS token first) ends on its final norm instead: the normalised error of
  the features it outputs, over every token, the CLS token included (:meth:`AutoRace._feature_errors`).

Everything the race fits and scores runs on BC's token budget (the first calibration batches up to
:data:`optimum_bc.calibration.bc_budget.BC_TOKENS` tokens): the other streams hold those batches only; the leading
stream holds every batch, since the weight method reads it. The BC-off stream ("none") is one of the candidates:
the guard. The report's ``bc_summary`` gives the final scores,
each block's ``bc_scores`` the streams' errors after it; each layer's MSEs are the sequential target's, measured on
the leading stream (the report's residual pass), with the winner's bias. A mixin of
:class:`optimum_bc.calibration.calibrator.BlockCalibrator` (its state: config, clock, batches, report).
"""

import logging
import time

import torch
from torch import nn

from .. import distributed
from ..algorithms.bc_select import (
    AutoLayer,
    FoldInputSums,
    fallback_mode,
    fold_of,
    leader,
    normalized_error,
    race_modes,
    token_rows,
)
from ..formats.activations import StageActivations
from .block_inputs import _Batch
from .report import BlockReport
from .streams import _capture_inputs, _run_block, _valid_positions, _valid_rows


logger = logging.getLogger(__name__)


#: Tokens per LM-head call of the final score (bounds the logits' memory: tokens x vocabulary floats).
LOGIT_CHUNK = 256


def _child_norms(module: nn.Module) -> list[nn.Module]:
    """The norm modules among ``module``'s children (by class name: LayerNorm, RMSNorm, each family's own)."""
    return [m for m in module.children() if "norm" in type(m).__name__.lower()]


def final_head(model: nn.Module, blocks: str) -> tuple[nn.Module, nn.Module] | None:
    """The model's final norm and LM head, when it has exactly one norm beside its blocks and an output embedding
    with its weights in memory (None otherwise: the race then ends on the last block's normalised error)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parent = model.get_submodule(blocks.rpartition(".")[0])
    norms = _child_norms(parent)
    if head is None or len(norms) != 1:
        return None
    params = [*head.parameters(), *norms[0].parameters()]
    if any(p.device.type == "meta" for p in params):
        return None
    return norms[0], head


def encoder_norm(model: nn.Module, blocks: str) -> nn.Module | None:
    """An image encoder's final norm (the model reads ``pixel_values``): the one norm among the children of the
    nearest ancestor of its blocks that has any (ViT, DeiT, DINOv2: ``layernorm`` beside ``encoder``). None for other
    models, several norms there, or weights not in memory."""
    if getattr(model, "main_input_name", None) != "pixel_values":
        return None
    path = blocks
    while path:
        path = path.rpartition(".")[0]
        norms = _child_norms(model.get_submodule(path))
        if norms:
            on_meta = any(p.device.type == "meta" for p in norms[0].parameters())
            return norms[0] if len(norms) == 1 and not on_meta else None
    return None


class AutoRace:
    """The race steps of the calibrator (see the module docstring)."""

    def _race_start(self, batches: list[_Batch]) -> None:
        """Every candidate stream starts from the block inputs; the stated rule's mode leads at block 0. The leading
        stream holds every batch (the weight method reads it), the others the budget batches only
        (:mod:`optimum_bc.calibration.bc_budget`)."""
        modes = race_modes(self.config.layer_sink_tokens)
        rule = fallback_mode(self.config.layer_sink_tokens)
        self.primary = rule if rule in modes else modes[-1]
        self.streams: dict[str, list[_Batch]] = {
            mode: batches if mode == self.primary else batches[: self.bc_batches] for mode in modes
        }
        self.race_scores: dict[str, float] = {}
        self.race_head = final_head(self.model, self.spec.blocks)
        self.race_norm = encoder_norm(self.model, self.spec.blocks) if self.race_head is None else None
        self.race_hidden: dict[str, float] = {}  # the last block's normalised errors (when the head decides)

    def _race_block_start(
        self, index: int, features: dict[str, int], device: torch.device, store: torch.device | None
    ) -> None:
        """Move the other streams to the block; open input sums for each sequential stream but the leading one."""
        for mode, batches in self.streams.items():
            if mode != self.primary:
                self.streams[mode] = [b.for_block(index).to(device, store) for b in batches]
        sink_tokens = self.config.layer_sink_tokens
        self.stream_sums = {
            mode: {key: FoldInputSums(n, sink_tokens, device) for key, n in features.items()}
            for mode in self.streams
            if mode.startswith("sequential") and mode != self.primary
        }

    def _race_add_float(
        self, key: str, fold: int, x_float: torch.Tensor, positions: torch.Tensor, act: bool = False
    ) -> None:
        """The float inputs of ``key`` (stage 0's float pass; ``act``: through the layer's activation quantizer, from
        the layer's own stage) join every stream's sums."""
        for sums in self.stream_sums.values():
            (sums[key].add_float_act if act else sums[key].add_float)(fold, x_float, positions)

    def _race_stage(self, block: nn.Module, keys: list[str], acts: StageActivations, device: torch.device) -> None:
        """One stopped pass per sequential stream but the leading one: the inputs of the stage's layers, with the
        block's earlier stages carrying that stream's biases."""
        for mode, sums in self.stream_sums.items():
            for layer in self.auto_layers:
                layer.apply(*layer.bias_of(mode))
            for b, batch in enumerate(self.streams[mode]):
                seen: dict[str, torch.Tensor] = {}
                with _capture_inputs(block, keys, seen, stop=True):
                    self.clock.count_pass(stopped=True)
                    _run_block(block, batch.hidden.to(device), batch.kwargs)
                positions = _valid_positions(batch.valid)
                for key in keys:
                    x = _valid_rows(acts.apply(key, seen[key]), batch.valid)
                    sums[key].add_quant(fold_of(self.batch_ids[b]), x, positions)
            for key in keys:  # complete now (the float inputs came in stage 0): sum over data-parallel ranks
                sums[key].reduce()
        for layer in self.auto_layers:
            layer.apply(*layer.bias_of(self.primary))

    def _add_auto_layer(
        self,
        name: str,
        qlinear: nn.Module,
        linear: nn.Module,
        W: torch.Tensor,
        Q: torch.Tensor,
        group: tuple[str, ...],
        sums: FoldInputSums,
    ) -> None:
        """Track a quantized Linear of group ``group`` (float weights ``W``, dequantized ``Q``) for auto. In the race
        it also gets the residual sums of every sequential stream but the leading one and the leading stream's biases,
        until the race ends."""
        base = linear.bias.detach().float() if linear.bias is not None else torch.zeros(W.shape[0])
        residual = sums.residual_sums(W, Q)
        layer = AutoLayer(name, qlinear, residual, base.to(residual.count.device))
        if self.race:
            key = group[0]
            for mode, stream in self.stream_sums.items():
                layer.sources[mode] = stream[key].residual_sums(W, Q)
            layer.apply(*layer.bias_of(self.primary))
        self.auto_layers.append(layer)

    def _race_register(self, index: int, report: BlockReport) -> None:
        """Record the block's layers (they hold the leading stream's biases until the race ends)."""
        rows = {row.name: row for row in self.report.layers if row.block == index}
        for layer in self.auto_layers:
            layer.bc_mode = rows[layer.name].bc_choice = self.primary
        self.auto_history.extend((index, layer) for layer in self.auto_layers)
        report.bc_choice = self.primary

    def _race_step(
        self,
        index: int,
        block: nn.Module,
        next_q: list[_Batch],
        next_fp: list[_Batch],
        report: BlockReport,
        device: torch.device,
        store: torch.device | None,
    ) -> list[_Batch]:
        """Run the block on every other stream with its biases, score all streams against the float model (after the
        last block: the final KL where the head fits) on the budget batches and return the leading stream (the next
        block's quantized stream). No stream is dropped: mid-depth errors misrank them (docs/bc_auto.md, fifth round).

        Beyond the budget only the leading stream runs: when another stream takes the lead, its budget batches join
        the batches beyond the budget as the old leader left them (this block with the old leader's biases)."""
        start = time.perf_counter()
        layers: list[AutoLayer] = [layer for i, layer in self.auto_history if i == index]
        self.streams[self.primary] = next_q
        for mode in self.streams:
            if mode == self.primary:
                continue
            for layer in layers:
                layer.apply(*layer.bias_of(mode))
            self.streams[mode] = [
                b.with_hidden(self._counted_run(block, b.hidden.to(device), b.kwargs).to(store))
                for b in self.streams[mode]
            ]
        for layer in layers:
            layer.apply(*layer.bias_of(self.primary))
        n = self.bc_batches
        scores = self._stream_errors(next_fp[:n], device)
        if index == self.total_blocks - 1 and self._head_fits(next_q):
            self.race_hidden = scores
            scores = self._logit_divergence(next_fp[:n], device)
        elif index == self.total_blocks - 1 and self.race_norm is not None:
            self.race_hidden = scores
            scores = self._feature_errors(next_fp[:n], device)
        self.race_scores = scores
        ahead = leader(scores, race_modes(self.config.layer_sink_tokens))
        if ahead != self.primary:
            self.streams[ahead] = self.streams[ahead] + next_q[n:]
            self.streams[self.primary] = next_q[:n]
            self.primary = ahead
        report.bc_scores = scores
        report.bc_choice_seconds = time.perf_counter() - start
        return self.streams[self.primary]

    def _head_fits(self, outputs: list[_Batch]) -> bool:
        """Whether the final norm and LM head read the last block's output (``outputs``: the leading stream, which
        every rank holds batches of) as it is: ``(batch, tokens, hidden)``.
        Blocks that carry extra axes (hyper-connection streams, e.g. DeepSeek-V4) are collapsed by the model's own
        code before its norm; the race then ends on the normalised error."""
        if self.race_head is None:
            return False
        width = self.race_head[1].weight.shape[-1]
        return all(b.hidden.dim() == 3 and b.hidden.shape[-1] == width for b in outputs)

    def _scored(self, batch: _Batch) -> torch.Tensor:
        """The tokens the race scores: every valid one but the sink positions, whose own outputs are dominated by
        massive activations the final norm scales away (their effect on later tokens is in those tokens' errors),
        and whose bias is fitted on these very tokens (one per window)."""
        scored = batch.valid.clone()
        scored[:, : self.config.layer_sink_tokens] = False
        return scored

    def _stream_errors(
        self, next_fp: list[_Batch], device: torch.device, output: nn.Module | None = None
    ) -> dict[str, float]:
        """Each stream's RMS-normalised squared error per element against the float stream (``next_fp``: the budget
        batches), summed over ranks; ``output``: of that module's outputs (the encoder's final norm), over every
        valid token."""
        modes = list(self.streams)
        errors = torch.zeros(len(modes), 2, dtype=torch.float64, device=device)  # squared error, elements
        for m, mode in enumerate(modes):
            for out, fp in zip(self.streams[mode][: len(next_fp)], next_fp, strict=True):
                scored = self._scored(out) if output is None else out.valid
                out_rows, fp_rows = token_rows(out.hidden.to(device), scored), token_rows(fp.hidden.to(device), scored)
                if output is not None:
                    out_rows, fp_rows = output(out_rows), output(fp_rows)
                error = normalized_error(out_rows, fp_rows)
                errors[m, 0] += error.sum()
                errors[m, 1] += error.numel() * out.hidden.shape[-1]
        distributed.all_reduce_sum([errors], "the auto race's stream errors")
        return {mode: float(errors[m, 0] / errors[m, 1].clamp(min=1)) for m, mode in enumerate(modes)}

    @torch.no_grad()
    def _feature_errors(self, final_fp: list[_Batch], device: torch.device) -> dict[str, float]:
        """An image encoder's final score: each stream's normalised error after the model's final norm (the features
        it outputs), over every token. The CLS token is scored too: it is the encoder's pooled output, not a sink
        whose own output a later norm scales away."""
        return self._stream_errors(final_fp, device, output=self.race_norm)

    @torch.no_grad()
    def _logit_divergence(self, final_fp: list[_Batch], device: torch.device) -> dict[str, float]:
        """Each stream's mean KL divergence from the float model's next-token distribution (the model's final norm
        and LM head on the last block's outputs), per scored token, summed over ranks: what perplexity sees."""
        norm, head = self.race_head
        modes = list(self.streams)
        sums = torch.zeros(len(modes), 2, dtype=torch.float64, device=device)  # KL, tokens
        for b, fp in enumerate(final_fp):
            scored = self._scored(fp)
            target = token_rows(fp.hidden.to(device), scored)
            outs = [token_rows(self.streams[mode][b].hidden.to(device), scored) for mode in modes]
            for start in range(0, target.shape[0], LOGIT_CHUNK):
                p = head(norm(target[start : start + LOGIT_CHUNK])).float().log_softmax(-1)
                for m, out in enumerate(outs):
                    q = head(norm(out[start : start + LOGIT_CHUNK])).float().log_softmax(-1)
                    sums[m, 0] += (p.exp() * (p - q)).sum().double()
                    sums[m, 1] += p.shape[0]
        distributed.all_reduce_sum([sums], "the auto race's logit divergences")
        return {mode: float(sums[m, 0] / sums[m, 1].clamp(min=1)) for m, mode in enumerate(modes)}

    def _race_finish(self) -> None:
        """Store the winning stream's biases in every block and write the choice into the report."""
        if not self.race_scores:
            return
        chosen = leader(self.race_scores, race_modes(self.config.layer_sink_tokens))
        logger.info("optimum-bc: bc_target='auto': the %r stream ended closest to the float model", chosen)
        rows = {row.name: row for row in self.report.layers if row.bc_choice is not None}
        for _, layer in self.auto_history:
            layer.apply(*layer.bias_of(chosen))
            layer.bc_mode = chosen
            row = rows.get(layer.name)
            if row is not None:
                row.bc_choice = chosen
                row.mse_before, row.mse_after = layer.report_mse(chosen, "sequential")
        for block_report in self.report.blocks:
            if block_report.bc_choice is not None:
                block_report.bc_choice = chosen
        self.report.bc_summary = self._race_summary("BC chosen by the auto race", chosen, self.race_scores, "stream")
        self.streams, self.stream_sums = {}, {}

    def _race_summary(self, race: str, chosen: str, scores: dict[str, float], what: str) -> str:
        """The report's ``bc_summary``: the winner and every candidate's final score, named by what it measured."""
        final = ", ".join(f"{mode} {score:.4g}" for mode, score in scores.items())
        hidden = ", ".join(f"{mode} {score:.4g}" for mode, score in self.race_hidden.items())
        measure = "RMS-normalised squared error"
        if hidden:
            measure = (
                "mean KL divergence of the next-token distribution"
                if self.race_norm is None
                else "normalised error of the final norm's output, every token"
            )
        return (
            f"{race}: {chosen!r}, the {what} closest to the float model after the last block "
            f"({measure}: {final}" + (f"; last block's normalised error: {hidden}" if hidden else "") + ")"
        )
