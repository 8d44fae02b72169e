"""Generic discovery of a decoder's blocks and their quantizable layers, for any transformers causal LM.

Structure comes from the model alone (so a pre-quantized reload rebuilds the same packed layers from a meta-device
skeleton): the decoder blocks are the ``nn.ModuleList`` of identical blocks (preferring the class transformers marks
as not to be split, ``model._no_split_modules``), and the quantizable layers are the ``nn.Linear`` and GPT-2-style
``Conv1D`` modules inside them, routers excepted. Forward order and input sharing come from observing one calibration
forward of each block (:func:`observe_block`), never from names. The Linear whose bias adds directly to the block
output (where layer-level compensation folds) is found by a perturbation test (:func:`find_output_bias`).
"""

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers.packed_base import PackedLinearBase


logger = logging.getLogger(__name__)

#: Config attributes holding the number of routed experts of a mixture-of-experts model.
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def is_quantizable(module: nn.Module) -> bool:
    """A float ``nn.Linear`` or ``Conv1D`` (transposed weight), or one already packed by optimum-bc."""
    return isinstance(module, nn.Linear | Conv1D | PackedLinearBase)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a quantizable layer (``Conv1D`` stores its weight as ``[in, out]``)."""
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float weight as ``[out, in]`` (``Conv1D`` transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.data.T.contiguous()
    return module.weight.data


def _expert_counts(config: object) -> set[int]:
    return {int(v) for k in _EXPERT_COUNTS if isinstance(v := getattr(config, k, None), int) and v > 0}


def is_router(name: str, module: nn.Module, config: object) -> bool:
    """A router / gate Linear of a mixture of experts (kept in float): it scores experts (``out_features`` is the
    expert count, or 1 for a shared-expert gate) or is named a router."""
    leaf = name.rpartition(".")[2].lower()
    if "router" in leaf:
        return True
    counts = _expert_counts(config)
    if not counts or not is_quantizable(module):
        return False
    out = layer_features(module)[1]
    return out in counts or (out == 1 and "gate" in leaf)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> str:
    """Dotted path of the ModuleList of decoder blocks, or a ValueError naming what was not found.

    Candidates are ModuleLists of blocks of one class holding quantizable layers; a list whose class is in
    ``model._no_split_modules`` wins, then one inside the text decoder (``model.get_decoder()``), then the largest.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    decoder_names = {name for name, m in model.named_modules() if decoder is not None and m is decoder}
    best: tuple | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child).__name__ for child in module}
        # Identical blocks, or (hybrid stacks) blocks whose classes transformers all marks as not to be split.
        if not (len(kinds) == 1 or kinds <= no_split) or not any(is_quantizable(m) for m in module[0].modules()):
            continue
        in_decoder = any(name == d or name.startswith(d + ".") or d == "" for d in decoder_names)
        score = (type(module[0]).__name__ in no_split, in_decoder, _param_count(module), -name.count("."))
        if best is None or score > best[0]:
            best = (score, name)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}): no repeated decoder "
            "blocks found (no nn.ModuleList of identical blocks holding nn.Linear or Conv1D layers). Fix: register "
            "an override naming the blocks, e.g. optimum_bc.architectures.register_architecture(model_type, "
            "blocks='model.layers'), or quantize a model whose projections are nn.Linear."
        )
    return best[1]


def candidate_layers(block: nn.Module, config: object) -> list[str]:
    """Names (relative to ``block``) of its quantizable layers in registration order, routers excepted."""
    return [
        name
        for name, module in block.named_modules()
        if name and is_quantizable(module) and not is_router(name, module, config)
    ]


def is_fused_expert_weight(module: nn.Module, param: torch.Tensor) -> bool:
    """A 3-D parameter that is not a convolution kernel: a fused ``[experts, ., .]`` mixture-of-experts weight."""
    return param.dim() == 3 and not isinstance(module, nn.modules.conv._ConvNd)


def fused_expert_weights(block: nn.Module) -> list[str]:
    """Names of the fused mixture-of-experts weights (see :func:`is_fused_expert_weight`) in ``block``."""
    return [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in block.named_modules()
        for name, p in module.named_parameters(recurse=False)
        if is_fused_expert_weight(module, p)
    ]


