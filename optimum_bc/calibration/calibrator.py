"""Sequential block-wise calibration: quantize, compensate and pack one decoder block at a time.

Each block is calibrated on the outputs of the already quantized and compensated blocks before it (the quantized
stream ``h_q``). When bias compensation is on, the float model's own activations (the float stream ``h_fp``) are
propagated beside it through a float copy of the current block, so the compensation target is the float model.

Inside a block the Linears are quantized stage by stage (``true_sequential``): each stage is observed on the block
with the earlier stages already quantized and compensated. Padding tokens never enter any statistic.
"""

import logging
import time
from contextlib import nullcontext

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .. import distributed
from ..algorithms import WeightQuantizer, get_algorithm
from ..algorithms.bc_select import FOLDS, AutoLayer, FoldInputSums, fold_of
from ..algorithms.compensation import InputMoments
from ..config import BCQuantizationConfig
from ..formats.activations import StageActivations
from ..layers import kernels
from ..layers.packed_base import transient_dense_weights
from .architectures import ArchitectureSpec, bias_flags, first_param_device, get_blocks
from .attention_observers import calibrate_block_attention
from .auto_race import AutoRace
from .bc_budget import FloatOutputs, budget_batches, report_batches, weights_read_every_window
from .block_compensation import BlockCompensation
from .block_inputs import _Batch
from .block_layout import BlockLayoutSteps
from .discovery import dense_weight, layer_features
from .expert_calibration import ExpertCalibrator
from .model_race import ModelRace, copies_fit
from .offload import OffloadedCalibration, drop_dense_caches, float_copy
from .report import BlockClock, BlockReport, LayerReport, QuantizationReport
from .skeleton import packed_layer
from .streams import _capture_inputs, _run_block, _valid_positions, _valid_rows, fit_input_scales


logger = logging.getLogger(__name__)

#: ``model.config`` attribute listing float modules that layer-level BC gave a new bias (a reload creates it).
FLOAT_BIASES_ATTR = "optimum_bc_float_biases"


_progress_bars = True


def set_progress_bars(enabled: bool) -> None:
    """Show or hide the calibration bar (transformers' tqdm: ``disable_progress_bar()`` hides it too)."""
    global _progress_bars
    _progress_bars = enabled


