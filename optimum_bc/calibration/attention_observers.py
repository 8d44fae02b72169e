"""Calibration of the attention MatMul quantizers (``act_attention=True``, see
:mod:`optimum_bc.layers.attention_quant`): fitted per block on the quantized stream, recorded for reload.

:func:`calibrate_block_attention` runs once per block after its Linears are quantized (their outputs, the query,
key and value, are the quantized model's), before the block's output feeds the next block, so that the next block,
the block's MoE experts and BC's choices see the quantized attention. The block's ``o_proj`` was fitted on float
attention outputs (the attention scales need the quantized ``q/k/v_proj`` first).
"""

from collections.abc import Callable

import torch
from torch import nn

from ..formats.activations import spec_from_config
from ..layers import attention_quant
from ..layers.attention_quant import QUANT_ATTR, AttentionQuantizer


#: ``model.config`` attribute listing the attention modules that carry a quantizer (a reload creates them).
ATTENTION_MODULES_ATTR = "optimum_bc_attention_modules"


def check(model: nn.Module, config: object) -> None:
    """Refuse (ValueError naming the fix) a model whose attention cannot take ``act_attention``."""
    if getattr(config, "act_attention", False):
        attention_quant.check_model(model)


def enable(model: nn.Module, config: object) -> None:
    """Before calibration: check ``model`` can take ``act_attention`` and switch it to the quantized attention."""
    if getattr(config, "act_attention", False):
        attention_quant.enable(model)


@torch.no_grad()
def calibrate_block_attention(
    block: nn.Module, batches: list, run: Callable[[nn.Module, object], torch.Tensor], config: object
) -> int:
    """Observe the block's attention inputs over ``batches`` (``_Batch``: ``.valid`` masks padding) with
    ``run(block, batch)``, then attach a fitted quantizer to each attention module; returns how many."""
    if not getattr(config, "act_attention", False) or not batches:
        return 0
    spec = spec_from_config(config)
    with attention_quant.observing(config) as observers:
        for batch in batches[:1] if spec.dynamic else batches:  # dynamic scales need only the modules
            with attention_quant.valid_tokens(batch.valid):
                run(block, batch)
    if not observers:
        raise ValueError(
            f"act_attention=True but no attention module of block {type(block).__name__} called the quantized "
            f"attention function (config._attn_implementation must be {attention_quant.ATTN_IMPLEMENTATION!r}). "
            "Fix: quantize through optimum_bc.quantize_model or from_pretrained, or set act_attention=False."
        )
    for module, observed in observers.items():
        params = None if spec.dynamic else {name: obs.params() for name, obs in observed.items()}
        attention_quant.attach(module, AttentionQuantizer(spec, params).to(first_tensor_device(module)))
    return len(observers)


def first_tensor_device(module: nn.Module) -> torch.device:
    """Where the module's parameters live (CPU for a module without any)."""
    tensor = next(module.parameters(), None)
    return torch.device("cpu") if tensor is None else tensor.device


def record(model: nn.Module) -> list[str]:
    """After calibration: list the attention modules holding a quantizer in ``model.config`` (for reload)."""
    names = [
        name for name, module in model.named_modules() if isinstance(getattr(module, QUANT_ATTR, None), nn.Module)
    ]
    if names:
        setattr(model.config, ATTENTION_MODULES_ATTR, names)
    return names


def attach_skeletons(model: nn.Module, config: object) -> int:
    """On a pre-quantized reload, before the weights load: an empty quantizer on every recorded attention module
    (its buffers then load from the checkpoint); returns how many."""
    names = getattr(model.config, ATTENTION_MODULES_ATTR, None) or []
    if not getattr(config, "act_attention", False):
        return 0
    spec = spec_from_config(config)
    for name in names:
        attention_quant.attach(model.get_submodule(name), AttentionQuantizer(spec))
    return len(names)


def remove(model: nn.Module) -> int:
    """``model.dequantize()``: drop the attention quantizers and go back to float ``sdpa`` attention, as the dense
    Linears drop their input quantizers; returns how many were removed."""
    names = [
        name for name, module in model.named_modules() if isinstance(getattr(module, QUANT_ATTR, None), nn.Module)
    ]
    for name in names:
        delattr(model.get_submodule(name), QUANT_ATTR)
    if getattr(model.config, "_attn_implementation", None) == attention_quant.ATTN_IMPLEMENTATION:
        model.set_attn_implementation("sdpa")
    if hasattr(model.config, ATTENTION_MODULES_ATTR):
        delattr(model.config, ATTENTION_MODULES_ATTR)
    return len(names)
