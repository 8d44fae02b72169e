"""Declarative per-``model_type`` description of where the decoder blocks and their Linears are.

Adding a model family means adding one :class:`ArchitectureSpec` to :data:`ARCHITECTURES`; the calibration loop
never branches on class names.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where to find and how to walk the decoder blocks of one model family."""

    blocks: str  # dotted path of the ModuleList of decoder blocks
    # Linears of one block in forward order, grouped: a group is quantized together after its inputs are observed.
    groups: tuple[tuple[str, ...], ...]
    # Module (inside a block) whose bias receives the layer-level compensation: the last op before the block output.
    layer_bias_target: str
    # Same for post-LayerNorm blocks, chosen when ``getattr(config, post_ln_flag) is False``.
    post_ln_flag: str | None = None
    post_ln_bias_target: str | None = None
    # Config flags that make stock loaders build biased Linears, keyed by the module-name prefix they cover.
    bias_config_flags: tuple[tuple[str, str], ...] = ()
    # Whether every Linear sees [batch, seq, features] inputs (needed by bc_granularity="position").
    keeps_sequence_axis: bool = True


_LLAMA = ArchitectureSpec(
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    layer_bias_target="mlp.down_proj",
    bias_config_flags=(("self_attn.", "attention_bias"), ("mlp.", "mlp_bias")),
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "opt": ArchitectureSpec(
        blocks="model.decoder.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        layer_bias_target="fc2",
        post_ln_flag="do_layer_norm_before",
        post_ln_bias_target="final_layer_norm",
        keeps_sequence_axis=False,  # OPT flattens tokens before fc1/fc2
    ),
    "llama": _LLAMA,
    "mistral": ArchitectureSpec(_LLAMA.blocks, _LLAMA.groups, _LLAMA.layer_bias_target),
    "qwen2": ArchitectureSpec(_LLAMA.blocks, _LLAMA.groups, _LLAMA.layer_bias_target),
}


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values we can quantize."""
    return sorted(ARCHITECTURES)


def get_spec(model_type: str) -> ArchitectureSpec:
    """The spec for ``model_type``, or a ValueError naming the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by optimum-bc; supported: {supported_model_types()}. "
            "To add a family, describe its blocks in optimum_bc/architectures.py (ARCHITECTURES)."
        )
    return ARCHITECTURES[model_type]


def check_supported(model_type: str, bc_granularity: str) -> ArchitectureSpec:
    """The spec for ``model_type`` after checking the config's options fit this architecture."""
    spec = get_spec(model_type)
    if bc_granularity == "position" and not spec.keeps_sequence_axis:
        raise ValueError(
            f"bc_granularity='position' is not available for model_type {model_type!r}: its MLP Linears see flattened "
            "tokens, so a per-position bias cannot be applied. Fix: bc_granularity='channel'."
        )
    return spec


def get_blocks(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    """The decoder blocks of ``model``."""
    blocks = model.get_submodule(spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"expected a ModuleList at {spec.blocks!r}, found {type(blocks).__name__}")
    return blocks


def layer_bias_target(config: object, spec: ArchitectureSpec) -> str:
    """Module inside a block whose bias adds directly to the block output (see ALGORITHMS.md §3.6)."""
    if spec.post_ln_flag is not None and getattr(config, spec.post_ln_flag, True) is False:
        return spec.post_ln_bias_target or spec.layer_bias_target
    return spec.layer_bias_target


def is_skipped(full_name: str, modules_to_not_convert: list[str]) -> bool:
    """Whether ``full_name`` matches an entry of ``modules_to_not_convert`` (exact name or dotted suffix/prefix)."""
    for pattern in modules_to_not_convert:
        if full_name == pattern or full_name.endswith("." + pattern) or full_name.startswith(pattern + "."):
            return True
    return False


def target_linears(model: nn.Module, spec: ArchitectureSpec, modules_to_not_convert: list[str]) -> list[str]:
    """Full names of the Linears the config quantizes, in block and forward order."""
    names = []
    for i, block in enumerate(get_blocks(model, spec)):
        for group in spec.groups:
            for rel in group:
                full = f"{spec.blocks}.{i}.{rel}"
                if is_skipped(full, modules_to_not_convert):
                    continue
                module = block.get_submodule(rel)
                if not isinstance(module, nn.Linear) and not hasattr(module, "qweight"):
                    raise ValueError(f"{full} is a {type(module).__name__}, expected a Linear")
                names.append(full)
    return names


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def bias_flags(spec: ArchitectureSpec, compensated: list[str]) -> dict[str, bool]:
    """Config flags to set so loaders build biases where compensation added one (LLaMA ``attention_bias`` ...)."""
    flags = {}
    for prefix, flag in spec.bias_config_flags:
        if any(f".{prefix}" in name for name in compensated):
            flags[flag] = True
    return flags


def first_param_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer of ``module`` (CPU if it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")