class BlockCalibrator(BlockLayoutSteps, BlockCompensation, AutoRace):
    """Quantizes the blocks of one model in order; holds the two activation streams between blocks."""

    def __init__(
        self,
        model: nn.Module,
        spec: ArchitectureSpec,
        config: BCQuantizationConfig,
        skip: list[str],
        placement: OffloadedCalibration | None = None,
        store: torch.device | None = None,
    ) -> None:
        self.model = model
        self.placement = placement
        self.store = store
        self.spec = spec
        self.config = config
        self.skip = skip
        self.algorithm = get_algorithm(config.method)
        self.bc = config.bias_compensation
        self.positions = config.seq_len if config.bc_granularity == "position" else None
        # "auto" streams the sequential target's moments (the float target's are a part of them) and lets each block
        # choose on held-out batches (optimum_bc.bc_select); with the position table it is the paper's float target.
        self.auto = self.bc and config.bc_target == "auto" and self.positions is None
        self.target = config.bc_target if config.bc_target != "auto" else ("float" if self.positions else "sequential")
        self.sequential_target = self.bc and self.target == "sequential"
        self.auto_layers: list[AutoLayer] = []
        self.batch_ids: list[int] = []  # global index of each local calibration batch (set by run)
        self.total_batches = 0  # calibration batches over all data-parallel ranks
        self.bc_batches = 0  # the local batches in BC's token budget: a prefix (optimum_bc.calibration.bc_budget)
        self.report_batches = 0  # the local batches of the report's MSEs: a prefix of the budget's
        self.total_bc_batches = 0  # the budget's batches over all ranks
        self.local_batches = 0  # this rank's calibration batches (what the report's pass counts are relative to)
        self.kept: FloatOutputs | None = None  # the float Linear outputs the report pairs (the report's batches)
        self.total_blocks = 0
        # "auto" races whole-model candidate streams (optimum_bc.calibration.auto_race), except with layer-level BC
        # (whose block bias the streams do not track) or one calibration batch: then each block chooses on its own.
        self.race = False
        self.stream_sums: dict[str, dict[str, FoldInputSums]] = {}  # per block: the other sequential streams' sums
        self.auto_history: list[tuple[int, AutoLayer]] = []
        # The float stream runs beside the quantized one for BC's target and for algorithms that use float inputs.
        self.float_stream = config.needs_float_stream
        # The compensated Linears of the block being calibrated (relative name, report row): the residual pass at
        # the block's end measures their MSEs.
        self.measured: list[tuple[str, LayerReport, torch.Tensor | None]] = []
        self.clock = BlockClock(0)
        # With activation quantization the float target's quantized layer sees the float input through its input
        # quantizer, whose scale each stage fits just before it runs: so that stage's float inputs are paired, and its
        # moments are the sequential target's with x̂ = Q_a(x) (r = W x - Q Q_a(x)).
        self.act_float_target = self.bc and self.target == "float" and config.act_bits is not None
        # auto's float candidates need the float inputs through each layer's activation quantizer, whose static
        # scales are fitted at the layer's own stage: a float pass per stage.
        self.auto_act = self.bc and self.auto and config.act_bits is not None
        # Dynamic scales need no fitting: every layer's Q_a(x) of the float inputs comes from stage 0's float pass.
        self.act_at_stage_0 = config.act_bits is not None and config.act_scale == "dynamic"
        self.report = QuantizationReport()
        self.compensated: list[str] = []
        # Float modules that layer-level BC gave a bias they had no slot for (recorded so a reload creates it).
        self.float_biases: list[str] = []

    def _options(self) -> dict:
        c = self.config
        return {
            "bits": c.bits,
            "group_size": c.group_size,
            "sym": c.sym,
            "damp_percent": c.damp_percent,
            "desc_act": c.desc_act,
            "format": c.format,
            "comq_sweeps": c.comq_sweeps,
            "comq_update_scale": c.comq_update_scale,
            "erq_lambda": c.erq_lambda,
            "erq_chunk": c.erq_chunk,
        }

    @torch.no_grad()
    def run(self, batches: list[_Batch]) -> QuantizationReport:
        """Quantize every block; returns the report."""
        start = time.perf_counter()
        tokens = int(sum(int(b.valid.sum()) for b in batches))
        self.report.calibration_tokens = distributed.all_reduce_count(tokens, "the calibration token count")
        # Held-out folds come from each batch's global index, so data-parallel ranks split as one process does.
        self.total_batches = distributed.all_reduce_count(len(batches), "the calibration batch count")
        self.batch_ids = list(distributed.shard_range(self.total_batches)) if batches else []
        valid = [int(b.valid.sum()) for b in batches]
        self.local_batches = len(batches)
        self.bc_batches, self.total_bc_batches, bc_tokens = budget_batches(valid, self.batch_ids, self.total_batches)
        self.report.bc_tokens = bc_tokens if self.bc else 0
        self.report_batches, mse_tokens = report_batches(valid, self.batch_ids, self.total_batches)
        self.report.mse_tokens = mse_tokens if self.bc else 0
        algorithm = self.algorithm
        if self.bc and not weights_read_every_window(
            self.config, algorithm.needs_inputs, algorithm.needs_float_inputs
        ):
            # Only BC reads the data (RTN): the budget batches alone (one at least, which observes the layout).
            batches = batches[: max(self.bc_batches, 1)]
        h_q = batches
        # The float stream beyond the budget only where the weight method pairs float inputs (ERQ).
        h_fp = (batches if algorithm.needs_float_inputs else batches[: self.bc_batches]) if self.float_stream else None
        blocks = get_blocks(self.model, self.spec)
        self.total_blocks = len(blocks)
        self.race = self.auto and not self.config.bc_layer and self.total_batches >= FOLDS
        # A weight method that reads its inputs races whole models (one per candidate; optimum_bc.calibration.
        # model_race), unless blocks are offloaded: then the shared-weight race, bounded by one block's memory.
        models = self.race and algorithm.needs_inputs and self.placement is None and copies_fit(blocks, self.config)
        self.race = self.race and not models
        if self.race:
            self._race_start(batches)
        bar = tqdm(total=len(blocks), desc="optimum-bc", unit="block", disable=not _progress_bars)
        # The quantized stream runs the packed layers on the exact path (the fast kernels compute in bf16), and
        # their dense caches are dropped once a block is done, so the quantized model holds only packed weights.
        # Offloaded, they keep no dense cache at all: a block's quantized layers then hold only packed weights.
        transient = transient_dense_weights() if self.placement is not None else nullcontext()
        with kernels.use_backend("reference"), transient:
            if models:
                ModelRace(self).run(h_q, h_fp, bar)
            else:
                for i in range(len(blocks)):
                    prefix = f"{self.spec.blocks}.{i}."
                    # The block being worked on; the count is done ones.
                    bar.set_description(f"optimum-bc {prefix[:-1]}")
                    if self.placement is not None:
                        self.placement.onload(blocks[i], prefix)
                    h_q, h_fp = self.quantize_block(i, blocks[i], h_q, h_fp)
                    drop_dense_caches(blocks[i])
                    if self.placement is not None:
                        self.placement.offload(blocks[i], prefix)
                    bar.update(1)
        bar.close()
        if self.race:
            self._race_finish()
        flags = bias_flags(self.model.config, self.spec.blocks, self.compensated)
        for flag, value in flags.items():
            setattr(self.model.config, flag, value)
        if self.float_biases:
            recorded = list(getattr(self.model.config, FLOAT_BIASES_ATTR, None) or [])
            setattr(self.model.config, FLOAT_BIASES_ATTR, sorted(set(recorded + self.float_biases)))
        self.report.total_seconds = time.perf_counter() - start
        return self.report

    def quantize_block(
        self, index: int, block: nn.Module, h_q: list[_Batch], h_fp: list[_Batch] | None
    ) -> tuple[list[_Batch], list[_Batch] | None]:
        """Quantize, compensate and pack one block; return the next block's inputs (quantized, float) streams."""
        t0 = time.perf_counter()
        device = first_param_device(block)
        # Blocks of a device map may sit on different devices: the streams follow the block, or stay on the CPU
        # (offloaded activations) and come to the device one batch at a time.
        store = self.store or device
        h_q = [b.for_block(index).to(device, store) for b in h_q]
        h_fp = [b.for_block(index).to(device, store) for b in h_fp] if h_fp is not None else None
        self.clock = BlockClock(self.local_batches)  # passes over all calibration tokens, budgeted or not
        layout = self.observe(index, block, h_q[0] if h_q else None, device)
        # Each data-parallel rank observed its own first batch: the layouts must agree, or the sums would not match.
        distributed.check_agree((layout.groups, sorted(layout.left_out)), f"layer layout of block {index}")
        fblock = float_copy(block, self.placement, f"{self.spec.blocks}.{index}.") if self.float_stream else None
        stages = self.stages(layout)
        # BC needs first moments only: per Linear group the sums of the float inputs (all taken in the one float pass
        # of stage 0) and, for the sequential target, of the quantized prefix's inputs (each stage's own pass).
        bc_keys = [g[0] for stage in stages for g in stage] if self.bc else []
        sink_tokens = self.config.layer_sink_tokens
        moments: dict[str, InputMoments] = {}
        fold_sums: dict[str, FoldInputSums] = {}
        for key in bc_keys:
            in_features = layer_features(block.get_submodule(key))[0]
            target = "sequential" if self.act_float_target else self.target  # δ = x - Q_a(x)
            moments[key] = InputMoments(in_features, target, device, self.positions, sink_tokens)
            if self.auto:
                fold_sums[key] = FoldInputSums(in_features, sink_tokens, device)
        if self.race:
            self._race_block_start(index, {k: s.sum_x.shape[-1] for k, s in fold_sums.items()}, device, store)
        self.auto_layers, self.measured = [], []
        # The report pairs the float Linears' outputs of stage 0's pass (its own batches) with the quantized ones.
        groups = {rel: g[0] for stage in stages for g in stage for rel in g}
        float_residual = self.target == "float" or (self.auto and not self.race)
        self.kept = FloatOutputs(groups, float_residual, store) if self.bc else None
        next_fp: list[_Batch] | None = [] if self.float_stream else None
        act_pair = (self.act_float_target or self.auto_act) and not self.act_at_stage_0
        pair = self.algorithm.needs_float_inputs or act_pair
        for s, stage in enumerate(stages):
            keys = [g[0] for g in stage]
            need_q = self.algorithm.needs_inputs or self.sequential_target
            # The float block runs whole once (stage 0): its output feeds the next block and every BC float sum is
            # taken there; algorithms using float inputs (ERQ) pair each stage's float inputs with its quantized ones
            # (a float pass stopped at the stage).
            float_keys = list(dict.fromkeys((bc_keys if s == 0 else []) + (keys if pair else [])))
            run_float = self.float_stream and (s == 0 or pair)
            quantizers = {
                k: self.algorithm(layer_features(block.get_submodule(k))[0], **self._options()) for k in keys
            }
            acts = StageActivations(self.config, keys)
            if acts.static:  # fit the input scales on the quantized stream before the weights see the inputs
                with self.clock.timed("forward"):
                    fit_input_scales(acts, block, keys, h_q, device, self.clock.count_pass)
            if need_q or run_float:
                for b, batch in enumerate(h_q):
                    seen_q: dict[str, torch.Tensor] = {}
                    seen_fp: dict[str, torch.Tensor] = {}
                    valid = batch.valid
                    positions = _valid_positions(valid)
                    fold = fold_of(self.batch_ids[b]) if self.auto else 0
                    in_bc = b < self.bc_batches  # BC's sums: the budget batches only (the report: a prefix of them)
                    if need_q and (self.algorithm.needs_inputs or in_bc):
                        with self.clock.timed("forward"), _capture_inputs(block, keys, seen_q, stop=True):
                            self.clock.count_pass(stopped=True)
                            _run_block(block, batch.hidden.to(device), batch.kwargs)
                        with self.clock.timed("statistics"):
                            seen_q = {k: _valid_rows(acts.apply(k, v), valid) for k, v in seen_q.items()}
                            for key in keys:
                                quantizers[key].add_batch(seen_q[key])
                                if self.sequential_target and in_bc:
                                    moments[key].add_quant(seen_q[key], positions)
                                if key in fold_sums and in_bc:
                                    fold_sums[key].add_quant(fold, seen_q[key], positions)
                    if run_float and b < len(h_fp):
                        fp_batch = h_fp[b]
                        keep = (
                            self.kept.recording(fblock, valid)
                            if s == 0 and b < self.report_batches and self.kept is not None
                            else nullcontext()
                        )
                        # Only the first stage needs the whole float block: its output feeds the next block.
                        capture = _capture_inputs(fblock, float_keys, seen_fp, stop=s > 0)
                        with self.clock.timed("forward"), capture, keep:
                            self.clock.count_pass(stopped=s > 0)
                            out = _run_block(fblock, fp_batch.hidden.to(device), fp_batch.kwargs)
                        if s == 0:
                            next_fp.append(fp_batch.with_hidden(out.to(store)))
                        with self.clock.timed("statistics"):
                            for key in float_keys:
                                x_fp = _valid_rows(seen_fp[key], valid)
                                if self.algorithm.needs_float_inputs and key in quantizers:
                                    quantizers[key].add_float_batch(seen_q[key], x_fp)
                                if not in_bc:
                                    continue
                                if s == 0 and key in moments:
                                    moments[key].add_float(x_fp, positions)
                                # Q_a(x): at the layer's own stage (its static scale), or at stage 0 (dynamic).
                                act_here = s == 0 if self.act_at_stage_0 else key in quantizers
                                if self.act_float_target and act_here:
                                    moments[key].add_quant(acts.apply(key, x_fp), positions)
                                if s == 0 and key in fold_sums:
                                    fold_sums[key].add_float(fold, x_fp, positions)
                                    self._race_add_float(key, fold, x_fp, positions)
                                if self.auto_act and act_here and key in fold_sums:
                                    x_act = acts.apply(key, x_fp)
                                    fold_sums[key].add_float_act(fold, x_act, positions)
                                    self._race_add_float(key, fold, x_act, positions, act=True)
            if self.race:
                with self.clock.timed("bc"):
                    self._race_stage(block, keys, acts, device)
            self._finish_stage(index, block, stage, quantizers, moments, fold_sums, acts)
            if self.placement is not None:  # the stage's replaced float Linears, before the next stage's solve
                self.placement.release()

        def run(module: nn.Module, batch: _Batch) -> torch.Tensor:
            return _run_block(module, batch.hidden.to(device), batch.kwargs)

        calibrate_block_attention(block, h_q, run, self.config)
        experts = ExpertCalibrator(self.config, self._options(), self.algorithm, run, self.skip)
        with self.clock.timed("solve"):
            self.report.experts.extend(experts.quantize(block, f"{self.spec.blocks}.{index}.", h_q, self.model.config))
        block_report = BlockReport(index=index, seconds=0.0)
        if self.auto:
            with self.clock.timed("bc"):
                if self.race:
                    self._race_register(index, block_report)
                else:
                    self._choose_block(block, h_q, next_fp, block_report, device)
        del fblock  # its last use was the stage passes: free it before the race's and layer-level BC's passes
        if self.bc:
            # The next block's inputs, paired on the way with the kept float Linear outputs: the report's MSEs.
            next_q = self._measure_layers(index, block, h_q, device, store)
        else:
            with self.clock.timed("forward"):
                next_q = [
                    b.with_hidden(self._counted_run(block, b.hidden.to(device), b.kwargs).to(store)) for b in h_q
                ]
        if self.race:
            with self.clock.timed("bc"):
                next_q = self._race_step(index, block, next_q, next_fp, block_report, device, store)
        if self.config.bc_layer:
            with self.clock.timed("bc"):
                self._compensate_block(index, block, layout.bias_target, h_fp, next_q, next_fp, block_report, device)
        block_report.seconds = time.perf_counter() - t0
        self.clock.fill(block_report)
        self.report.blocks.append(block_report)
        return next_q, next_fp

    def _finish_stage(
        self,
        index: int,
        block: nn.Module,
        stage: list[tuple[str, ...]],
        quantizers: dict[str, WeightQuantizer],
        moments: dict[str, InputMoments],
        fold_sums: dict[str, FoldInputSums],
        acts: StageActivations,
    ) -> None:
        """Quantize every Linear of a stage, add its compensation bias and swap in the packed layer (with its input
        quantizer, ``acts``).

        With ``bc_target="auto"`` the bias is provisional (the sequential target's) until the block chooses."""
        prefix = f"{self.spec.blocks}.{index}."
        for group in stage:
            quantizer = quantizers[group[0]]
            linears = [block.get_submodule(rel) for rel in group]
            # Linears sharing an input share the statistics and their rows are independent: quantize them stacked.
            t0 = time.perf_counter()
            weights = [dense_weight(linear) for linear in linears]
            # Data-parallel ranks sum their statistics here, in the same group order on every rank.
            for stats in (quantizer, moments.get(group[0]), fold_sums.get(group[0])):
                if stats is not None:
                    stats.reduce()
            with self.clock.timed("solve"):
                stacked = quantizer.quantize(torch.cat(weights))
            quantizer.free()
            share = (time.perf_counter() - t0) / stacked.codes.shape[0]
            start = 0
            for rel, linear, W in zip(group, linears, weights, strict=True):
                t0 = time.perf_counter()
                qw = stacked.rows(start, start + W.shape[0])
                start += W.shape[0]
                bias = linear.bias.data.clone() if linear.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)
                row = LayerReport(name=prefix + rel, block=index, seconds=0.0, loss=qw.loss, damp=qw.damp)
                base = bias if self.positions is None else None  # folded in float32, rounded once
                comp = moments[group[0]].compensate(W, qw.dequantize(), W.dtype, base) if self.bc else None
                if comp is not None:
                    # Its MSEs come from the residual pass at the block's end, which needs the float bias (read here:
                    # a float copy streamed from disk holds its tensors only during its forward).
                    float_bias = linear.bias.detach().float().clone() if linear.bias is not None else None
                    self.measured.append((rel, row, float_bias))
                    if self.positions is None:
                        bias = comp.bias
                        self.compensated.append(prefix + rel)
                qlinear = packed_layer(qw, self.config, bias, W.dtype).to(W.device)
                acts.attach(group[0], qlinear)  # its input quantizer (none without act_bits)
                if comp is not None and self.positions is not None:
                    qlinear.set_position_bias(comp.bias)
                if comp is not None and comp.sink is not None:
                    qlinear.set_sink_bias(comp.sink)
                if group[0] in fold_sums:
                    self._add_auto_layer(prefix + rel, qlinear, linear, W, qw.dequantize(), group, fold_sums[group[0]])
                parent_name, _, child = rel.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child, qlinear)
                row.seconds = time.perf_counter() - t0 + share * W.shape[0]
                self.report.layers.append(row)
        for group in stage:
            moments.pop(group[0], None)
            fold_sums.pop(group[0], None)
