"""Sequential block-wise calibration: quantize, compensate and pack one decoder block at a time.

Each block is calibrated on the outputs of the already quantized and compensated blocks before it (the quantized
stream ``h_q``). When bias compensation is on, the float model's own activations (the float stream ``h_fp``) are
propagated beside it through a float copy of the current block, so the compensation target is the float model.

Inside a block the Linears are quantized stage by stage (``true_sequential``): each stage is observed on the block
with the earlier stages already quantized and compensated. Padding tokens never enter any statistic.
"""

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .. import distributed
from ..algorithms import WeightQuantizer, get_algorithm
from ..algorithms.bc_select import (
    FOLDS,
    AutoLayer,
    BlockChoice,
    FoldInputSums,
    choose_block_mode,
    fold_of,
    normalized_error,
    token_rows,
)
from ..algorithms.compensation import InputMoments
from ..config import BCQuantizationConfig
from ..formats.activations import StageActivations
from ..layers import kernels
from ..layers.packed_base import PackedLinearBase
from ..layers.positions import token_positions
from .architectures import ArchitectureSpec, bias_flags, block_layers, first_param_device, get_blocks, is_skipped
from .block_bias import fold_block_bias, holds_sink, residual_accumulator
from .block_inputs import _Batch, _StopForward
from .discovery import BlockLayout, dense_weight, find_output_bias, fused_expert_weights, layer_features, observe_block
from .expert_calibration import ExpertCalibrator
from .offload import OffloadedCalibration
from .report import BlockReport, LayerReport, QuantizationReport
from .skeleton import packed_layer


logger = logging.getLogger(__name__)

#: ``model.config`` attribute listing float modules that layer-level BC gave a new bias (a reload creates it).
FLOAT_BIASES_ATTR = "optimum_bc_float_biases"


_progress_bars = True


def set_progress_bars(enabled: bool) -> None:
    """Show or hide the calibration bar (transformers' tqdm: ``disable_progress_bar()`` hides it too)."""
    global _progress_bars
    _progress_bars = enabled


#: Activations are offloaded by default when they would fill more than this share of the GPU's free memory; the rest
#: is left to the block, its float copy, the Hessians and the forward pass's own temporaries.
ACTIVATION_SHARE = 0.5


def free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator ``device`` (None when the backend cannot tell)."""
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "mem_get_info"):
        return None
    return int(backend.mem_get_info(device)[0])


def activation_bytes(tokens: int, hidden_size: int, dtype: torch.dtype, streams: int) -> int:
    """Memory of the calibration activations: ``streams`` streams, each one block's inputs and outputs."""
    return tokens * hidden_size * torch.empty((), dtype=dtype).element_size() * streams * 2


def activation_store(setting: bool | None, device: torch.device, needed: int) -> torch.device | None:
    """Where the calibration activations live between uses: None (with the block, on ``device``) or the CPU.

    ``setting`` is ``config.offload_activations``; None decides from the free memory of ``device``: offload when
    the activations (``needed`` bytes) exceed :data:`ACTIVATION_SHARE` of it. Blocks running on the CPU keep theirs.
    """
    if device.type == "cpu":
        return None
    if setting is None:
        free = free_memory(device)
        setting = free is not None and needed > ACTIVATION_SHARE * free
        logger.debug(
            "optimum-bc: calibration activations need %.1f MiB, %s MiB free on %s: %s",
            needed / 2**20,
            "?" if free is None else f"{free / 2**20:.0f}",
            device,
            "kept on the CPU" if setting else f"kept on {device}",
        )
    return torch.device("cpu") if setting else None


