"""How the calibrator sees a block: its Linears' shared inputs (one observed forward), the stages they are
quantized in, and the refusals that must come before any long work. A mixin of
:class:`optimum_bc.calibration.calibrator.BlockCalibrator` (its state: model, spec, config, skip, positions)."""

import logging

import torch
from torch import nn

from .architectures import block_layers
from .block_inputs import _Batch
from .discovery import BlockLayout, find_output_bias, fused_expert_weights, observe_block
from .streams import _run_block


logger = logging.getLogger(__name__)


class BlockLayoutSteps:
    """The layout steps of the calibrator (see the module docstring)."""

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
        if self.config.act_bits is not None and fused_expert_weights(block):
            raise ValueError(
                f"act_bits={self.config.act_bits} is not available for model_type {self.model.config.model_type!r}: "
                "its fused experts have no input quantizer, so their inputs would silently stay in float. Fix: "
                "act_bits=None (weight-only quantization)."
            )
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
