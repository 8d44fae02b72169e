"""Block-level bias compensation of the calibrator: the ``bc_target="auto"`` choice per block, its global guard and
layer-level BC (``bc_layer``). A mixin of :class:`optimum_bc.calibration.calibrator.BlockCalibrator`, which holds the
state these methods read (the config, the auto layers and their history, the BC-off stream, the report)."""

import logging
import time

import torch
from torch import nn

from .. import distributed
from ..algorithms.bc_select import FOLDS, BlockChoice, choose_block_mode, normalized_error, token_rows
from .architectures import is_skipped
from .block_bias import fold_block_bias, holds_sink, residual_accumulator
from .block_inputs import _Batch
from .report import BlockReport
from .streams import _run_block, _valid_positions, _valid_rows


logger = logging.getLogger(__name__)


class BlockCompensation:
    """The block-level BC steps of the calibrator (see the module docstring)."""

    def _choose_block(
        self,
        block: nn.Module,
        h_q: list[_Batch],
        next_fp: list[_Batch],
        report: BlockReport,
        device: torch.device,
    ) -> None:
        """``bc_target="auto"``: the block's BC mode by held-out block-output error (see optimum_bc.bc_select)."""
        start = time.perf_counter()
        if self.bc_off_since is None:
            choice = choose_block_mode(
                self.auto_layers, block, h_q, next_fp, _run_block, device, self.batch_ids, self.total_batches
            )
        else:
            for layer in self.auto_layers:
                layer.apply(*layer.sums.candidate("none", list(range(FOLDS))))
            reason = f"BC off since block {self.bc_off_since} (its BC-off stream was closer to the float model)"
            choice = BlockChoice(mode="none", scores={}, fallback=reason)
        report.bc_choice_seconds = time.perf_counter() - start
        report.bc_choice, report.bc_scores = choice.mode, choice.scores
        if choice.fallback:
            report.bc_fallback = choice.fallback
            logger.warning("optimum-bc: bc_target='auto': %s", choice.fallback)
        rows = {row.name: row for row in self.report.layers if row.block == report.index}
        for layer in self.auto_layers:
            row = rows[layer.name]
            row.bc_choice = choice.mode
            row.mse_before, row.mse_after = layer.report_mse(choice.mode)
            layer.bc_mode = choice.mode
        self.auto_history.extend((report.index, layer) for layer in self.auto_layers)
        self.auto_layers = []

    def _guard(
        self,
        index: int,
        block: nn.Module,
        next_q: list[_Batch],
        next_fp: list[_Batch],
        report: BlockReport,
        device: torch.device,
        store: torch.device | None,
    ) -> list[_Batch]:
        """The global guard of ``bc_target="auto"``: run the block without its biases on the BC-off stream and
        compare both streams' block outputs with the float model's (normalised like the choice, all calibration
        batches, summed over ranks). Once the BC-off stream is closer, take back every bias auto added, so far and
        from now on, and continue on the BC-off stream; returns the quantized stream for the next block."""
        layers = [layer for i, layer in self.auto_history if i == index]
        everything = list(range(FOLDS))
        chosen = {layer.name: layer.sums.candidate(layer.bc_mode, everything) for layer in layers}
        for layer in layers:
            layer.apply(*layer.sums.candidate("none", everything))
        off_in = [b.for_block(index).to(device, store) for b in self.off_stream]
        next_off = [b.with_hidden(_run_block(block, b.hidden.to(device), b.kwargs).to(store)) for b in off_in]
        for layer in layers:
            layer.apply(*chosen[layer.name])
        errors = torch.zeros(2, dtype=torch.float64, device=device)  # BC stream, BC-off stream
        for q, off, fp in zip(next_q, next_off, next_fp, strict=True):
            target = token_rows(fp.hidden.to(device), q.valid)  # blocks may carry extra axes (hyper-connections)
            errors[0] += normalized_error(token_rows(q.hidden.to(device), q.valid), target).sum()
            errors[1] += normalized_error(token_rows(off.hidden.to(device), q.valid), target).sum()
        distributed.all_reduce_sum([errors], "the auto guard's stream errors")
        if errors[1] >= errors[0]:
            self.off_stream = next_off
            return next_q
        self.bc_off_since = index
        logger.warning(
            "optimum-bc: bc_target='auto': after block %d the BC-off stream is closer to the float model (%.4g < %.4g);"
            " bias compensation is taken back in blocks 0-%d and off for the rest",
            index,
            float(errors[1]),
            float(errors[0]),
            index,
        )
        by_name = {row.name: row for row in self.report.layers if row.bc_choice is not None}
        for _, layer in self.auto_history:
            layer.apply(*layer.sums.candidate("none", everything))
            layer.bc_mode = "none"
            row = by_name[layer.name]
            row.bc_choice = "none"
            row.mse_before, row.mse_after = layer.report_mse("none")
        reason = f"BC taken back: after block {index} the BC-off stream was closer to the float model"
        for block_report in [*self.report.blocks, report]:
            if block_report.bc_choice is not None:
                block_report.bc_choice, block_report.bc_fallback = "none", reason
        self.off_stream = None
        return next_off

    def _compensate_block(
        self,
        index: int,
        block: nn.Module,
        target_name: str,
        h_fp: list[_Batch],
        next_q: list[_Batch],
        next_fp: list[_Batch],
        report: BlockReport,
        device: torch.device,
    ) -> None:
        """Layer-level BC: the mean of (float block output - quantized block output), folded into ``target_name``'s
        bias (sink tokens apart, see :mod:`optimum_bc.block_bias`)."""
        full_name = f"{self.spec.blocks}.{index}.{target_name}"
        target = block.get_submodule(target_name)
        sink_tokens = self.config.layer_sink_tokens
        with_sink = holds_sink(target, full_name, sink_tokens)
        residual = residual_accumulator(next_q[0].hidden.shape[-1], sink_tokens, device)
        for b, batch in enumerate(next_q):
            if self.sequential_target:
                out = batch.hidden.to(device)
            else:
                out = _run_block(block, h_fp[b].hidden.to(device), h_fp[b].kwargs)
            rows = (_valid_rows(next_fp[b].hidden.to(device), batch.valid), _valid_rows(out, batch.valid))
            if sink_tokens:
                residual.add_batch(*rows, _valid_positions(batch.valid))
            else:
                residual.add_batch(*rows)
        residual.reduce()  # data-parallel ranks sum their residuals
        # Kept in float32 here and rounded once, when folded into the stored bias.
        comp = residual.compensate(torch.float32, with_sink) if sink_tokens else residual.compensate(torch.float32)
        created, added, added_sink = fold_block_bias(target, comp)
        if created:
            self.float_biases.append(full_name)
        if not is_skipped(full_name, self.skip):
            self.compensated.append(full_name)
        for batch in next_q:  # the quantized stream gets what the stored biases add
            shift = added.to(batch.hidden.dtype).to(batch.hidden.device).expand_as(batch.hidden).clone()
            if added_sink is not None:
                k = min(added_sink.shape[0], shift.shape[1])
                shift[:, :k] += added_sink[:k].to(shift.dtype).to(shift.device)
            batch.hidden = batch.hidden + shift
        report.mse_before, report.mse_after = comp.mse_before, comp.mse_after
