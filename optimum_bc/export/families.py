"""Which stock transformers class an exported checkpoint names, so that every compensation bias has a place.

A stock class builds a biased Linear only where its config allows one (LLaMA: ``attention_bias`` covers q/k/v/o,
``mlp_bias`` gate/up/down; Qwen2: q/k/v only; Mistral: none; OPT: all). :func:`plan_family` turns on the bias flags
of the model's own class, or, where the class has none (Qwen2, Mistral), writes the checkpoint under the exactly
equivalent ``LlamaForCausalLM`` config when one exists (no sliding window; same head_dim, RoPE, norms, ties). The
original ``model_type`` is recorded by the caller. Biases that still have no place are listed with their cost so the
export can warn about them; none is dropped silently.
"""

import dataclasses
from typing import Any

import torch
from torch import nn


#: model_type -> bias flags of its stock config, keyed by the module-name prefix they cover.
BIAS_FLAGS: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": (("self_attn.", "attention_bias"), ("mlp.", "mlp_bias")),
    "opt": (("", "enable_bias"),),
}
#: Families whose blocks are LLaMA's up to the options checked in :func:`_llama_equivalent`.
_LLAMA_LIKE = ("mistral", "qwen2")
_LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "dtype",
)


@dataclasses.dataclass
class FamilyPlan:
    """The config.json (without ``quantization_config``) to write, and the biases it cannot hold.

    ``biased``: every Linear of the stock class that has a bias (the export writes one for each, zeros where the
    model has none). ``dropped`` maps a Linear's full name to the cost of losing its bias: bias norm / output norm
    on a unit-Gaussian probe.
    """

    config: dict[str, Any]
    biased: set[str]
    dropped: dict[str, float]
    reason: str = ""  # why the dropped biases have no stock place

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def _llama_equivalent(config: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """A LLaMA config computing exactly what ``config`` (Mistral / Qwen2) computes, or None and the reason."""
    if config.get("sliding_window") is not None and (
        config.get("model_type") == "mistral" or config.get("use_sliding_window")
    ):
        return None, f"it uses a sliding window ({config['sliding_window']}), which LlamaForCausalLM has no option for"
    layer_types = config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        return None, f"its layer_types {sorted(set(layer_types))} include non-full attention"
    from transformers import LlamaConfig

    fields = {k: config[k] for k in _LLAMA_KEYS if k in config}
    fields["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    llama = LlamaConfig(**fields).to_dict()
    llama["architectures"] = ["LlamaForCausalLM"]
    return llama, ""


def _with_bias_flags(config: dict[str, Any], needs_bias: dict[str, bool], blocks: str) -> dict[str, Any]:
    """``config`` with each bias flag of its family turned on where a Linear it covers needs a bias."""
    out = dict(config)
    for prefix, flag in BIAS_FLAGS.get(config["model_type"], ()):
        if any(needed and _block_relative(name, blocks).startswith(prefix) for name, needed in needs_bias.items()):
            out[flag] = True
    return out


def _block_relative(name: str, blocks: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``."""
    rest = name.removeprefix(blocks + ".")
    return rest.split(".", 1)[1] if "." in rest else rest


def _biased_slots(config: dict[str, Any]) -> set[str]:
    """Names of the Linears that have a bias in the stock class of ``config`` (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config["model_type"]
    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    stock = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(stock)
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}


def bias_cost(layer: nn.Module, probe_rows: int = 16) -> float:
    """Relative output error of dropping ``layer.bias``: ||b|| / ||W x + b|| over unit-Gaussian inputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = layer.dequantize_weight(torch.float32).cpu()
        x = torch.randn(probe_rows, weight.shape[1], generator=generator)
        bias = layer.bias.detach().float().cpu()
        out = x @ weight.T + bias
        return float(bias.norm() * probe_rows**0.5 / out.norm().clamp_min(1e-12))


def plan_family(config: dict[str, Any], layers: dict[str, nn.Module], blocks: str) -> FamilyPlan:
    """The stock config to export under, choosing the one that carries the most biases (own class first).

    Args:
        config: the model's config dict (``model.config.to_dict()`` without ``quantization_config``).
        layers: full name -> packed layer (a layer needs a bias where its bias is not all zero).
        blocks: dotted path of the decoder blocks (from the architecture table).
    """
    needs_bias = {name: bool(layer.bias.detach().abs().max() > 0) for name, layer in layers.items()}
    candidates = [_with_bias_flags(config, needs_bias, blocks)]
    if config["model_type"] in _LLAMA_LIKE:
        llama, _ = _llama_equivalent(config)
        if llama is not None:
            candidates.append(_with_bias_flags(llama, needs_bias, blocks))
    best: FamilyPlan | None = None
    for candidate in candidates:
        slots = _biased_slots(candidate)
        missing = [n for n, needed in needs_bias.items() if needed and n not in slots]
        if best is None or len(missing) < len(best.dropped):
            best = FamilyPlan(candidate, slots, dict.fromkeys(missing, 0.0))
    assert best is not None
    best.dropped = {n: bias_cost(layers[n]) for n in best.dropped}
    if best.dropped:
        best.reason = why_not_llama(config)
    return best


def why_not_llama(config: dict[str, Any]) -> str:
    """Why a Mistral / Qwen2 config has no exactly equivalent LLaMA config ("" when it has one)."""
    if config.get("model_type") not in _LLAMA_LIKE:
        return f"model_type {config.get('model_type')!r} has no bias flag for these Linears"
    return "no exactly equivalent LlamaForCausalLM config: " + _llama_equivalent(config)[1]