@dataclass
class BlockLayout:
    """What one observed forward of a block showed about its quantizable layers."""

    groups: list[tuple[str, ...]]  # forward order; the layers of a group read the same input
    # Layers kept in float: never called on the calibration tokens, called more than once, or fed other rows than
    # the block's tokens (routed experts), with the reason.
    left_out: dict[str, str] = field(default_factory=dict)
    keeps_sequence_axis: bool = True  # every layer saw ``[batch, tokens, features]`` inputs
    order: list[str] = field(default_factory=list)  # every called module (layers and biased norms), first call order
    bias_target: str | None = None  # where layer-level BC folds (set when bc_layer is on)


def _biased(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return isinstance(bias, torch.Tensor) and bias.dim() == 1 and not list(module.children())


def _run(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def observe_block(
    block: nn.Module, names: list[str], hidden: torch.Tensor, kwargs: dict, run: object = None
) -> BlockLayout:
    """Run ``block`` once on ``hidden`` and group ``names`` by forward order and shared input.

    ``run(block, hidden, kwargs)`` runs the forward (default: call the block). Layers reading equal inputs (same
    values, same shape) form one group, quantized on one set of statistics.
    """
    tokens = hidden.shape[0] * hidden.shape[1]
    calls: dict[str, list[torch.Tensor]] = {}
    order: list[str] = []
    handles = []
    wanted = set(names)
    for name, module in block.named_modules():
        if name and (name in wanted or is_quantizable(module) or _biased(module)):

            def hook(module: nn.Module, args: tuple, name: str = name) -> None:
                if name not in calls:
                    order.append(name)
                    calls[name] = []
                if name in wanted and args:
                    calls[name].append(args[0].detach())

            handles.append(module.register_forward_pre_hook(hook))
    try:
        (run or _run)(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    layout = BlockLayout(groups=[], order=order)
    inputs: list[torch.Tensor] = []
    for name in names:
        seen = calls.get(name)
        if not seen:
            layout.left_out[name] = "never called on the calibration tokens"
        elif len(seen) > 1:
            layout.left_out[name] = f"called {len(seen)} times in one forward"
        elif seen[0].numel() // seen[0].shape[-1] != tokens:
            layout.left_out[name] = (
                f"reads {seen[0].numel() // seen[0].shape[-1]} rows, not the block's {tokens} tokens"
            )
    for name in [n for n in order if n in wanted and n not in layout.left_out]:
        x = calls[name][0]
        layout.keeps_sequence_axis &= x.dim() == 3
        for g, rep in enumerate(inputs):
            if rep.shape == x.shape and torch.equal(rep, x):
                layout.groups[g] = (*layout.groups[g], name)
                break
        else:
            inputs.append(x)
            layout.groups.append((name,))
    return layout


@torch.no_grad()
def find_output_bias(
    block: nn.Module, order: list[str], hidden: torch.Tensor, kwargs: dict, run: object = None
) -> str | None:
    """The last module in forward order whose output adds unchanged to the block output, or None.

    Perturbation test: adding a vector ``d`` to the module's output must move every token of the block output by
    exactly ``d``; then a bias added to that module compensates the block output. Only modules that hold (or, as a
    Linear, can hold) a bias qualify. Stops at the first hit from the end, usually one forward.
    """
    run = run or _run
    reference = run(block, hidden, kwargs)
    for name in reversed(order):
        module = block.get_submodule(name)
        if not (is_quantizable(module) or _biased(module)):
            continue
        width = layer_features(module)[1] if is_quantizable(module) else module.bias.shape[0]
        if width != reference.shape[-1]:
            continue
        g = torch.Generator().manual_seed(0)
        scale = float(reference.float().std()) + 1e-3
        delta = (torch.randn(width, generator=g) * scale).to(reference.dtype).to(reference.device)

        def add(module: nn.Module, args: tuple, out: torch.Tensor, delta: torch.Tensor = delta) -> torch.Tensor:
            return out + delta if isinstance(out, torch.Tensor) else out

        handle = module.register_forward_hook(add)
        try:
            moved = run(block, hidden, kwargs) - reference
        finally:
            handle.remove()
        error = (moved.float() - delta.float()).abs().max()
        if float(error) <= 1e-2 * float(delta.float().abs().max()):
            return name
    return None