def _valid_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (``(batch, tokens, d)`` or already flattened ``(batch*tokens, d)``) at non-padding tokens."""
    return x.reshape(-1, x.shape[-1])[valid.reshape(-1)]


def _valid_positions(valid: torch.Tensor) -> torch.Tensor:
    """Token position of each row returned by :func:`_valid_rows` for the same mask."""
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    return positions[valid]


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block's output hidden states; calibration windows are right-padded, so token ``t`` is at position ``t``
    (published for families whose blocks receive no ``position_ids``)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], hidden.shape[1])
    with token_positions(positions):
        out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


@contextmanager
def _capture_inputs(
    block: nn.Module, names: list[str], store: dict[str, torch.Tensor], stop: bool = False
) -> Iterator[None]:
    """Record the input of each named submodule of ``block`` into ``store`` during the forward passes inside.

    With ``stop`` the forward is cut (``_StopForward``) once every input is recorded: the rest of the block is not
    needed to observe them.
    """
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            store[name] = args[0].detach()
            if stop and len(store) == len(names):
                raise _StopForward

        handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


class BlockCalibrator:
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
        # The global guard of "auto": a BC-off quantized stream runs beside the chosen one; once it is closer to the
        # float model, every bias auto added is taken back and the later blocks get none (bc_off_since).
        self.off_stream: list[_Batch] | None = None
        self.auto_history: list[tuple[int, AutoLayer]] = []
        self.bc_off_since: int | None = None
        # The float stream runs beside the quantized one for BC's target and for algorithms that use float inputs.
        self.float_stream = config.needs_float_stream
        # Whether each stage pairs its quantized inputs with the float inputs of the same Linears.
        self.paired = self.sequential_target or self.algorithm.needs_float_inputs
        self.report = QuantizationReport()
        self.compensated: list[str] = []
        # Float modules that layer-level BC gave a bias they had no slot for (recorded so a reload creates it).
        self.float_biases: list[str] = []

    def stages(self, layout: BlockLayout) -> list[list[tuple[str, ...]]]:
        """Per stage, the groups of layers (relative names) sharing one input, in forward order.

        ``modules_in_block_to_quantize`` fixes the stages (one per inner list, in its order); otherwise each group is
        a stage (``true_sequential``) or the whole block is one.
        """
        groups = list(layout.groups)
        if self.config.modules_in_block_to_quantize:
            stages = []
            for names in map(set, self.config.modules_in_block_to_quantize):
                stage = [tuple(n for n in g if n in names) for g in groups if names.intersection(g)]
                if stage:
                    stages.append(stage)
            return stages
        return [[g] for g in groups] if self.config.true_sequential else [groups]

    def observe(self, index: int, block: nn.Module, batch: _Batch | None, device: torch.device) -> BlockLayout:
        """One forward of ``block`` on one batch: its layers' order and shared inputs; refuse what cannot work."""
        prefix = f"{self.spec.blocks}.{index}."
        names = block_layers(block, prefix, self.spec, self.model.config, self.skip)
        if batch is None:  # no calibration data (RTN without BC): no statistics, so no grouping is needed
            return BlockLayout(groups=[(n,) for n in names], order=names)
        hidden = batch.hidden.to(device)
        layout = observe_block(block, names, hidden, batch.kwargs, run=_run_block)
        if self.positions is not None and fused_expert_weights(block):
            raise ValueError(
                f"bc_granularity='position' is not available for model_type {self.model.config.model_type!r}: its "
                "experts see routed (flattened) tokens, so a per-position bias cannot be applied. Fix: "
                "bc_granularity='channel'."
            )
        for rel, reason in layout.left_out.items():
            logger.warning("optimum-bc: %s%s stays in float: %s", prefix, rel, reason)
            self.skip.append(prefix + rel)
            if (
                self.config.modules_to_not_convert is not None
                and prefix + rel not in self.config.modules_to_not_convert
            ):
                self.config.modules_to_not_convert.append(prefix + rel)
        if self.config.bc_layer:
            target = self.spec.layer_bias_target or find_output_bias(
                block, layout.order, hidden, batch.kwargs, run=_run_block
            )
            if target is None:
                raise ValueError(
                    f"bc_layer=True: no module of block {prefix.rstrip('.')} ({type(block).__name__}) adds its output "
                    "unchanged to the block output (e.g. a norm follows the residual branch, as Gemma 2's post "
                    "norms), so the block bias has no exact place. Fix: bc_layer=False, or name a target with "
                    "optimum_bc.architectures.register_architecture(model_type, blocks, layer_bias_target=...)."
                )
            layout.bias_target = target
        return layout

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
        h_q = batches
        h_fp = batches if self.float_stream else None
        # The guard needs the biases auto stored to be all the BC there is: not with layer-level BC on top.
        self.off_stream = batches if self.auto and not self.config.bc_layer else None
        blocks = get_blocks(self.model, self.spec)
        bar = tqdm(total=len(blocks), desc="optimum-bc", unit="block", disable=not _progress_bars)
        # The quantized stream runs the packed layers on the exact path (the fast kernels compute in bf16), and
        # their dense caches are dropped once a block is done, so the quantized model holds only packed weights.
        with kernels.use_backend("reference"):
            for i in range(len(blocks)):
                prefix = f"{self.spec.blocks}.{i}."
                bar.set_description(f"optimum-bc {prefix[:-1]}")  # the block being worked on; the count is done ones
                if self.placement is not None:
                    self.placement.onload(blocks[i], prefix)
                h_q, h_fp = self.quantize_block(i, blocks[i], h_q, h_fp)
                for module in blocks[i].modules():
                    if isinstance(module, PackedLinearBase):
                        module.reset_cache()
                if self.placement is not None:
                    self.placement.offload(blocks[i], prefix)
                bar.update(1)
        bar.close()
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
        layout = self.observe(index, block, h_q[0] if h_q else None, device)
        # Each data-parallel rank observed its own first batch: the layouts must agree, or the sums would not match.
        distributed.check_agree((layout.groups, sorted(layout.left_out)), f"layer layout of block {index}")
        fblock = copy.deepcopy(block) if self.float_stream else None
        stages = self.stages(layout)
        moments: dict[str, InputMoments] = {}
        fold_sums: dict[str, FoldInputSums] = {}
        self.auto_layers = []
        next_fp: list[_Batch] | None = [] if self.float_stream else None
        for s, stage in enumerate(stages):
            keys = [g[0] for g in stage]
            need_q = self.algorithm.needs_inputs or self.sequential_target
            # The float stream runs once per block (its output feeds the next block); the float target observes all
            # inputs in that pass; the sequential target, and algorithms using float inputs (ERQ), pair each stage's
            # float inputs with its quantized ones.
            if self.paired:
                float_keys = keys
            else:
                float_keys = [g[0] for st in stages for g in st] if (self.bc and s == 0) else []
            run_float = self.float_stream and (s == 0 or bool(float_keys))
            quantizers = {
                k: self.algorithm(layer_features(block.get_submodule(k))[0], **self._options()) for k in keys
            }
            acts = StageActivations(self.config, keys)
            if acts.static:  # fit the input scales on the quantized stream before the weights see the inputs
                for batch in h_q:
                    seen: dict[str, torch.Tensor] = {}
                    with _capture_inputs(block, keys, seen, stop=True):
                        _run_block(block, batch.hidden.to(device), batch.kwargs)
                    for key in keys:
                        acts.observe(key, _valid_rows(seen[key], batch.valid))
                acts.fit()
            for key in float_keys if self.bc else []:
                in_features = layer_features(block.get_submodule(key))[0]
                if self.auto:
                    fold_sums[key] = FoldInputSums(in_features, self.config.layer_sink_tokens, device)
                moments[key] = InputMoments(
                    in_features,
                    self.target,
                    device,
                    positions=self.positions,
                    sink_tokens=self.config.layer_sink_tokens,
                )
            if need_q or run_float:
                for b, batch in enumerate(h_q):
                    seen_q: dict[str, torch.Tensor] = {}
                    seen_fp: dict[str, torch.Tensor] = {}
                    valid = batch.valid
                    if need_q:
                        with _capture_inputs(block, keys, seen_q, stop=True):
                            _run_block(block, batch.hidden.to(device), batch.kwargs)
                        seen_q = {k: acts.apply(k, v) for k, v in seen_q.items()}
                        for key in keys:
                            quantizers[key].add_batch(_valid_rows(seen_q[key], valid))
                    if run_float:
                        fp_batch = h_fp[b]
                        # Only the first stage needs the whole float block: its output feeds the next block.
                        with _capture_inputs(fblock, float_keys, seen_fp, stop=s > 0):
                            out = _run_block(fblock, fp_batch.hidden.to(device), fp_batch.kwargs)
                        if s == 0:
                            next_fp.append(fp_batch.with_hidden(out.to(store)))
                        for key in float_keys:
                            x_fp = _valid_rows(seen_fp[key], valid)
                            if self.algorithm.needs_float_inputs:
                                quantizers[key].add_float_batch(_valid_rows(seen_q[key], valid), x_fp)
                            if self.bc:
                                x_q = _valid_rows(seen_q[key], valid) if self.sequential_target else None
                                moments[key].add_batch(x_fp, x_q, _valid_positions(valid))
                            if key in fold_sums:
                                fold_sums[key].add_batch(
                                    fold_of(self.batch_ids[b]), x_fp, x_q, _valid_positions(valid)
                                )
            self._finish_stage(index, block, stage, quantizers, moments, fold_sums, acts)
        del fblock  # its last use was the last stage: free it before the quantized block's own passes below
        experts = ExpertCalibrator(
            self.config,
            self._options(),
            self.algorithm,
            lambda m, b: _run_block(m, b.hidden.to(device), b.kwargs),
            self.skip,
        )
        self.report.experts.extend(experts.quantize(block, f"{self.spec.blocks}.{index}.", h_q, self.model.config))
        block_report = BlockReport(index=index, seconds=0.0)
        if self.auto:
            self._choose_block(block, h_q, next_fp, block_report, device)
        next_q = [b.with_hidden(_run_block(block, b.hidden.to(device), b.kwargs).to(store)) for b in h_q]
        if self.off_stream is not None:
            next_q = self._guard(index, block, next_q, next_fp, block_report, device, store)
        if self.config.bc_layer:
            self._compensate_block(index, block, layout.bias_target, h_fp, next_q, next_fp, block_report, device)
        block_report.seconds = time.perf_counter() - t0
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
        acts: StageActivations | None = None,
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
            quantizer.reduce()
            if self.bc:
                moments[group[0]].reduce()
            if group[0] in fold_sums:
                fold_sums[group[0]].reduce()
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
                    row.mse_before, row.mse_after = comp.mse_before, comp.mse_after
                    if self.positions is None:
                        bias = comp.bias
                        self.compensated.append(prefix + rel)
                qlinear = packed_layer(qw, self.config, bias, W.dtype).to(W.device)
                if acts is not None:
                    acts.attach(group[0], qlinear)
                if comp is not None and self.positions is not None:
                    qlinear.set_position_bias(comp.bias)
                if comp is not None and comp.sink is not None:
                    qlinear.set_sink_bias(comp.sink)
                if group[0] in fold_sums:
                    sums = fold_sums[group[0]].residual_sums(W, qw.dequantize())
                    base = linear.bias.detach().float() if linear.bias is not None else torch.zeros(W.shape[0])
                    power = moments[group[0]].residual_power(W, qw.dequantize())
                    auto = AutoLayer(prefix + rel, qlinear, sums, base.to(sums.count.device), power)
                    self.auto_layers.append(auto)
                parent_name, _, child = rel.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child, qlinear)
                row.seconds = time.perf_counter() - t0 + share * W.shape[0]
                self.report.layers.append(row)
        for group in stage:
            moments.pop(group[0], None)
            fold_sums.pop(group[0], None)

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
