"""Where a model's decoder blocks and quantizable layers are: discovered generically, with optional overrides.

Every causal LM goes through :mod:`optimum_bc.calibration.discovery` (blocks from the model structure, layer order from one
observed forward). A family that needs it can be given an explicit override with :func:`register_architecture`
(the blocks' path, the module where layer-level compensation folds, layers to keep in float); an unknown family
works without one.
"""

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .discovery import candidate_layers, find_blocks


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the decoder blocks of one model are, and the overrides that apply to them."""

    blocks: str  # dotted path of the ModuleList of decoder blocks
    # Module (inside a block) whose bias receives the layer-level compensation; None: found by a perturbation test.
    layer_bias_target: str | None = None
    # Layers (relative to a block) kept in float even though they are quantizable.
    exclude: tuple[str, ...] = ()


#: Explicit per-``model_type`` overrides; empty by default (every family is discovered).
OVERRIDES: dict[str, ArchitectureSpec] = {}

#: Config flags that make stock loaders build biased Linears, keyed by words of the first module-name component.
_BIAS_FLAGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention_bias", ("attn", "attention")),
    ("mlp_bias", ("mlp", "ffn", "feed_forward")),
)


def register_architecture(
    model_type: str, blocks: str, layer_bias_target: str | None = None, exclude: tuple[str, ...] = ()
) -> None:
    """Override discovery for ``model_type``: the blocks' dotted path, the layer-BC target, layers kept in float."""
    OVERRIDES[model_type] = ArchitectureSpec(blocks, layer_bias_target, tuple(exclude))


def _setting(settings: Any, key: str) -> Any:
    """A quantization setting from a config object or its ``to_dict()`` (None when absent)."""
    return settings.get(key) if isinstance(settings, dict) else getattr(settings, key, None)


def resolve_spec(model: nn.Module, settings: Any = None) -> ArchitectureSpec:
    """The override for the model's ``model_type``, else the discovered blocks (works on a meta-device model).

    ``settings`` (default: ``model.config.quantization_config``) may name the blocks (``block_name_to_quantize``,
    which wins over the registered override's path) and the only layers to quantize in each block
    (``modules_in_block_to_quantize``: the block's other quantizable layers join the spec's ``exclude``).
    """
    if settings is None:
        settings = getattr(model.config, "quantization_config", None)
    blocks = _setting(settings, "block_name_to_quantize")
    if isinstance(blocks, list | tuple):
        blocks = blocks[0] if blocks else None
    spec = OVERRIDES.get(getattr(model.config, "model_type", None))
    if blocks is not None:
        spec = ArchitectureSpec(blocks=blocks) if spec is None else replace(spec, blocks=blocks)
    if spec is None:
        return _only_listed(model, ArchitectureSpec(blocks=find_blocks(model)), settings)
    get_blocks(model, spec)
    return _only_listed(model, spec, settings)


def _only_listed(model: nn.Module, spec: ArchitectureSpec, settings: Any) -> ArchitectureSpec:
    """``spec`` with every quantizable layer not named in ``modules_in_block_to_quantize`` excluded."""
    stages = _setting(settings, "modules_in_block_to_quantize")
    if not stages:
        return spec
    wanted = {name for stage in stages for name in stage}
    present: set[str] = set()
    for block in get_blocks(model, spec):
        present.update(candidate_layers(block, model.config))
    missing = sorted(wanted - present)
    if missing:
        raise ValueError(
            f"modules_in_block_to_quantize names {missing}, which are not quantizable layers of the blocks at "
            f"{spec.blocks!r}; they hold {sorted(present)}. Fix: use those names (relative to a block)."
        )
    return replace(spec, exclude=tuple(sorted(set(spec.exclude) | (present - wanted))))


def get_blocks(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    """The decoder blocks of ``model``."""
    try:
        blocks = model.get_submodule(spec.blocks)
    except AttributeError as err:
        raise ValueError(
            f"no module {spec.blocks!r} in {type(model).__name__}; fix the blocks path given to register_architecture "
            "or block_name_to_quantize (e.g. 'model.layers')"
        ) from err
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"expected a ModuleList at {spec.blocks!r}, found {type(blocks).__name__}")
    return blocks


def is_skipped(full_name: str, modules_to_not_convert: list[str]) -> bool:
    """Whether ``full_name`` matches an entry of ``modules_to_not_convert`` (exact name or dotted suffix/prefix)."""
    for pattern in modules_to_not_convert:
        if full_name == pattern or full_name.endswith("." + pattern) or full_name.startswith(pattern + "."):
            return True
    return False


def block_layers(block: nn.Module, prefix: str, spec: ArchitectureSpec, config: object, skip: list[str]) -> list[str]:
    """Quantizable layers of one block (relative names, registration order) that the config converts."""
    return [
        rel
        for rel in candidate_layers(block, config)
        if rel not in spec.exclude and not is_skipped(prefix + rel, skip)
    ]


def target_linears(model: nn.Module, spec: ArchitectureSpec, modules_to_not_convert: list[str]) -> list[str]:
    """Full names of the layers the config quantizes, block by block (reproducible from the structure alone)."""
    names = []
    for i, block in enumerate(get_blocks(model, spec)):
        prefix = f"{spec.blocks}.{i}."
        names += [prefix + rel for rel in block_layers(block, prefix, spec, model.config, modules_to_not_convert)]
    return names


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def bias_flags(config: object, blocks: str, compensated: list[str]) -> dict[str, bool]:
    """Config flags to set so stock loaders build biases where compensation added one (``attention_bias`` ...)."""
    flags = {}
    for flag, words in _BIAS_FLAGS:
        if not hasattr(config, flag):
            continue
        for name in compensated:
            rel = name[len(blocks) + 1 :].partition(".")[2]
            if any(word in rel.partition(".")[0].lower() for word in words):
                flags[flag] = True
    return flags


def first_param_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer of ``module`` (CPU if it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")
