"""Block-level bias compensation of the calibrator: the ``bc_target="auto"`` choice per block (with layer-level BC or
one calibration batch; otherwise auto races whole-model streams, :mod:`optimum_bc.calibration.auto_race`), the
report's residual pass and layer-level BC (``bc_layer``). A mixin of
:class:`optimum_bc.calibration.calibrator.BlockCalibrator`, which holds the state these methods read (the config, the
auto layers and their history, the report)."""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..algorithms.bc_select import choose_block_mode
from ..algorithms.compensation import ResidualMoments, position_classes
from .architectures import is_skipped
from .block_bias import fold_block_bias, holds_sink, residual_accumulator
from .block_inputs import _Batch
from .report import BlockReport
from .streams import _run_block, _valid_positions, _valid_rows


logger = logging.getLogger(__name__)


def applied_bias(module: nn.Module, base: torch.Tensor, classes: int) -> torch.Tensor:
    """What a packed layer's BC adds on top of its float bias ``base``, per position class ``[classes, out]`` (float32):
    its stored bias minus ``base``, plus its sink rows (first classes) or its position table."""
    added = (module.bias.detach().float() - base.to(module.bias.device)).expand(classes, -1).clone()
    sink = getattr(module, "sink_bias", None)
    if sink is not None:
        added[: sink.shape[0]] += sink.detach().float()
    table = getattr(module, "position_bias", None)
    if table is not None:
        added += table.detach().float()[:classes]
    return added


@contextmanager
def _hooks(block: nn.Module, names: list[str], hook: Callable) -> Iterator[None]:
    """Forward hooks ``hook(module, args, output, name)`` on the named submodules of ``block`` while inside."""
    handles = [block.get_submodule(n).register_forward_hook(partial(hook, rel=n)) for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
        n = self.bc_batches  # the budget batches: the float stream's own (optimum_bc.calibration.bc_budget)
        choice = choose_block_mode(
            self.auto_layers,
            block,
            h_q[:n],
            next_fp[:n],
            self._counted_run,
            device,
            self.batch_ids[:n],
            self.total_bc_batches,
        )
        report.bc_choice_seconds = time.perf_counter() - start
        report.bc_choice, report.bc_scores = choice.mode, choice.scores
        if choice.fallback:
            report.bc_fallback = choice.fallback
            logger.warning("optimum-bc: bc_target='auto': %s", choice.fallback)
        rows = {row.name: row for row in self.report.layers if row.block == report.index}
        for layer in self.auto_layers:
            rows[layer.name].bc_choice = choice.mode  # its MSEs come from the residual pass (_measure_layers)
            layer.bc_mode = choice.mode
        self.auto_history.extend((report.index, layer) for layer in self.auto_layers)

    def _counted_run(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """``_run_block``, counted as one block forward on one batch."""
        self.clock.count_pass()
        return _run_block(block, hidden, kwargs)

    def _measure_layers(
        self, index: int, block: nn.Module, h_q: list[_Batch], device: torch.device, store: torch.device | None
    ) -> list[_Batch]:
        """The pass to the next block, measuring the report's per-layer MSEs on the way; returns the next block's
        quantized inputs.

        On the report's batches (``self.kept``: the float Linears' outputs and inputs of stage 0's float pass, the same
        tokens) hooks on every compensated Linear pair its quantized output with its kept float one: no float pass
        runs here. Each layer streams its residual before compensation
        (:class:`optimum_bc.compensation.ResidualMoments`): the sequential target's ``float output - quantized
        output + what its bias adds``, the float target's ``(W - Q) x`` on the float inputs. The MSE of any bias then
        follows in closed form: the race's final choice needs no new pass. No ``in x in`` matrix is kept."""
        prefix = f"{self.spec.blocks}.{index}."
        classes = self.positions or self.config.layer_sink_tokens + 1
        autos = {layer.name: layer for layer in self.auto_layers}
        targets, base, applied, dense, residuals, quantize_input = {}, {}, {}, {}, {}, {}
        for rel, _, float_bias in self.measured:
            module = block.get_submodule(rel)
            auto = autos.get(prefix + rel)
            if auto is None:
                targets[rel] = {self.target}
            else:
                with_float = auto.bc_mode.startswith("float") and not self.race  # the race reports the sequential
                targets[rel] = {"sequential"} | ({"float"} if with_float else set())
            out = module.bias.shape[0]
            base[rel] = float_bias.to(device) if float_bias is not None else torch.zeros(out, device=device)
            applied[rel] = applied_bias(module, base[rel], classes)
            if "float" in targets[rel]:
                dense[rel] = module.dequantize_weight(torch.float32)
                quantize_input[rel] = module._quantize_input  # the float target's residual is W x - Q Q_a(x)
            residuals[rel] = {t: ResidualMoments(out, classes, device) for t in sorted(targets[rel])}
        kept = self.kept
        now: dict = {}  # the batch being measured: its index, valid mask, row positions, position classes

        def quant_hook(module: nn.Module, args: tuple, output: torch.Tensor, rel: str) -> None:
            if now["batch"] < len(kept) and "sequential" in residuals[rel]:
                float_out = kept.outputs[now["batch"]][rel].to(device).float()
                r = float_out - _valid_rows(output, now["valid"]).float() + applied[rel][now["index"]]
                residuals[rel]["sequential"].add_batch(r, now["positions"])

        next_q = []
        with _hooks(block, list(targets), quant_hook):
            for b, batch in enumerate(h_q):
                now["batch"], now["valid"], now["positions"] = b, batch.valid, _valid_positions(batch.valid)
                now["index"] = position_classes(now["positions"], classes).to(device)
                with self.clock.timed("bc"):
                    for rel, weight in dense.items() if b < len(kept) else ():
                        x = kept.float_input(b, rel).to(device)
                        float_in = _valid_rows(quantize_input[rel](x), batch.valid).float()
                        float_out = kept.outputs[b][rel].to(device).float()
                        r = float_out - base[rel] - float_in @ weight.to(device).T
                        residuals[rel]["float"].add_batch(r, now["positions"])
                with self.clock.timed("forward"):
                    self.clock.count_pass()
                    out = _run_block(block, batch.hidden.to(device), batch.kwargs)
                next_q.append(batch.with_hidden(out.to(store)))
        self.kept = None
        for rel, row, _ in self.measured:  # the same order on every data-parallel rank
            for moments in residuals[rel].values():
                moments.reduce()
            auto = autos.get(prefix + rel)
            target = self.target if auto is None else next(t for t in ("float", "sequential") if t in residuals[rel])
            row.mse_before = residuals[rel][target].mse()
            row.mse_after = residuals[rel][target].mse(applied[rel])
            if auto is not None:
                auto.residual = residuals[rel]
        self.auto_layers, self.measured = [], []
        return next_q

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
        for b, batch in enumerate(next_q[: self.bc_batches]):  # the budget batches (the float stream's own)
            if self.sequential_target:
                out = batch.hidden.to(device)
            else:
                out = self._counted_run(block, h_fp[b].hidden.to(device), h_fp[b].kwargs)
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
