"""Packed storage of the fused 3-D expert weights of transformers 5.x mixture-of-experts blocks.

A fused expert weight (``MixtralExperts.gate_up_proj [E, 2I, H]``, GPT-OSS's transposed ``[E, H, 2I]``, ...) becomes
a ``torch.nn.utils.parametrize`` parametrization holding one packed layer per expert (``QuantLinear`` or
``MXLinear``, the same storage as the Linears, always ``[out, in]``; :mod:`optimum_bc.layers.experts`). Reading the
attribute (``experts.gate_up_proj``) dequantizes the stacked weight, so every family's stock experts forward (eager,
batched or grouped matmul) runs unchanged; inside a standard experts call only the routed experts are dequantized,
into a scratch buffer shared across layers (see there). ``torch.nn.utils.parametrize.cached()`` keeps one dequantized
copy of every expert for a block of forwards.

Per-expert bias compensation of the expert output goes into the family's own expert bias when it has one (GPT-OSS
``down_proj_bias [E, out]``); otherwise each expert's packed layer keeps it in its ``bias`` and a forward hook on
the experts module adds ``sum_k top_k_weights[t, k] * bias[top_k_index[t, k]]``, the same as adding the expert's
bias before the routing weight multiply of the standard ``forward(hidden_states, top_k_index, top_k_weights)``.

What was packed is recorded in ``model.config`` (:data:`EXPERTS_ATTR`) so a pre-quantized reload rebuilds it.
"""

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..algorithms import QuantizedWeight
from ..config import BCQuantizationConfig
from ..formats.formats import is_mx
from ..layers.experts import PackedExperts, routed_experts, routing
from ..layers.mxlinear import MXLinear
from ..layers.packed_base import PackedLinearBase
from ..layers.qlinear import QuantLinear
from .discovery import is_fused_expert_weight
from .skeleton import packed_layer


#: ``model.config`` attribute: ``{full parameter name: {"transposed": bool, "hooked_bias": bool}}``.
EXPERTS_ATTR = "optimum_bc_packed_experts"


def fused_expert_params(block: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """3-D parameters (``[experts, ., .]`` fused expert weights) of ``block`` by relative name, with their owning
    module and attribute name; parametrized (already packed) ones included."""
    found: dict[str, tuple[nn.Module, str]] = {}
    for module_name, module in block.named_modules():
        if ".parametrizations." in f".{module_name}.":
            continue
        prefix = f"{module_name}." if module_name else ""
        for attr, p in module.named_parameters(recurse=False):
            if is_fused_expert_weight(module, p):
                found[prefix + attr] = (module, attr)
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                if isinstance(plist[0], PackedExperts):
                    found[prefix + attr] = (module, attr)
    return found


def routes_standard(args: tuple, kwargs: dict) -> bool:
    """Whether an experts module was called as ``forward(hidden_states, top_k_index, top_k_weights)``."""
    return routing(args, kwargs) is not None


def _add_expert_bias(attr: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        routed = routing(args, kwargs)
        packs = getattr(module, "parametrizations", None)
        if routed is None or not isinstance(output, torch.Tensor) or packs is None or attr not in packs:
            return output
        index, weights = routed
        packed = packs[attr][0]
        bias = packed.biases(torch.float32).to(output.device)
        known = index < bias.shape[0]  # some families mark dropped slots with index == num_experts
        picked = bias[index.clamp(max=bias.shape[0] - 1)] * (weights.float() * known).unsqueeze(-1)
        return output + picked.sum(1).to(output.dtype)

    return hook


def install(
    module: nn.Module, attr: str, layers: list[PackedLinearBase], transposed: bool, hooked_bias: bool
) -> PackedExperts:
    """Replace the 3-D parameter ``module.<attr>`` by a :class:`PackedExperts` parametrization of ``layers``."""
    old = module._parameters.pop(attr)
    placeholder = nn.Parameter(torch.empty(0, dtype=old.dtype, device=old.device), requires_grad=False)
    module.register_parameter(attr, placeholder)
    packed = PackedExperts(layers, transposed, attr)
    parametrize.register_parametrization(module, attr, packed, unsafe=True)
    experts = len(layers)
    module.register_forward_pre_hook(
        lambda m, args, kwargs: packed.begin_forward(routed_experts(args, kwargs, experts)), with_kwargs=True
    )
    module.register_forward_hook(lambda m, args, out: packed.end_forward())
    if hooked_bias:
        module.register_forward_hook(_add_expert_bias(attr), with_kwargs=True)
    return packed


def pack(
    weights: list[QuantizedWeight], config: BCQuantizationConfig, biases: list[torch.Tensor], dtype: torch.dtype
) -> list[PackedLinearBase]:
    """One packed layer per expert (``[out, in]`` codes), each with its bias."""
    return [packed_layer(qw, config, b, dtype) for qw, b in zip(weights, biases, strict=True)]


def skeleton(shape: torch.Size, transposed: bool, config: BCQuantizationConfig, dtype: torch.dtype) -> list:
    """Empty meta-device packed layers for a fused ``shape`` weight, so a checkpoint loads into them by name."""
    experts, a, b = shape
    out_features, in_features = (b, a) if transposed else (a, b)
    if is_mx(config.format):
        return [MXLinear(in_features, out_features, config.format, dtype=dtype, device="meta") for _ in range(experts)]
    return [
        QuantLinear(in_features, out_features, config.bits, config.group_size, dtype=dtype, device="meta")
        for _ in range(experts)
    ]


def swap_in_skeletons(model: nn.Module, config: BCQuantizationConfig, dtype: torch.dtype | None) -> None:
    """Pre-quantized reload: rebuild the packed experts recorded in ``model.config`` on the meta device."""
    for name, info in (getattr(model.config, EXPERTS_ATTR, None) or {}).items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        param = owner._parameters.get(attr)
        if param is None or param.dim() != 3:
            raise ValueError(
                f"the checkpoint records packed experts {name!r}, but the model has no 3-D parameter there; was it "
                "saved with another transformers version? Fix: reload with the version that saved it"
            )
        layers = skeleton(param.shape, info["transposed"], config, dtype or param.dtype)
        install(owner, attr, layers, info["transposed"], info["hooked_bias"])


def packed_expert_modules(model: nn.Module) -> dict[str, PackedExperts]:
    """Every :class:`PackedExperts` of ``model`` by the full name of the weight it replaces."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                if isinstance(plist[0], PackedExperts):
                    found[f"{name}.{attr}" if name else attr] = plist[0]
    return found


def dequantize_experts(model: nn.Module) -> None:
    """Turn every packed expert weight back into a float 3-D parameter (its exact dequantization), in place.

    Refused (before anything changes) when an expert holds a compensation bias that only the forward hook adds:
    the float model has no slot for it, so its logits would change.
    """
    packed = packed_expert_modules(model)
    hooked = [
        name
        for name, p in packed.items()
        if (getattr(model.config, EXPERTS_ATTR, None) or {}).get(name, {}).get("hooked_bias")
        and any(bool(layer.bias.detach().abs().max() > 0) for layer in p.packed)
    ]
    if hooked:
        raise ValueError(
            f"{hooked[0]} holds per-expert compensation biases that its float experts module has no parameter for, "
            "so a dequantized model would lose them. Fix: keep the quantized model, or quantize with "
            "bias_compensation=False (or for a family with expert biases, e.g. GPT-OSS, they fold exactly)."
        )
    for name in packed:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
        getattr(owner, attr).requires_grad_(False)
    if hasattr(model.config, EXPERTS_ATTR):
        delattr(model.config, EXPERTS_ATTR)
